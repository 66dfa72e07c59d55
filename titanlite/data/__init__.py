"""Data: BPE tokenizer, corpora as parquet shards, and the BOS-aligned best-fit packing loader."""

from titanlite.data.corpora import prepare_corpus, prepare_tokenizer, resolve_data_dir, resolve_tokenizer_dir
from titanlite.data.loader import PackingLoader, build_loader
from titanlite.data.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, check_vocab

__all__ = [
    "PackingLoader", "SPECIAL_TOKENS", "SPLIT_PATTERN", "Tokenizer", "build_loader", "check_vocab",
    "prepare_corpus", "prepare_tokenizer", "resolve_data_dir", "resolve_tokenizer_dir",
]

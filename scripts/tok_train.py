"""Train the BPE tokenizer on a corpus's training shards (the recipe's scripts/tok_train).

    python -m scripts.tok_train                                   # embedded corpus, vocab 32768
    python -m scripts.tok_train --dataset climbmix --max-chars 2000000000 --doc-cap 10000
    python -m scripts.tok_train --vocab-size 4096 --tokenizer-dir /tmp/tok4k --force

Prepares the corpus first if needed, then writes tokenizer.tiktoken + tokenizer.json + token_bytes.npy and
reports the compression (bytes per token) on the validation shard.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import time
from dataclasses import replace

from titanlite.cli import run_cli
from titanlite.config.sections import DataConfig
from titanlite.data import corpora, shards
from titanlite.logging_utils import init_logger, logger


def parse_args(argv: list[str]) -> argparse.Namespace:
    d = DataConfig()
    p = argparse.ArgumentParser(prog="python -m scripts.tok_train", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default=d.dataset, choices=("embedded", "local", "climbmix", "fineweb_edu"))
    p.add_argument("--local-path", default=d.local_path)
    p.add_argument("--data-dir", default=d.data_dir)
    p.add_argument("--num-shards", type=int, default=d.num_shards)
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, help="total, special tokens included")
    p.add_argument("--max-chars", type=int, default=d.tokenizer_max_chars, help="training characters in total")
    p.add_argument("--doc-cap", type=int, default=d.tokenizer_doc_cap, help="characters kept per document")
    p.add_argument("--tokenizer-dir", default=d.tokenizer_dir, help="'' = <cache>/tokenizer/<dataset>-<vocab>")
    p.add_argument("--force", action="store_true", help="retrain even if the tokenizer folder exists")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    init_logger()
    args = parse_args(argv)
    cfg = replace(DataConfig(), dataset=args.dataset, local_path=args.local_path, data_dir=args.data_dir,
                  num_shards=args.num_shards, vocab_size=args.vocab_size, tokenizer_max_chars=args.max_chars,
                  tokenizer_doc_cap=args.doc_cap, tokenizer_dir=args.tokenizer_dir)
    data_dir = corpora.prepare_corpus(cfg)
    tok_dir = corpora.resolve_tokenizer_dir(cfg)
    if args.force and tok_dir.exists():
        shutil.rmtree(tok_dir)
    start = time.time()
    tokenizer = corpora.prepare_tokenizer(cfg)
    logger.info(f"tokenizer: {tokenizer} ready in {time.time() - start:.1f}s at {tok_dir}")
    val_texts = list(itertools.islice(shards.iter_texts(shards.split_shards(data_dir, "val")), 2000))
    num_bytes = sum(len(t.encode("utf-8")) for t in val_texts)
    num_tokens = sum(len(ids) for ids in tokenizer.encode(val_texts, num_threads=4))
    logger.info(f"tokenizer: {num_bytes / max(num_tokens, 1):.2f} bytes/token on {len(val_texts)} validation documents")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))

"""titanlite's tiktoken tokenizer as Hugging Face tokenizer files (tokenizer.json for PreTrainedTokenizerFast).

Exactness, piece by piece:
- pre-tokenizer: the same split regex (Oniguruma in `tokenizers` reads the possessive quantifiers), then the
  byte-level map (every byte to one printable character, GPT-2's table) without the ByteLevel regex;
- model: BPE over those characters with `ignore_merges` (a piece that is itself a token is that token, as tiktoken
  looks a piece up before merging) and one merge per multi-byte token: the two parts tiktoken's own merge loop
  reaches on the token's bytes with only lower ranks allowed. At every step of encoding, the adjacent pair tiktoken
  merges (the lowest-ranked concatenation, leftmost first) spans bytes that were merged only among themselves, so
  it is exactly that token's recorded merge, and the merge lists order them by the same rank;
- special tokens: added tokens with their ids; `split_special_tokens` makes "<|bos|>" typed in text ordinary text,
  as titanlite's `Tokenizer.encode` treats it; the post-processor prepends <|bos|> as titanlite's loader does to
  every document (`add_special_tokens=False` leaves it out).
"""

from __future__ import annotations

import json
from pathlib import Path

from titanlite.data.tokenizer import Tokenizer

BOS = "<|bos|>"


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, the other 68 bytes (controls,
    space, 0x7f-0xa0, 0xad) for the characters from U+0100 on, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _merge_parts(token: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    """tiktoken's merge loop on `token`'s bytes using only ranks below `max_rank`: the lowest-ranked adjacent
    concatenation merges first, leftmost among equals."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best < 0:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts


def bpe_vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[str]]:
    """(vocab: byte-level string -> id, merges "left right" in rank order) for HF's BPE model."""
    to_char = byte_to_unicode()

    def text(token: bytes) -> str:
        return "".join(to_char[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = _merge_parts(token, ranks, rank)
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not the merge of two lower-ranked tokens: "
                             "these ranks are not a byte-pair encoding")
        merges.append(f"{text(parts[0])} {text(parts[1])}")  # byte-level characters never include a space
    return vocab, merges


def tokenizer_json(tokenizer: Tokenizer) -> dict:
    vocab, merges = bpe_vocab_and_merges(tokenizer.mergeable_ranks)
    bos_id = tokenizer.bos_token_id
    added = [{"id": token_id, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for name, token_id in sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])]
    bos_piece = {"SpecialToken": {"id": BOS, "type_id": 0}}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tokenizer.pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]},
        "post_processor": {"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
            {"type": "TemplateProcessing",
             "single": [bos_piece, {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [bos_piece, {"Sequence": {"id": "A", "type_id": 0}},
                      {"SpecialToken": {"id": BOS, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {BOS: {"id": BOS, "ids": [bos_id], "tokens": [BOS]}}},
        ]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": merges},
    }


def write_hf_tokenizer(tokenizer: Tokenizer, out_dir: Path, model_max_length: int) -> list[str]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json in `out_dir`; returns the file names."""
    out_dir = Path(out_dir)
    (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer_json(tokenizer), ensure_ascii=False),
                                            encoding="utf-8")
    specials = sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        # documents are packed as <|bos|> doc <|bos|> doc ..., so the model ends a document by predicting <|bos|>
        "eos_token": BOS,
        # no pad token in the vocab: padding reuses <|bos|> (masked out), on the left as batched generation needs
        "pad_token": BOS,
        "padding_side": "left",
        "add_bos_token": True,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "additional_special_tokens": [name for name, _ in specials if name != BOS],
        "added_tokens_decoder": {str(token_id): {"content": name, "single_word": False, "lstrip": False,
                                                 "rstrip": False, "normalized": False, "special": True}
                                 for name, token_id in specials},
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
    special_map = {"bos_token": BOS, "eos_token": BOS, "pad_token": BOS,
                   "additional_special_tokens": [name for name, _ in specials if name != BOS]}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n", encoding="utf-8")
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


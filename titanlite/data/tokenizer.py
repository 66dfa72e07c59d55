"""Byte-level BPE tokenizer: trained with rustbpe, served by tiktoken, saved as plain files (no pickle).

Files in a tokenizer folder:
- `tokenizer.tiktoken`: mergeable ranks in tiktoken's text format (base64 token, space, rank per line),
  readable by `tiktoken.load.load_tiktoken_bpe`;
- `tokenizer.json`: split pattern, special tokens with their ids, total vocab size;
- `token_bytes.npy`: int32 byte length of every token id (0 for specials), for bits-per-byte.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from titanlite.errors import UserError
from titanlite.logging_utils import logger
from titanlite.progress import Progress

# GPT-4's split pattern with numbers grouped in 1-2 digits (the recipe measured {1,2} best at 32K vocab).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
# Placed after the merges in this order, so <|bos|> = vocab_size - 9 (32759 at the default 32768).
SPECIAL_TOKENS = (
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
)
RANKS_FILE = "tokenizer.tiktoken"
META_FILE = "tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.npy"
DEFAULT_DOC_CAP = 10_000
DEFAULT_MAX_CHARS = 2_000_000_000


def capped_texts(texts: Iterable[str], doc_cap: int, max_chars: int, progress: Progress | None = None
                 ) -> Iterator[str]:
    """The recipe's training stream: each doc cut to `doc_cap` chars, stop once `max_chars` is exceeded."""
    total = 0
    for text in texts:
        if doc_cap > 0:
            text = text[:doc_cap]
        total += len(text)
        if progress is not None:
            progress.update(len(text))
        yield text
        if total > max_chars:
            return


class Tokenizer:
    """tiktoken-backed BPE with the recipe's special tokens. Build with `train` or `load`."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN,
                 special_tokens: Sequence[str] = SPECIAL_TOKENS):
        import tiktoken

        num_ranks = len(mergeable_ranks)
        if sorted(mergeable_ranks.values()) != list(range(num_ranks)):
            raise UserError("tokenizer ranks are not the contiguous ids 0..N-1: the ranks file is damaged; "
                            "delete the tokenizer folder and retrain it (python -m scripts.tok_train)")
        self.pattern = pattern
        self.mergeable_ranks = mergeable_ranks
        self.special_tokens = {name: num_ranks + i for i, name in enumerate(special_tokens)}
        self._enc = tiktoken.Encoding("titanlite", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                      special_tokens=self.special_tokens)
        self._pools: dict[int, ThreadPoolExecutor] = {}
        self._pool_lock = threading.Lock()

    # ---- training -------------------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, doc_cap: int = DEFAULT_DOC_CAP,
              max_chars: int = DEFAULT_MAX_CHARS, progress: bool = True) -> "Tokenizer":
        """Train on `texts` (each cut to doc_cap chars, at most ~max_chars in total) to `vocab_size` tokens
        in total, special tokens included."""
        import rustbpe

        num_bpe = vocab_size - len(SPECIAL_TOKENS)
        if num_bpe < 256:
            raise UserError(f"vocab_size {vocab_size} is too small: it must be at least "
                            f"{256 + len(SPECIAL_TOKENS)} (256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)")
        # rustbpe reports nothing while it counts: the bar follows the characters fed to it. The merges
        # that follow are fast next to the counting (about a second for 32K merges on 5 MB of text).
        bar = Progress(max_chars if max_chars < DEFAULT_MAX_CHARS else None, "tokenizer: counting", "chars",
                       enabled=None if progress else False)
        bpe = rustbpe.Tokenizer()
        with bar:
            bpe.train_from_iterator(capped_texts(texts, doc_cap, max_chars, bar), num_bpe, pattern=SPLIT_PATTERN)
        ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
        if len(ranks) != num_bpe:
            raise UserError(f"the tokenizer training text is too small for vocab_size {vocab_size}: it only "
                            f"supports {len(ranks)} BPE tokens; lower data.vocab_size or give more text")
        logger.info(f"tokenizer: trained {len(ranks)} BPE tokens + {len(SPECIAL_TOKENS)} specials "
                    f"from {bar.count:,.0f} chars")
        return cls(ranks, bpe.get_pattern())

    # ---- persistence ----------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write the three plain files; the folder appears complete or not at all (temp dir + rename)."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            with open(tmp / RANKS_FILE, "w", encoding="ascii") as f:
                for token, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]):
                    f.write(f"{base64.b64encode(token).decode('ascii')} {rank}\n")
            meta = {"format": "titanlite-tokenizer-v1", "pattern": self.pattern,
                    "special_tokens": self.special_tokens, "vocab_size": self.vocab_size}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            np.save(tmp / TOKEN_BYTES_FILE, self._token_bytes_array(), allow_pickle=False)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; a tokenizer is meant to be shared
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(tmp, directory)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer":
        from tiktoken.load import load_tiktoken_bpe

        directory = Path(directory)
        for name in (RANKS_FILE, META_FILE):
            if not (directory / name).is_file():
                raise UserError(f"no tokenizer at {directory} (missing {name}): train one with "
                                f"`python -m scripts.tok_train` or point data.tokenizer_dir at a tokenizer folder")
        try:
            meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
            ranks = load_tiktoken_bpe(str(directory / RANKS_FILE))
            specials = sorted(meta["special_tokens"].items(), key=lambda kv: kv[1])
            tok = cls(ranks, meta["pattern"], [name for name, _ in specials])
        except UserError:
            raise
        except Exception as exc:  # damaged or foreign files: one clear line, not a traceback
            raise UserError(f"cannot read the tokenizer at {directory} ({type(exc).__name__}: {exc}); "
                            f"delete the folder and retrain it with `python -m scripts.tok_train`") from None
        if tok.special_tokens != meta["special_tokens"] or tok.vocab_size != meta.get("vocab_size"):
            raise UserError(f"tokenizer at {directory}: {META_FILE} does not match {RANKS_FILE}; "
                            f"delete the folder and retrain it")
        return tok

    # ---- encoding -------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    @property
    def bos_token_id(self) -> int:
        return self.special_tokens["<|bos|>"]

    def encode_special(self, name: str) -> int:
        if name not in self.special_tokens:
            raise UserError(f"unknown special token {name!r}; known: {', '.join(self.special_tokens)}")
        return self.special_tokens[name]

    def _prefix(self, prepend: int | str | None) -> list[int]:
        if prepend is None:
            return []
        return [self.encode_special(prepend) if isinstance(prepend, str) else int(prepend)]

    def _executor(self, num_threads: int) -> ThreadPoolExecutor:
        # One long-lived pool: tiktoken's own batch call builds a new pool per call, which costs more
        # than encoding a 128-doc batch of short documents.
        with self._pool_lock:
            if num_threads not in self._pools:
                self._pools[num_threads] = ThreadPoolExecutor(num_threads, thread_name_prefix="titanlite-tok")
            return self._pools[num_threads]

    def encode(self, text: str | list[str], prepend: int | str | None = None, num_threads: int = 4
               ) -> list[int] | list[list[int]]:
        """Plain text -> ids. Special-token text such as "<|bos|>" in the input is encoded as ordinary text."""
        prefix = self._prefix(prepend)
        if isinstance(text, str):
            return prefix + self._enc.encode_ordinary(text)
        if num_threads > 1 and len(text) > 1:
            encoded = list(self._executor(num_threads).map(self._enc.encode_ordinary, text))
        else:
            encoded = [self._enc.encode_ordinary(t) for t in text]
        return [prefix + ids for ids in encoded] if prefix else encoded

    def _encode_array(self, text: str) -> np.ndarray:
        # allowed_special=set() + disallowed_special=() is exactly ordinary encoding, but returns the
        # Rust buffer as a numpy array without building a Python int per token (about 2x faster).
        return self._enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())

    def encode_arrays(self, texts: Sequence[str], prepend: int | None = None, num_threads: int = 1
                      ) -> list[np.ndarray]:
        """Fast path for the loader: one int32 array per text, `prepend` (a token id) first."""
        if num_threads > 1 and len(texts) > 1:
            raw = list(self._executor(num_threads).map(self._encode_array, texts))
        else:
            raw = [self._encode_array(t) for t in texts]
        offset = 0 if prepend is None else 1
        out = []
        for ids in raw:
            arr = np.empty(len(ids) + offset, dtype=np.int32)
            if offset:
                arr[0] = prepend
            arr[offset:] = ids
            out.append(arr)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._enc.decode(list(ids))

    def decode_single_token_bytes(self, token_id: int) -> bytes:
        return self._enc.decode_single_token_bytes(token_id)

    def _token_bytes_array(self) -> np.ndarray:
        lengths = np.zeros(self.vocab_size, dtype=np.int32)
        for token, rank in self.mergeable_ranks.items():
            lengths[rank] = len(token)
        return lengths  # special tokens stay 0: they are not text and must not count in bits-per-byte

    def fingerprint(self) -> str:
        """sha256 (hex) of the mergeable ranks and the special tokens: equal exactly when two tokenizers give
        every id the same bytes, so a checkpoint can refuse a tokenizer that would make its ids mean other text."""
        digest = hashlib.sha256()
        for token, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]):
            digest.update(b"%d:%d:" % (rank, len(token)) + token)
        for name, token_id in sorted(self.special_tokens.items(), key=lambda kv: kv[1]):
            digest.update(b"special:%d:" % token_id + name.encode("utf-8") + b"\0")
        return digest.hexdigest()

    def token_bytes(self) -> torch.Tensor:
        """int32 (vocab_size,): raw byte length of each token, 0 for special tokens."""
        return torch.from_numpy(self._token_bytes_array())

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token_id})"


def check_vocab(tokenizer: Tokenizer, expected: int, where: str = "data.vocab_size") -> None:
    """The model's embedding must match the tokenizer exactly: a mismatch would silently misread ids."""
    if tokenizer.vocab_size != expected:
        raise UserError(f"tokenizer vocab size {tokenizer.vocab_size} does not match {where}={expected}; "
                        f"set {where}={tokenizer.vocab_size} or retrain the tokenizer with that vocab size")

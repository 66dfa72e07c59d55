"""BOS-aligned best-fit packing loader with exact resume (recipe §5.2-5.3).

Pipeline per rank: DocStream (this rank's row groups, tokenised 128 docs at a time, BOS first)
-> BestFitPacker (a buffer of ~1000 docs) -> rows of T+1 tokens -> inputs/targets (B, T) int64.

Exact resume: the packed batches depend on the doc buffer, so the state holds the stream position of the
next unread document *and* the identities (file, row group, doc) of the documents in the buffer, in buffer
order. Loading re-reads and re-tokenises those documents, which rebuilds the buffer bit for bit. The state
is a snapshot taken right after each batch was packed and travels with the batch through the prefetch
queue, so `state_dict()` always describes the batches already handed out, never the ones prefetched.
"""

from __future__ import annotations

import bisect
import hashlib
import queue
import threading
import weakref
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from titanlite.data import shards
from titanlite.data.tokenizer import Tokenizer
from titanlite.errors import UserError
from titanlite.logging_utils import logger

TOKENIZER_BATCH_DOCS = 128  # documents per refill (one tokenizer call)
STATE_VERSION = 1


class DocStream:
    """This rank's documents in a fixed order: files in name order; within a file, row groups
    rank, rank+W, ...; within a row group, documents in row order. Infinite: wraps around, counting epochs."""

    def __init__(self, paths: list[Path], rank: int, world_size: int, tokenizer: Tokenizer, threads: int,
                 split: str):
        self.paths = paths
        self.rank, self.world_size = rank, world_size
        self.tokenizer, self.threads = tokenizer, threads
        self.bos = tokenizer.bos_token_id
        files = [shards.open_shard(p) for p in paths]  # reads every footer: bad shards fail here, clearly
        self.row_groups = [pf.num_row_groups for pf in files]
        # documents this rank reads per epoch (row groups rank, rank+W, ... of every file)
        self.docs_per_epoch = sum(pf.metadata.row_group(rg).num_rows
                                  for pf in files for rg in range(rank, pf.num_row_groups, world_size))
        if not any(n > rank for n in self.row_groups):
            raise UserError(f"the {split} split ({len(paths)} shard(s), at most {max(self.row_groups)} row groups "
                            f"per shard) has no row group for rank {rank} of {world_size}: use fewer ranks or "
                            f"shards with more row groups")
        self.epoch, self.file, self.rg, self.doc = 1, 0, rank, 0
        self._cached_key: tuple[int, int] | None = None
        self._cached_texts: list[str] = []
        self._open_file: tuple[int, Any] | None = None

    def position(self) -> tuple[int, int, int, int]:
        return self.epoch, self.file, self.rg, self.doc

    def seek(self, epoch: int, file: int, rg: int, doc: int) -> None:
        self.epoch, self.file, self.rg, self.doc = epoch, file, rg, doc

    def _texts(self, file: int, rg: int) -> list[str]:
        if self._cached_key != (file, rg):
            if self._open_file is None or self._open_file[0] != file:
                self._open_file = (file, shards.open_shard(self.paths[file]))
            self._cached_texts = shards.read_row_group(self._open_file[1], rg, self.paths[file])
            self._cached_key = (file, rg)
        return self._cached_texts

    def _advance_to_readable(self) -> None:
        while self.file >= len(self.paths) or self.rg >= self.row_groups[self.file]:
            if self.file >= len(self.paths):
                self.file, self.epoch = 0, self.epoch + 1
            else:
                self.file += 1
            self.rg, self.doc = self.rank, 0

    def next_batch(self) -> tuple[list[np.ndarray], list[tuple[int, int, int]]]:
        """Up to 128 tokenised documents (BOS first) and their identities."""
        while True:
            self._advance_to_readable()
            texts = self._texts(self.file, self.rg)
            if self.doc < len(texts):
                break
            self.rg, self.doc = self.rg + self.world_size, 0
        chunk = texts[self.doc:self.doc + TOKENIZER_BATCH_DOCS]
        idents = [(self.file, self.rg, self.doc + j) for j in range(len(chunk))]
        self.doc += len(chunk)
        return self.tokenizer.encode_arrays([t or "" for t in chunk], self.bos, self.threads), idents

    def read_documents(self, idents: list[tuple[int, int, int]]) -> list[np.ndarray]:
        """Tokenised documents by identity (to rebuild the buffer when resuming)."""
        by_row_group: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, (file, rg, _) in enumerate(idents):
            by_row_group[(file, rg)].append(i)
        out: list[np.ndarray | None] = [None] * len(idents)
        for (file, rg), positions in sorted(by_row_group.items()):
            texts = self._texts(file, rg)
            arrays = self.tokenizer.encode_arrays([texts[idents[i][2]] or "" for i in positions], self.bos,
                                                  self.threads)
            for i, arr in zip(positions, arrays):
                out[i] = arr
        return out  # type: ignore[return-value]


class BestFitPacker:
    """The doc buffer. Kept sorted by (length, arrival) so that both recipe picks are a binary search:
    the largest doc that fits (first arrival on ties), else the shortest doc (first arrival on ties)."""

    def __init__(self):
        self._keys: list[tuple[int, int]] = []  # (length, arrival number), sorted
        self._docs: dict[int, tuple[np.ndarray, tuple[int, int, int]]] = {}  # arrival number -> doc (in order)
        self._arrivals = 0

    def __len__(self) -> int:
        return len(self._docs)

    def add(self, tokens: np.ndarray, ident: tuple[int, int, int]) -> None:
        bisect.insort(self._keys, (len(tokens), self._arrivals))
        self._docs[self._arrivals] = (tokens, ident)
        self._arrivals += 1

    def pop(self, space: int) -> tuple[np.ndarray, bool]:
        """The doc to place in `space` tokens, and whether it fits whole (else the caller crops it)."""
        i = bisect.bisect_right(self._keys, (space, float("inf")))
        if i > 0:
            length = self._keys[i - 1][0]
            key = self._keys.pop(bisect.bisect_left(self._keys, (length, -1)))
            fits = True
        else:
            key = self._keys.pop(0)
            fits = False
        tokens, _ = self._docs.pop(key[1])
        return tokens, fits

    def identities(self) -> list[tuple[int, int, int]]:
        return [ident for _, ident in self._docs.values()]

    def clear(self) -> None:
        self._keys.clear()
        self._docs.clear()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class PackingLoader:
    """Infinite iterator of (inputs, targets), each (B, T) int64 on `device`. Stateful and exact."""

    def __init__(self, data_dir: Path, split: str, tokenizer: Tokenizer, batch_size: int, seq_len: int,
                 rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu", buffer_docs: int = 1000,
                 threads: int = 4, prefetch: int = 2):
        if batch_size < 1 or seq_len < 1 or buffer_docs < 1:
            raise ValueError("batch_size, seq_len and buffer_docs must be positive")
        self.split = split
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.prefetch = prefetch
        self.paths = shards.split_shards(Path(data_dir), split)
        self.files_digest = hashlib.sha256("\n".join(p.name for p in self.paths).encode()).hexdigest()[:16]
        self.stream = DocStream(self.paths, rank, world_size, tokenizer, max(1, threads), split)
        self.packer = BestFitPacker()
        # A buffer larger than this rank's share of the split would hold several copies of the same documents
        # (small val shards, the embedded corpus); cap it so every buffered document is distinct.
        self.buffer_docs = max(1, min(buffer_docs, self.stream.docs_per_epoch))
        self.tokens_kept = 0
        self.tokens_read = 0
        self.batches = 0
        self._pin = self.device.type == "cuda" and torch.cuda.is_available()
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._restore_pending = False
        self._initial_state = self._snapshot()
        self._consumed = self._initial_state

    # ---- packing (producer side) ------------------------------------------------------------------------
    def _snapshot(self) -> dict:
        epoch, file, rg, doc = self.stream.position()
        return {
            "version": STATE_VERSION, "split": self.split, "rank": self.rank, "world_size": self.world_size,
            "files": self.files_digest, "seq_len": self.seq_len, "batch_size": self.batch_size,
            "buffer_docs": self.buffer_docs, "epoch": epoch, "file": file, "row_group": rg, "doc": doc,
            "buffer": [x for ident in self.packer.identities() for x in ident],  # flat (file, rg, doc) triples
            "tokens_kept": self.tokens_kept, "tokens_read": self.tokens_read, "batches": self.batches,
        }

    def _pack_rows(self) -> np.ndarray:
        capacity = self.seq_len + 1
        rows = np.empty((self.batch_size, capacity), dtype=np.int64)
        packer, stream = self.packer, self.stream
        for row in rows:
            pos = 0
            while pos < capacity:
                while len(packer) < self.buffer_docs:
                    arrays, idents = stream.next_batch()
                    for tokens, ident in zip(arrays, idents):
                        packer.add(tokens, ident)
                space = capacity - pos
                tokens, fits = packer.pop(space)
                n = len(tokens) if fits else space  # crop: keep the first `space` tokens, drop the rest
                row[pos:pos + n] = tokens[:n]
                pos += n
                self.tokens_read += len(tokens)
        self.tokens_kept += rows.size
        self.batches += 1
        return rows

    def _produce(self) -> tuple[torch.Tensor, torch.Tensor, dict]:
        rows = self._pack_rows()
        state = self._snapshot()
        T = self.seq_len
        if self._pin:
            inputs = torch.empty((self.batch_size, T), dtype=torch.int64, pin_memory=True)
            targets = torch.empty((self.batch_size, T), dtype=torch.int64, pin_memory=True)
            inputs.numpy()[:] = rows[:, :T]
            targets.numpy()[:] = rows[:, 1:]
        else:
            inputs = torch.from_numpy(np.ascontiguousarray(rows[:, :T]))
            targets = torch.from_numpy(np.ascontiguousarray(rows[:, 1:]))
        return inputs, targets, state

    def _stop_producer(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            if self.batches != self._consumed["batches"]:
                self._restore_pending = True  # packed ahead but never handed out: rewind before going on
        self._thread, self._queue = None, None
        self._stop = threading.Event()

    # ---- consumer side ------------------------------------------------------------------------------------
    def __iter__(self) -> "PackingLoader":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._restore_pending:
            self.load_state_dict(self._consumed)
        if self.prefetch <= 0:
            inputs, targets, state = self._produce()
        else:
            if self._thread is None:
                self._queue = queue.Queue(maxsize=self.prefetch)
                self._thread = threading.Thread(target=_producer_main,
                                                args=(weakref.ref(self), self._queue, self._stop),
                                                name=f"titanlite-loader-{self.split}-r{self.rank}", daemon=True)
                self._thread.start()
            item = self._queue.get()
            if isinstance(item, _Failure):
                self._thread.join()
                self._thread, self._queue = None, None
                self._restore_pending = True  # the failed batch may have left the buffer half used
                raise item.exc
            inputs, targets, state = item
        self._consumed = state
        if self.device.type != "cpu":
            inputs = inputs.to(self.device, non_blocking=self._pin)
            targets = targets.to(self.device, non_blocking=self._pin)
        return inputs, targets

    def close(self) -> None:
        self._stop_producer()

    def __del__(self):
        try:
            self._stop.set()
        except Exception:
            pass

    # ---- Stateful -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """State after the last batch handed out (prefetched batches are not counted)."""
        state = dict(self._consumed)
        state["buffer"] = list(state["buffer"])
        return state

    def load_state_dict(self, state: dict) -> None:
        self._stop_producer()
        self._restore_pending = False
        self.packer.clear()
        if state.get("version") != STATE_VERSION or state.get("split") != self.split:
            raise UserError(f"data loader state (version {state.get('version')}, split {state.get('split')}) does "
                            f"not fit this {self.split} loader (version {STATE_VERSION}); resume with the same data "
                            f"settings or start a fresh run")
        self.tokens_kept, self.tokens_read = state["tokens_kept"], state["tokens_read"]
        self.batches = state["batches"]
        same_layout = (state["world_size"] == self.world_size and state["rank"] == self.rank
                       and state["files"] == self.files_digest)
        if same_layout:
            self.stream.seek(state["epoch"], state["file"], state["row_group"], state["doc"])
            flat = state["buffer"]
            idents = [tuple(int(x) for x in flat[i:i + 3]) for i in range(0, len(flat), 3)]
            for tokens, ident in zip(self.stream.read_documents(idents), idents):
                self.packer.add(tokens, ident)
            if (state["seq_len"], state["batch_size"], state["buffer_docs"]) != (
                    self.seq_len, self.batch_size, self.buffer_docs):
                logger.warning("warning: data loader resumed with a different batch size, sequence length or "
                               "buffer size: the data order continues, but not as the original run would have")
        else:
            # Another world size or another set of shards: positions of other ranks do not map onto ours.
            # Continue at the same epoch and shard with an empty buffer (approximate, like the reference).
            file = min(int(state["file"]), len(self.paths) - 1)
            logger.warning(f"warning: data loader state was saved with world size {state['world_size']} or other "
                           f"shards; resuming approximately at epoch {state['epoch']}, shard {file}")
            self.stream.seek(state["epoch"], file, self.rank, 0)
        self._consumed = self._snapshot()

    def reset(self) -> None:
        """Back to the very first batch (the validation loader does this before every evaluation)."""
        self.load_state_dict(self._initial_state)

    # ---- reporting -------------------------------------------------------------------------------------------
    def position(self) -> dict:
        """Where the last handed-out batch came from: epoch, shard index/name, row group."""
        s = self._consumed
        file = min(s["file"], len(self.paths) - 1)
        return {"epoch": s["epoch"], "shard": s["file"], "shard_name": self.paths[file].name,
                "row_group": s["row_group"]}

    def stats(self) -> dict:
        s = self._consumed
        kept, read = s["tokens_kept"], s["tokens_read"]
        return {"tokens_kept": kept, "tokens_read": read, "utilisation": kept / read if read else 0.0,
                "batches": s["batches"]}


def _producer_main(loader_ref: "weakref.ref[PackingLoader]", out: queue.Queue, stop: threading.Event) -> None:
    """Background packing. Holds the loader only while packing, so a dropped loader (e.g. a val loader
    rebuilt at every evaluation) is garbage collected and its thread ends instead of leaking."""
    try:
        while not stop.is_set():
            loader = loader_ref()
            if loader is None:
                return
            item = loader._produce()
            del loader
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
    except BaseException as exc:  # handed to the consumer, which raises it in the training thread
        while not stop.is_set():
            try:
                out.put(_Failure(exc), timeout=0.1)
                return
            except queue.Full:
                continue


def build_loader(data_dir: Path, split: str, tokenizer: Tokenizer, batch_size: int, seq_len: int, rank: int = 0,
                 world_size: int = 1, device: str | torch.device = "cpu", buffer_docs: int = 1000,
                 threads: int = 4, prefetch: int = 2) -> PackingLoader:
    """Train or val loader for one rank. `prefetch` batches are packed ahead in a background thread
    (0: pack synchronously in the caller)."""
    return PackingLoader(data_dir, split, tokenizer, batch_size, seq_len, rank, world_size, device, buffer_docs,
                         threads, prefetch)

"""BOS-aligned best-fit packing loader with exact resume (docs/recipe.md §5.2-5.3).

Pipeline: ShardIndex (a split's footers, once per process) -> DocStream (stream k of S: the split's row groups,
repeated forever, dealt out round-robin; tokenised 128 docs at a time, BOS first) -> RowStream (a best-fit buffer
of ~1000 docs packing rows of T+1 tokens) -> PackingLoader (a batch = rows of one or more RowStreams stacked)
-> inputs/targets (B, T) int64.

A RowStream's rows do not depend on how many of them a batch takes, so the trainer gives every row of the global
batch its own stream (data/streams.py) and any split of those rows into processes and micro-batches reads the
same data. The validation loader is one stream per rank, `batch_size` rows at a time.

Exact resume: the packed rows depend on the doc buffer, so a stream's state holds its position (items taken,
next document within the item) *and* the identities (file, row group, doc) of the documents in the buffer, in
buffer order. Loading re-reads and re-tokenises those documents, which rebuilds the buffer bit for bit. The state
is a snapshot taken right after each batch was packed and travels with the batch through the prefetch queue, so
`state_dict()` always describes the batches already handed out, never the ones prefetched.

Why a thread and a queue of our own and not torchdata.nodes (Prefetcher, PinMemory): a version on torchdata's
Prefetcher (commit 776c45a) kept every resume test exact but measured no faster (interleaved bench_loader pairs at
prefetch 2: 0.94x the tokens/s, slower in 10 of 16 pairs, contended 2-core machine), needed torchdata's private
thread handles to wait for the packing thread before a restore, and re-raises a thread's exception as a new one
with the traceback in its message (a user error would no longer be one line).
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import queue
import threading
import weakref
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from titanlite.data import shards
from titanlite.data.tokenizer import Tokenizer
from titanlite.errors import UserError
from titanlite.logging_utils import logger

TOKENIZER_BATCH_DOCS = 128  # documents per refill (one tokenizer call)
STATE_VERSION = 2  # 2: per-stream states (item, doc) of streams dealt row groups round-robin
SHARED_ROW_GROUPS = 8  # decoded row groups kept per process (streams reading the same ones share them)


class ShardIndex:
    """One split's shards: their footers, read once per process and shared by all its streams.

    The split is a sequence of row groups (file order, then row-group order). Decoded row groups are kept in a
    small shared cache: when a split has fewer row groups than streams, every stream reads every row group.
    """

    def __init__(self, paths: Sequence[Path], split: str):
        self.paths, self.split = list(paths), split
        self.names_digest = hashlib.sha256("\n".join(p.name for p in self.paths).encode()).hexdigest()[:16]
        files = [shards.open_shard(p) for p in self.paths]  # reads every footer: bad shards fail here, clearly
        self.units: list[tuple[int, int]] = []  # (file, row group)
        self.unit_docs: list[int] = []
        self.text_bytes = 0  # uncompressed size of the text column, for the epoch estimate (data/epochs.py)
        for f, pf in enumerate(files):
            column = pf.schema_arrow.names.index(shards.TEXT_COLUMN)
            for rg in range(pf.num_row_groups):
                meta = pf.metadata.row_group(rg)
                self.units.append((f, rg))
                self.unit_docs.append(meta.num_rows)
                # plain-encoded strings carry a 4-byte length each
                self.text_bytes += max(0, meta.column(column).total_uncompressed_size - 4 * meta.num_rows)
        self.doc_starts = list(itertools.accumulate(self.unit_docs, initial=0))  # first global doc of each unit
        self.num_docs = self.doc_starts[-1]
        self._cache: OrderedDict[tuple[int, int], tuple[list, shards.Skipped]] = OrderedDict()
        self._lock = threading.Lock()
        self._warned = False

    @classmethod
    def of(cls, data_dir: Path, split: str) -> "ShardIndex":
        return cls(shards.split_shards(Path(data_dir), split), split)

    def row_group(self, file: int, rg: int) -> tuple[list, shards.Skipped]:
        """Texts of a row group (None where a row is null or not UTF-8) and what it holds that is unusable."""
        key = (file, rg)
        with self._lock:  # streams of several loaders (threads) share the cache; decoding takes milliseconds
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            skipped = shards.Skipped()
            path = self.paths[file]
            texts = shards.read_row_group(shards.open_shard(path), rg, path, skipped)
            self._cache[key] = (texts, skipped)
            while len(self._cache) > SHARED_ROW_GROUPS:
                self._cache.popitem(last=False)
            return texts, skipped

    def locate(self, doc: int) -> tuple[int, int, int]:
        """(file, row group, row) of global document `doc`."""
        unit = bisect.bisect_right(self.doc_starts, doc) - 1
        file, rg = self.units[unit]
        return file, rg, doc - self.doc_starts[unit]

    def note_skipped(self, file: int, rg: int, skipped: shards.Skipped) -> None:
        """One line per split and process, the first time a stream skips documents."""
        with self._lock:
            if self._warned:
                return
            self._warned = True
        logger.warning(f"warning: the {self.split} split has documents that are null, empty or not valid UTF-8; "
                       f"they are skipped and counted in the loader's stats (first met in {self.paths[file].name} "
                       f"row group {rg}: {skipped.describe()})")


class DocStream:
    """Stream `stream` of `num_streams`: the split's items repeated forever (epochs) and dealt out round-robin,
    so stream k takes items k, k+S, k+2S, ... An item is a row group, or a single document when the split has
    fewer row groups than there are streams (a small corpus: every stream still gets documents).

    Position: `item` = items taken so far, `doc` = the next row within the current item.
    """

    def __init__(self, index: ShardIndex, stream: int, num_streams: int, tokenizer: Tokenizer, threads: int = 1):
        if not 0 <= stream < num_streams:
            raise ValueError(f"stream {stream} is not one of {num_streams} streams")
        self.index, self.stream, self.num_streams = index, stream, num_streams
        self.tokenizer, self.threads = tokenizer, max(1, threads)
        self.bos = tokenizer.bos_token_id
        self.by_doc = len(index.units) < num_streams
        self.num_items = index.num_docs if self.by_doc else len(index.units)
        self.item, self.doc = 0, 0
        self.skipped = 0  # unusable documents passed over (each pass counts)
        self._cached: tuple[tuple[int, int], list] | None = None

    @property
    def docs_per_epoch(self) -> int:
        """Documents this stream reads per pass over the split, on average."""
        return max(1, self.index.num_docs // self.num_streams)

    def epoch_of(self, item: int) -> int:
        return (self.stream + item * self.num_streams) // self.num_items + 1

    @property
    def epoch(self) -> int:
        return self.epoch_of(self.item)

    def item_at(self, item: int) -> tuple[int, int, int, int]:
        """(file, row group, first row, rows) of the stream's `item`-th item."""
        unit = (self.stream + item * self.num_streams) % self.num_items
        if self.by_doc:
            file, rg, row = self.index.locate(unit)
            return file, rg, row, 1
        file, rg = self.index.units[unit]
        return file, rg, 0, self.index.unit_docs[unit]

    def position(self) -> tuple[int, int]:
        return self.item, self.doc

    def seek(self, item: int, doc: int) -> None:
        self.item, self.doc = item, doc

    def _texts(self, file: int, rg: int) -> list:
        if self._cached is None or self._cached[0] != (file, rg):
            texts, skipped = self.index.row_group(file, rg)
            if skipped.total:
                self.index.note_skipped(file, rg, skipped)
            self._cached = ((file, rg), texts)
        return self._cached[1]

    def next_batch(self) -> tuple[list[np.ndarray], list[tuple[int, int, int]]]:
        """Up to 128 tokenised usable documents (BOS first) and their identities (file, row group, row)."""
        texts, idents = [], []
        barren = 0  # items passed without a usable document: a whole cycle of them means there are none
        while len(texts) < TOKENIZER_BATCH_DOCS:
            file, rg, first, rows = self.item_at(self.item)
            if self.doc >= rows:
                self.item, self.doc = self.item + 1, 0
                barren = barren + 1 if not texts else 0
                if barren > self.num_items:
                    raise UserError(f"the {self.index.split} split holds no usable document for data stream "
                                    f"{self.stream} of {self.num_streams} (every one it reads is null, empty or "
                                    f"not valid UTF-8): use a corpus with more usable documents")
                if texts:
                    break  # one item per call at most once documents were found: batches stay row-group sized
                continue
            all_texts = self._texts(file, rg)
            stop = min(rows, self.doc + TOKENIZER_BATCH_DOCS - len(texts))
            for row in range(first + self.doc, first + stop):
                text = all_texts[row]
                if text:
                    texts.append(text)
                    idents.append((file, rg, row))
                else:
                    self.skipped += 1
            self.doc = stop
        return self.tokenizer.encode_arrays(texts, self.bos, self.threads), idents

    def read_documents(self, idents: list[tuple[int, int, int]]) -> list[np.ndarray]:
        """Tokenised documents by identity (to rebuild the buffer when resuming)."""
        by_row_group: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, (file, rg, _) in enumerate(idents):
            by_row_group[(file, rg)].append(i)
        out: list[np.ndarray | None] = [None] * len(idents)
        for (file, rg), positions in sorted(by_row_group.items()):
            texts, _ = self.index.row_group(file, rg)
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

    def identities(self) -> tuple[tuple[int, int, int], ...]:
        return tuple(ident for _, ident in self._docs.values())

    def clear(self) -> None:
        self._keys.clear()
        self._docs.clear()


class RowStream:
    """One DocStream and its best-fit buffer: an endless sequence of rows of seq_len + 1 tokens."""

    def __init__(self, index: ShardIndex, stream: int, num_streams: int, tokenizer: Tokenizer, seq_len: int,
                 buffer_docs: int, threads: int = 1):
        self.stream, self.num_streams, self.seq_len = stream, num_streams, seq_len
        self.docs = DocStream(index, stream, num_streams, tokenizer, threads)
        self.packer = BestFitPacker()
        # A buffer larger than the stream's share of the split would hold several copies of the same documents
        # (small val shards, small corpora); half the share keeps every buffered document distinct and a fresh
        # stream in its first epoch.
        self.buffer_docs = max(1, min(buffer_docs, self.docs.docs_per_epoch // 2))
        self.tokens_kept = self.tokens_read = self.rows = 0

    def pack(self, out: np.ndarray) -> None:
        """Fill `out` (rows x (seq_len + 1)) with the next rows."""
        capacity = self.seq_len + 1
        packer, stream = self.packer, self.docs
        for row in out:
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
        self.tokens_kept += out.size
        self.rows += len(out)

    def snapshot(self) -> dict:
        item, doc = self.docs.position()
        return {"stream": self.stream, "num_streams": self.num_streams, "seq_len": self.seq_len,
                "buffer_docs": self.buffer_docs, "item": item, "doc": doc, "buffer": self.packer.identities(),
                "tokens_kept": self.tokens_kept, "tokens_read": self.tokens_read, "rows": self.rows,
                "skipped": self.docs.skipped}

    @staticmethod
    def portable(snapshot: dict) -> dict:
        """A snapshot as plain JSON-able data (buffer identities flattened)."""
        return dict(snapshot, buffer=[x for ident in snapshot["buffer"] for x in ident])

    def restore(self, state: dict, exact: bool = True) -> None:
        """Continue from `state`; `exact` False (the shards changed): keep the position, start with an empty
        buffer (its document identities would point at other documents)."""
        for key, ours in (("num_streams", self.num_streams), ("seq_len", self.seq_len), ("stream", self.stream)):
            if state.get(key) != ours:
                raise UserError(f"data stream state was saved with {key} {state.get(key)} but this loader has "
                                f"{ours}: resume with the same global batch (training.total_batch_size) and "
                                f"sequence length (model.max_seq_len), or start a fresh run")
        self.packer.clear()
        self.docs.seek(int(state["item"]), int(state["doc"]))
        self.docs.skipped = int(state.get("skipped", 0))
        self.tokens_kept, self.tokens_read, self.rows = state["tokens_kept"], state["tokens_read"], state["rows"]
        if exact:
            flat = state["buffer"]
            idents = [tuple(int(x) for x in flat[i:i + 3]) for i in range(0, len(flat), 3)]
            for tokens, ident in zip(self.docs.read_documents(idents), idents):
                self.packer.add(tokens, ident)
            if state["buffer_docs"] != self.buffer_docs:
                logger.warning("warning: data loader resumed with another buffer size (data.buffer_docs): the data "
                               "order continues, but not as the original run would have")


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class PackingLoader:
    """Infinite iterator of (inputs, targets), each (B, T) int64 on `device`. Stateful and exact.

    A batch stacks the next rows of `streams` (ids among `num_streams`), batch_size / len(streams) rows each.
    """

    def __init__(self, data_dir: Path, split: str, tokenizer: Tokenizer, batch_size: int, seq_len: int,
                 rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu", buffer_docs: int = 1000,
                 threads: int = 4, prefetch: int = 2, streams: Sequence[int] | None = None,
                 num_streams: int | None = None, index: ShardIndex | None = None):
        if batch_size < 1 or seq_len < 1 or buffer_docs < 1:
            raise ValueError("batch_size, seq_len and buffer_docs must be positive")
        if streams is None:
            streams, num_streams = [rank], world_size
        if not streams or batch_size % len(streams):
            raise ValueError(f"batch_size {batch_size} is not a multiple of the {len(streams)} streams")
        self.split = split
        self.batch_size, self.seq_len = batch_size, seq_len
        self.width = batch_size // len(streams)
        self.device = torch.device(device)
        self.prefetch = prefetch
        self.index = index if index is not None else ShardIndex.of(Path(data_dir), split)
        self.paths = self.index.paths
        self.files_digest = self.index.names_digest
        self.num_streams = num_streams
        self.streams = [RowStream(self.index, g, num_streams, tokenizer, seq_len, buffer_docs, max(1, threads))
                        for g in streams]
        self.buffer_docs = self.streams[0].buffer_docs
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
        return {"batches": self.batches, "streams": [s.snapshot() for s in self.streams]}

    def _produce(self) -> tuple[torch.Tensor, torch.Tensor, dict]:
        rows = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
        for i, stream in enumerate(self.streams):
            stream.pack(rows[i * self.width:(i + 1) * self.width])
        self.batches += 1
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
            self._restore(self._consumed)
        if self.prefetch <= 0:
            inputs, targets, state = self._produce()
        else:
            if self._thread is None:
                self._queue = queue.Queue(maxsize=self.prefetch)
                self._thread = threading.Thread(target=_producer_main,
                                                args=(weakref.ref(self), self._queue, self._stop),
                                                name=f"titanlite-loader-{self.split}-s{self.streams[0].stream}",
                                                daemon=True)
                self._thread.start()
            item = self._queue.get()
            if isinstance(item, _Failure):
                self._thread.join()
                self._thread, self._queue = None, None
                self._restore_pending = True  # the failed batch may have left the buffers half used
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
    def stream_states(self) -> dict[int, dict]:
        """Per stream id, its JSON-able state after the last batch handed out (prefetched ones not counted)."""
        return {s["stream"]: RowStream.portable(s) for s in self._consumed["streams"]}

    def load_stream_states(self, states: dict[int, dict], exact: bool = True) -> None:
        """Continue every stream from its state (`exact`: see RowStream.restore)."""
        self._stop_producer()
        self._restore_pending = False
        for stream in self.streams:
            if stream.stream not in states:
                raise UserError(f"data loader state has no data stream {stream.stream}; resume with the same "
                                f"global batch (training.total_batch_size) or start a fresh run")
            stream.restore(states[stream.stream], exact)
        self.batches = max(s.rows for s in self.streams) // self.width
        self._consumed = self._snapshot()

    def _restore(self, snapshot: dict) -> None:
        self.load_stream_states({s["stream"]: RowStream.portable(s) for s in snapshot["streams"]})
        self.batches = snapshot["batches"]
        self._consumed = self._snapshot()

    def state_dict(self) -> dict:
        """State after the last batch handed out (prefetched batches are not counted)."""
        return {"version": STATE_VERSION, "split": self.split, "files": self.files_digest,
                "num_streams": self.num_streams, "seq_len": self.seq_len, "batches": self._consumed["batches"],
                "streams": {str(k): v for k, v in self.stream_states().items()}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION or state.get("split") != self.split:
            raise UserError(f"data loader state (version {state.get('version')}, split {state.get('split')}) does "
                            f"not fit this {self.split} loader (version {STATE_VERSION}); resume with the same data "
                            f"settings or start a fresh run")
        exact = state["files"] == self.files_digest
        if not exact:
            logger.warning(f"warning: the {self.split} shards changed since the data loader state was saved; the "
                           f"streams continue at their saved positions with fresh buffers (approximate)")
        self.load_stream_states({int(k): v for k, v in state["streams"].items()}, exact)
        self.batches = state["batches"]
        self._consumed = self._snapshot()

    def reset(self) -> None:
        """Back to the very first batch (the validation loader does this before every evaluation)."""
        self._restore(self._initial_state)

    # ---- reporting -------------------------------------------------------------------------------------------
    def position(self) -> dict:
        """Where the first stream's last handed-out rows came from: epoch, shard index/name, row group."""
        item = self._consumed["streams"][0]["item"]
        stream = self.streams[0].docs
        file, rg, _, _ = stream.item_at(item)
        return {"epoch": stream.epoch_of(item), "shard": file, "shard_name": self.paths[file].name,
                "row_group": rg}

    def stats(self) -> dict:
        states = self._consumed["streams"]
        kept = sum(s["tokens_kept"] for s in states)
        read = sum(s["tokens_read"] for s in states)
        return {"tokens_kept": kept, "tokens_read": read, "utilisation": kept / read if read else 0.0,
                "batches": self._consumed["batches"], "skipped_docs": sum(s["skipped"] for s in states)}


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
                 threads: int = 4, prefetch: int = 2, streams: Sequence[int] | None = None,
                 num_streams: int | None = None, index: ShardIndex | None = None) -> PackingLoader:
    """Train or val loader: stream `rank` of `world_size` (or the given `streams` of `num_streams`, sharing
    `index`). `prefetch` batches are packed ahead in a background thread (0: pack synchronously)."""
    return PackingLoader(data_dir, split, tokenizer, batch_size, seq_len, rank, world_size, device, buffer_docs,
                         threads, prefetch, streams, num_streams, index)

"""The training data of one rank, independent of how the global batch is split into processes and micro-batches.

Every row of the global batch (total_batch_size / seq_len rows) has its own packing stream: global row g of every
step is the next row of stream g, whatever the layout. Rank r's micro-step m holds rows (r*A + m)*B ... + B - 1
(A micro-steps of B rows), so a rank holds only the streams of its rows and a micro-batch stacks them. Any
device_batch_size and process count that divide the same global batch read the same rows in the same order, so a
checkpoint resumes under any of them; the loss differs only by the order of the float sums.

Why one stream per row and not a few wider ones: a wider stream (w rows a step) would force device_batch_size to
be a multiple of w, and the small batches an OOM sends people to are exactly the ones that matter. The cost of
many streams is bounded: packing and tokenising per token are the same (a stream packs its rows one by one either
way), the footers are read once per process (ShardIndex), and a stream's buffer holds at most its share of the
split. What grows is the documents buffered per rank (rows per rank x data.buffer_docs: 64 x 1000 for d26 on 8
ranks, about 64k documents tokenised at start and on resume, a few seconds, and ~0.3 GB of token ids) and the
checkpoint's buffer identities (3 ints per buffered document).

Checkpoint entry: "layout_rows{R}_seq{T}" (the key's name carries the global batch shape, so a resume can check it
from the checkpoint's metadata before loading anything) and one "row_{g}" JSON state per stream.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from titanlite.data.loader import STATE_VERSION, PackingLoader, ShardIndex, build_loader
from titanlite.errors import UserError
from titanlite.logging_utils import logger

_LAYOUT_KEY = re.compile(r"dataloader\.layout_rows(\d+)_seq(\d+)")
_OLD_STREAM_KEY = re.compile(r"dataloader\.stream_\d+")  # before streams per row: one per (rank, micro-step)


class TrainData:
    def __init__(self, data_dir: Path, tokenizer, *, rows: int, seq_len: int, device_batch_size: int,
                 grad_accum: int, rank: int, world_size: int, device, buffer_docs: int, threads: int,
                 index: ShardIndex | None = None):
        if rows != device_batch_size * grad_accum * world_size:
            raise ValueError(f"{rows} global rows != {device_batch_size} x {grad_accum} x {world_size}")
        self.rows, self.seq_len = rows, seq_len
        self.index = index if index is not None else ShardIndex.of(Path(data_dir), "train")
        self.layout_key = f"layout_rows{rows}_seq{seq_len}"
        self.loaders: dict[int, PackingLoader] = {}  # micro-step -> its loader, in order
        for micro in range(grad_accum):
            first = (rank * grad_accum + micro) * device_batch_size
            self.loaders[micro] = build_loader(
                data_dir, "train", tokenizer, device_batch_size, seq_len, device=device, buffer_docs=buffer_docs,
                threads=threads, streams=range(first, first + device_batch_size), num_streams=rows,
                index=self.index)

    # ---- checkpoint ---------------------------------------------------------------------------------------
    def checkpoint_entry(self) -> dict[str, str]:
        """This rank's part of the checkpoint's "dataloader" entry (every rank writes the same layout key)."""
        layout = {"version": STATE_VERSION, "rows": self.rows, "seq_len": self.seq_len,
                  "files": self.index.names_digest}
        entry = {self.layout_key: json.dumps(layout)}
        for loader in self.loaders.values():
            entry.update({f"row_{g}": json.dumps(state) for g, state in loader.stream_states().items()})
        return entry

    def check_checkpoint(self, step_dir: Path) -> bool:
        """Whether the checkpoint's data state can be loaded into these streams (False: it predates streams per
        row; the caller then leaves it out and the data restarts). A changed global batch or sequence length
        is refused by name, in one line."""
        from torch.distributed.checkpoint import FileSystemReader

        try:
            keys = list(FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata)
        except Exception:  # noqa: BLE001 - unreadable metadata: the checkpoint load reports it properly
            return True
        layouts = [m for m in map(_LAYOUT_KEY.fullmatch, keys) if m]
        if not layouts:
            if any(_OLD_STREAM_KEY.fullmatch(k) for k in keys):
                logger.warning(f"warning: checkpoint {step_dir} holds data loader state from an older titanlite "
                               f"(streams per micro-batch, which this one cannot continue): the model and optimizer "
                               f"resume, the data starts again from the beginning of the corpus")
            return False
        rows, seq_len = (int(x) for x in layouts[0].groups())
        if seq_len != self.seq_len:
            raise UserError(f"checkpoint {step_dir} was trained with sequence length {seq_len} and this run has "
                            f"model.max_seq_len={self.seq_len}: its data streams cannot continue at another length; "
                            f"resume with --model.max_seq_len={seq_len} or start a new run (another "
                            f"checkpoint.model_tag)")
        if rows != self.rows:
            raise UserError(f"checkpoint {step_dir} was trained with a global batch of {rows} rows x {seq_len} "
                            f"tokens ({rows * seq_len:,} tokens) and this run's is {self.rows} rows "
                            f"(training.total_batch_size={self.rows * self.seq_len}): its data streams cannot be "
                            f"split or merged; resume with --training.total_batch_size={rows * seq_len} (any "
                            f"device_batch_size and process count that divide it) or start a new run")
        return True

    def load(self, entry: dict[str, str]) -> None:
        """Continue every stream from the loaded checkpoint entry."""
        layout = json.loads(entry[self.layout_key])
        exact = layout.get("files") == self.index.names_digest
        if not exact:
            logger.warning("warning: the train shards changed since the checkpoint; the data streams continue at "
                           "their saved positions with fresh buffers (approximate)")
        states = {}
        for key, value in entry.items():
            if key.startswith("row_"):
                states[int(key[len("row_"):])] = json.loads(value)
        for loader in self.loaders.values():
            loader.load_stream_states(states, exact)

    def load_keys(self) -> dict[str, str]:
        """The entry to hand the checkpoint loader: the keys this rank needs, to be filled in place."""
        return {key: "" for key in self.checkpoint_entry()}

    # ---- reporting ----------------------------------------------------------------------------------------
    def position(self) -> str:
        pos = self.loaders[0].position()
        return f"epoch: {pos['epoch']} shard: {pos['shard']} rg: {pos['row_group']}"

    def close(self) -> None:
        for loader in self.loaders.values():
            loader.close()

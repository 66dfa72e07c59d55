"""The loader's source as a torchdata.nodes node: batches packed from RowStreams, with their state.

`PackedBatches.next()` packs one batch of rows from its RowStreams; its state is the streams' snapshot after that
batch, and `reset(state)` continues from one. torchdata's `Prefetcher` runs it in a background thread and
records that state with every batch it queues, so the loader's `state_dict()` describes the batches handed out,
never those prefetched.

A failure while packing is returned as a `PackingFailure` item, not raised: torchdata re-raises a thread's
exception as a new one whose message embeds the traceback, and the loader raises the original instead (a user
error stays one line).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torchdata.nodes import BaseNode


class PackingFailure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class PackedBatches(BaseNode):
    def __init__(self, streams: Sequence, batch_size: int, seq_len: int, pin: bool):
        super().__init__()
        self.streams, self.batch_size, self.seq_len, self.pin = list(streams), batch_size, seq_len, pin
        self.width = batch_size // len(self.streams)
        self.batches = 0

    def reset(self, initial_state: dict | None = None) -> None:
        """Continue from `initial_state` ({"batches", "streams": {id: portable state}, "exact"}); None: as is."""
        super().reset(initial_state)
        if initial_state is None:
            return
        for stream in self.streams:
            stream.restore(initial_state["streams"][stream.stream], initial_state.get("exact", True))
        self.batches = initial_state["batches"]

    def get_state(self) -> dict[str, Any]:
        return {"batches": self.batches, "streams": {s.stream: s.snapshot() for s in self.streams}}

    def next(self):
        try:
            return self._pack()
        except Exception as exc:  # noqa: BLE001 - raised by the loader in the consumer's thread
            return PackingFailure(exc)

    def _pack(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
        for i, stream in enumerate(self.streams):
            stream.pack(rows[i * self.width:(i + 1) * self.width])
        self.batches += 1
        T = self.seq_len
        if self.pin:  # pinned at birth: the host-to-device copy can be asynchronous, with no extra copy here
            inputs = torch.empty((self.batch_size, T), dtype=torch.int64, pin_memory=True)
            targets = torch.empty((self.batch_size, T), dtype=torch.int64, pin_memory=True)
            inputs.numpy()[:] = rows[:, :T]
            targets.numpy()[:] = rows[:, 1:]
            return inputs, targets
        return torch.from_numpy(np.ascontiguousarray(rows[:, :T])), torch.from_numpy(np.ascontiguousarray(rows[:, 1:]))

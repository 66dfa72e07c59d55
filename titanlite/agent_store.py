"""The process group's store under torchrun: a namespace of its own for every attempt of the workers.

torchrun's c10d rendezvous lends its workers one TCPStore for the whole job (TORCHELASTIC_USE_AGENT_STORE) and
keeps it across worker restarts: it is not cleared, and torch adds no per-attempt prefix. Gloo's full-mesh
connect reads each peer's listening address from fixed keys in that store, so a restarted worker can read the
address a dead worker of the previous attempt published and fail with "Gloo connectFullMesh failed ...
Connection refused". TORCHELASTIC_RESTART_COUNT cannot tell the attempts apart: each agent counts its own
restarts, and an agent restarting its workers because a node joined does not count at all.

So the workers of one attempt agree on a fresh prefix through the store itself. Rank 0 takes the next number
of a counter (`add` is atomic, so no two incarnations of rank 0 ever share one) and publishes it. Every other
rank may read a number that a dead rank 0 published; it therefore announces a nonce of its own under that
number and proceeds only once rank 0 answers with the same nonce. A dead rank 0 answers nobody, so a rank that
read a stale number hears nothing and keeps reading the number until the new one appears.
"""

from __future__ import annotations

import os
import secrets
import time
from datetime import timedelta

import torch.distributed as dist

from titanlite.errors import UserError

KEY_ROOT = "titanlite/attempt"
_POLL_S = 0.02
_MAX_POLL_S = 0.2  # waiting ranks back off to this, so a large job does not flood the store while rank 0 starts
_attempt: int | None = None  # this process's attempt number, once attempt_store has agreed on it


def attempt_number() -> int | None:
    """1 for the first attempt of this torchrun job's workers, 2 for the next, ... (None outside torchrun's
    shared store). Unlike TORCHELASTIC_RESTART_COUNT it is the same on every rank and also counts the restarts
    torchrun makes when a node joins."""
    return _attempt


def uses_agent_store() -> bool:
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def connect_agent_store(timeout: timedelta) -> dist.Store:
    """A client of the store torchrun's agent hosts at MASTER_ADDR:MASTER_PORT."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        raise UserError("torchrun set TORCHELASTIC_USE_AGENT_STORE but not MASTER_ADDR/MASTER_PORT; launch with "
                        "torchrun (not by copying its environment)")
    return dist.TCPStore(host, int(port), is_master=False, timeout=timeout)


def attempt_prefix(store: dist.Store, rank: int, world_size: int, timeout: timedelta) -> str:
    """The key prefix all ranks of this attempt share and no earlier attempt used (collective over `store`)."""
    give_up = time.monotonic() + timeout.total_seconds()
    if rank == 0:
        number = store.add(f"{KEY_ROOT}/counter", 1)
        prefix = f"{KEY_ROOT}/{number}"
        store.set(f"{KEY_ROOT}/current", str(number))
        waiting = set(range(1, world_size))
        while waiting:
            for peer in sorted(waiting):
                if store.check([f"{prefix}/hello/{peer}"]):
                    store.set(f"{prefix}/welcome/{peer}", store.get(f"{prefix}/hello/{peer}"))
                    waiting.discard(peer)
            if waiting:
                if time.monotonic() > give_up:
                    raise TimeoutError(f"ranks {sorted(waiting)} did not join attempt {number} within {timeout}")
                time.sleep(_POLL_S)
        return prefix
    nonce = secrets.token_hex(8).encode()
    announced, prefix, delay = None, "", _POLL_S
    while True:
        current = store.get(f"{KEY_ROOT}/current") if store.check([f"{KEY_ROOT}/current"]) else None
        if current is not None and current != announced:  # first read, or a newer rank 0 published
            announced, prefix = current, f"{KEY_ROOT}/{current.decode()}"
            store.set(f"{prefix}/hello/{rank}", nonce)
        welcome = f"{prefix}/welcome/{rank}"
        if announced is not None and store.check([welcome]) and store.get(welcome) == nonce:
            return prefix
        if time.monotonic() > give_up:
            raise TimeoutError(f"rank 0 did not answer rank {rank} within {timeout}")
        time.sleep(delay)
        delay = min(_MAX_POLL_S, delay * 1.5)


def attempt_store(rank: int, world_size: int, timeout: timedelta) -> dist.Store | None:
    """Under torchrun's shared agent store: that store, behind this attempt's own prefix. Otherwise None (the
    process group's usual env:// rendezvous is right)."""
    global _attempt
    if not uses_agent_store():
        return None
    store = connect_agent_store(timeout)
    prefix = attempt_prefix(store, rank, world_size, timeout)
    _attempt = int(prefix.rsplit("/", 1)[1])
    return dist.PrefixStore(prefix + "/", store)

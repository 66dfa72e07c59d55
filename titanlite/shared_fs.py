"""Check at start that every rank sees the folders rank 0 writes: the run folder and the data folders.

Rank 0 alone publishes checkpoints (renames the finished folder, writes meta.json) and prepares the corpus and
the tokenizer while the other ranks wait; every rank then reads them. On node-local disks another node would
save its shards where nothing publishes them and build (or half-read) a corpus of its own. So, before any of
that:
- the run folder: rank 0 writes a marker file with a random token, and every rank reads it back after a barrier;
- the corpus and tokenizer folders, once rank 0 has prepared them: every rank lists the files (names and sizes)
  and compares with rank 0's list. A copy made on each node beforehand passes, a missing or different one stops.
Either failure ends every rank with one line naming the folder, the rank, its host and the fix.
"""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

import torch.distributed as dist

from titanlite.errors import UserError

MARKER_PREFIX = ".titanlite-shared-check-"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather(value) -> list:
    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _not_shared(what: str, folder: Path, key: str, rank: int, host: str, host0: str, how: str) -> UserError:
    return UserError(f"{what} {folder} is not shared between the nodes: rank {rank} on {host} {how} (rank 0 is on "
                     f"{host0}); point {key} at a filesystem every node mounts, or give every node the same copy")


def check_run_folder_shared(folder: Path, key: str = "job.dump_folder") -> None:
    """Every rank must read the marker rank 0 writes into `folder` (which rank 0 has created). Collective."""
    if not _distributed():
        return
    folder = Path(folder)
    token = [secrets.token_hex(16) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)
    marker = folder / f"{MARKER_PREFIX}{token[0]}"
    error = None
    if dist.get_rank() == 0:
        try:
            marker.write_text(token[0])
        except OSError as exc:
            error = f"cannot write in {folder} ({exc.strerror or exc}); {key} must be a writable folder"
    errors = _gather(error)  # also the barrier: the marker is written before anyone looks
    if errors[0] is not None:
        raise UserError(errors[0])
    try:
        seen = marker.read_text() == token[0]
    except OSError:
        seen = False
    seen_by = _gather((seen, socket.gethostname(), str(folder)))
    if dist.get_rank() == 0:
        marker.unlink(missing_ok=True)  # everyone has looked: the gather above is after every read
    _, host0, folder0 = seen_by[0]  # the same line on every rank: rank 0's view
    for rank, (ok, host, _) in enumerate(seen_by):
        if not ok:
            raise _not_shared("the run folder", Path(folder0), key, rank, host, host0,
                              "does not see the file rank 0 just wrote there")


def file_listing(folder: Path) -> list[tuple[str, int]] | None:
    """Sorted (relative path, size) of the files under `folder` (hidden ones aside); None when it does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    listing = []
    for root, _, files in os.walk(folder):
        for name in files:
            if name.startswith("."):  # markers, locks, partial downloads: not the data
                continue
            path = Path(root) / name
            try:
                listing.append((str(path.relative_to(folder)), path.stat().st_size))
            except OSError:
                continue  # removed while listing (another process cleaning up): not part of the data
    return sorted(listing)


def check_same_files(folders: list[tuple[str, Path, str]]) -> None:
    """Every rank must see the files rank 0 sees in each (description, folder, config key). Collective."""
    if not _distributed():
        return
    mine = [file_listing(folder) for _, folder, _ in folders]
    everyone = _gather((mine, socket.gethostname(), [str(folder) for _, folder, _ in folders]))
    reference, host0, folders0 = everyone[0]  # the same line on every rank: rank 0's view
    for rank, (listings, host, _) in enumerate(everyone):
        for (what, _, key), folder, theirs, expected in zip(folders, folders0, listings, reference):
            if theirs != expected:
                how = ("has no such folder" if theirs is None else
                       f"finds {len(theirs)} files there where rank 0 finds {len(expected or [])} (or other sizes)")
                raise _not_shared(what, folder, key, rank, host, host0, how)

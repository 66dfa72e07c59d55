"""Run a test function in N real gloo processes on a `cpu` device mesh.

No ports: ranks rendezvous through a FileStore in a fresh temp dir. Each worker sends back either its
result or its traceback, then tears down in the order that avoids torch 2.13's exit-time SIGABRT on gloo
(barrier -> destroy_process_group -> flush -> os._exit). The parent checks every exit code as well as the
results; a run whose workers all succeeded but one died during teardown is retried once, so CI is not flaky
while a real failure still fails.
"""

from __future__ import annotations

import os
import queue as queue_module
import sys
import tempfile
import traceback

import torch.multiprocessing as mp

_TEARDOWN_RETRIES = 1


class WorkerFailed(AssertionError):
    pass


def _worker(rank: int, world_size: int, store_path: str, fn, args, results) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), TORCHAO_FORCE_SKIP_LOADING_SO_FILES="1")
    torch.set_num_threads(1)
    exit_code = 0
    try:
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
        value = fn(rank, world_size, *args)
        results.put((rank, "ok", value))
    except BaseException:  # noqa: BLE001 - the parent needs every failure, with its traceback
        results.put((rank, "error", traceback.format_exc()))
        exit_code = 1
    results.close()
    results.join_thread()  # flush the queue's feeder thread: os._exit below would drop a half-sent result
    try:
        if dist.is_initialized():
            if exit_code == 0:
                dist.barrier()
            dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)


def _run_once(fn, world_size: int, args: tuple, timeout: float):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="titanlite-dist-") as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, args=(r, world_size, store_path, fn, args, results))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        collected: dict[int, tuple[str, object]] = {}
        try:
            while len(collected) < world_size:
                rank, status, value = results.get(timeout=timeout)
                collected[rank] = (status, value)
                if status == "error":
                    break
        except queue_module.Empty:
            pass
        for p in procs:
            p.join(timeout=30 if len(collected) == world_size else 5)
            if p.is_alive():
                p.kill()
                p.join()
        exit_codes = [p.exitcode for p in procs]
    return collected, exit_codes


def run_in_processes(fn, world_size: int = 2, args: tuple = (), timeout: float = 180) -> list:
    """Run `fn(rank, world_size, *args)` in `world_size` spawned gloo workers; return per-rank results."""
    for attempt in range(_TEARDOWN_RETRIES + 1):
        collected, exit_codes = _run_once(fn, world_size, args, timeout)
        errors = {r: v for r, (s, v) in collected.items() if s == "error"}
        if errors:
            rank = min(errors)
            raise WorkerFailed(f"rank {rank} of {world_size} failed:\n{errors[rank]}")
        if len(collected) < world_size:
            missing = sorted(set(range(world_size)) - set(collected))
            raise WorkerFailed(f"ranks {missing} sent no result within {timeout}s (exit codes {exit_codes})")
        if all(code == 0 for code in exit_codes):
            return [collected[r][1] for r in range(world_size)]
        # Every rank finished its work and reported success, but one died in teardown: retry once.
        if attempt == _TEARDOWN_RETRIES:
            raise WorkerFailed(f"workers finished but exited with codes {exit_codes} during teardown")
    raise AssertionError("unreachable")

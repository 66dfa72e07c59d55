"""Download the recipe's web-scale shards (ClimbMix 400B, FineWeb-Edu 100B) from Hugging Face.

Parallel (threads), with retries and exponential backoff. Bytes go to `<shard>.tmp` and the file is renamed
only when it is complete and its parquet footer reads, so a shard name always means a whole shard. An
interrupted download resumes from the bytes already on disk (HTTP Range). Plain urllib: no extra dependency.
`HF_ENDPOINT` (the usual Hugging Face mirror variable) replaces https://huggingface.co.

Shards are only fetched into a folder that is missing, empty, titanlite's own download of the same dataset
(its manifest is there), or holds nothing but that dataset's shard files (a download by an older titanlite or
by the reference trainer: the same files under the same names, so taking it over loses nothing).
"""

from __future__ import annotations

import http.client
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from titanlite.data import shards
from titanlite.errors import UserError
from titanlite.logging_utils import logger
from titanlite.progress import Progress

CHUNK_BYTES = 1 << 20
DOWNLOADED_FILE = re.compile(r"shard_\d{5}\.parquet(\.tmp)?")


@dataclass(frozen=True)
class RemoteDataset:
    repo: str
    last_index: int  # the validation shard; training shards are 0..last_index-1

    def url(self, index: int, base_url: str | None = None) -> str:
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        base = base_url or f"{endpoint}/datasets/{self.repo}/resolve/main"
        return f"{base.rstrip('/')}/{shard_name(index)}"


DATASETS = {
    "climbmix": RemoteDataset("karpathy/climbmix-400b-shuffle", 6542),
    "fineweb_edu": RemoteDataset("karpathy/fineweb-edu-100b-shuffle", 1822),
}


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def shard_indices(dataset: RemoteDataset, num_shards: int) -> list[int]:
    """Training shards 0..num_shards-1 (-1: all of them) plus the validation shard, which is always needed."""
    if num_shards < 0 or num_shards > dataset.last_index:
        num_shards = dataset.last_index
    return list(range(num_shards)) + [dataset.last_index]


class _Stopped(Exception):
    """Another download failed for good: the remaining ones stop early."""


def _offline(exc: BaseException) -> bool:
    reason = getattr(exc, "reason", exc)
    return isinstance(reason, socket.gaierror)


def download_file(url: str, dest: Path, retries: int = 5, backoff_s: float = 1.0, timeout_s: float = 60.0,
                  stop: threading.Event | None = None, on_bytes=None) -> Path:
    """Fetch `url` into `dest` (via `dest.tmp`, resuming it if present)."""
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    last_error: BaseException | None = None
    for attempt in range(retries):
        if stop is not None and stop.is_set():
            raise _Stopped()
        offset = tmp.stat().st_size if tmp.exists() else 0
        headers = {"User-Agent": "titanlite-downloader"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s) as resp:
                length = resp.headers.get("Content-Length")
                resumed = offset > 0 and resp.status == 206
                start = offset if resumed else 0  # a 200 answer to a Range request means: start over
                expected = start + int(length) if length is not None else None
                with open(tmp, "ab" if resumed else "wb") as f:
                    while chunk := resp.read(CHUNK_BYTES):
                        f.write(chunk)
                        if on_bytes is not None:
                            on_bytes(len(chunk))
                        if stop is not None and stop.is_set():
                            raise _Stopped()
            size = tmp.stat().st_size
            if expected is not None and size != expected:
                raise http.client.IncompleteRead(b"", expected - size)
            try:
                shards.open_shard(tmp)
            except UserError as exc:  # complete by length but not a readable shard: fetch it again from zero
                tmp.unlink(missing_ok=True)
                raise OSError(str(exc)) from None
            os.replace(tmp, dest)
            return dest
        except _Stopped:
            raise
        except urllib.error.HTTPError as exc:
            if exc.code == 416:  # our partial file is not a prefix of the remote one any more
                tmp.unlink(missing_ok=True)
            elif exc.code in (401, 403, 404):
                raise UserError(f"{url} answered HTTP {exc.code} ({exc.reason}): check the dataset name, "
                                f"the shard count (data.num_shards) and HF_ENDPOINT") from None
            last_error = exc
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            if _offline(exc):  # name resolution failed: no network; retrying would only delay the error
                host = url.split("/")[2] if "://" in url else url
                raise UserError(f"cannot reach {host} (no network?): download the shards on a machine with "
                                f"internet and copy them into {dest.parent}, or use data.dataset=embedded") from None
            last_error = exc
        if attempt + 1 < retries:
            time.sleep(backoff_s * (2 ** attempt))
    raise UserError(f"downloading {url} failed after {retries} attempts ({type(last_error).__name__}: "
                    f"{last_error}); check the network (and HF_ENDPOINT) and run again: finished shards are kept "
                    f"and the partial one resumes")


def _present(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        shards.open_shard(path)
        return True
    except UserError:
        logger.warning(f"warning: {path} is damaged; downloading it again")
        path.unlink()
        return False


def download_shards(dataset: str | RemoteDataset, data_dir: Path, num_shards: int = -1, workers: int = 4,
                    retries: int = 5, backoff_s: float = 1.0, timeout_s: float = 60.0,
                    base_url: str | None = None) -> list[Path]:
    """Make sure the shards exist in `data_dir`; already complete shards are not fetched again."""
    remote = DATASETS[dataset] if isinstance(dataset, str) else dataset
    data_dir = Path(data_dir)
    manifest = shards.claim_folder(data_dir, remote.repo, adoptable=DOWNLOADED_FILE)
    data_dir.mkdir(parents=True, exist_ok=True)
    if manifest is None:  # written first: an interrupted download is still recognised as ours
        shards.write_manifest(data_dir, {"source": remote.repo})
    wanted = [(i, data_dir / shard_name(i)) for i in shard_indices(remote, num_shards)]
    todo = [(i, path) for i, path in wanted if not _present(path)]
    if todo:
        logger.info(f"data: downloading {len(todo)} of {len(wanted)} shards of {remote.repo} to {data_dir} "
                    f"({workers} in parallel)")
        stop = threading.Event()
        lock = threading.Lock()
        with Progress(len(todo), "downloading shards", "shards") as bar:
            def fetch(index: int, path: Path) -> Path:
                result = download_file(remote.url(index, base_url), path, retries, backoff_s, timeout_s, stop)
                with lock:
                    bar.update(1)
                return result

            with ThreadPoolExecutor(max(1, workers), thread_name_prefix="titanlite-dl") as pool:
                futures = [pool.submit(fetch, i, path) for i, path in todo]
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                failed = next((f for f in done if f.exception() is not None), None)
                if failed is not None:
                    stop.set()
                    for f in futures:
                        f.cancel()
                    raise failed.exception()
    return [path for _, path in wanted]

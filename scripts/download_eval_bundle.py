"""Fetch the reference's public CORE eval bundle (DCLM format, 22 tasks) into the titanlite cache.

    python -m scripts.download_eval_bundle                 # -> $TITANLITE_HOME/eval_bundle
    python -m scripts.download_eval_bundle --dest DIR --force

Downloads to a `.tmp` name and renames only when the zip is complete and unpacked, so an interrupted run never
leaves a half bundle that looks valid. Without network it stops with one line saying what to do instead.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from titanlite.cli import run_cli
from titanlite.errors import UserError
from titanlite.logging_utils import init_logger, logger
from titanlite.paths import cache_dir

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
_CHUNK = 1 << 20


def _fetch(url: str, target: Path, timeout: float) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(target, "wb") as out:
            shutil.copyfileobj(response, out, _CHUNK)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"could not download {url} ({reason}); without network, build a bundle from local "
                        f"packages with `python -m scripts.prepare_core_offline`") from None


def _bundle_root(unpacked: Path) -> Path:
    """The folder holding core.yaml: the zip's top folder (eval_bundle/) or the unpack folder itself."""
    if (unpacked / "core.yaml").is_file():
        return unpacked
    candidates = [p.parent for p in unpacked.glob("*/core.yaml")]
    if len(candidates) != 1:
        raise UserError(f"the downloaded zip has no single folder with core.yaml (found {len(candidates)}); "
                        f"the bundle format may have changed")
    return candidates[0]


def download_eval_bundle(dest: Path, url: str = EVAL_BUNDLE_URL, force: bool = False,
                         timeout: float = 60.0) -> Path:
    dest = Path(dest)
    if (dest / "core.yaml").is_file() and not force:
        logger.info(f"eval bundle already present at {dest} (use --force to fetch it again)")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    zip_tmp = dest.with_name(dest.name + ".zip.tmp")
    unpack_tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(unpack_tmp, ignore_errors=True)
    try:
        logger.info(f"downloading {url}")
        _fetch(url, zip_tmp, timeout)
        try:
            with zipfile.ZipFile(zip_tmp) as archive:
                archive.extractall(unpack_tmp)
        except zipfile.BadZipFile:
            raise UserError(f"{url} did not return a valid zip file; try again later") from None
        root = _bundle_root(unpack_tmp)
        if dest.exists():
            shutil.rmtree(dest)
        root.rename(dest)
    finally:
        zip_tmp.unlink(missing_ok=True)
        shutil.rmtree(unpack_tmp, ignore_errors=True)
    logger.info(f"eval bundle ready at {dest}")
    return dest


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.download_eval_bundle", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=None, help="target folder (default <cache>/eval_bundle)")
    parser.add_argument("--url", default=EVAL_BUNDLE_URL, help="bundle zip URL")
    parser.add_argument("--force", action="store_true", help="download again even if the bundle exists")
    parser.add_argument("--timeout", type=float, default=60.0, help="network timeout in seconds")
    args = parser.parse_args(argv)
    init_logger()
    download_eval_bundle(args.dest or cache_dir() / "eval_bundle", args.url, args.force, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

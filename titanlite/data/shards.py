"""Parquet shards: one string column `text`, one document per row (the recipe's format).

The split rule is the recipe's: list `*.parquet` sorted by name; the lexicographically last file is the
validation shard, every other file is training data. Shards are written to `<name>.tmp` and renamed when
complete, so a crash never leaves a half-written file under a shard name.

A folder titanlite writes shards into carries a manifest (`corpus.json`); titanlite only ever writes into such a
folder or a missing/empty one (`claim_folder`), so it never deletes or overwrites a file it did not write.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from titanlite.errors import UserError

TEXT_COLUMN = "text"
ROW_GROUP_DOCS = 1024
MANIFEST_FILE = "corpus.json"
# what titanlite itself writes into a corpus folder (besides the manifest)
OWN_SHARD = re.compile(r"shard_(\d{5}|val)\.parquet(\.tmp)?")


def write_shard(path: Path, texts: Sequence[str], row_group_size: int = ROW_GROUP_DOCS) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    table = pa.table({TEXT_COLUMN: pa.array(list(texts), type=pa.string())})
    pq.write_table(table, tmp, row_group_size=row_group_size, use_dictionary=False, compression="zstd",
                   compression_level=3, write_statistics=False)
    os.replace(tmp, path)
    return path


# ---- folder ownership -----------------------------------------------------------------------------------
def read_manifest(folder: Path) -> dict | None:
    """The folder's manifest, None when it has none; a manifest that does not parse still marks the folder as
    titanlite's (it only ever writes that file itself)."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def write_manifest(folder: Path, manifest: dict) -> None:
    (Path(folder) / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def foreign_folder_message(folder: Path, what: str) -> str:
    return (f"data folder {folder} {what}, and titanlite did not prepare it (no {MANIFEST_FILE}): nothing in it was "
            f"changed. Pick an empty or new folder with --data.data_dir, or train on the shards already there with "
            f"--data.dataset=local (no data.local_path: *.parquet files with a '{TEXT_COLUMN}' column, the last "
            f"by name is the validation shard)")


def claim_folder(folder: Path, source: str, adoptable: re.Pattern | None = None) -> dict | None:
    """Check that corpus `source` may be written into `folder`; returns its manifest (None: missing or empty).

    Allowed: a missing or empty folder, or one whose manifest says titanlite prepared `source` there and that
    holds no other shards. `adoptable`: file names that may be taken over although no manifest is there
    (downloads: the files a download of the same dataset writes, e.g. by an older titanlite). Anything else
    is a UserError naming the folder and the ways out; nothing is touched.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"data.data_dir {folder} is a file, not a folder: point data.data_dir at a folder")
    if not folder.is_dir():
        return None
    manifest = read_manifest(folder)
    names = sorted(p.name for p in folder.iterdir())
    if manifest is None:
        if not names:
            return None
        if adoptable is not None and all(adoptable.fullmatch(n) for n in names):
            return None
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise UserError(foreign_folder_message(folder, f"is not empty ({len(names)} entries: {shown})"))
    found = manifest.get("source")
    if found != source:
        raise UserError(f"data folder {folder} holds the corpus '{found}' that titanlite prepared, not '{source}': "
                        f"it was left unchanged. Pick another --data.data_dir (or none, for the default folder), or "
                        f"train on it with --data.dataset=local and no data.local_path")
    strangers = [n for n in names if n.endswith(".parquet") and not OWN_SHARD.fullmatch(n)]
    if strangers:
        raise UserError(foreign_folder_message(folder, f"holds {strangers[0]}, a shard titanlite did not write"))
    return manifest


# ---- reading --------------------------------------------------------------------------------------------
def list_shards(data_dir: Path) -> list[Path]:
    """All complete shards in `data_dir`, sorted by name; a clear error when there are none."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"data folder {data_dir} does not exist: prepare it with `python -m scripts.prepare_data` "
                        f"or set data.data_dir to a folder of parquet shards")
    shards = sorted(p for p in data_dir.glob("*.parquet") if p.is_file())
    if not shards:
        raise UserError(f"no parquet shards (*.parquet) in {data_dir}: prepare them with "
                        f"`python -m scripts.prepare_data` or set data.data_dir to a folder of shards")
    return shards


def split_shards(data_dir: Path, split: str) -> list[Path]:
    """train = every shard but the last by name; val = the last one."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    shards = list_shards(data_dir)
    if len(shards) < 2:
        raise UserError(f"{data_dir} holds only {shards[0].name}: at least two shards are needed (training "
                        f"shards + the validation shard, which is the last file by name)")
    return shards[:-1] if split == "train" else shards[-1:]


def open_shard(path: Path):
    """Open a shard's footer and check it: readable, has a string `text` column, holds documents."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise UserError(f"cannot read shard {path} ({type(exc).__name__}: {exc}); it is damaged or not a "
                        f"parquet file: delete it and prepare/download it again") from None
    schema = pf.schema_arrow
    if TEXT_COLUMN not in schema.names:
        raise UserError(f"shard {path} has no '{TEXT_COLUMN}' column (columns: {', '.join(schema.names)}); "
                        f"shards need one document per row in a string column named '{TEXT_COLUMN}'")
    kind = schema.field(TEXT_COLUMN).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise UserError(f"shard {path}: column '{TEXT_COLUMN}' holds {kind} values, not strings; shards need one "
                        f"document per row as text in a string column named '{TEXT_COLUMN}'")
    if pf.metadata.num_rows == 0:
        raise UserError(f"shard {path} is empty (0 documents): delete it or prepare the data again")
    return pf


@dataclass
class Skipped:
    """Documents left out of training, by reason (counted where they are read)."""
    not_utf8: int = 0
    null: int = 0
    empty: int = 0

    @property
    def total(self) -> int:
        return self.not_utf8 + self.null + self.empty

    def describe(self) -> str:
        parts = [(self.not_utf8, "not valid UTF-8"), (self.null, "null"), (self.empty, "empty")]
        return ", ".join(f"{n} {what}" for n, what in parts if n)


def _utf8_or_none(value: bytes | None) -> str | None:
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return None


def read_row_group(pf, index: int, path: Path | None = None, skipped: Skipped | None = None) -> list[str | None]:
    """The documents of one row group in row order. A null row and a row that is not valid UTF-8 come back as
    None, so row positions (the loader's document identities) stay put; callers skip None and "". `skipped`
    counts them, and the empty ones."""
    import pyarrow as pa

    try:
        column = pf.read_row_group(index, columns=[TEXT_COLUMN]).column(TEXT_COLUMN)
    except Exception as exc:
        raise UserError(f"cannot read row group {index} of shard {path or '?'} ({type(exc).__name__}: {exc}); "
                        f"the file is damaged: delete it and prepare/download it again") from None
    try:
        texts = column.to_pylist()
    except UnicodeDecodeError:
        # Parquet readers do not check UTF-8, Python does: decode row by row so one bad document costs one row,
        # not the file.
        texts = [_utf8_or_none(v) for v in column.cast(pa.binary()).to_pylist()]
    if skipped is not None:
        nulls = column.null_count
        skipped.null += nulls
        skipped.not_utf8 += sum(t is None for t in texts) - nulls
        skipped.empty += sum(t == "" for t in texts)
    return texts


def check_ready(data_dir: Path) -> list[Path]:
    """The shards of a usable train/val split (every footer checks out), else the UserError saying why."""
    shards = list_shards(data_dir)
    split_shards(data_dir, "val")  # at least two
    for path in shards:
        open_shard(path)
    return shards


def shards_ready(data_dir: Path) -> bool:
    """True when `data_dir` already holds a usable train/val split (every shard's footer checks out)."""
    try:
        check_ready(data_dir)
    except UserError:
        return False
    return True


def iter_texts(paths: Sequence[Path]) -> Iterator[str]:
    """Every usable document of `paths`, in file and row order (the tokenizer's training stream)."""
    for path in paths:
        pf = open_shard(path)
        for rg in range(pf.num_row_groups):
            yield from (t for t in read_row_group(pf, rg, path) if t)

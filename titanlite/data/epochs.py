"""How many times the planned run reads its training split: a corpus far too small for the run is said, once.

The split's size comes from the manifest titanlite writes with its shards (`train_bytes`), else from the
shards' footers (the text column's uncompressed size); tokens per byte are measured on the split's first
documents with the run's tokenizer. An estimate: packing crops documents, so the corpus goes by a bit faster.
"""

from __future__ import annotations

from pathlib import Path

from titanlite.data import shards
from titanlite.data.loader import ShardIndex

REPEAT_WARN_EPOCHS = 4  # a few passes are normal practice; beyond this the model mostly memorises
SAMPLE_DOCS = 256
SAMPLE_BYTES = 1 << 20


def train_bytes(data_dir: Path, index: ShardIndex) -> int:
    manifest = shards.read_manifest(data_dir) or {}
    found = manifest.get("train_bytes")
    return int(found) if isinstance(found, int) and found > 0 else index.text_bytes


def tokens_per_byte(index: ShardIndex, tokenizer) -> float:
    """Tokens (BOS included, as the loader adds one per document) per UTF-8 byte of the first documents."""
    texts, size = [], 0
    documents = (text for file, rg in index.units for text in index.row_group(file, rg)[0] if text)
    for text in documents:  # row groups are read only as far as the sample goes
        texts.append(text[:SAMPLE_BYTES])
        size += len(texts[-1].encode("utf-8"))
        if len(texts) >= SAMPLE_DOCS or size >= SAMPLE_BYTES:
            break
    if not size:
        return 0.0
    tokens = sum(len(ids) for ids in tokenizer.encode_arrays(texts, tokenizer.bos_token_id))
    return tokens / size


def planned_epochs(data_dir: Path, index: ShardIndex, tokenizer, planned_tokens: int) -> tuple[float, int]:
    """(passes over the train split, its estimated size in tokens)."""
    corpus_tokens = max(1, round(train_bytes(data_dir, index) * tokens_per_byte(index, tokenizer)))
    return planned_tokens / corpus_tokens, corpus_tokens


def repeat_warning(data_dir: Path, index: ShardIndex, tokenizer, planned_tokens: int,
                   limit: float = REPEAT_WARN_EPOCHS) -> str | None:
    """One warning line when the run reads the train split more than `limit` times, else None."""
    epochs, corpus_tokens = planned_epochs(data_dir, index, tokenizer, planned_tokens)
    if epochs <= limit:
        return None
    return (f"warning: the run reads the train split of {data_dir} about {epochs:,.0f} times ({epochs:,.1f} "
            f"epochs: {planned_tokens:,} planned tokens, the split holds about {corpus_tokens:,}); past "
            f"{limit:g} epochs the model mostly memorises it: use a bigger corpus or fewer steps "
            f"(training.num_iterations)")

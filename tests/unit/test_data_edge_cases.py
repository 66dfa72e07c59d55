"""Bad documents and tiny corpora: one printed line each, never a traceback or a silently repeated corpus."""

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.helpers.runs import isolated_cache
from titanlite import train
from titanlite.cli import run_cli
from titanlite.config import load_config
from titanlite.data import shards
from titanlite.data.loader import build_loader
from titanlite.data.tokenizer import Tokenizer

TINY = [
    "--model.depth=2", "--model.aspect_ratio=32", "--model.head_dim=32", "--model.max_seq_len=64",
    "--model.window_pattern=SL", "--training.device_type=cpu", "--training.dtype=float32",
    "--training.device_batch_size=4", "--training.total_batch_size=256", "--training.num_iterations=6",
    "--data.vocab_size=512", "--eval.eval_every=-1", "--eval.sample_every=-1", "--eval.core_metric_every=-1",
    "--metrics.log_every=1", "--metrics.tensorboard=false", "--compile.enabled=false",
    "--lr_scheduler.warmup_steps=0",
]


@pytest.fixture(scope="module", autouse=True)
def _isolated_cache(tmp_path_factory):
    yield from isolated_cache(tmp_path_factory)



def _words(i: int) -> str:
    return f"Document {i} tells of the rain in spring and the sun in summer. " * (3 + i % 5)


def _texts_with_bad_bytes(good: list[str], bad: bytes) -> pa.Array:
    """A string column holding one row that is not UTF-8 (other tools write such files; pyarrow's own writer
    checks nothing when handed binary data viewed as strings)."""
    return pa.array([t.encode() for t in good] + [bad], pa.binary()).view(pa.string())


def _local_args(source: Path, tmp_path: Path) -> list[str]:
    return TINY + ["--data.dataset=local", f"--data.local_path={source}", f"--data.data_dir={tmp_path / 'shards'}",
                   f"--data.tokenizer_dir={tmp_path / 'tok'}", f"--job.dump_folder={tmp_path / 'out'}"]


def test_integer_text_column_is_one_line_naming_the_type(tmp_path, capsys):
    source = tmp_path / "texts"
    source.mkdir()
    pq.write_table(pa.table({"text": list(range(50))}), source / "numbers.parquet")
    assert run_cli(train.main, _local_args(source, tmp_path)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [f"error: shard {source / 'numbers.parquet'}: column 'text' holds int64 values, not strings; "
                   "shards need one document per row as text in a string column named 'text'"]

    # the same file among ready shards (data.dataset = "local" without local_path): the same line
    ready = tmp_path / "ready"
    ready.mkdir()
    pq.write_table(pa.table({"text": list(range(50))}), ready / "shard_00000.parquet")
    pq.write_table(pa.table({"text": ["a validation document"]}), ready / "shard_00001.parquet")
    args = TINY + ["--data.dataset=local", f"--data.data_dir={ready}", f"--job.dump_folder={tmp_path / 'out2'}"]
    assert run_cli(train.main, args) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert f"shard {ready / 'shard_00000.parquet'}: column 'text' holds int64 values, not strings" in line


def test_invalid_utf8_empty_and_null_documents_are_skipped_and_counted(tmp_path, captured):
    from titanlite.data.corpora import read_local_documents

    source = tmp_path / "texts"
    source.mkdir()
    good = [_words(i) for i in range(20)]
    pq.write_table(pa.table({"text": _texts_with_bad_bytes(good, b"caf\xe9 au lait")}), source / "a.parquet")
    pq.write_table(pa.table({"text": ["", None, " \n ", None, _words(20)]}), source / "b.parquet")
    scan = read_local_documents(source)
    assert sorted(scan.docs) == sorted(good + [_words(20)])  # the bad rows cost only themselves
    summaries = [line for line in captured if line.startswith("warning: skipped")]
    assert summaries == [f"warning: skipped 5 of 26 documents in {source}: 1 not valid UTF-8, 2 null, 2 empty"]


def test_one_invalid_utf8_document_in_ready_shards_is_skipped_by_the_loader(tmp_path, captured):
    folder = tmp_path / "ready"
    folder.mkdir()
    good = [_words(i) for i in range(12)]
    pq.write_table(pa.table({"text": _texts_with_bad_bytes(good, b"\xff\xfe broken")}), folder / "shard_00000.parquet")
    pq.write_table(pa.table({"text": ["", None, "validation text"]}), folder / "shard_00001.parquet")
    tok = Tokenizer.train(good * 4, 300, progress=False)
    loader = build_loader(folder, "train", tok, batch_size=2, seq_len=32, buffer_docs=4, prefetch=0)
    rows = [torch.cat(next(loader)) for _ in range(20)]  # several passes over the 12 good documents
    assert all(r.numel() for r in rows)
    assert loader.stats()["skipped_docs"] >= 1 and loader.position()["epoch"] > 1
    warned = [line for line in captured if "not valid UTF-8" in line]
    assert warned == ["warning: the train split has documents that are null, empty or not valid UTF-8; they are "
                      "skipped and counted in the loader's stats (first met in shard_00000.parquet row group 0: "
                      "1 not valid UTF-8)"]
    val = build_loader(folder, "val", tok, batch_size=1, seq_len=8, prefetch=0)
    next(val)
    assert any("first met in shard_00001.parquet row group 0: 1 null, 1 empty" in line for line in captured)


def test_three_document_corpus_warns_with_the_number_of_epochs(tmp_path, captured):
    from titanlite.data.corpora import bible_chapters

    source = tmp_path / "texts"
    source.mkdir()
    for i in range(3):
        (source / f"doc{i}.txt").write_text(_words(i), encoding="utf-8")
    # three documents cannot train a 512-token vocabulary: the run uses one trained on other text
    Tokenizer.train(bible_chapters()[:200], 512, progress=False).save(tmp_path / "tok")
    trainer = train.Trainer(load_config(_local_args(source, tmp_path)))
    try:
        trainer.train()
        losses = dict(trainer.loss_history)
    finally:
        trainer.close()
    assert sorted(losses) == list(range(1, 7))  # 2 train documents still feed 4 streams

    # the reference: the train split's documents as the loader sees them (BOS + tokens each)
    train_docs = list(shards.iter_texts(shards.split_shards(tmp_path / "shards", "train")))
    assert len(train_docs) == 2
    tokens = sum(len(trainer.tokenizer.encode(doc)) + 1 for doc in train_docs)
    planned = 6 * 256
    lines = [line for line in captured if line.startswith("warning: the run reads the train split")]
    assert len(lines) == 1, captured
    epochs = float(re.search(r"\(([\d,.]+) epochs", lines[0]).group(1).replace(",", ""))
    assert epochs == pytest.approx(planned / tokens, rel=0.02)
    assert f"{planned:,} planned tokens" in lines[0] and str(tmp_path / "shards") in lines[0]


def test_a_corpus_read_a_few_times_is_not_warned(tmp_path, captured):
    from titanlite.data.epochs import repeat_warning
    from titanlite.data.loader import ShardIndex

    folder = tmp_path / "ready"
    folder.mkdir()
    texts = [_words(i) for i in range(40)]
    pq.write_table(pa.table({"text": texts}), folder / "shard_00000.parquet")
    pq.write_table(pa.table({"text": ["validation"]}), folder / "shard_00001.parquet")
    tok = Tokenizer.train(texts, 300, progress=False)
    tokens = sum(len(tok.encode(t)) + 1 for t in texts)
    index = ShardIndex.of(folder, "train")  # no manifest: the size comes from the footer
    assert repeat_warning(folder, index, tok, 3 * tokens) is None
    line = repeat_warning(folder, index, tok, 9 * tokens)
    assert line is not None and "about 9 times" in line

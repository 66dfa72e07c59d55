"""titanlite never deletes or overwrites data it did not write; ready shards train as data.dataset = "local"."""

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.helpers.runs import isolated_cache
from titanlite.config import load_config
from titanlite.config.sections import DataConfig
from titanlite.data import corpora, download, shards
from titanlite.data.corpora import prepare_corpus
from titanlite.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "--model.depth=2", "--model.aspect_ratio=32", "--model.head_dim=32", "--model.max_seq_len=64",
    "--model.window_pattern=SL", "--training.device_type=cpu", "--training.dtype=float32",
    "--training.device_batch_size=4", "--training.total_batch_size=256", "--training.num_iterations=4",
    "--data.vocab_size=512", "--eval.eval_every=-1", "--eval.sample_every=-1", "--eval.core_metric_every=-1",
    "--metrics.log_every=1", "--metrics.tensorboard=false", "--compile.enabled=false",
    "--lr_scheduler.warmup_steps=0",
]


@pytest.fixture(scope="module", autouse=True)
def _isolated_cache(tmp_path_factory):
    yield from isolated_cache(tmp_path_factory)


def _ready_shards(folder: Path) -> dict[str, str]:
    """Shards as another tool writes them (pyarrow defaults: one row group, dictionary pages, snappy), the last
    one by name for validation, plus a file of the user's; returns each file's sha256."""
    folder.mkdir(parents=True)
    chapters = corpora.bible_chapters()
    pq.write_table(pa.table({"text": chapters[:500]}), folder / "shard_00000.parquet")
    pq.write_table(pa.table({"text": chapters[500:1000]}), folder / "shard_00001.parquet")
    pq.write_table(pa.table({"text": chapters[1000:1100]}), folder / "shard_00002.parquet")
    (folder / "notes.txt").write_text("my notes\n")
    return _hashes(folder)


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_embedded_run_into_a_foreign_folder_exits_2_and_changes_nothing(tmp_path):
    """The real CLI: one `error:` line naming the folder and both ways out, exit 2, every file byte-identical."""
    folder = tmp_path / "my_shards"
    before = _ready_shards(folder)
    env = dict(os.environ, TITANLITE_HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "titanlite.train", *TINY, "--data.dataset=embedded",
                           f"--data.data_dir={folder}", f"--job.dump_folder={tmp_path / 'out'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    line = errors[0]
    assert line.startswith(f"error: data folder {folder} is not empty")
    assert "--data.data_dir" in line and "--data.dataset=local" in line and "nothing in it was changed" in line
    assert _hashes(folder) == before


def test_local_dataset_trains_on_ready_shards_in_data_dir(tmp_path):
    from titanlite import train

    folder = tmp_path / "ready"
    before = _ready_shards(folder)
    (folder / "notes.txt").unlink()  # the split rule takes every *.parquet; other files are simply not read
    before.pop("notes.txt")
    config = load_config(TINY + ["--data.dataset=local", f"--data.data_dir={folder}",
                                 f"--data.tokenizer_dir={tmp_path / 'tok'}", f"--job.dump_folder={tmp_path / 'out'}"])
    trainer = train.Trainer(config)
    try:
        assert [p.name for p in trainer.train_data.index.paths] == ["shard_00000.parquet", "shard_00001.parquet"]
        assert [p.name for p in trainer.val_loader.paths] == ["shard_00002.parquet"]
        trainer.train()
        losses = dict(trainer.loss_history)
    finally:
        trainer.close()
    assert sorted(losses) == [1, 2, 3, 4] and all(torch.isfinite(torch.tensor(list(losses.values()))))
    assert losses[4] < losses[1]  # it learns from those shards
    assert _hashes(folder) == before  # read, never written


def test_local_without_local_path_or_data_dir_is_one_line():
    with pytest.raises(UserError, match=r"needs data.local_path .* or data.data_dir"):
        load_config(TINY + ["--data.dataset=local"])


def test_local_build_into_a_foreign_folder_is_refused(tmp_path):
    source = tmp_path / "texts"
    source.mkdir()
    for i in range(3):
        (source / f"{i}.txt").write_text(f"document {i} " * 20)
    folder = tmp_path / "my_shards"
    before = _ready_shards(folder)
    cfg = replace(DataConfig(), dataset="local", local_path=str(source), data_dir=str(folder))
    with pytest.raises(UserError, match=f"data folder {folder} is not empty") as info:
        prepare_corpus(cfg)
    assert "\n" not in str(info.value)
    assert _hashes(folder) == before


def test_own_folder_rules(tmp_path):
    folder = tmp_path / "corpus"
    embedded = replace(DataConfig(), data_dir=str(folder))
    prepare_corpus(embedded)
    assert json.loads((folder / "corpus.json").read_text())["source"] == "embedded"

    # another corpus into it: refused, the embedded shards stay
    source = tmp_path / "texts"
    source.mkdir()
    for i in range(3):
        (source / f"{i}.txt").write_text(f"document {i} " * 20)
    before = _hashes(folder)
    with pytest.raises(UserError, match="holds the corpus 'embedded' that titanlite prepared, not 'local'"):
        prepare_corpus(replace(embedded, dataset="local", local_path=str(source)))
    assert _hashes(folder) == before

    # a shard of the user's added to titanlite's folder is never removed by a rebuild
    (folder / "corpus.json").write_text(json.dumps({"source": "embedded", "complete": False}))  # forces a rebuild
    pq.write_table(pa.table({"text": ["mine"]}), folder / "extra.parquet")
    with pytest.raises(UserError, match="holds extra.parquet, a shard titanlite did not write"):
        prepare_corpus(embedded)
    assert (folder / "extra.parquet").is_file()
    (folder / "extra.parquet").unlink()

    # an interrupted build (incomplete manifest) is titanlite's: rebuilt in place
    assert prepare_corpus(embedded) == folder
    assert "complete" not in json.loads((folder / "corpus.json").read_text())
    assert not (folder / "extra.parquet").exists()


def test_download_never_writes_into_a_foreign_folder(tmp_path, monkeypatch):
    import urllib.request

    def no_network(*args, **kwargs):
        raise AssertionError("nothing may be fetched into a foreign folder")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "data.parquet").write_bytes(b"not even parquet")
    with pytest.raises(UserError, match=f"data folder {folder} is not empty"):
        download.download_shards("climbmix", folder, num_shards=1)
    assert sorted(p.name for p in folder.iterdir()) == ["data.parquet"]

    # a folder holding only that dataset's shard files (an older download) is taken over: nothing else is there
    older = tmp_path / "older"
    older.mkdir()
    (older / "shard_00000.parquet.tmp").write_bytes(b"partial")
    assert shards.claim_folder(older, download.DATASETS["climbmix"].repo, download.DOWNLOADED_FILE) is None
    with pytest.raises(UserError, match="is not empty"):
        shards.claim_folder(older, download.DATASETS["climbmix"].repo)  # without the exception: foreign


"""Folders every rank must share, on 2 gloo processes: each rank may be given its own folder, as two nodes with
node-local disks would each see their own disk at the same path."""

import shutil
from pathlib import Path

import pytest

from tests.helpers.dist import run_in_processes


def _node_folder(root: Path, rank: int, shared: bool) -> Path:
    return root / ("shared" if shared else f"node{rank}") / "run"


def _scenarios(rank, world_size, root):
    """Every scenario in one pair of processes (each spawn costs seconds)."""
    return {"trainer": _trainer_on_node_local_disks(rank, root),
            "run_folder": {shared: _check_run_folder(rank, root, shared) for shared in (True, False)},
            "data": {layout: _check_data(rank, Path(root) / layout, layout)
                     for layout in ("shared", "copied", "missing", "different")}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared_fs")
    return root, run_in_processes(_scenarios, 2, args=(str(root),), timeout=180)


def _trainer_on_node_local_disks(rank, root):
    """The trainer itself, each rank given its own dump folder: it must stop before writing anything there."""
    from titanlite.config import load_config
    from titanlite.errors import UserError
    from titanlite.train import Trainer

    dump = Path(root) / f"node{rank}" / "outputs"
    try:
        Trainer(load_config(["--job.config_file", "train_configs/debug_cpu.toml", f"--job.dump_folder={dump}",
                             "--metrics.peak_flops=1e12", "--training.device_type=cpu"]))
    except UserError as error:
        return str(error)
    return None


def test_trainer_with_node_local_dump_folders_stops_at_start(runs):
    tmp_path = runs[0]
    for error in (r["trainer"] for r in runs[1]):
        assert error is not None and "\n" not in error
        assert error.startswith(f"the run folder {tmp_path / 'node0' / 'outputs'}"), error
        assert "is not shared between the nodes: rank 1 on " in error


def _check_run_folder(rank, root, shared):
    from titanlite.errors import UserError
    from titanlite.shared_fs import check_run_folder_shared

    folder = _node_folder(Path(root), rank, shared)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "kept.txt").write_text("a file titanlite did not write")
    import torch.distributed as dist
    error = None
    try:
        check_run_folder_shared(folder)
    except UserError as exc:
        error = str(exc)
    dist.barrier()  # rank 0 removes the marker once everyone has read it: look after that
    return {"error": error, "left": sorted(p.name for p in folder.iterdir())}


def test_run_folder_seen_by_every_rank_passes_and_leaves_nothing(runs):
    for result in runs[1]:
        assert result["run_folder"][True] == {"error": None, "left": ["kept.txt"]}


def test_node_local_run_folders_stop_every_rank_with_one_line(runs):
    tmp_path = runs[0]
    for result in (r["run_folder"][False] for r in runs[1]):
        error = result["error"]
        assert error is not None and "\n" not in error
        assert error.startswith(f"the run folder {tmp_path / 'node0' / 'run'} is not shared between the nodes: "
                                "rank 1 on ")
        assert "does not see the file rank 0 just wrote there" in error and "job.dump_folder" in error
        assert result["left"] == ["kept.txt"]  # the marker is gone, the user's file untouched


def _check_data(rank, root, layout):
    from titanlite.errors import UserError
    from titanlite.shared_fs import check_same_files

    root = Path(root)
    reference = root / "node0" / "data"
    if rank == 0:
        (reference / "sub").mkdir(parents=True)
        (reference / "shard_00000.parquet").write_bytes(b"x" * 100)
        (reference / "sub" / "tokenizer.json").write_text("{}")
        (reference / ".lock").write_text("")  # hidden files are not the data
    import torch.distributed as dist
    dist.barrier()  # rank 0 "prepared" the data
    folder = reference if rank == 0 or layout == "shared" else root / "node1" / "data"
    if rank == 1 and layout in ("copied", "different"):
        shutil.copytree(reference, folder, ignore=shutil.ignore_patterns(".lock"))
        if layout == "different":
            (folder / "shard_00000.parquet").write_bytes(b"x" * 99)
    try:
        check_same_files([("the corpus folder", folder, "data.data_dir")])
    except UserError as error:
        return str(error)
    return None


def test_data_folder_shared_or_copied_to_every_node_passes(runs):
    for layout in ("shared", "copied"):
        assert [r["data"][layout] for r in runs[1]] == [None, None]


def test_missing_or_different_data_on_a_node_stops_every_rank_with_one_line(runs):
    tmp_path = runs[0]
    for layout, how in (("missing", "has no such folder"), ("different", "finds 2 files there")):
        for error in (r["data"][layout] for r in runs[1]):
            assert error is not None and "\n" not in error, layout
            assert error.startswith(f"the corpus folder {tmp_path / layout / 'node0' / 'data'} is not shared "
                                    "between the nodes: rank 1 on "), error
            assert how in error and "data.data_dir" in error

"""scripts.scaling_sweep end to end: real trainer runs in child processes at toy budgets, a sweep killed mid-run
and restarted, a failing run recorded, and the printed commands read back through the config parser."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.runs import prepared_home
from titanlite.config import load_config

REPO = Path(__file__).resolve().parents[2]
TOY = [
    "--model.aspect_ratio=32", "--model.head_dim=32", "--model.max_seq_len=64", "--model.window_pattern=L",
    "--training.device_type=cpu", "--training.dtype=float32", "--training.device_batch_size=4",
    "--training.total_batch_size=256", "--data.vocab_size=512", "--data.loader_threads=1",
    "--eval.eval_every=100000", "--eval.eval_tokens=1024", "--eval.sample_every=-1", "--eval.core_metric_every=-1",
    "--metrics.log_every=5", "--metrics.peak_flops=1e11", "--compile.enabled=false",
    "--lr_scheduler.warmup_steps=0",
]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    yield from prepared_home(tmp_path_factory, TOY)


def _env(home: Path) -> dict:
    return {**os.environ, "TITANLITE_HOME": str(home), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _sweep(home: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "scripts.scaling_sweep", *TOY, *args], cwd=REPO, env=_env(home),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _starts(run_dir: Path) -> int:
    """How many times a trainer started in this run folder: it prints its plan once per start."""
    return (run_dir / "train.log").read_text().count("Plan for depth")


def test_sweep_killed_mid_run_restarts_without_repeating_finished_runs(home, tmp_path):
    out = tmp_path / "sweep"
    args = ["--depths", "1,2", "--flops", "4e9,8e9", "--out", str(out)]
    names = ["C4e9-d1", "C4e9-d2", "C8e9-d1", "C8e9-d2"]
    first = _sweep(home, *args)
    victim = out / names[2]  # the third run, 160 steps of the smallest model
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        log = victim / "train.log"
        if log.is_file() and "step 00010/" in log.read_text():
            break
        assert first.poll() is None, first.stdout.read()
        time.sleep(0.05)
    else:
        pytest.fail("the third run never got going")
    first.send_signal(signal.SIGKILL)  # the sweep dies outright; its child gets SIGTERM from the kernel
    first.wait()
    first.stdout.close()
    assert not (victim / "summary.json").exists(), "killed too late: the run had finished"
    finished_before = {n: (out / n / "summary.json").stat().st_mtime_ns for n in names[:2]}

    second = _sweep(home, *args)
    text, _ = second.communicate(timeout=120)
    assert second.returncode == 0, text

    for name in names[:2]:  # finished before the kill: not run again
        assert _starts(out / name) == 1
        assert (out / name / "summary.json").stat().st_mtime_ns == finished_before[name]
    assert _starts(victim) == 2  # interrupted: run again, from the checkpoint its SIGTERM save wrote
    assert "Resumed from" in (victim / "train.log").read_text()
    assert _starts(out / names[3]) == 1
    summary = json.loads((victim / "summary.json").read_text())
    assert summary["steps"] == summary["plan"]["num_iterations"]
    # the horizon is the budget: whole steps of FLOPs/token x tokens/step nearest to 8e9 (hand arithmetic)
    per_step = summary["plan"]["flops_per_token"] * 256
    assert summary["steps"] == round(8e9 / per_step)

    table_rows = [line for line in text.splitlines() if line.split(" ")[0] in names]
    assert len(table_rows) == 4 and all(line.rstrip().endswith("finished") for line in table_rows), text
    data = json.loads((out / "sweep.json").read_text())
    assert sorted(r["name"] for r in data["runs"]) == names
    assert all(r["status"] == "finished" and r["val_bpb"] > 0 for r in data["runs"])
    png = (out / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_a_failing_run_is_recorded_and_the_sweep_goes_on(home, tmp_path):
    out = tmp_path / "sweep"
    # d2 costs 8.85e5 FLOPs/token x 256 tokens = 2.3e8 FLOPs a step: 1e8 rounds to 0 steps (the trainer refuses),
    # 2.5e8 to 1 step. Runs go budget by budget, so the failure comes first and the next run must still happen.
    args = ["--depths", "2", "--flops", "1e8,2.5e8", "--out", str(out)]
    proc = _sweep(home, *args)
    text, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, text
    failure = json.loads((out / "C1e8-d2" / "sweep_failure.json").read_text())
    assert failure["error"].startswith("error: the horizon from training.target_flops gives 0 steps")
    assert failure["exit_code"] == 2
    assert text.index("C1e8-d2: FAILED") < text.index("C2.5e8-d2: finished"), text
    data = json.loads((out / "sweep.json").read_text())
    assert {r["name"]: r["status"] for r in data["runs"]} == {"C1e8-d2": "failed", "C2.5e8-d2": "finished"}
    assert data["runs"][1]["steps"] == 1
    # run again: nothing to do, the failure is kept rather than retried
    again = _sweep(home, *args)
    text, _ = again.communicate(timeout=90)
    assert again.returncode == 0 and "1 failed before" in text and "0 to run" in text, text
    assert (out / "C1e8-d2" / "train.log").read_text().count("error: the horizon") == 1


def test_print_launcher_gives_one_trainer_command_per_run(tmp_path, capsys):
    from scripts.scaling_sweep import main

    out = tmp_path / "sweep"
    assert main([*TOY, "--depths", "3,5", "--flops", "1e12,3e12", "--out", str(out), "--launch", "print",
                 "--nproc-per-node", "2", "--training.seed=7"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    seen = set()
    for line in lines:
        words = shlex.split(line)
        assert words[:4] == ["torchrun", "--standalone", "--nproc-per-node=2", "-m"] and words[4] == "titanlite.train"
        config = load_config(words[5:])
        seen.add((config.model.depth, config.training.target_flops))
        assert config.training.num_iterations == -1 and config.training.target_param_data_ratio == -1
        assert config.training.seed == 7 and config.model.max_seq_len == 64
        assert Path(config.job.dump_folder) == out.resolve()
        assert config.checkpoint.model_tag == f"C{config.training.target_flops:.0e}".replace("e+", "e") + \
            f"-d{config.model.depth}"
    assert seen == {(3, 1e12), (5, 1e12), (3, 3e12), (5, 3e12)}


@pytest.mark.parametrize("extra, message", [
    (["--model.depth=4"], "--model.depth is set by the sweep"),
    (["--training.num_iterations", "5"], "--training.num_iterations is set by the sweep"),
    (["--eval.eval_every=-1"], "eval.eval_every <= 0"),
    (["--launch", "slurm"], "--launch 'slurm' is not one of"),
])
def test_user_mistakes_end_in_one_line(tmp_path, capsys, extra, message):
    from scripts.scaling_sweep import main
    from titanlite.cli import run_cli

    code = run_cli(main, [*TOY, "--depths", "1,2", "--flops", "1e10", "--out", str(tmp_path / "s"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_a_sweep_folder_refuses_other_settings(tmp_path, capsys):
    from scripts.scaling_sweep import main
    from titanlite.cli import run_cli

    common = [*TOY, "--depths", "1,2", "--flops", "1e10", "--out", str(tmp_path / "s"), "--launch", "print"]
    assert run_cli(main, common) == 0
    assert run_cli(main, [*common[:-2], "--depths", "1,2,3", "--launch", "print"]) == 0  # more depths: fine
    capsys.readouterr()
    assert run_cli(main, [*common, "--model.max_seq_len=128"]) == 2
    err = capsys.readouterr().err
    assert "holds runs with model.max_seq_len = 64" in err and "128" in err


def test_collect_without_matplotlib_still_writes_sweep_json_and_says_why_there_is_no_png(tmp_path, monkeypatch,
                                                                                        capsys):
    import builtins

    from scripts.scaling_sweep import main
    from titanlite.sweep.runs import run_name

    out = tmp_path / "sweep"
    assert main([*TOY, "--depths", "1", "--flops", "1e10", "--out", str(out), "--launch", "print"]) == 0
    (out / run_name(1e10, 1)).mkdir()
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    capsys.readouterr()
    assert main(["--out", str(out), "--collect"]) == 0
    text = capsys.readouterr().out
    assert "drawing it needs matplotlib" in text and (out / "sweep.json").is_file()
    assert not (out / "sweep.png").exists()
    assert json.loads((out / "sweep.json").read_text())["runs"][0]["status"] == "pending"


def test_a_run_another_sweep_holds_is_skipped_not_failed(tmp_path):
    # Two sweeps on one folder (e.g. different budgets, then overlapping) can both start the same run between the
    # lock check and the trainer's own lock: the loser's trainer fails on the lock, which is not the run's failure.
    from titanlite.run_lock import LOCK_FILE, this_process
    from titanlite.sweep.launch import LocalRunner, held_by_another

    folder = tmp_path / "C1e10-d1"
    folder.mkdir()
    (folder / LOCK_FILE).write_text(json.dumps(this_process()))  # a live holder: this test process
    outcome = LocalRunner().run([sys.executable, "-c", "import sys; print('error: in use'); sys.exit(2)"], folder)
    assert outcome.exit_code == 2 and outcome.error == "error: in use" and outcome.pid > 0
    assert f"PID {os.getpid()}" in held_by_another(folder, outcome.pid)
    # the holder is our own (now finished) child: a real failure of the run
    (folder / LOCK_FILE).write_text(json.dumps({**this_process(), "pid": outcome.pid, "start_ticks": None}))
    assert held_by_another(folder, outcome.pid) is None
    (folder / LOCK_FILE).unlink()
    assert held_by_another(folder, outcome.pid) is None

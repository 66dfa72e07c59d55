"""Resume without a person (`auto`, torchrun restarts), checkpoints by wall clock, the attempt namespace in
torchrun's shared store, the lock of an earlier attempt, and the plan's fault costs. About 25 s on 2 cores."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.helpers.runs import logged_lines, prepared_home, tiny_run_args, train_losses
from titanlite.agent_store import attempt_prefix
from titanlite.checkpoint import list_steps
from titanlite.elastic import choose_resume, world_change_line
from titanlite.save_clock import SaveClock

BASE = tiny_run_args(12)


# ----- which checkpoint a start resumes -------------------------------------------------------------------------

@pytest.mark.parametrize("requested, latest, restarts, step, says", [
    ("-1", None, 0, None, None),                      # an ordinary first start
    ("-1", 8, 0, None, None),                         # checkpoints there, but nobody asked
    ("7", 8, 0, 7, None),
    ("latest", 8, 0, "latest", None),
    ("auto", None, 0, None, "auto: no complete checkpoint in /r, starting fresh"),
    ("auto", 8, 0, 8, "auto: resuming the latest complete checkpoint, /r/step-000008"),
    ("-1", 8, 1, 8, "torchrun restart 1: resuming the latest complete checkpoint, /r/step-000008"),
    ("auto", None, 2, None, "torchrun restart 2: no complete checkpoint in /r yet, starting fresh"),
    ("4", 12, 1, 12, "/r/step-000012; checkpoint.resume_from_step = 4 applies to the first start only"),
])
def test_choose_resume(requested, latest, restarts, step, says):
    choice = choose_resume(requested, latest, Path("/r"), restarts)
    assert choice.step == step
    assert (choice.line is None) if says is None else (says in choice.line and "\n" not in choice.line)


def test_world_change_line_names_both_sizes_and_the_new_split(tmp_path):
    from titanlite.config import load_config
    from titanlite.models import get_train_spec
    from titanlite.scaling import derive_plan

    config = load_config(BASE + ["--training.total_batch_size=512"])  # 8 rows of 64 tokens
    step_dir = tmp_path / "step-000004"
    step_dir.mkdir()
    saved = "[training]\ndevice_batch_size = 2\n"  # 2 processes x 2 rows x 2 micro-steps
    (step_dir / "meta.json").write_text(json.dumps({"world_size": 2, "config_toml": saved}))
    plan = derive_plan(config.model, config.training, config.optimizer, 512, 1, get_train_spec("gpt"))
    assert world_change_line(step_dir, 4, plan) == (
        f"world size 2 → 1: resumed from step 4 ({step_dir}); the global batch stays 512 tokens per step, "
        "grad accumulation 2 → 4 micro-steps")
    same = derive_plan(config.model, config.training, config.optimizer, 512, 2, get_train_spec("gpt"))
    assert world_change_line(step_dir, 4, same) is None


# ----- the save clock -----------------------------------------------------------------------------------------

class FakeClock:
    def __init__(self, tick: float):
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_save_clock_is_due_a_full_period_after_the_last_save():
    clock = FakeClock(tick=20.0)      # every reading is 20 s later than the previous one
    saves = SaveClock(1.0, clock)     # read at 20
    assert saves.enabled and not saves.due() and not saves.due()  # 40, 60: 20 s and 40 s since
    assert saves.due()                # 80: 60 s since
    saves.reset()                     # 100
    assert not saves.due() and not saves.due() and saves.due()  # 120, 140, 160
    assert not SaveClock(-1, clock).enabled and not SaveClock(-1, clock).due()


# ----- torchrun's shared store: a namespace per attempt ---------------------------------------------------------

def _ranks_agree(store, world: int, first: int, delay: float) -> list[str]:
    """attempt_prefix on `world` threads; rank `first` starts `delay` seconds before the others."""
    results: list = [None] * world

    def rank(r):
        if r != first:
            time.sleep(delay)
        results[r] = attempt_prefix(store, r, world, timedelta(seconds=30))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def test_every_attempt_gets_a_prefix_of_its_own_even_when_rank_0_comes_last():
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=30))
    first = _ranks_agree(store, 3, first=0, delay=0.0)
    assert len(set(first)) == 1
    # the next attempt: ranks 1 and 2 find the previous attempt's number (and its answers) in the store and must
    # not take it; rank 0 arrives half a second later
    second = _ranks_agree(store, 3, first=1, delay=0.5)
    assert len(set(second)) == 1 and second[0] != first[0]
    third = _ranks_agree(store, 2, first=1, delay=0.3)  # a smaller world (a node lost)
    assert len(set(third)) == 1 and third[0] not in (first[0], second[0])


# ----- the lock of an earlier attempt --------------------------------------------------------------------------

def _foreign_lock(folder: Path, job: str | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.lock"
    path.write_text(json.dumps({"host": "another-node", "pid": 4242, "started": "yesterday", "torchrun_job": job}))
    return path


@pytest.mark.parametrize("holder_job, my_job, taken", [
    ("job-17", "job-17", True),    # an earlier attempt of this torchrun job on a node that is gone
    ("job-16", "job-17", False),   # another job on another host: nothing here can tell it ended
    ("none", "none", False),       # torchrun's default id is shared by unrelated jobs
    (None, "", False),             # not under torchrun
])
def test_lock_of_an_earlier_attempt_on_another_host(tmp_path, monkeypatch, holder_job, my_job, taken):
    from titanlite.errors import UserError
    from titanlite.run_lock import RunLock

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", my_job)
    path = _foreign_lock(tmp_path, holder_job)
    if taken:
        lock = RunLock(tmp_path).acquire()
        assert json.loads(path.read_text())["pid"] != 4242
        lock.release()
        assert not path.exists()
    else:
        with pytest.raises(UserError, match="is in use by another run"):
            RunLock(tmp_path).acquire()
        assert json.loads(path.read_text())["pid"] == 4242


# ----- trainer runs ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def home(tmp_path_factory):
    torch.set_num_threads(1)
    yield from prepared_home(tmp_path_factory, BASE)


def _captured(argv) -> tuple[dict[int, float], list[str]]:
    """(raw step losses, every INFO line) of an in-process run."""
    with logged_lines() as lines:
        return train_losses(argv), lines


def test_auto_starts_fresh_then_resumes_step_4_past_a_leftover_tmp(home, tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    straight = train_losses(BASE + [f"--job.dump_folder={tmp_path / 'straight'}"])
    run = [f"--job.dump_folder={tmp_path}", "--checkpoint.save_every=4", "--checkpoint.resume_from_step=auto"]
    fresh, lines = _captured(BASE + run + ["--debug.stop_after_steps=6"])
    assert f"checkpoint.resume_from_step = auto: no complete checkpoint in {tmp_path / 'd2'}, starting fresh" in lines
    assert sorted(fresh) == list(range(1, 7)) and list_steps(tmp_path / "d2") == [4]
    leftover = tmp_path / "d2" / ".step-000006.tmp"  # a save killed midway
    leftover.mkdir()
    (leftover / "__0_0.distcp").write_bytes(b"partial")
    resumed, lines = _captured(BASE + run)
    assert (f"checkpoint.resume_from_step = auto: resuming the latest complete checkpoint, "
            f"{tmp_path / 'd2'}/step-000004") in lines
    assert not leftover.exists()
    assert sorted(resumed) == list(range(5, 13))
    for step in resumed:
        assert resumed[step] == straight[step], step  # bitwise, as any same-layout resume


def test_a_torchrun_restart_resumes_the_latest_whatever_the_flag_says(home, tmp_path, monkeypatch):
    run = BASE + [f"--job.dump_folder={tmp_path}", "--checkpoint.save_every=4"]
    train_losses(run + ["--debug.stop_after_steps=9"])
    assert list_steps(tmp_path / "d2") == [4, 8]
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    resumed, lines = _captured(run + ["--checkpoint.resume_from_step=4"])
    assert [line for line in lines if line.startswith("torchrun restart")] == [
        f"torchrun restart 1: resuming the latest complete checkpoint, {tmp_path / 'd2'}/step-000008; "
        "checkpoint.resume_from_step = 4 applies to the first start only"]
    assert sorted(resumed) == list(range(9, 13))


def test_save_every_minutes_saves_by_the_clock(home, tmp_path, monkeypatch):
    """A clock that reads 1 s later at every look: with a 3 s period the saves fall every third step boundary.

    Readings: construction 1, loop start 2 (reset), boundaries of steps 0, 1, 2 at 3, 4, 5 -> due at step 2
    (5 - 2 >= 3); the save resets at 6; steps 3, 4, 5 at 7, 8, 9 -> due at step 5; and so on: 2, 5, 8, 11."""
    import titanlite.save_clock as save_clock

    clock = FakeClock(tick=1.0)
    monkeypatch.setattr(save_clock, "now", clock)
    train_losses(BASE + [f"--job.dump_folder={tmp_path}", "--checkpoint.save_every_minutes=0.05"])
    assert list_steps(tmp_path / "d2") == [2, 5, 8, 11, 12]  # 12: the final save


def test_plan_block_states_the_checkpoint_size_it_then_writes(home, tmp_path):
    import re

    _, lines = _captured(BASE + [f"--job.dump_folder={tmp_path}", "--checkpoint.save_every=4",
                                 "--checkpoint.save_every_minutes=30", "--debug.stop_after_steps=4"])
    plan = next(line for line in lines if line.startswith("Plan for depth"))
    size = re.search(r"checkpoint cost   : ([\d.]+) (kB|MB) per save", plan)
    assert size and "at most 4 steps (checkpoint.save_every) or 30 min (checkpoint.save_every_minutes)" in plan
    estimate = float(size.group(1)) * {"kB": 1e3, "MB": 1e6}[size.group(2)]
    tensors = sum(p.stat().st_size for p in (tmp_path / "d2" / "step-000004").glob("*.distcp"))
    assert 0.8 * tensors < estimate <= tensors  # weights + optimizer state; the files add data-loader state


def test_config_refuses_a_bad_resume_or_period():
    from titanlite.config import load_config
    from titanlite.errors import UserError

    with pytest.raises(UserError, match="'latest', 'auto' or -1"):
        load_config(BASE + ["--checkpoint.resume_from_step=soon"])
    with pytest.raises(UserError, match="save_every_minutes must be positive or -1"):
        load_config(BASE + ["--checkpoint.save_every_minutes=0"])
    assert load_config(BASE + ["--checkpoint.save_every_minutes=30"]).checkpoint.save_every_minutes == 30.0


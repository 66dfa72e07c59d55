"""The stop/publish agreement between steps on 2 gloo processes: every few steps, not every step, on no extra
process group, and every rank learns of one rank's SIGTERM at the same step."""

import time

from tests.helpers.dist import run_in_processes

STEPS, SIGNAL_AT, STEP_S, PERIOD_S = 60, 17, 0.01, 0.1


def _loop(rank, world_size):
    import torch.distributed as dist

    from tests.helpers.fake_world import CollectiveRecorder
    from titanlite import step_control

    step_control.CHECK_PERIOD_S = PERIOD_S
    control = step_control.StepControl(distributed=True, is_main=rank == 0, needed=True)
    stopped_at, checked_at = None, []
    recorder = CollectiveRecorder()
    with recorder:
        for step in range(STEPS):
            if control.due(step):
                checked_at.append(step)
                stop, _, _ = control.agree(step, stop=rank == 1 and step >= SIGNAL_AT, unfinished=False)
                if stop:
                    stopped_at = step
                    break
            time.sleep(STEP_S)  # the step
    return {"group": control.group, "default_backend": dist.get_backend(), "stopped_at": stopped_at,
            "checked_at": checked_at, "all_reduces": recorder.count("allreduce_")}


def test_ranks_agree_every_few_steps_and_stop_together():
    ranks = run_in_processes(_loop, world_size=2, timeout=120)
    for result in ranks:
        assert result["default_backend"] == "gloo" and result["group"] is None  # no extra gloo group on CPU
    assert ranks[0]["checked_at"] == ranks[1]["checked_at"]  # the same steps on both ranks
    checked = ranks[0]["checked_at"]
    assert ranks[0]["all_reduces"] == ranks[1]["all_reduces"] == len(checked)
    # about one check per PERIOD_S of ~STEP_S steps (10 steps): far fewer than one per step
    assert checked[:2] == [0, 1] and len(checked) <= 2 + SIGNAL_AT // 3 + 2
    assert ranks[0]["stopped_at"] == ranks[1]["stopped_at"] is not None
    # rank 1's signal is seen at the first check at or after it: within one period of steps
    stopped = ranks[0]["stopped_at"]
    assert SIGNAL_AT <= stopped <= SIGNAL_AT + PERIOD_S / STEP_S + 1

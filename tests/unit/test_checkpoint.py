"""CheckpointManager in one process: layout, meta.json, retention, async, and every load error as a UserError."""

import dataclasses
import json

import pytest
import torch

from titanlite.checkpoint import CheckpointManager, list_steps
from titanlite.config.sections import CheckpointConfig
from titanlite.distributed import WorldInfo
from titanlite.errors import UserError
from titanlite.models.gpt.model import GPT, GPTArgs
from titanlite.train_state import TrainState

ARGS = GPTArgs(n_layer=2, n_embd=64, n_head=2, n_kv_head=2, head_dim=32, vocab_size=512, sequence_len=32,
               window_pattern="L", attention_backend="sdpa")
WORLD = WorldInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), mesh=None, dp_shard=1,
                  dp_replicate=1)



def trained(seed: int, args: GPTArgs = ARGS):
    """A model + AdamW after one step (so the optimizer has state), and a train state."""
    torch.manual_seed(seed)
    model = GPT(args)
    model.init_weights()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, args.vocab_size, (2, 16))
    model(idx, idx).backward()
    optimizer.step()
    return model, optimizer, TrainState(step=seed, tokens_seen=1000 * seed, min_val_bpb=0.5 + seed)


def states_of(model, optimizer, train_state, streams=None):
    return {"model": model, "optimizer": optimizer, "train_state": train_state,
            "dataloader": dict(streams if streams is not None else {"stream_0": "{}"})}


def manager(tmp_path, **cfg) -> CheckpointManager:
    return CheckpointManager(CheckpointConfig(**cfg), tmp_path / "run", WORLD)


def assert_same_params(a, b):
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(x, y), name


def test_round_trip_layout_and_meta(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.toml").write_text("[model]\ndepth = 2\n")
    ckpt = manager(tmp_path)
    model, optimizer, state = trained(3)
    ckpt.save(3, states_of(model, optimizer, state, {"stream_0": '{"pos": 17}', "stream_1": b"\x00bytes"}))
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["config.toml", "step-000003"]  # no temp folder left
    meta = json.loads((run / "step-000003" / "meta.json").read_text())
    assert meta["step"] == 3 and meta["config_toml"] == "[model]\ndepth = 2\n"
    assert meta["model_args"] == dataclasses.asdict(ARGS)
    assert ckpt.latest_step() == 3

    other, other_opt, other_state = trained(9)
    states = states_of(other, other_opt, other_state, {"stream_0": "", "stream_1": b""})
    assert ckpt.load("latest", states) == 3
    assert_same_params(other, model)
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(optimizer.state[p]["exp_avg_sq"], other_opt.state[q]["exp_avg_sq"])
    assert json.dumps(dataclasses.asdict(other_state)) == json.dumps(dataclasses.asdict(state))  # nan-safe
    assert states["dataloader"] == {"stream_0": '{"pos": 17}', "stream_1": b"\x00bytes"}


def test_keep_latest_k_and_resave(tmp_path):
    ckpt = manager(tmp_path, keep_latest_k=2)
    model, optimizer, state = trained(1)
    for step in (1, 2, 3, 4):
        ckpt.save(step, states_of(model, optimizer, state))
    assert list_steps(tmp_path / "run") == [3, 4]
    state.tokens_seen = 4242
    ckpt.save(4, states_of(model, optimizer, state), final=True)  # same step again: replaced, not an error
    assert list_steps(tmp_path / "run") == [3, 4]
    fresh = TrainState()
    ckpt.load(4, states_of(*trained(2)[:2], fresh))
    assert fresh.tokens_seen == 4242


def test_async_save_captures_the_state_at_save_time(tmp_path):
    ckpt = manager(tmp_path, async_mode="async")
    model, optimizer, state = trained(1)
    snapshot = [p.detach().clone() for p in model.parameters()]
    ckpt.save(5, states_of(model, optimizer, state))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # training goes on while the save is in flight
    ckpt.close()
    assert ckpt.latest_step() == 5
    other, other_opt, other_state = trained(2)
    ckpt.load(5, states_of(other, other_opt, other_state))
    for p, expected in zip(other.parameters(), snapshot):
        assert torch.equal(p, expected)


def test_async_save_is_published_only_when_finished(tmp_path):
    ckpt = manager(tmp_path, async_mode="async")
    model, optimizer, state = trained(1)
    ckpt.save(1, states_of(model, optimizer, state))
    ckpt.wait()
    ckpt.save(2, states_of(model, optimizer, state))
    # in flight, or written but not yet published: either way not visible as a checkpoint
    assert ckpt._pending is not None
    assert not (tmp_path / "run" / "step-000002").exists() and ckpt.latest_step() == 1
    ckpt.save(3, states_of(model, optimizer, state), final=True)  # waits for 2 first; final is synchronous
    assert list_steps(tmp_path / "run") == [1, 2, 3]


def test_load_errors_are_user_errors(tmp_path):
    ckpt = manager(tmp_path)
    model, optimizer, state = trained(1)
    with pytest.raises(UserError, match="no complete checkpoint"):
        ckpt.load("latest", states_of(model, optimizer, state))
    ckpt.save(1, states_of(model, optimizer, state))
    with pytest.raises(UserError, match=r"step 7 not found.*available steps: 1"):
        ckpt.load(7, states_of(model, optimizer, state))
    with pytest.raises(UserError, match="stream_3"):  # asking for a key the checkpoint does not have
        ckpt.load(1, states_of(model, optimizer, state, {"stream_3": ""}))

    bigger = trained(1, dataclasses.replace(ARGS, n_layer=3))
    with pytest.raises(UserError, match=r"different model \(n_layer=2\).*configured now \(n_layer=3\)"):
        ckpt.load(1, states_of(*bigger))


def test_partial_and_corrupt_checkpoints(tmp_path):
    ckpt = manager(tmp_path)
    model, optimizer, state = trained(1)
    for step in (1, 2, 3):
        ckpt.save(step, states_of(model, optimizer, state))
    run = tmp_path / "run"
    (run / "step-000002" / ".metadata").unlink()      # partial: DCP metadata missing
    for data_file in (run / "step-000003").glob("*.distcp"):
        data_file.write_bytes(b"garbage")             # corrupt: data files overwritten
    (run / ".step-000004.tmp").mkdir()                # an interrupted save
    assert list_steps(run) == [1, 3]
    with pytest.raises(UserError, match="incomplete or corrupt"):
        ckpt.load(2, states_of(model, optimizer, state))
    with pytest.raises(UserError, match="could not load checkpoint"):
        ckpt.load(3, states_of(model, optimizer, state))
    (run / "step-000003" / "meta.json").unlink()
    assert ckpt.latest_step() == 1
    ckpt.save(4, states_of(model, optimizer, state))  # clears the stale temp folder, publishes step 4
    assert not (run / ".step-000004.tmp").exists() and ckpt.latest_step() == 4


def test_non_tensor_entries_load_without_unpickling_code(tmp_path):
    """Non-tensor entries are read with torch.load(weights_only=True): a pickled object is refused."""
    ckpt = manager(tmp_path)
    model, optimizer, state = trained(1)
    ckpt.save(1, states_of(model, optimizer, state, {"stream_0": WorldInfo}))  # a class: needs full unpickling
    with pytest.raises(UserError, match="could not load checkpoint"):
        ckpt.load(1, states_of(model, optimizer, state, {"stream_0": ""}))


def test_export_to_safetensors_and_load(tmp_path):
    from safetensors import safe_open

    from scripts.export import main as export_main
    from titanlite.export import load_exported

    ckpt = manager(tmp_path)
    model, optimizer, state = trained(4)
    ckpt.save(4, states_of(model, optimizer, state))
    assert export_main([str(tmp_path / "run"), "--out", str(tmp_path / "fp32")]) == 0
    assert export_main([str(tmp_path / "run" / "step-000004"), "--out", str(tmp_path / "bf16"),
                        "--dtype", "bfloat16"]) == 0
    config = json.loads((tmp_path / "fp32" / "config.json").read_text())
    assert config["model_args"] == dataclasses.asdict(ARGS) and config["step"] == 4
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(name for name, _ in model.named_parameters())
        assert f.get_tensor("wte.weight").dtype == torch.bfloat16

    idx = torch.randint(0, ARGS.vocab_size, (2, 16))
    exported = load_exported(tmp_path / "fp32")
    assert_same_params(exported, model)
    with torch.no_grad():
        torch.testing.assert_close(exported(idx), model(idx), rtol=0, atol=0)
        half = load_exported(tmp_path / "bf16" / "model.safetensors")
        torch.testing.assert_close(half(idx), model(idx), rtol=0.05, atol=0.05)
    with pytest.raises(UserError, match="not an exported model"):
        load_exported(tmp_path)
    with pytest.raises(UserError, match="available steps: 4"):
        export_main([str(tmp_path / "run"), "--step", "9"])


def test_tokenizer_fingerprint_is_checked_and_old_checkpoints_load(tmp_path):
    from titanlite.checkpoint import CheckpointManager

    model, optimizer, state = trained(1)
    old = manager(tmp_path)  # a checkpoint written before fingerprints existed
    old.save(1, states_of(model, optimizer, state))
    assert json.loads((tmp_path / "run" / "step-000001" / "meta.json").read_text())["tokenizer_fingerprint"] is None
    ours = CheckpointManager(CheckpointConfig(), tmp_path / "run", WORLD, tokenizer_fingerprint="a" * 64)
    assert ours.load(1, states_of(model, optimizer, state)) == 1
    ours.save(2, states_of(model, optimizer, state))
    assert ours.load(2, states_of(model, optimizer, state)) == 2
    other = CheckpointManager(CheckpointConfig(), tmp_path / "run", WORLD, tokenizer_fingerprint="b" * 64)
    with pytest.raises(UserError, match=r"step-000002 was trained with another tokenizer \(fingerprint aaaaaaaaaaaa, "
                                        r"the configured one is bbbbbbbbbbbb\)"):
        other.load(2, states_of(model, optimizer, state))
    assert other.load(1, states_of(model, optimizer, state)) == 1


def test_tokenizer_fingerprint_changes_with_any_rank_or_special():
    from titanlite.data.tokenizer import Tokenizer

    ranks = {bytes([i]): i for i in range(256)}
    base = Tokenizer(ranks).fingerprint()
    assert base == Tokenizer(dict(ranks)).fingerprint() and len(base) == 64
    swapped = dict(ranks) | {b"a": ranks[b"b"], b"b": ranks[b"a"]}
    assert Tokenizer(swapped).fingerprint() != base
    assert Tokenizer(ranks, special_tokens=("<|bos|>",)).fingerprint() != base


def test_remove_interrupted_saves_puts_back_a_step_caught_between_renames(tmp_path):
    from titanlite.checkpoint import remove_interrupted_saves

    ckpt = manager(tmp_path)
    model, optimizer, state = trained(1)
    ckpt.save(1, states_of(model, optimizer, state))
    ckpt.save(2, states_of(model, optimizer, state))
    run = tmp_path / "run"
    # re-saving step 2 was killed after moving the old copy aside and before renaming the new one in
    (run / "step-000002").rename(run / ".step-000002.replaced")
    (run / ".step-000002.tmp").mkdir()
    (run / ".step-000001.replaced").mkdir()  # a leftover whose step is complete: just removed
    remove_interrupted_saves(run)
    assert sorted(p.name for p in run.iterdir()) == ["step-000001", "step-000002"]
    assert ckpt.load("latest", states_of(model, optimizer, state)) == 2


def test_sync_save_failure_removes_tmp_and_names_cause(tmp_path, monkeypatch):
    import errno

    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    ckpt = manager(tmp_path)
    model, optimizer, state = trained(1)
    ckpt.save(1, states_of(model, optimizer, state))
    raised = []

    def full_disk(self, plan, planner):
        (self.path / "__0_0.distcp").write_bytes(b"\0" * 100)  # part of a shard made it to disk
        try:
            torch.save(torch.zeros(64), _Filling(budget=100, err=errno.ENOSPC))
        except BaseException as exc:
            raised.append(exc)
            raise

    monkeypatch.setattr(FileSystemWriter, "write_data", full_disk)
    with pytest.raises(UserError, match=r"could not save checkpoint step 2: .*\.step-000002\.tmp: no space left on "
                                        r"device; the partial save was removed and the last complete checkpoint, "
                                        r".*step-000001, is intact"):
        ckpt.save(2, states_of(model, optimizer, state))
    # what torch itself raised is the opaque form users saw: the errno is only in the exception's context
    assert isinstance(raised[0], RuntimeError) and "unexpected pos" in str(raised[0])
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["step-000001"]


class _Filling:
    """A file on a disk that fills up after `budget` bytes."""

    def __init__(self, budget: int, err: int):
        self.budget, self.err = budget, err

    def write(self, data):
        import os

        if len(data) > self.budget:
            raise OSError(self.err, os.strerror(self.err))
        self.budget -= len(data)
        return len(data)

    def flush(self):
        pass

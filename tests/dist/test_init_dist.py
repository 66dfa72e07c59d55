"""On-device init from the meta model: 2 FSDP ranks start from the weights 1 process gets, without a full copy.

Each rank measures its own peak resident memory while `materialize` runs (Linux: VmHWM after resetting it through
/proc/self/clear_refs). A materialize that built the whole fp32 model on each rank's CPU first, as titanlite's
first one did, grows by at least one full copy; the per-name seeded init grows by this rank's shard plus a few
chunk buffers.
"""

import hashlib
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor

from tests.helpers.dist import run_in_processes
from titanlite.config.sections import ActivationCheckpointConfig, CompileConfig, Float8Config, ParallelismConfig
from titanlite.distributed import init_distributed, set_seed
from titanlite.models.gpt.model import GPT, GPTArgs
from titanlite.models.gpt.parallelize import parallelize_gpt
from titanlite.parallelize import materialize

# ~29M parameters: one fp32 copy (~116 MB) is far above the noise of a fresh process's RSS
ARGS = GPTArgs(n_layer=4, n_embd=512, n_head=4, n_kv_head=4, head_dim=128, vocab_size=8192, sequence_len=64,
               window_pattern="L", attention_backend="sdpa")
SEED = 4321


def _peak_rss_tracking() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set size (VmHWM)
        return True
    except OSError:
        return False


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _build_meta(world):
    with torch.device("meta"):
        model = GPT(ARGS)
    return parallelize_gpt(model, world, CompileConfig(enabled="false"), Float8Config(),
                           ActivationCheckpointConfig(mode="none"))


def _full_weights(model) -> dict[str, torch.Tensor]:
    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for name, p in model.named_parameters()}


def _init_on_rank(rank, world_size):
    world = init_distributed(ParallelismConfig(), "cpu")
    model = _build_meta(world)
    set_seed(SEED)
    tracked = _peak_rss_tracking()
    before = _rss_kib("VmRSS")
    model = materialize(model, world.device)
    growth_bytes = (_rss_kib("VmHWM") - before) * 1024 if tracked else None
    sharded = all(isinstance(p, DTensor) for p in model.parameters())
    digests = _digests(_full_weights(model))  # every rank joins the all-gathers
    return {"growth_bytes": growth_bytes, "sharded": sharded, "digests": digests}


def _digests(weights: dict[str, torch.Tensor]) -> dict[str, str]:
    """Bit-exact fingerprints: tensors themselves would travel back through shared memory the exiting worker
    takes with it."""
    return {name: hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest() for name, t in weights.items()}


def _init_in_one_process() -> dict[str, torch.Tensor]:
    from titanlite.distributed import WorldInfo

    world = WorldInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), mesh=None, dp_shard=1,
                      dp_replicate=1)
    model = _build_meta(world)
    set_seed(SEED)
    return _full_weights(materialize(model, "cpu"))


def test_two_ranks_init_the_single_process_weights_without_a_full_copy_each():
    results = run_in_processes(_init_on_rank, world_size=2, timeout=300)
    single = _init_in_one_process()
    full_copy_bytes = sum(t.numel() * 4 for t in single.values())
    assert full_copy_bytes > 100e6
    assert all(r["sharded"] for r in results)
    expected = _digests(single)
    for r in results:
        assert r["digests"].keys() == expected.keys()
        for name, digest in expected.items():
            assert r["digests"][name] == digest, name
    assert single["wte.weight"].std() > 0.5  # real random values, not a zero fill that would trivially agree
    growth = [r["growth_bytes"] for r in results]
    if growth[0] is None:
        pytest.skip("peak RSS cannot be reset here (/proc/self/clear_refs not writable); weights were checked")
    for rank, grown in enumerate(growth):
        assert grown < full_copy_bytes, f"rank {rank} grew by {grown / 1e6:.0f} MB during init " \
                                        f"(one full fp32 copy is {full_copy_bytes / 1e6:.0f} MB)"

"""FSDP2 units and collectives at 8 ranks, on a fake process group (one process, real tensors, no real peers).

What only shows at scale: which modules are FSDP units once float8 has swapped the head, which units are
gathered again for backward, and how often HSDP all-reduces across replicas under gradient accumulation.
References are counted from the model's own modules and the rules of FSDP2, never from titanlite's output.
"""

from types import SimpleNamespace

import pytest
import torch
from torch.distributed.fsdp import FSDPModule

from tests.helpers.fake_world import CollectiveRecorder, fake_world
from titanlite.config.sections import ActivationCheckpointConfig, CompileConfig, Float8Config
from titanlite.models.gpt.model import GPT, GPTArgs
from titanlite.models.gpt.parallelize import parallelize_gpt
from titanlite.models.llama.model import Llama, LlamaArgs
from titanlite.models.llama.spec import parallelize_llama
from titanlite.parallelize import materialize
from titanlite.train import Trainer

# 3 layers: value embeddings on layers 0 and 2 (alternating, always the last)
ARGS = GPTArgs(n_layer=3, n_embd=64, n_head=2, n_kv_head=2, head_dim=32, vocab_size=512, sequence_len=32,
               window_pattern="L", attention_backend="sdpa")
LLAMA_ARGS = LlamaArgs(n_layer=2, n_embd=64, n_head=2, n_kv_head=1, head_dim=32, ffn_dim=192, vocab_size=512,
                       sequence_len=32, attention_backend="sdpa")
NO_COMPILE = CompileConfig(enabled="false")
FLOAT8 = Float8Config(enabled=True, emulate=True)


def gpt(world, float8=Float8Config()):
    with torch.device("meta"):
        model = GPT(ARGS)
    return parallelize_gpt(model, world, NO_COMPILE, float8, ActivationCheckpointConfig())


def fsdp_units(model) -> dict[str, FSDPModule]:
    return {name: m for name, m in model.named_modules() if isinstance(m, FSDPModule)}


@pytest.mark.parametrize("float8", [Float8Config(), FLOAT8], ids=["bf16", "float8"])
def test_the_live_head_is_an_fsdp_unit_of_its_own(float8):
    """float8 replaces lm_head with a Float8Linear; FSDP must shard that live module, not the one it replaced
    (else the head's weight falls into the root unit and its gradient is reduce-scattered last, unoverlapped)."""
    with fake_world(8) as world:
        model = gpt(world, float8)
        units = fsdp_units(model)
        head = model.lm_head
        assert ("Float8Linear" in type(head).__name__) == float8.enabled
        assert "lm_head" in units and units["lm_head"] is head
        # the root's own parameters are exactly those outside every other unit: the head's weight is not among
        inner = {id(p) for name, m in units.items() if name for p in m.parameters()}
        root_own = [n for n, p in model.named_parameters() if id(p) not in inner]
        assert "lm_head.weight" not in root_own
        assert set(root_own) == {"resid_lambdas", "x0_lambdas", "smear_gate.weight", "smear_lambda",
                                 "backout_lambda"}


def test_llama_head_is_an_fsdp_unit_of_its_own_with_float8():
    with fake_world(8) as world:
        with torch.device("meta"):
            model = Llama(LLAMA_ARGS)
        model = parallelize_llama(model, world, NO_COMPILE, FLOAT8, ActivationCheckpointConfig())
        assert isinstance(model.lm_head, FSDPModule) and "Float8Linear" in type(model.lm_head).__name__


def _one_micro_step(model):
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, ARGS.vocab_size, (2, ARGS.sequence_len), generator=g)
    loss = model(idx, idx, loss_reduction="sum")
    return loss


def test_embeddings_are_not_gathered_again_for_backward():
    """Backward all-gathers only the units whose backward reads their weight: the blocks (resharded after
    forward). The embeddings' backward needs only indices and output gradients; the head stays gathered."""
    with fake_world(8) as world:
        model = materialize(gpt(world), "cpu")
        shard_group = world.mesh.get_group("dp_shard").group_name
        loss = _one_micro_step(model)
        recorder = CollectiveRecorder()
        with recorder:
            loss.backward()
        # reference: one all-gather per block (n_layer), nothing else; every unit reduce-scatters its gradient
        # once: blocks + wte + 2 value embeddings + head + root
        assert recorder.count("_allgather_base_", shard_group) == ARGS.n_layer
        assert recorder.count("_reduce_scatter_base_", shard_group) == ARGS.n_layer + 1 + 2 + 1 + 1
        # and the embedding gradients are still formed (shards of the right shape)
        for name in ("wte.weight", "value_embeds.0.weight", "value_embeds.2.weight"):
            grad = model.get_parameter(name).grad
            assert grad is not None and grad.shape == model.get_parameter(name).shape


def test_hsdp_all_reduces_across_replicas_once_per_step():
    """HSDP 2 x 4 with 3 micro-steps: reduce-scatters inside each replica every micro-step, but one all-reduce
    per FSDP unit across the replicas per optimizer step (Trainer.train_step itself)."""
    with fake_world(8, dp_replicate=2) as world:
        model = materialize(gpt(world), "cpu")
        replicate = world.mesh.get_group("dp_replicate").group_name
        shard = world.mesh.get_group("dp_shard").group_name
        micro_steps = 3
        g = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, ARGS.vocab_size, (2, ARGS.sequence_len), generator=g) for _ in range(micro_steps)]
        trainer = SimpleNamespace(
            model=model, device=torch.device("cpu"), loss_fn=lambda m, x, y: m(x, y, loss_reduction="sum"),
            plan=SimpleNamespace(total_batch_size=2 * ARGS.sequence_len * micro_steps * 8),
            optimizers=SimpleNamespace(zero_grad=lambda set_to_none: model.zero_grad(set_to_none=set_to_none),
                                       step=lambda step: None),
            config=SimpleNamespace(debug=SimpleNamespace(inject_nan_at_step=-1)),
            train_streams={i: iter([(b, b)]) for i, b in enumerate(batches)})
        units = len(fsdp_units(model))  # every unit holds parameters that get gradients
        recorder = CollectiveRecorder()
        with recorder:
            Trainer.train_step(trainer, 0)
        assert recorder.count("allreduce_", replicate) == units
        assert recorder.count("_reduce_scatter_base_", shard) == units * micro_steps
        # the next step starts with all-reduce enabled again on its last micro-step only: same counts
        trainer.train_streams = {i: iter([(b, b)]) for i, b in enumerate(batches)}
        recorder = CollectiveRecorder()
        with recorder:
            Trainer.train_step(trainer, 1)
        assert recorder.count("allreduce_", replicate) == units

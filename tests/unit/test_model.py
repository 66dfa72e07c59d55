"""The GPT of docs/recipe.md §1: counts, FLOPs, windows, init table, forward semantics (fp32 throughout)."""

import math

import pytest
import torch
import torch.nn.functional as F

from titanlite.errors import UserError
from titanlite.models.gpt.model import (GPT, GPTArgs, count_flops_per_token, count_params, has_value_embedding,
                                        window_sizes)
from titanlite.precision import resolve_compute_dtype
from titanlite.spec import width_and_heads as model_dims



def build(args: GPTArgs, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(args)
    model.to_empty(device="cpu")
    model.init_weights()
    return model


def reference_args(depth: int) -> GPTArgs:
    n_embd, n_head = model_dims(depth, 64, 128)
    return GPTArgs(n_layer=depth, n_embd=n_embd, n_head=n_head, n_kv_head=n_head, head_dim=128,
                   vocab_size=32768, sequence_len=2048, window_pattern="SSSL")


# docs/recipe.md §2.3: depth -> (total params, scaling params, FLOPs/token at 5 significant digits)
TABLE = {
    4: (36_700_242, 11_534_384, 8.0216e7),
    8: (125_829_354, 41_943_232, 2.9570e8),
    12: (286_261_730, 110_100_912, 7.5970e8),
    16: (536_871_738, 234_881_792, 1.5855e9),
    20: (896_533_746, 435_160_240, 2.8862e9),
    24: (1_384_122_122, 729_810_624, 4.7752e9),
    26: (1_681_786_938, 918_423_532, 5.9911e9),
    32: (2_818_575_450, 1_677_724_672, 1.0771e10),
}


@pytest.mark.parametrize("depth", sorted(TABLE))
def test_counts_and_flops_match_recipe_table(depth):
    args = reference_args(depth)
    with torch.device("meta"):
        model = GPT(args)
    total, scaling, flops = TABLE[depth]
    assert model.num_params()["total"] == total == count_params(args)["total"]
    assert model.scaling_params() == scaling
    assert model.num_params() == count_params(args)
    assert float(f"{model.flops_per_token():.4e}") == flops


def test_d12_d24_breakdown():
    d12 = count_params(reference_args(12))
    assert d12 == {"wte": 25_165_824, "value_embeds": 150_994_944, "lm_head": 25_165_824,
                   "transformer_matrices": 84_935_088, "scalars": 50, "total": 286_261_730}
    d24 = count_params(reference_args(24))
    assert (d24["value_embeds"], d24["transformer_matrices"], d24["scalars"]) == (603_979_776, 679_478_976, 74)


@pytest.mark.parametrize("args", [
    GPTArgs(n_layer=1, n_embd=64, n_head=2, n_kv_head=2, head_dim=32, vocab_size=100, sequence_len=32),
    GPTArgs(n_layer=3, n_embd=96, n_head=3, n_kv_head=1, head_dim=32, vocab_size=1000, sequence_len=64,
            window_pattern="L"),
    GPTArgs(n_layer=5, n_embd=128, n_head=2, n_kv_head=2, head_dim=64, vocab_size=64, sequence_len=512,
            window_pattern="SSL"),
])
def test_analytic_counts_equal_instantiated(args):
    with torch.device("meta"):
        model = GPT(args)
    assert model.num_params() == count_params(args)
    assert model.num_params()["total"] == sum(p.numel() for p in model.parameters())
    # FLOPs: 6 x every Linear weight (counted from the modules) + the attention term
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    attn = sum(12 * args.n_head * args.head_dim * min(w, args.sequence_len) for w in model.windows)
    assert model.flops_per_token() == 6 * linear + attn == count_flops_per_token(args)


def test_vocab_padding_and_value_embedding_layers():
    args = GPTArgs(n_layer=4, n_embd=64, n_head=2, n_kv_head=2, head_dim=32, vocab_size=1000, sequence_len=32)
    assert args.padded_vocab == 1024
    with torch.device("meta"):
        model = GPT(args)
    assert model.wte.weight.shape == (1024, 64) and model.lm_head.weight.shape == (1024, 64)
    assert sorted(model.value_embeds.keys()) == ["1", "3"]  # even L: odd layers, last included
    assert [i for i in range(5) if has_value_embedding(i, 5)] == [0, 2, 4]
    assert [b.attn.ve_gate is not None for b in model.blocks] == [False, True, False, True]


@pytest.mark.parametrize("seq_len,short", [(512, 128), (1024, 256), (2048, 512), (4096, 1024)])
def test_short_window_sizes(seq_len, short):
    sizes = window_sizes(8, seq_len, "SSSL")
    assert sizes == [short, short, short, seq_len, short, short, short, seq_len]


@pytest.mark.parametrize("depth,full", [
    (12, [3, 7, 11]), (20, [3, 7, 11, 15, 19]), (24, [3, 7, 11, 15, 19, 23]), (26, [3, 7, 11, 15, 19, 23, 25]),
])
def test_full_layers(depth, full):
    sizes = window_sizes(depth, 2048, "sssl")
    assert [i for i, w in enumerate(sizes) if w == 2048] == full
    assert set(sizes) == {512, 2048}


def test_bad_window_pattern_is_user_error():
    with pytest.raises(UserError, match="window_pattern"):
        window_sizes(4, 2048, "SXL")


def test_init_statistics():
    C = 256
    args = GPTArgs(n_layer=4, n_embd=C, n_head=2, n_kv_head=2, head_dim=128, vocab_size=2048, sequence_len=64)
    m = build(args)
    s = math.sqrt(3 / C)
    assert m.wte.weight.std().item() == pytest.approx(0.8, rel=0.02)
    assert m.wte.weight.mean().abs().item() < 0.01
    assert m.lm_head.weight.std().item() == pytest.approx(0.001, rel=0.02)
    for block in m.blocks:
        for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
            w = lin.weight
            assert w.abs().max().item() <= s and w.abs().max().item() > 0.99 * s
            assert w.std().item() == pytest.approx(1 / math.sqrt(C), rel=0.03)
        fc = block.mlp.c_fc.weight
        assert fc.abs().max().item() <= 0.4 * s and fc.abs().max().item() > 0.39 * s
        assert torch.all(block.attn.c_proj.weight == 0) and torch.all(block.mlp.c_proj.weight == 0)
        if block.attn.ve_gate is not None:
            g = block.attn.ve_gate.weight
            assert g.min().item() >= 0 and g.max().item() <= 0.02 and g.max().item() > 0.01
    for table in m.value_embeds.values():
        assert table.weight.abs().max().item() <= s
        assert table.weight.std().item() == pytest.approx(1 / math.sqrt(C), rel=0.02)
    torch.testing.assert_close(m.resid_lambdas.data, torch.tensor([1.15, 1.15 - 0.1 / 3, 1.15 - 0.2 / 3, 1.05]))
    torch.testing.assert_close(m.x0_lambdas.data, torch.tensor([0.20, 0.15, 0.10, 0.05]))
    assert m.smear_lambda.item() == 0.0 and m.backout_lambda.item() == pytest.approx(0.2)
    sg = m.smear_gate.weight
    assert sg.shape == (1, 24) and sg.min().item() >= 0 and sg.max().item() <= 0.02
    assert all(p.dtype == torch.float32 for p in m.parameters())
    # RoPE tables: 10x context, base 100000
    assert m.rope_cos.shape == (1, 640, 1, 64)
    torch.testing.assert_close(m.rope_cos[0, 7, 0, 1], torch.cos(torch.tensor(7 / 100000 ** (2 / 128))))


def test_single_layer_lambdas():
    m = build(GPTArgs(n_layer=1, n_embd=64, n_head=1, n_kv_head=1, head_dim=64, vocab_size=64, sequence_len=16))
    assert m.resid_lambdas.item() == pytest.approx(1.15) and m.x0_lambdas.item() == pytest.approx(0.2)


TINY = GPTArgs(n_layer=3, n_embd=64, n_head=2, n_kv_head=2, head_dim=32, vocab_size=500, sequence_len=512,
               window_pattern="SL", attention_backend="sdpa")


def test_fresh_model_loss_is_log_vocab():
    m = build(TINY)
    torch.manual_seed(1)
    idx = torch.randint(0, 500, (2, 64))
    loss = m(idx, torch.randint(0, 500, (2, 64)))
    assert loss.item() == pytest.approx(math.log(500), abs=0.02)


def test_logits_cropped_capped_and_reductions():
    m = build(TINY)
    with torch.no_grad():
        m.lm_head.weight.normal_(0, 5.0)  # large logits -> the cap bites
    torch.manual_seed(2)
    idx = torch.randint(0, 500, (2, 16))
    logits = m(idx)
    assert logits.shape == (2, 16, 500) and logits.dtype == torch.float32
    assert logits.abs().max().item() <= 15.0 and logits.abs().max().item() > 14.0
    targets = torch.randint(0, 500, (2, 16))
    targets[0, :5] = -1
    per_token = m(idx, targets, loss_reduction="none")
    assert per_token.shape == (2, 16) and torch.all(per_token[0, :5] == 0)
    total = m(idx, targets, loss_reduction="sum")
    mean = m(idx, targets)
    torch.testing.assert_close(total, per_token.sum())
    torch.testing.assert_close(mean, total / 27)
    ref = F.cross_entropy(logits.reshape(-1, 500), targets.reshape(-1), ignore_index=-1)
    torch.testing.assert_close(mean, ref)


def perturbed(args: GPTArgs, seed: int = 3) -> GPT:
    """A model with every parameter random (init zeros would hide bugs in the paths they switch off)."""
    m = build(args, seed)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def naive_forward(m: GPT, idx: torch.Tensor) -> torch.Tensor:
    """Recipe §1.2 written out literally: per-position smear, explicit masks, textbook RoPE."""
    a = m.args
    B, T = idx.shape
    rms = lambda x: x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)
    x = rms(m.wte.weight[idx])
    smeared = x.clone()
    for t in range(1, T):
        gate = m.smear_lambda * torch.sigmoid(x[:, t, :24] @ m.smear_gate.weight[0])
        smeared[:, t] = x[:, t] + gate[:, None] * x[:, t - 1]
    x = x0 = smeared
    pos = torch.arange(T, dtype=torch.float32)
    freqs = 1.0 / 100000 ** (torch.arange(0, a.head_dim, 2, dtype=torch.float32) / a.head_dim)
    ang = pos[:, None] * freqs[None]
    cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]

    def rope(u):  # rotation by -theta on (first half, second half) pairs
        d = u.size(-1) // 2
        u1, u2 = u[..., :d], u[..., d:]
        return torch.cat([u1 * cos + u2 * sin, -u1 * sin + u2 * cos], -1)

    saved = None
    for i, block in enumerate(m.blocks):
        x = m.resid_lambdas[i] * x + m.x0_lambdas[i] * x0
        at = block.attn
        h = rms(x)
        q = (h @ at.c_q.weight.T).reshape(B, T, a.n_head, a.head_dim)
        k = (h @ at.c_k.weight.T).reshape(B, T, a.n_kv_head, a.head_dim)
        v = (h @ at.c_v.weight.T).reshape(B, T, a.n_kv_head, a.head_dim)
        if str(i) in m.value_embeds:
            ve = m.value_embeds[str(i)].weight[idx].reshape(B, T, a.n_kv_head, a.head_dim)
            v = v + (3 * torch.sigmoid(h[..., :12] @ at.ve_gate.weight.T))[..., None] * ve
        q, k = rms(rope(q)) * 1.2, rms(rope(k)) * 1.2
        rep = a.n_head // a.n_kv_head
        k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(a.head_dim)
        qi, kj = torch.arange(T)[:, None], torch.arange(T)[None]
        allowed = (kj <= qi) & (qi - kj <= m.windows[i])
        y = torch.einsum("bhqk,bkhd->bqhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)
        x = x + y.reshape(B, T, -1) @ at.c_proj.weight.T
        hm = rms(x)
        x = x + torch.relu(hm @ block.mlp.c_fc.weight.T).pow(2) @ block.mlp.c_proj.weight.T
        if i == a.n_layer // 2:
            saved = x
    x = rms(x - m.backout_lambda * saved)
    logits = (x @ m.lm_head.weight.T)[..., :a.vocab_size]
    return 15 * torch.tanh(logits / 15)


@pytest.mark.parametrize("n_layer,n_kv_head,T", [(3, 2, 160), (4, 1, 160), (3, 2, 296)])
def test_forward_matches_naive_recipe(n_layer, n_kv_head, T):
    # sequence_len 512 -> short window 128 < T, so S layers really slide: through the explicit mask at T = 160,
    # through banded query blocks (padded to 3 x 128) at T = 296
    args = GPTArgs(n_layer=n_layer, n_embd=64, n_head=2, n_kv_head=n_kv_head, head_dim=32, vocab_size=300,
                   sequence_len=512, window_pattern="SL", attention_backend="sdpa")
    m = perturbed(args)
    torch.manual_seed(4)
    idx = torch.randint(0, 300, (2, T))
    with torch.no_grad():
        torch.testing.assert_close(m(idx), naive_forward(m, idx), atol=5e-4, rtol=1e-4)  # logits in [-15, 15]


def test_backward_reaches_every_parameter():
    m = perturbed(TINY)
    idx = torch.randint(0, 500, (2, 32))
    m(idx, idx).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_optimizer_param_groups_partition_parameters():
    m = build(TINY)
    groups = m.optimizer_param_groups()
    assert set(groups) == {"lm_head", "wte", "value_embeds", "resid_lambdas", "x0_lambdas", "smear", "matrices"}
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == len(list(m.parameters()))
    ve_gates = {id(b.attn.ve_gate.weight) for b in m.blocks if b.attn.ve_gate is not None}
    assert ve_gates and ve_gates <= {id(p) for p in groups["matrices"]}
    assert [id(p) for p in groups["smear"]] == [id(m.smear_gate.weight), id(m.smear_lambda), id(m.backout_lambda)]


def test_bf16_compute_keeps_fp32_master_weights():
    m = perturbed(TINY)
    torch.manual_seed(5)
    idx = torch.randint(0, 500, (2, 32))
    ref = m(idx, idx).item()
    m.set_compute_dtype(torch.bfloat16)
    logits = m(idx)
    assert logits.dtype == torch.float32
    loss = m(idx, idx)
    loss.backward()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in m.parameters())
    assert loss.item() == pytest.approx(ref, rel=0.03)


def test_resolve_compute_dtype(monkeypatch):
    import titanlite.precision as precision

    assert resolve_compute_dtype("float32", "cuda") == torch.float32
    assert resolve_compute_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_compute_dtype("auto", "mps") == torch.float32
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert resolve_compute_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert resolve_compute_dtype("auto", "cpu") == torch.float32
    with pytest.raises(UserError, match="training.dtype"):
        resolve_compute_dtype("float16", "cpu")


def test_forward_traces_as_one_graph():
    """torch.compile-friendly: no graph breaks in forward + loss, windowed mask path included."""
    m = perturbed(TINY)
    idx = torch.randint(0, 500, (1, 160))
    expected = m(idx, idx)
    compiled = torch.compile(m, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(idx, idx), expected)

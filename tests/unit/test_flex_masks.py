"""flex on CPU: masks built once per shape outside the compiled block, the block traced whole, output = SDPA."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

from titanlite import attention as attn
from titanlite.models.gpt.model import GPT, GPTArgs

# T=256 -> short window 128: two distinct windows (S, L), each a multi-block flex mask (flex blocks are 128)
ARGS = GPTArgs(n_layer=2, n_embd=64, n_head=2, n_kv_head=1, head_dim=32, vocab_size=128, sequence_len=256,
               window_pattern="SL", attention_backend="sdpa")

pytestmark = pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")  # eager CPU flex warns


@pytest.fixture
def mask_builds(monkeypatch):
    """Count real BlockMask constructions (through the cache)."""
    attn.flex_block_mask.cache_clear()
    built = []
    real = attn._build_flex_mask

    def counting(t, window, device):
        built.append((t, window))
        return real(t, window, device)

    monkeypatch.setattr(attn, "_build_flex_mask", counting)
    yield built
    attn.flex_block_mask.cache_clear()


def model() -> GPT:
    torch.manual_seed(0)
    with torch.device("meta"):
        m = GPT(ARGS)
    m.to_empty(device="cpu")
    m.init_weights()
    with torch.no_grad():  # zero-initialised projections would hide attention: randomise every matrix
        for p in m.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    return m.requires_grad_(False)  # CPU flex has no backward


def block_inputs(m: GPT, t: int = 256):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, t, ARGS.n_embd, generator=g)
    return x, None, m.rope_cos[:, :t], m.rope_sin[:, :t]


def test_masks_are_built_once_per_shape_outside_the_model(mask_builds):
    m = model()
    m.set_attention_backend("flex")
    idx = torch.randint(0, 128, (2, 256), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        flex_logits = m(idx)
        m(idx)
        m(idx[:, :128])
    # one per (T, window), a window >= T - 1 being plain causal: S and L at 256, and at 128 both are causal
    assert sorted(mask_builds) == [(128, 127), (256, 128), (256, 255)]
    m.set_attention_backend("sdpa")
    with torch.no_grad():
        sdpa_logits = m(idx)
    torch.testing.assert_close(flex_logits, sdpa_logits, atol=1e-4, rtol=1e-4)


def test_flex_block_compiles_fullgraph_without_graph_breaks(mask_builds):
    m = model()
    m.set_attention_backend("flex")
    masks = attn.attention_masks("flex", 256, m.windows, torch.device("cpu"))
    assert attn.attention_masks("flex", 256, m.windows, torch.device("cpu")) == masks
    assert len(mask_builds) == 2 and attn.attention_masks("sdpa", 256, m.windows, torch.device("cpu")) is None
    block = m.blocks[0]  # the short-window block
    args = block_inputs(m)
    mask = masks[m.windows[0]]
    explanation = torch._dynamo.explain(block)(*args, None, mask)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    counter = CompileCounter()
    compiled = torch.compile(block, fullgraph=True, backend=counter)  # fullgraph: a graph break would raise
    with torch.no_grad():
        out = compiled(*args, None, mask)
        again = compiled(*args, None, mask)
    assert counter.frame_count == 1  # traced once, reused
    assert len(mask_builds) == 2  # nothing was rebuilt inside the compiled block
    for b in m.blocks:
        b.attn.backend = "sdpa"
    with torch.no_grad():
        ref = block(*args)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(out, again)

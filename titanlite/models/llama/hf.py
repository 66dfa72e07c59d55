"""The Llama family as a standard transformers `LlamaForCausalLM` (no remote code).

Same math, renamed tensors: titanlite's RoPE here is already the half-split rotate_half form HF Llama uses
(model.rotary hands GPT's kernel -sin), and q/k rows are head-major as HF lays them out, so no weight needs
the interleaved-to-halves permutation Meta checkpoints do. Vocab padding rows are cropped: HF's vocab_size is
the tokenizer's.
"""

from __future__ import annotations

import torch

from titanlite.models.llama.model import ROPE_CONTEXT_MULTIPLE, LlamaArgs
from titanlite.spec import HFModelFiles

# titanlite block-relative name -> HF layer-relative name
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.c_q.weight": "self_attn.q_proj.weight",
    "attn.c_k.weight": "self_attn.k_proj.weight",
    "attn.c_v.weight": "self_attn.v_proj.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.w3.weight": "mlp.up_proj.weight",
    "mlp.w2.weight": "mlp.down_proj.weight",
}


def hf_name(name: str) -> str:
    if name == "wte.weight":
        return "model.embed_tokens.weight"
    if name == "norm.weight":
        return "model.norm.weight"
    if name == "lm_head.weight":
        return "lm_head.weight"
    parts = name.split(".", 2)
    if parts[0] == "blocks" and len(parts) == 3 and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}"
    raise ValueError(f"no Hugging Face name for the Llama tensor {name!r}")


def to_hf(args: LlamaArgs, weights: dict[str, torch.Tensor]) -> HFModelFiles:
    V = args.vocab_size
    tensors = {hf_name(name): (t[:V] if name in ("wte.weight", "lm_head.weight") else t)
               for name, t in weights.items()}
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": V,
        "hidden_size": args.n_embd,
        "intermediate_size": args.ffn_dim,
        "num_hidden_layers": args.n_layer,
        "num_attention_heads": args.n_head,
        "num_key_value_heads": args.n_kv_head,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        # titanlite's RoPE table length: the longest sequence its forward (and CORE) accepts
        "max_position_embeddings": ROPE_CONTEXT_MULTIPLE * args.sequence_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,                                       # transformers 4.x
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},  # transformers 5
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    return HFModelFiles(config=config, tensors=tensors)

"""The reference GPT as a custom transformers architecture: `TitanliteGPTForCausalLM`, loaded with
`trust_remote_code=True` from the modeling and configuration files this family ships (hf_remote/), which the
export copies next to the weights.

Tensor names are titanlite's under `model.` (the head stays `lm_head`); vocab padding rows of the embedding,
value-embedding and head tables are cropped, so HF's vocab_size is the tokenizer's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from titanlite.models.gpt.model import (QK_SCALE, ROPE_BASE, ROPE_CONTEXT_MULTIPLE, SMEAR_CHANNELS, VE_GATE_CHANNELS,
                                        GPTArgs, has_value_embedding, window_sizes)
from titanlite.spec import HFModelFiles

REMOTE_CODE_DIR = Path(__file__).resolve().parent / "hf_remote"
CONFIG_MODULE, MODELING_MODULE = "configuration_titanlite_gpt", "modeling_titanlite_gpt"


def hf_name(name: str) -> str:
    return name if name == "lm_head.weight" else f"model.{name}"


def to_hf(args: GPTArgs, weights: dict[str, torch.Tensor]) -> HFModelFiles:
    V, L = args.vocab_size, args.n_layer
    padded_tables = {"wte.weight", "lm_head.weight"} | {f"value_embeds.{i}.weight" for i in range(L)}
    tensors = {hf_name(name): (t[:V] if name in padded_tables else t) for name, t in weights.items()}
    config = {
        "architectures": ["TitanliteGPTForCausalLM"],
        "model_type": "titanlite_gpt",
        "auto_map": {"AutoConfig": f"{CONFIG_MODULE}.TitanliteGPTConfig",
                     "AutoModelForCausalLM": f"{MODELING_MODULE}.TitanliteGPTForCausalLM"},
        "vocab_size": V,
        "hidden_size": args.n_embd,
        "num_hidden_layers": L,
        "num_attention_heads": args.n_head,
        "num_key_value_heads": args.n_kv_head,
        "head_dim": args.head_dim,
        "window_sizes": window_sizes(L, args.sequence_len, args.window_pattern),
        "value_embedding_layers": [i for i in range(L) if has_value_embedding(i, L)],
        "softcap": args.softcap,
        "rope_theta": float(ROPE_BASE),
        "qk_scale": QK_SCALE,
        "ve_gate_channels": VE_GATE_CHANNELS,
        "smear_channels": SMEAR_CHANNELS,
        "backout_layer": L // 2,
        # titanlite's RoPE table length: the longest sequence its forward (and CORE) accepts
        "max_position_embeddings": ROPE_CONTEXT_MULTIPLE * args.sequence_len,
        "training_sequence_len": args.sequence_len,
        "tie_word_embeddings": False,
        "use_cache": True,
    }
    code = (REMOTE_CODE_DIR / f"{CONFIG_MODULE}.py", REMOTE_CODE_DIR / f"{MODELING_MODULE}.py")
    return HFModelFiles(config=config, tensors=tensors, code_files=code)

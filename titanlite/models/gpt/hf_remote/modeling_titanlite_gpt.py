"""titanlite's reference GPT as a Hugging Face transformers model (shipped inside each export folder).

Written by titanlite's `python -m scripts.export RUN_DIR --format hf`; loaded with
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`. It needs transformers and torch, not
titanlite, and computes what titanlite's GPT forward computes:

- token embedding -> weight-free RMSNorm -> smear: x_t += smear_lambda * sigmoid(smear_gate(x_t[:24])) * x_{t-1}
  (on the normed, pre-smear embeddings; the first token is untouched);
- per layer: x = resid_lambdas[i] x + x0_lambdas[i] x0 (x0: the smeared embedding), then a pre-norm block:
  attention (RoPE with base 100000 rotating (x1, x2) -> (x1 cos + x2 sin, x2 cos - x1 sin) on the two halves of
  each head, QK-norm x 1.2, a gated value embedding on alternating layers, a causal sliding window per layer)
  and a ReLU^2 MLP;
- backout: the stream after layer n_layer // 2 is subtracted, scaled by backout_lambda, before the final norm;
- untied head, logits softcapped: c * tanh(logits / c).

Generation goes through transformers' cache (DynamicCache). The smear needs the token before the first new one,
so `prepare_inputs_for_generation` passes it as `previous_token_ids`; a hand-driven decoding loop passes it too.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_titanlite_gpt import TitanliteGPTConfig

# transformers 5 renamed the output's (and forward's) `past_key_values` to `cache`
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _rms_norm(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    y = F.rms_norm(x, (x.size(-1),))  # no weight, eps = the dtype's machine epsilon
    return y * scale if scale != 1.0 else y


def _rope(positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype):
    """cos, sin of shape (B, T, 1, head_dim / 2) for integer positions (B, T), computed in fp32."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = (positions.to(torch.float32)[..., None] * inv_freq)[:, :, None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class TitanliteGPTAttention(nn.Module):
    def __init__(self, config: TitanliteGPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                      config.head_dim)
        self.window = config.window_sizes[layer_idx]
        self.qk_scale = config.qk_scale
        self.ve_gate_channels = config.ve_gate_channels
        C = config.hidden_size
        self.c_q = nn.Linear(C, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, C, bias=False)
        has_ve = layer_idx in config.value_embedding_layers
        self.ve_gate = nn.Linear(config.ve_gate_channels, self.n_kv_head, bias=False) if has_ve else None

    def forward(self, x, ve, cos, sin, key_valid, cache):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # one gate in (0, 3) per kv-head and position
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        q, k = _rms_norm(q, self.qk_scale), _rms_norm(k, self.qk_scale)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, D)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        t_k = k.size(2)
        # queries are the last T of the t_k cached positions; each sees itself and the `window` keys before it
        q_pos = torch.arange(t_k - T, t_k, device=x.device)[:, None]
        k_pos = torch.arange(t_k, device=x.device)[None, :]
        allowed = (k_pos <= q_pos) & (q_pos - k_pos <= self.window)
        if key_valid is not None:  # padding: never a key, but a query may see itself (no all-masked row)
            allowed = allowed & (key_valid[:, None, None, :t_k] | (k_pos == q_pos))
        if self.n_kv_head != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class TitanliteGPTMLP(nn.Module):
    def __init__(self, config: TitanliteGPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, 4 * config.hidden_size, bias=False)
        self.c_proj = nn.Linear(4 * config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.c_proj(torch.relu(self.c_fc(x)).square())


class TitanliteGPTBlock(nn.Module):
    def __init__(self, config: TitanliteGPTConfig, layer_idx: int):
        super().__init__()
        self.attn = TitanliteGPTAttention(config, layer_idx)
        self.mlp = TitanliteGPTMLP(config)

    def forward(self, x, ve, cos, sin, key_valid, cache):
        x = x + self.attn(_rms_norm(x), ve, cos, sin, key_valid, cache)
        return x + self.mlp(_rms_norm(x))


class TitanliteGPTPreTrainedModel(PreTrainedModel):
    config_class = TitanliteGPTConfig
    base_model_prefix = "model"
    _no_split_modules = ["TitanliteGPTBlock"]
    supports_gradient_checkpointing = False
    _supports_sdpa = True

    def _init_weights(self, module):
        """Fresh weights for a model built from a config alone (loading a checkpoint overwrites them)."""
        std = self.config.initializer_range

        def fill(param, how):
            if param is not None and not getattr(param, "_is_hf_initialized", False):
                with torch.no_grad():
                    how(param)

        if isinstance(module, (nn.Linear, nn.Embedding)):
            fill(module.weight, lambda p: p.normal_(0.0, std))
        elif isinstance(module, TitanliteGPTModel):
            fill(module.resid_lambdas, lambda p: p.fill_(1.0))
            fill(module.x0_lambdas, lambda p: p.zero_())
            fill(module.smear_lambda, lambda p: p.zero_())
            fill(module.backout_lambda, lambda p: p.zero_())


class TitanliteGPTModel(TitanliteGPTPreTrainedModel):
    """Embeddings, smear, blocks, backout and the final norm: the last hidden state the head reads."""

    def __init__(self, config: TitanliteGPTConfig):
        super().__init__(config)
        C, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
        kv_dim = config.num_key_value_heads * config.head_dim
        self.wte = nn.Embedding(V, C)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim) for i in config.value_embedding_layers})
        self.blocks = nn.ModuleList([TitanliteGPTBlock(config, i) for i in range(L)])
        self.resid_lambdas = nn.Parameter(torch.ones(L))
        self.x0_lambdas = nn.Parameter(torch.zeros(L))
        self.smear_gate = nn.Linear(config.smear_channels, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return _rms_norm(self.wte(ids))

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, previous_token_ids=None):
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        key_valid = None
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            key_valid = attention_mask.bool()

        x = self._embed(input_ids)
        dtype = x.dtype
        if past > 0:
            if previous_token_ids is None:
                raise ValueError("decoding after cached positions needs `previous_token_ids` (the token just before "
                                 "input_ids): the smear mixes in that token's embedding; generate() passes it")
            first_prev = self._embed(previous_token_ids.view(B, 1))
        else:  # the first token has no predecessor: a zero vector leaves it untouched
            first_prev = torch.zeros_like(x[:, :1])
        prev = torch.cat([first_prev, x[:, :-1]], dim=1)
        if key_valid is not None:  # a padding predecessor counts as none
            prev_valid = key_valid[:, past - 1:past + T - 1] if past > 0 else F.pad(key_valid[:, :T - 1], (1, 0))
            prev = prev * prev_valid[..., None].to(dtype)
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., :self.config.smear_channels]))
        x = x + gate * prev

        cos, sin = _rope(position_ids, self.config.head_dim, self.config.rope_theta, dtype)
        x0 = x
        x_backout = x
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            key = str(i)
            ve = self.value_embeds[key](input_ids) if key in self.value_embeds else None
            x = block(x, ve, cos, sin, key_valid, cache)
            if i == self.config.backout_layer:
                x_backout = x
        return _rms_norm(x - self.backout_lambda * x_backout)


class TitanliteGPTForCausalLM(TitanliteGPTPreTrainedModel, GenerationMixin):
    def __init__(self, config: TitanliteGPTConfig):
        super().__init__(config)
        self.model = TitanliteGPTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.wte

    def set_input_embeddings(self, value):
        self.model.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        new = inputs.get("input_ids")
        if new is not None and 0 < new.size(1) < input_ids.size(1):
            n = new.size(1)
            inputs["previous_token_ids"] = input_ids[:, -n - 1:-n]
        return inputs

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, cache=None,
                use_cache=None, labels=None, previous_token_ids=None, logits_to_keep=0, return_dict=None,
                **kwargs):
        if input_ids is None:
            raise ValueError("TitanliteGPTForCausalLM needs input_ids (inputs_embeds are not supported: the value "
                             "embeddings and the smear read token ids)")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        hidden = self.model(input_ids, attention_mask, position_ids, cache, previous_token_ids)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden).float()
        c = self.config.softcap
        logits = c * torch.tanh(logits / c)
        loss = None
        if labels is not None:  # next-token loss: logits at t predict labels at t + 1; -100 is ignored
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        if return_dict is False:
            out = (logits, cache if use_cache else None)
            return (loss,) + out if loss is not None else out
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})

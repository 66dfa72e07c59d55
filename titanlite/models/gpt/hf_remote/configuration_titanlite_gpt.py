"""Configuration of titanlite's reference GPT for Hugging Face transformers (shipped inside each export folder).

Written by titanlite's `python -m scripts.export RUN_DIR --format hf`; loaded with
`AutoConfig.from_pretrained(folder, trust_remote_code=True)`. It needs transformers and torch, not titanlite.
"""

from transformers import PretrainedConfig


class TitanliteGPTConfig(PretrainedConfig):
    model_type = "titanlite_gpt"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(self, vocab_size: int = 32768, hidden_size: int = 768, num_hidden_layers: int = 12,
                 num_attention_heads: int = 6, num_key_value_heads: int = 6, head_dim: int = 128,
                 window_sizes: list | None = None, value_embedding_layers: list | None = None,
                 softcap: float = 15.0, rope_theta: float = 100000.0, qk_scale: float = 1.2,
                 ve_gate_channels: int = 12, smear_channels: int = 24, backout_layer: int | None = None,
                 max_position_embeddings: int = 20480, training_sequence_len: int = 2048,
                 initializer_range: float = 0.02, use_cache: bool = True, tie_word_embeddings: bool = False,
                 **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        # a query at position p sees keys p - window .. p (window + 1 keys) in that layer
        self.window_sizes = (list(window_sizes) if window_sizes is not None else
                             [training_sequence_len] * num_hidden_layers)
        # layers whose attention adds a (gated) value embedding of the input token
        self.value_embedding_layers = (list(value_embedding_layers) if value_embedding_layers is not None else
                                       [i for i in range(num_hidden_layers) if i % 2 == (num_hidden_layers - 1) % 2])
        self.softcap = softcap
        self.rope_theta = rope_theta
        self.qk_scale = qk_scale
        self.ve_gate_channels = ve_gate_channels
        self.smear_channels = smear_channels
        self.backout_layer = num_hidden_layers // 2 if backout_layer is None else backout_layer
        self.max_position_embeddings = max_position_embeddings
        self.training_sequence_len = training_sequence_len
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

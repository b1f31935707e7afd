"""Supported architectures and the model shape read from a Hugging Face config."""

from __future__ import annotations

from dataclasses import dataclass

# Architecture name in config.json -> how its attention projections are biased.
# All three are the Llama block (RMSNorm, rotary, gated SiLU MLP); they differ in biases and
# sliding windows, which ModelShape captures.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass(frozen=True)
class ModelShape:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    max_context_len: int  # the longest sequence its positions cover (see context_limit)
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    hidden_act: str
    sliding_window: int | None

    def kv_bytes_per_token(self, bytes_per_element: int) -> int:
        """2 (K and V) x layers x KV heads x head_dim x bytes per element."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_element

    def num_parameters(self) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * h * i
        per_layer = attn + mlp + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + h


def rope_parameters(hf_config) -> dict:
    """Rope settings from either config style: transformers 5 keeps them in `rope_parameters`,
    older checkpoints use top-level `rope_theta` and `rope_scaling`."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(hf_config, "rope_theta", 10000.0)
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    for key, value in scaling.items():
        params.setdefault(key, value)
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def context_limit(hf_config) -> int:
    """The longest sequence the model's positions cover: max_position_embeddings, or with
    dynamic NTK scaling that times its factor (as vLLM serves it), since that scaling exists
    to go past the trained length."""
    params = rope_parameters(hf_config)
    if params["rope_type"] == "dynamic":
        return int(hf_config.max_position_embeddings * float(params.get("factor", 1.0)))
    return hf_config.max_position_embeddings


def model_shape(hf_config) -> ModelShape:
    archs = list(getattr(hf_config, "architectures", None) or [])
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        found = ", ".join(archs) or f"model_type {getattr(hf_config, 'model_type', '?')!r}"
        raise ValueError(f"Model architecture {found} is not supported. "
                         f"shardserve supports: {', '.join(SUPPORTED_ARCHITECTURES)}.")
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads ({heads}) must be a multiple of "
                         f"num_key_value_heads ({kv_heads})")
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    window = getattr(hf_config, "sliding_window", None)
    if arch == "Qwen2ForCausalLM":
        if getattr(hf_config, "use_sliding_window", False):
            raise ValueError("Qwen2 with use_sliding_window=true is not supported yet")
        window = None
        qkv_bias, o_bias, mlp_bias = True, False, False
    else:
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        qkv_bias = o_bias = attention_bias
        mlp_bias = bool(getattr(hf_config, "mlp_bias", False))
    return ModelShape(
        architecture=arch,
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=hf_config.rms_norm_eps,
        max_position_embeddings=hf_config.max_position_embeddings,
        max_context_len=context_limit(hf_config),
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
        hidden_act=getattr(hf_config, "hidden_act", "silu"),
        sliding_window=window,
    )

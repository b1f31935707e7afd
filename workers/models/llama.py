"""The Llama block family (Llama, Mistral, Qwen2, SmolLM2) written for sharding.

One instance holds one shard: the layers [first_layer, last_layer) of its pipeline stage and
its tensor-parallel slice of each. The residual stream matches transformers' LlamaModel step
for step, which is what makes greedy outputs identical.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from ..layers.attention import AttentionMetadata, HeadLayout, LayerKVCache, paged_attention
from ..layers.decode_layers import DecodeLayers
from ..layers.embedding import ParallelLMHead, VocabParallelEmbedding
from ..layers.fused import rotary_and_cache, silu_and_mul
from ..layers.linear import ColumnParallelLinear, RowParallelLinear
from ..layers.norm import RMSNorm
from ..layers.rotary import RotaryEmbedding
from ..parallel import ParallelContext, split_range
from . import ModelShape



def _stored_scale(reader, prefix: str):
    """The int8 scales of a checkpoint saved quantized (workers/compress.py), else None."""
    name = f"{prefix}.weight_scale"
    return reader.get(name) if reader.has(name) else None

class LlamaAttention(nn.Module):
    def __init__(self, shape: ModelShape, ctx: ParallelContext, dtype, device):
        super().__init__()
        self.heads = HeadLayout.for_rank(shape.num_heads, shape.num_kv_heads,
                                         ctx.tp_size, ctx.tp_rank)
        d = self.head_dim = shape.head_dim
        h = self.heads
        self.qkv_proj = ColumnParallelLinear(
            shape.hidden_size,
            {"q": (h.q_start * d, h.q_end * d), "k": (h.kv_start * d, h.kv_end * d),
             "v": (h.kv_start * d, h.kv_end * d)},
            bias=shape.qkv_bias, dtype=dtype, device=device)
        self.o_proj = RowParallelLinear((h.q_start * d, h.q_end * d), shape.hidden_size,
                                        bias=shape.o_bias, ctx=ctx, dtype=dtype, device=device)
        self.scale = d ** -0.5
        self.window = shape.sliding_window

    def load(self, reader, prefix: str) -> None:
        for name in ("q", "k", "v"):
            bias = reader.get(f"{prefix}.{name}_proj.bias") if self.qkv_proj.bias is not None else None
            self.qkv_proj.load(name, reader.get(f"{prefix}.{name}_proj.weight"), bias,
                               _stored_scale(reader, f"{prefix}.{name}_proj"))
        bias = reader.get(f"{prefix}.o_proj.bias") if self.o_proj.bias is not None else None
        self.o_proj.load(reader.get(f"{prefix}.o_proj.weight"), bias,
                         _stored_scale(reader, f"{prefix}.o_proj"))

    def forward(self, cos_sin, x, kv_cache: LayerKVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        padded = x.shape[0]
        x = x[:meta.num_tokens]  # sequence parallelism pads the batch to a multiple of TP
        t, d, h = x.shape[0], self.head_dim, self.heads
        q, k, v = rotary_and_cache(self.qkv_proj(x), h.num_q, h.num_kv, d, *cos_sin, kv_cache,
                                   meta.slot_mapping)
        out = paged_attention(q, k, v, kv_cache, meta, h, self.scale,
                              self.window).view(t, h.num_q * d)
        if padded > t:
            out = F.pad(out, (0, 0, 0, padded - t))
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    def __init__(self, shape: ModelShape, ctx: ParallelContext, dtype, device):
        super().__init__()
        part = split_range(shape.intermediate_size, ctx.tp_size, ctx.tp_rank)
        self.gate_up_proj = ColumnParallelLinear(shape.hidden_size, {"gate": part, "up": part},
                                                 bias=shape.mlp_bias, dtype=dtype, device=device)
        self.down_proj = RowParallelLinear(part, shape.hidden_size, bias=shape.mlp_bias, ctx=ctx,
                                           dtype=dtype, device=device)
        self.act = None if shape.hidden_act == "silu" else ACT2FN[shape.hidden_act]

    def load(self, reader, prefix: str) -> None:
        for name in ("gate", "up"):
            bias = reader.get(f"{prefix}.{name}_proj.bias") if self.gate_up_proj.bias is not None else None
            self.gate_up_proj.load(name, reader.get(f"{prefix}.{name}_proj.weight"), bias,
                                   _stored_scale(reader, f"{prefix}.{name}_proj"))
        bias = reader.get(f"{prefix}.down_proj.bias") if self.down_proj.bias is not None else None
        self.down_proj.load(reader.get(f"{prefix}.down_proj.weight"), bias,
                            _stored_scale(reader, f"{prefix}.down_proj"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.act is None:  # SiLU, fused with the product
            return self.down_proj(silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, shape: ModelShape, ctx: ParallelContext, dtype, device):
        super().__init__()
        self.ctx = ctx
        self.input_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps, dtype, device)
        self.self_attn = LlamaAttention(shape, ctx, dtype, device)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps, dtype,
                                                device)
        self.mlp = LlamaMLP(shape, ctx, dtype, device)

    def load(self, reader, prefix: str) -> None:
        self.input_layernorm.load(reader.get(f"{prefix}.input_layernorm.weight"))
        self.post_attention_layernorm.load(reader.get(f"{prefix}.post_attention_layernorm.weight"))
        self.self_attn.load(reader, f"{prefix}.self_attn")
        self.mlp.load(reader, f"{prefix}.mlp")

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        # Under sequence parallelism the residual stream holds 1/TP of the tokens; the
        # projections need all of them.
        return self.ctx.all_gather_tokens(x) if self.ctx.sequence_parallel else x

    def forward(self, cos_sin, x, residual, kv_cache, meta):
        """x: the previous sublayer's output, residual: the stream it adds to (None in the
        stage's first layer, whose x is the stream itself). Returns the same pair; the stream
        is their sum, added inside the next norm (transformers' `hidden = residual + x`)."""
        normed, residual = self.input_layernorm(x, residual)
        x = self.self_attn(cos_sin, self._gather(normed), kv_cache, meta)
        normed, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(self._gather(normed)), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, hf_config, shape: ModelShape, ctx: ParallelContext,
                 layer_range: tuple[int, int], dtype: torch.dtype, device: torch.device,
                 head_token_ids: tuple[int, ...] | None = None):
        super().__init__()
        self.shape, self.ctx, self.layer_range = shape, ctx, layer_range
        # a restricted head (a draft's): only these rows of the LM head, on one rank
        assert head_token_ids is None or ctx.tp_size == 1, "a restricted head runs at TP=1"
        self.head_token_ids = head_token_ids
        if ctx.is_first_stage:
            self.embed_tokens = VocabParallelEmbedding(shape.vocab_size, shape.hidden_size, ctx,
                                                       dtype, device)
        self.layers = nn.ModuleList(LlamaDecoderLayer(shape, ctx, dtype, device)
                                    for _ in range(*layer_range))
        self.rotary = RotaryEmbedding(hf_config, shape.head_dim, shape.max_context_len, dtype,
                                      device)
        if ctx.is_last_stage:
            self.norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps, dtype, device)
            rows = shape.vocab_size if head_token_ids is None else len(head_token_ids)
            self.lm_head = ParallelLMHead(rows, shape.hidden_size, ctx, dtype, device)

    # The layers in one C call for decode-only steps, where that applies (after packing).
    decode_layers: DecodeLayers | None = None

    def prepare_decode_layers(self, dtype: torch.dtype, device: torch.device) -> None:
        self.decode_layers = DecodeLayers.for_layers(self.layers, self.ctx, dtype, device)

    def load(self, reader) -> None:
        if self.ctx.is_first_stage:
            self.embed_tokens.load(reader.get("model.embed_tokens.weight"))
        for index, layer in zip(range(*self.layer_range), self.layers):
            layer.load(reader, f"model.layers.{index}")
        if self.ctx.is_last_stage:
            self.norm.load(reader.get("model.norm.weight"))
            head = ("model.embed_tokens.weight" if self.shape.tie_word_embeddings
                    else "lm_head.weight")
            weight = reader.get(head)
            if self.head_token_ids is not None:
                weight = weight[:][torch.tensor(self.head_token_ids, dtype=torch.long)]
            self.lm_head.load(weight)

    def forward(self, token_ids: torch.Tensor | None, hidden: torch.Tensor | None,
                positions: torch.Tensor, kv_caches: list[LayerKVCache],
                meta: AttentionMetadata) -> torch.Tensor:
        """Returns the stage's output hidden states for all tokens (before the final norm)."""
        ctx = self.ctx
        if ctx.is_first_stage:
            if ctx.sequence_parallel:
                token_ids = F.pad(token_ids, (0, _padding(token_ids.shape[0], ctx.tp_size)))
            hidden = self.embed_tokens(token_ids)
        elif ctx.sequence_parallel:
            hidden = F.pad(hidden, (0, 0, 0, _padding(hidden.shape[0], ctx.tp_size)))
            chunk = hidden.shape[0] // ctx.tp_size
            hidden = hidden[ctx.tp_rank * chunk:(ctx.tp_rank + 1) * chunk]
        cos_sin = self.rotary.cos_sin(positions, meta.token_seq_lens)  # once for every layer
        native = self.decode_layers and self.decode_layers.run(hidden, *cos_sin, kv_caches, meta)
        if native:
            hidden, residual = native
        else:
            residual = None
            for layer, kv_cache in zip(self.layers, kv_caches):
                hidden, residual = layer(cos_sin, hidden, residual, kv_cache, meta)
        if residual is not None:
            hidden = residual + hidden
        if ctx.sequence_parallel:
            hidden = ctx.all_gather_tokens(hidden)[:meta.num_tokens]
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits (fp32) for the rows to sample; the norm is per row, so applying
        it only to those rows gives the same values."""
        return self.lm_head(self.norm(hidden)[0]).float()


def _padding(n: int, multiple: int) -> int:
    return -n % multiple

"""A stage's decoder layers in one C call for steps of decodes only (workers/kernels/
decode_layers.c): the batch-1 decode step's ~270 small calls from Python cost about as much
as streaming the weights.

It applies where every piece has a C kernel on this shard: float32 on the CPU, one
tensor-parallel rank, linears packed as gemm.c panels (float32 or int8 weights, dense or 2:4),
SiLU, a step whose tokens are all single-token decodes. Anywhere else, and with
SHARDSERVE_DECODE_LAYERS=python, the layers run one call at a time as before. The C code runs
the same kernels split the same way, so both paths give the same bits (tests compare them).
"""

from __future__ import annotations

import ctypes
import os

import torch

from ..kernels import decode_layers_library
from .attention import NATIVE_CACHE_DTYPES, AttentionMetadata, LayerKVCache, _kv_of_q_tensor

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


class _Linear(ctypes.Structure):
    _fields_ = [("packed", _ptr), ("places", _ptr), ("scale", _ptr), ("bias", _ptr),
                ("n", _i64), ("k", _i64), ("wtype", _i64)]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", _ptr), ("post_norm", _ptr), ("qkv", _Linear), ("o", _Linear),
                ("gate_up", _Linear), ("down", _Linear), ("k_cache", _ptr), ("v_cache", _ptr),
                ("k_scales", _ptr), ("v_scales", _ptr)]


class _Step(ctypes.Structure):
    _fields_ = [("rows", _i64), ("hidden_size", _i64), ("intermediate_size", _i64),
                ("num_q", _i64), ("num_kv", _i64), ("head_dim", _i64), ("eps", ctypes.c_float),
                ("scale", ctypes.c_float), ("window", _i64), ("cos", _ptr), ("sin", _ptr),
                ("slots", _ptr), ("block_tables", _ptr), ("max_blocks", _i64),
                ("context_lens", _ptr), ("kv_of_q", _ptr), ("num_blocks", _i64),
                ("block_size", _i64), ("cache_dtype", ctypes.c_int), ("hidden", _ptr),
                ("stream", _ptr), ("normed", _ptr), ("qkv", _ptr), ("attended", _ptr),
                ("gate_up", _ptr), ("activated", _ptr)]


def _linear(layer) -> _Linear | None:
    """The panels of one of our linears, or None where gemm.c does not hold them."""
    if (layer.packed not in ("panels", "panels-2:4") or layer.outlier_threshold is not None
            or layer.int8_activations):
        return None
    w, places, scale, bias = layer.weight, layer.weight_places, layer.weight_scale, layer.bias
    k = w.shape[1] * (4 if places is not None else 1)
    return _Linear(w.data_ptr(), places.data_ptr() if places is not None else None,
                   scale.data_ptr() if scale is not None else None,
                   bias.data_ptr() if bias is not None else None, layer.out_features, k,
                   int(w.dtype == torch.int8))


class DecodeLayers:
    """Runs `layers` (LlamaDecoderLayer) for decode-only steps; see the module docstring."""

    def __init__(self, layers, lib):
        self.layers, self.lib = layers, lib
        first = layers[0]
        attention = first.self_attn
        self.heads, self.head_dim = attention.heads, attention.head_dim
        self.scale, self.window = attention.scale, attention.window or 0
        self.eps = first.input_layernorm.eps
        self.hidden_size = first.input_layernorm.weight.shape[0]
        self.weights = [self._weights(layer) for layer in layers]
        self.intermediate_size = self.weights[0][5].k  # the down projection's inputs
        self._cache_key = None
        self._table = None

    @staticmethod
    def for_layers(layers, ctx, dtype: torch.dtype, device: torch.device
                   ) -> DecodeLayers | None:
        """Where the C path applies to these layers as packed (call after packing)."""
        if (os.environ.get("SHARDSERVE_DECODE_LAYERS") == "python" or not len(layers)
                or device.type != "cpu" or dtype != torch.float32 or ctx.tp_size != 1
                or ctx.sequence_parallel):
            return None
        lib = decode_layers_library()
        if lib is None or not lib.decode_layers_threaded():
            return None
        for layer in layers:
            attention, mlp = layer.self_attn, layer.mlp
            if mlp.act is not None or any(
                    _linear(x) is None for x in (attention.qkv_proj, attention.o_proj,
                                                 mlp.gate_up_proj, mlp.down_proj)):
                return None
        return DecodeLayers(layers, lib)

    @staticmethod
    def _weights(layer) -> tuple:
        attention, mlp = layer.self_attn, layer.mlp
        return (layer.input_layernorm.weight.data_ptr(),
                layer.post_attention_layernorm.weight.data_ptr(),
                _linear(attention.qkv_proj), _linear(attention.o_proj),
                _linear(mlp.gate_up_proj), _linear(mlp.down_proj))

    def _layer_table(self, kv_caches: list[LayerKVCache]):
        """The layers' weights and caches as C structs, rebuilt when the caches are."""
        key = tuple(c.keys.data_ptr() for c in kv_caches)
        if key != self._cache_key:
            table = (_Layer * len(self.layers))()
            for entry, weights, cache in zip(table, self.weights, kv_caches):
                scales = ((None, None) if cache.key_scales is None
                          else (cache.key_scales.data_ptr(), cache.value_scales.data_ptr()))
                entry.input_norm, entry.post_norm = weights[0], weights[1]
                entry.qkv, entry.o, entry.gate_up, entry.down = weights[2:]
                entry.k_cache, entry.v_cache = cache.keys.data_ptr(), cache.values.data_ptr()
                entry.k_scales, entry.v_scales = scales
            self._table, self._cache_key = table, key
        return self._table

    def run(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            kv_caches: list[LayerKVCache], meta: AttentionMetadata):
        """(the last layer's output, the residual stream), as the layer loop returns them;
        None where this step is not one for the C path (nothing has been computed then)."""
        t, h, d = hidden.shape[0], self.heads, self.head_dim
        cache = kv_caches[0]
        if (meta.prefills or meta.num_decode != t or meta.num_tokens != t
                or cache.keys.dtype not in NATIVE_CACHE_DTYPES
                or not (cos.is_contiguous() and sin.is_contiguous())
                or cos.dtype != torch.float32):
            return None
        num_kv, num_blocks, block_size, _ = cache.keys.shape
        out = torch.empty(t, self.hidden_size)  # overwritten layer by layer: not the caller's
        out.copy_(hidden)
        stream = torch.empty_like(out)
        scratch = [torch.empty(t, n) for n in (
            self.hidden_size, (h.num_q + 2 * h.num_kv) * d, h.num_q * d,
            2 * self.intermediate_size, self.intermediate_size)]
        step = _Step(t, self.hidden_size, self.intermediate_size, h.num_q, h.num_kv, d,
                     self.eps, self.scale, self.window, cos.data_ptr(), sin.data_ptr(),
                     meta.slot_mapping.data_ptr(), meta.decode_block_ids.data_ptr(),
                     meta.decode_blocks_per_seq, meta.decode_context_lens.data_ptr(),
                     _kv_of_q_tensor(h, hidden.device).data_ptr(), num_blocks, block_size,
                     NATIVE_CACHE_DTYPES[cache.keys.dtype], out.data_ptr(), stream.data_ptr(),
                     *(x.data_ptr() for x in scratch))
        status = self.lib.decode_layers_f32(self._layer_table(kv_caches), len(self.layers),
                                            ctypes.byref(step), torch.get_num_threads())
        if status == -2:
            raise IndexError("a decode's cache slot or block table is outside the KV cache of "
                             f"{num_blocks} blocks")
        if status != 0:
            return None
        return out, stream

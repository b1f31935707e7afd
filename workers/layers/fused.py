"""A decoder layer's element-wise steps, each one C call on CPU (float32), else torch.

The torch functions here (`*_reference`) are the definition: they are the operations
transformers runs, and the C kernels in workers/kernels/fused.c compute the same float32
operations in one pass each (the tests hold them to it). The C path applies to float32
tensors on the CPU; every other case (GPU, 16-bit models, no C compiler) runs the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import fused_library
from .attention import NATIVE_CACHE_DTYPES, LayerKVCache


def _native(*tensors: torch.Tensor):
    """The C library when every tensor is float32 on the CPU, else None."""
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return None
    return fused_library()


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    x32 = x32 * torch.rsqrt(variance + eps)
    return weight * x32.to(dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual), x + residual); without a residual, (RMSNorm(x), x).

    The sum is the residual stream transformers carries (`hidden = residual + out`), so the
    layer that calls this passes it on as the next residual."""
    lib = _native(x, weight) if residual is None else _native(x, residual, weight)
    if lib is None or not x.is_contiguous() or (residual is not None
                                                and not residual.is_contiguous()):
        summed = x if residual is None else residual + x
        return rms_norm_reference(summed, weight, eps), summed
    out = torch.empty_like(x)
    rows, n = x.numel() // x.shape[-1], x.shape[-1]
    if residual is None:
        lib.add_rms_norm_f32(out.data_ptr(), None, x.data_ptr(), None, weight.data_ptr(), rows,
                             n, eps)
        return out, x
    summed = torch.empty_like(x)
    lib.add_rms_norm_f32(out.data_ptr(), summed.data_ptr(), x.data_ptr(), residual.data_ptr(),
                         weight.data_ptr(), rows, n, eps)
    return out, summed


def silu_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for the fused gate/up projection's output [T, 2n] -> [T, n]."""
    lib = _native(gate_up)
    if lib is None or not gate_up.is_contiguous():
        return silu_and_mul_reference(gate_up)
    n = gate_up.shape[-1] // 2
    out = torch.empty(*gate_up.shape[:-1], n, dtype=gate_up.dtype)
    lib.silu_and_mul_f32(out.data_ptr(), gate_up.data_ptr(), gate_up.numel() // (2 * n), n)
    return out


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per vector (the last dim): (round(x / scale), scale = max|x| / 127),
    in float32."""
    x = x.to(torch.float32)
    scale = x.abs().amax(-1, keepdim=True) / 127
    q = torch.where(scale > 0, torch.round(x / scale), torch.zeros_like(x))
    return q.to(torch.int8), scale.squeeze(-1)


def write_cache_reference(cache: LayerKVCache, k: torch.Tensor, v: torch.Tensor,
                          slot_mapping: torch.Tensor) -> None:
    """k, v [T, Hkv, D] into their slots; the cache may store another dtype than the model
    computes in (kv_cache_dtype)."""
    num_kv, head_dim = cache.keys.shape[0], cache.keys.shape[-1]
    for store, scales, new in ((cache.keys, cache.key_scales, k),
                               (cache.values, cache.value_scales, v)):
        if scales is not None:
            new, new_scales = quantize_int8(new)
            scales.view(num_kv, -1).index_copy_(1, slot_mapping, new_scales.transpose(0, 1))
        store.view(num_kv, -1, head_dim).index_copy_(1, slot_mapping,
                                                     new.transpose(0, 1).to(store.dtype))


def rotary_and_cache_reference(q, k, v, cos, sin, cache: LayerKVCache, slot_mapping):
    """q: [T, Hq, D], k, v: [T, Hkv, D]; cos, sin: [T, D]. Returns the rotated q and k, with
    k and v written to their slots of the cache."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    write_cache_reference(cache, k, v, slot_mapping)
    return q, k


def rotary_and_cache(qkv: torch.Tensor, num_q: int, num_kv: int, head_dim: int,
                     cos: torch.Tensor, sin: torch.Tensor, cache: LayerKVCache,
                     slot_mapping: torch.Tensor):
    """From the fused q/k/v projection's output [T, (Hq + 2 Hkv) D]: q and k rotated, k and v
    stored in the cache. Returns q [T, Hq, D], k, v [T, Hkv, D]; on the C path they are views
    into qkv (rotated in place), so q's rows are strided."""
    t, d = qkv.shape[0], head_dim
    q, k, v = qkv.split([num_q * d, num_kv * d, num_kv * d], dim=-1)
    q, k, v = q.view(t, num_q, d), k.view(t, num_kv, d), v.view(t, num_kv, d)
    lib = _native(qkv, cos, sin)
    tensors = [cache.keys, cache.values, cos, sin, qkv]
    if cache.key_scales is not None:
        tensors += [cache.key_scales, cache.value_scales]
    if (lib is None or cache.keys.dtype not in NATIVE_CACHE_DTYPES
            or not all(x.is_contiguous() for x in tensors)):
        q, k = rotary_and_cache_reference(q, k, v, cos, sin, cache, slot_mapping)
        return q, k, v
    scales = ((None, None) if cache.key_scales is None
              else (cache.key_scales.data_ptr(), cache.value_scales.data_ptr()))
    total = cache.keys.numel() // (num_kv * d)
    status = lib.rotary_and_cache_f32(
        qkv.data_ptr(), t, qkv.shape[1], num_q, num_kv, d, cos.data_ptr(), sin.data_ptr(),
        slot_mapping.data_ptr(), cache.keys.data_ptr(), cache.values.data_ptr(), *scales,
        total, NATIVE_CACHE_DTYPES[cache.keys.dtype])
    if status == -2:
        bad = slot_mapping[(slot_mapping < 0) | (slot_mapping >= total)][0]
        raise IndexError(f"KV cache slot index {int(bad)} is outside the cache of {total} "
                         "slots")
    if status != 0:  # e.g. an odd head_dim: the reference handles what the kernel does not
        q, k = rotary_and_cache_reference(q, k, v, cos, sin, cache, slot_mapping)
    return q, k, v

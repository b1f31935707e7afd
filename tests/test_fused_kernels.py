"""The fused C kernels (workers/kernels/fused.c) against their torch references, over the
shapes the model code gives them: decode batches, prefill chunks past the threading
threshold, the head layouts of MHA/GQA/MQA, every KV cache dtype."""

import pytest
import torch

from shardserve.workers.kernels import fused_library
from shardserve.workers.layers import fused
from shardserve.workers.layers.attention import LayerKVCache


@pytest.fixture(scope="module", autouse=True)
def library():
    lib = fused_library()
    assert lib is not None, "the fused kernels must build on this machine (a C compiler is here)"
    return lib


@pytest.mark.parametrize("rows", [1, 7, 33, 700])
@pytest.mark.parametrize("n", [64, 576, 1000])
def test_add_rms_norm_matches_torch(rows, n):
    torch.manual_seed(rows * n)
    x, residual = torch.randn(rows, n) * 3, torch.randn(rows, n)
    weight, eps = torch.rand(n) + 0.5, 1e-5
    normed, summed = fused.add_rms_norm(x, residual, weight, eps)
    assert torch.equal(summed, residual + x)  # the residual stream stays bit-exact
    torch.testing.assert_close(normed, fused.rms_norm_reference(residual + x, weight, eps),
                               rtol=1e-6, atol=1e-6)
    normed, same = fused.add_rms_norm(x, None, weight, eps)
    assert same is x
    torch.testing.assert_close(normed, fused.rms_norm_reference(x, weight, eps),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 5, 32, 300])
@pytest.mark.parametrize("n", [128, 1536, 1003])
def test_silu_and_mul_matches_torch(rows, n):
    torch.manual_seed(rows + n)
    gate_up = torch.randn(rows, 2 * n) * 4
    gate_up[0, :4] = torch.tensor([0.0, -90.0, 90.0, -1e-30])  # the exp's edges
    out = fused.silu_and_mul(gate_up)
    torch.testing.assert_close(out, fused.silu_and_mul_reference(gate_up), rtol=2e-6,
                               atol=1e-6)


@pytest.mark.parametrize("num_q,num_kv,head_dim", [(9, 3, 64), (4, 4, 32), (8, 1, 128),
                                                   (2, 2, 6)])
@pytest.mark.parametrize("rows", [1, 3, 70])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.float16,
                                         torch.int8])
def test_rotary_and_cache_is_bit_identical_to_torch(num_q, num_kv, head_dim, rows,
                                                    cache_dtype):
    torch.manual_seed(num_q * rows + head_dim)
    num_blocks, block_size = 12, 8
    qkv = torch.randn(rows, (num_q + 2 * num_kv) * head_dim)
    angles = torch.rand(rows, head_dim // 2) * 100
    cos = torch.cat([angles.cos()] * 2, dim=-1)
    sin = torch.cat([angles.sin()] * 2, dim=-1)
    slots = torch.randperm(num_blocks * block_size)[:rows]
    caches = [new_cache(num_kv, num_blocks, block_size, head_dim, cache_dtype)
              for _ in range(2)]

    d = head_dim
    q, k, v = qkv.clone().split([num_q * d, num_kv * d, num_kv * d], dim=-1)
    want_q, want_k = fused.rotary_and_cache_reference(
        q.reshape(rows, num_q, d), k.reshape(rows, num_kv, d), v.reshape(rows, num_kv, d),
        cos, sin, caches[0], slots)
    got_q, got_k, got_v = fused.rotary_and_cache(qkv, num_q, num_kv, d, cos, sin, caches[1],
                                                 slots)
    assert got_q.data_ptr() == qkv.data_ptr(), "the C path rotates in place"
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    assert torch.equal(got_v, v.reshape(rows, num_kv, d))
    for name in ("keys", "values", "key_scales", "value_scales"):
        want, got = getattr(caches[0], name), getattr(caches[1], name)
        assert (want is None and got is None) or torch.equal(got, want), name


def new_cache(num_kv, num_blocks, block_size, head_dim, dtype) -> LayerKVCache:
    shape = (num_kv, num_blocks, block_size, head_dim)
    cache = LayerKVCache(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
    if dtype == torch.int8:
        cache.key_scales, cache.value_scales = torch.zeros(shape[:-1]), torch.zeros(shape[:-1])
    return cache


def test_int8_quantization_error_is_within_half_a_step():
    x = torch.randn(50, 64) * torch.rand(50, 1) * 10
    x[3] = 0  # an all-zero vector keeps scale 0 and dequantizes to zeros
    q, scale = fused.quantize_int8(x)
    back = q.float() * scale[:, None]
    assert torch.all((back - x).abs() <= scale[:, None] / 2 + 1e-6)
    assert scale[3] == 0 and not back[3].any()


def test_a_slot_outside_the_cache_is_refused_not_written():
    qkv = torch.randn(2, (2 + 2 * 1) * 8)
    cos, sin = torch.ones(2, 8), torch.zeros(2, 8)
    cache = new_cache(1, 4, 4, 8, torch.float32)
    with pytest.raises(IndexError, match="slot index 16 is outside the cache of 16 slots"):
        fused.rotary_and_cache(qkv, 2, 1, 8, cos, sin, cache, torch.tensor([3, 16]))
    assert not cache.keys.any() and not cache.values.any()

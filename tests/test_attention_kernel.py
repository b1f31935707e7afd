"""The native paged decode kernel gives what the torch path gives, for every shape it takes:
block sizes below and above its 8-token vector width, head dims that are and are not multiples
of its vector width, MHA / GQA / MQA and uneven TP head splits, sliding windows, three dtypes."""

from __future__ import annotations

import pytest
import torch

from shardserve.workers.kernels import paged_decode_library
from shardserve.workers.layers import attention as A
from shardserve.workers.step import SamplingParams, SequenceStep

if paged_decode_library() is None:
    pytest.skip("no C compiler: the native kernel is not built here", allow_module_level=True)


def decode_batch(context_lens: list[int], block_size: int, num_blocks: int, seed: int):
    """One decode step per sequence, each with its blocks scattered over the pool."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_blocks, generator=g).tolist()
    seqs, used = [], 0
    for i, ctx in enumerate(context_lens):
        n = -(-ctx // block_size)
        seqs.append(SequenceStep(i, [1], ctx - 1, order[used:used + n], True, SamplingParams(),
                                 0, 0))
        used += n
    return seqs


@pytest.mark.parametrize("num_heads, num_kv_heads, tp_rank, tp_size", [
    (4, 4, 0, 1),  # MHA
    (9, 3, 0, 1),  # GQA, SmolLM2's shape
    (8, 1, 0, 1),  # MQA
    (9, 3, 1, 2),  # uneven TP split: rank 1 holds heads 5..8, KV heads 1..2
])
@pytest.mark.parametrize("block_size, head_dim", [(16, 64), (4, 64), (8, 80), (32, 36)])
def test_native_decode_matches_torch(num_heads, num_kv_heads, tp_rank, tp_size, block_size,
                                     head_dim):
    heads = A.HeadLayout.for_rank(num_heads, num_kv_heads, tp_size, tp_rank)
    context_lens = [1, 7, 8, 9, 33, 100, 257]
    num_blocks = sum(-(-c // block_size) for c in context_lens) + 5
    for window in (None, 20):
        seqs = decode_batch(context_lens, block_size, num_blocks, seed=block_size + head_dim)
        ws = A.Workspace(torch.float32, torch.device("cpu"))
        meta = A.build_metadata(seqs, block_size, window, ws, torch.device("cpu"))
        g = torch.Generator().manual_seed(3)
        # Scores spread over a wide range, so the exponential sees large negative arguments.
        q = torch.randn(len(seqs), heads.num_q, head_dim, generator=g) * 4
        k_cache = torch.randn(heads.num_kv, num_blocks, block_size, head_dim, generator=g)
        v_cache = torch.randn(heads.num_kv, num_blocks, block_size, head_dim, generator=g)
        scale = head_dim ** -0.5
        kv_of_q = None if heads.uniform else A._kv_of_q_tensor(heads, q.device)
        expected = torch.empty_like(q)
        A._decode_torch(q, expected, k_cache, v_cache, meta, heads, scale, kv_of_q)
        got = torch.full_like(q, float("nan"))
        assert A._decode_native(q, got, k_cache, v_cache, meta, heads, scale, window)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_native_decode_half_precision(dtype):
    heads = A.HeadLayout.for_rank(9, 3, 1, 0)
    context_lens = [5, 16, 70]
    seqs = decode_batch(context_lens, 16, 12, seed=0)
    meta = A.build_metadata(seqs, 16, None, A.Workspace(torch.float32, torch.device("cpu")),
                            torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 9, 64, generator=g).to(dtype)
    k_cache = torch.randn(3, 12, 16, 64, generator=g).to(dtype)
    v_cache = torch.randn(3, 12, 16, 64, generator=g).to(dtype)
    expected = torch.empty(3, 9, 64)
    A._decode_torch(q.float(), expected, k_cache.float(), v_cache.float(), meta, heads, 0.125,
                    None)
    got = torch.empty_like(q)
    assert A._decode_native(q, got, k_cache, v_cache, meta, heads, 0.125, None)
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_cache_with_fp32_queries(cache_dtype):
    """kv_cache_dtype apart from the model's dtype: the kernel widens the cached values
    exactly, so it agrees with fp32 attention over those same values; so does the torch
    path, which gathers the 16-bit blocks and widens them."""
    heads = A.HeadLayout.for_rank(9, 3, 1, 0)
    seqs = decode_batch([5, 16, 70, 129], 16, 20, seed=1)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(4, 9, 64, generator=g) * 4
    k_cache = torch.randn(3, 20, 16, 64, generator=g).to(cache_dtype)
    v_cache = torch.randn(3, 20, 16, 64, generator=g).to(cache_dtype)
    cpu = torch.device("cpu")
    expected = torch.empty_like(q)
    A._decode_torch(q, expected, k_cache.float(), v_cache.float(),
                    A.build_metadata(seqs, 16, None, A.Workspace(torch.float32, cpu), cpu),
                    heads, 0.125, None)
    meta = A.build_metadata(seqs, 16, None, A.Workspace(cache_dtype, cpu), cpu)
    got = torch.full_like(q, float("nan"))
    assert A._decode_native(q, got, k_cache, v_cache, meta, heads, 0.125, None)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch_path = torch.full_like(q, float("nan"))
    A._decode_torch(q, torch_path, k_cache, v_cache, meta, heads, 0.125, None)
    torch.testing.assert_close(torch_path, expected, rtol=1e-5, atol=1e-5)


def test_queries_read_in_place_from_the_qkv_projection():
    """The model hands the kernel q as a view into the fused q/k/v output (strided rows);
    the work split over threads follows context lengths, longest first as the shard orders
    them."""
    heads = A.HeadLayout.for_rank(9, 3, 1, 0)
    context_lens = [300, 120, 64, 17, 16, 3, 1]
    num_blocks = sum(-(-c // 16) for c in context_lens) + 2
    seqs = decode_batch(context_lens, 16, num_blocks, seed=5)
    meta = A.build_metadata(seqs, 16, None, A.Workspace(torch.float32, torch.device("cpu")),
                            torch.device("cpu"))
    g = torch.Generator().manual_seed(11)
    qkv = torch.randn(len(seqs), (9 + 2 * 3) * 64, generator=g)
    q = qkv[:, :9 * 64].view(len(seqs), 9, 64)
    k_cache = torch.randn(3, num_blocks, 16, 64, generator=g)
    v_cache = torch.randn(3, num_blocks, 16, 64, generator=g)
    expected = torch.empty(q.shape)
    A._decode_torch(q.contiguous(), expected, k_cache, v_cache, meta, heads, 0.125, None)
    for threads in (1, 2, 3):
        got = torch.full(q.shape, float("nan"))
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            assert A._decode_native(q, got, k_cache, v_cache, meta, heads, 0.125, None)
        finally:
            torch.set_num_threads(before)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_block_outside_the_pool_is_refused_not_read():
    heads = A.HeadLayout.for_rank(4, 2, 1, 0)
    seqs = decode_batch([20], 16, 4, seed=1)
    seqs[0].block_table[1] = 10 ** 6
    meta = A.build_metadata(seqs, 16, None, A.Workspace(torch.float32, torch.device("cpu")),
                            torch.device("cpu"))
    q, out = torch.randn(1, 4, 64), torch.empty(1, 4, 64)
    cache = torch.randn(2, 4, 16, 64)
    with pytest.raises(IndexError, match="outside the KV cache of 4 blocks"):
        A._decode_native(q, out, cache, cache, meta, heads, 0.125, None)


def test_an_int8_cache_is_its_vectors_times_their_scales():
    """kv_cache_dtype int8: the kernel and the torch path both attend over int8 x scale, so
    they agree with fp32 attention over the dequantized cache."""
    from shardserve.workers.layers.fused import quantize_int8

    heads = A.HeadLayout.for_rank(9, 3, 1, 0)
    seqs = decode_batch([129, 70, 16, 5], 16, 20, seed=2)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(4, 9, 64, generator=g) * 4
    k_int8, k_scales = quantize_int8(torch.randn(3, 20, 16, 64, generator=g))
    v_int8, v_scales = quantize_int8(torch.randn(3, 20, 16, 64, generator=g))
    cpu = torch.device("cpu")
    expected = torch.empty_like(q)
    A._decode_torch(q, expected, A.dequantize(k_int8, k_scales, torch.float32),
                    A.dequantize(v_int8, v_scales, torch.float32),
                    A.build_metadata(seqs, 16, None, A.Workspace(torch.float32, cpu), cpu),
                    heads, 0.125, None)
    meta = A.build_metadata(seqs, 16, None, A.Workspace(torch.int8, cpu), cpu)
    got = torch.full_like(q, float("nan"))
    assert A._decode_native(q, got, k_int8, v_int8, meta, heads, 0.125, None, k_scales,
                            v_scales)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch_path = torch.full_like(q, float("nan"))
    A._decode_torch(q, torch_path, k_int8, v_int8, meta, heads, 0.125, None, k_scales, v_scales)
    torch.testing.assert_close(torch_path, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 20])
def test_a_verifying_run_attends_as_decode_rows_like_a_prefill_chunk(window):
    """Speculative verification: a sequence's next token and its drafts attend as decode
    rows (one per token, the context one longer each row), beside plain decodes; that is
    the causal attention a prefill chunk of the same tokens computes."""
    heads = A.HeadLayout.for_rank(9, 3, 1, 0)
    cpu = torch.device("cpu")
    g = torch.Generator().manual_seed(4)
    table = torch.randperm(12, generator=g).tolist()
    start, n = 37, 5  # the run covers positions 37..41
    verify = SequenceStep(0, [1] * n, start, table, True, SamplingParams(), 0, 0,
                          num_draft=n - 1)
    other = SequenceStep(1, [1], 50, table[::-1][:4], True, SamplingParams(), 0, 0)
    k_cache = torch.randn(3, 12, 16, 64, generator=g)
    v_cache = torch.randn(3, 12, 16, 64, generator=g)
    cache = A.LayerKVCache(k_cache, v_cache)
    q = torch.randn(n + 1, 9, 64, generator=g)
    k = v = torch.empty(n + 1, 3, 64)  # already in the cache; unread by these paths
    meta = A.build_metadata([verify, other], 16, window, A.Workspace(torch.float32, cpu), cpu)
    assert meta.num_decode == n + 1 and not meta.prefills
    got = A.paged_attention(q, k, v, cache, meta, heads, 0.125, window)
    chunk = SequenceStep(0, [1] * n, start, table, True, SamplingParams(), 0, 0)
    as_prefill = A.build_metadata([chunk], 16, window, A.Workspace(torch.float32, cpu), cpu)
    assert as_prefill.num_decode == 0
    expected = A.paged_attention(q[:n], k[:n], v[:n], cache, as_prefill, heads, 0.125, window)
    torch.testing.assert_close(got[:n], expected, rtol=1e-5, atol=1e-5)
    alone = A.build_metadata([other], 16, window, A.Workspace(torch.float32, cpu), cpu)
    torch.testing.assert_close(got[n:], A.paged_attention(q[n:], k[:1], v[:1], cache, alone,
                                                          heads, 0.125, window))

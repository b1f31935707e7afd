"""Attention over a paged KV cache, correct for any mix of prefill and decode in one batch.

Per layer the cache is two tensors of shape [kv_heads, num_blocks, block_size, head_dim]
(`LayerKVCache`; an int8 cache adds a float32 scale per cached vector).
Heads lead so that gathering a batch's blocks (`index_select` on dim 1) yields keys already in
[kv_heads, batch, context, head_dim] order, ready for SDPA without another copy.

Decodes (one new token each) are attended together: on CPU by a C kernel that reads the
blocks in place (`workers/kernels/`), elsewhere (GPU) by SDPA over gathered blocks. That
gather copies only the blocks each sequence uses, in groups of sequences of similar length
(the shard orders decodes longest first) of at most DECODE_GATHER_TOKENS slots, so its
workspace stays small beside the KV cache whatever the batch and context. Each prefill chunk
is attended on its own with SDPA: plain causal when it reads no cached tokens, else over its
own blocks with a mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import torch
import torch.nn.functional as F

from ..kernels import paged_decode_library
from ..parallel import split_range


@dataclass(frozen=True)
class HeadLayout:
    """Which query and KV heads this TP rank holds.

    Query heads are dealt evenly; a rank keeps every KV head its query heads read, so KV heads
    are split when there are at least as many as ranks and replicated when fewer (MQA/GQA).
    """

    q_start: int
    q_end: int
    kv_start: int
    kv_end: int
    kv_of_q: tuple[int, ...]  # local KV head index read by each local query head

    @staticmethod
    def for_rank(num_heads: int, num_kv_heads: int, tp_size: int, tp_rank: int) -> "HeadLayout":
        q_start, q_end = split_range(num_heads, tp_size, tp_rank)
        group = num_heads // num_kv_heads
        kv_start, kv_end = q_start // group, (q_end - 1) // group + 1
        kv_of_q = tuple(h // group - kv_start for h in range(q_start, q_end))
        return HeadLayout(q_start, q_end, kv_start, kv_end, kv_of_q)

    @property
    def num_q(self) -> int:
        return self.q_end - self.q_start

    @property
    def num_kv(self) -> int:
        return self.kv_end - self.kv_start

    @cached_property
    def uniform(self) -> bool:
        """Every KV head serves the same number of consecutive query heads (plain GQA)."""
        if self.num_q % self.num_kv:
            return False
        group = self.num_q // self.num_kv
        return all(kv == h // group for h, kv in enumerate(self.kv_of_q))


@dataclass
class LayerKVCache:
    """One layer's keys and values [kv_heads, num_blocks, block_size, head_dim]. An int8 cache
    (kv_cache_dtype int8) stores each cached vector (one token, one KV head) as int8 times its
    own float32 scale, kept in key_scales / value_scales [kv_heads, num_blocks, block_size]."""

    keys: torch.Tensor
    values: torch.Tensor
    key_scales: torch.Tensor | None = None
    value_scales: torch.Tensor | None = None

    def gather(self, block_ids: torch.Tensor, length: int, dtype: torch.dtype):
        """The first `length` cached keys and values of these blocks, [kv_heads, length, D],
        in dtype."""
        num_kv, head_dim = self.keys.shape[0], self.keys.shape[-1]
        out = []
        for cache, scales in ((self.keys, self.key_scales), (self.values, self.value_scales)):
            rows = cache.index_select(1, block_ids).view(num_kv, -1, head_dim)[:, :length]
            if scales is not None:
                rows = dequantize(rows, scales.index_select(1, block_ids).view(num_kv, -1)[
                    :, :length], dtype)
            out.append(rows.to(dtype))
        return out[0], out[1]


def dequantize(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 vectors [..., D] times their scales [...], computed in float32."""
    return (values.to(torch.float32) * scales.unsqueeze(-1)).to(dtype)


@dataclass
class PrefillSpan:
    start: int  # row of its first token in the batch
    length: int
    start_position: int
    context_length: int
    block_ids: torch.Tensor | None  # its blocks, when it must read tokens cached earlier
    mask: torch.Tensor | None  # [length, context] bool; None means plain causal


# The torch decode path gathers at most this many key (and value) slots per KV head at once.
DECODE_GATHER_TOKENS = 32768


@dataclass
class DecodeGroup:
    """Decode rows [start, end) attended by one SDPA call over their gathered blocks."""

    start: int
    end: int
    block_ids: torch.Tensor  # [(end - start) * blocks], each row padded with block 0
    blocks: int  # blocks per row: the longest row's
    mask: torch.Tensor  # [end - start, 1, blocks * block_size] bool: the keys each row sees


@dataclass
class AttentionMetadata:
    """Built once per step from the plan, shared by every layer."""

    num_tokens: int  # T, the real tokens of the step
    slot_mapping: torch.Tensor  # [T]: flat cache slot (block * block_size + offset) per token
    num_decode: int  # rows [0, num_decode) are single-token decodes, one per sequence
    decode_block_ids: torch.Tensor  # [num_decode * blocks_per_seq], padded with block 0
    decode_blocks_per_seq: int
    decode_context_lens: torch.Tensor  # [num_decode] int64
    prefills: list[PrefillSpan]
    workspace: "Workspace"
    block_size: int = 16
    sliding_window: int | None = None
    # Per token, its sequence's length at this step; only for length-dependent rope scaling.
    token_seq_lens: torch.Tensor | None = None

    @cached_property
    def decode_groups(self) -> list[DecodeGroup]:
        """For the torch decode path (the C kernel needs none), made on first use."""
        lengths = self.decode_context_lens.tolist()
        table = self.decode_block_ids.view(self.num_decode, -1)
        groups, start = [], 0
        while start < self.num_decode:
            blocks = -(-lengths[start] // self.block_size)  # rows come longest first
            end = start + 1
            while (end < self.num_decode
                   and (end + 1 - start) * blocks * self.block_size <= DECODE_GATHER_TOKENS):
                blocks = max(blocks, -(-lengths[end] // self.block_size))
                end += 1
            key_pos = torch.arange(blocks * self.block_size, device=table.device)
            ctx = self.decode_context_lens[start:end, None]
            mask = key_pos[None, :] < ctx
            if self.sliding_window is not None:
                mask &= key_pos[None, :] > ctx - 1 - self.sliding_window
            groups.append(DecodeGroup(start, end, table[start:end, :blocks].reshape(-1), blocks,
                                      mask.unsqueeze(1)))
            start = end
        return groups


class Workspace:
    """Reusable buffers for gathered keys and values: fresh large tensors cost page faults on
    every layer, reused ones do not."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device = dtype, device
        self.buffers: list[torch.Tensor] = [torch.empty(0, dtype=dtype, device=device)] * 2

    def get(self, index: int, shape: tuple[int, ...]) -> torch.Tensor:
        numel = 1
        for size in shape:
            numel *= size
        if self.buffers[index].numel() < numel:
            self.buffers[index] = torch.empty(numel, dtype=self.dtype, device=self.device)
        return self.buffers[index][:numel].view(shape)


def build_metadata(seqs, block_size: int, sliding_window: int | None,
                   workspace: Workspace, device: torch.device,
                   token_seq_lens: bool = False) -> AttentionMetadata:
    """`seqs`: SequenceSteps ordered with every decode first, longest first.

    A decode row is one token attending to its context. A verifying sequence's last token
    and drafts are one row each, the context growing by one per row: every row's key and
    value are in the cache before any row attends, so that is causal attention over the run,
    computed by the decode kernels (and the C decode layers) like any decode."""
    slots: list[int] = []
    for s in seqs:
        for pos in range(s.start_position, s.context_length):
            slots.append(s.block_table[pos // block_size] * block_size + pos % block_size)
    decodes = [s for s in seqs if s.is_decode]
    rows = [(s, pos + 1) for s in decodes for pos in range(s.start_position, s.context_length)]
    num_decode = len(rows)
    decode_ids, blocks_per_seq = [], 0
    if num_decode:
        blocks_per_seq = max(-(-length // block_size) for _, length in rows)
        for s, length in rows:
            used = s.block_table[:-(-length // block_size)]
            decode_ids.extend(used + [0] * (blocks_per_seq - len(used)))
    prefills = []
    row = num_decode
    for s in seqs[len(decodes):]:
        n, ctx = len(s.token_ids), s.context_length
        block_ids = mask = None
        if s.start_position > 0:
            block_ids = torch.tensor(s.block_table[:-(-ctx // block_size)], device=device)
        if s.start_position > 0 or (sliding_window is not None and ctx > sliding_window):
            q_pos = torch.arange(s.start_position, ctx, device=device)[:, None]
            k_pos = torch.arange(ctx, device=device)[None, :]
            mask = k_pos <= q_pos
            if sliding_window is not None:
                mask &= k_pos > q_pos - sliding_window
        prefills.append(PrefillSpan(row, n, s.start_position, ctx, block_ids, mask))
        row += n
    return AttentionMetadata(
        num_tokens=len(slots),
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        num_decode=num_decode,
        decode_block_ids=torch.tensor(decode_ids, dtype=torch.long, device=device),
        decode_blocks_per_seq=blocks_per_seq,
        decode_context_lens=torch.tensor([length for _, length in rows], dtype=torch.long,
                                         device=device),
        prefills=prefills,
        workspace=workspace,
        block_size=block_size,
        sliding_window=sliding_window,
        token_seq_lens=torch.tensor([s.context_length for s in seqs for _ in s.token_ids],
                                    dtype=torch.long, device=device) if token_seq_lens else None,
    )


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerKVCache,
                    meta: AttentionMetadata, heads: HeadLayout, scale: float,
                    window: int | None) -> torch.Tensor:
    """q: [T, Hq, D]; k, v: [T, Hkv, D] for the new tokens, already in the cache
    (fused.rotary_and_cache writes them). Returns [T, Hq, D]."""
    k_cache, v_cache = cache.keys, cache.values
    scales = (cache.key_scales, cache.value_scales)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    # Only an uneven head split needs query heads mapped to KV heads by index.
    kv_of_q = None if heads.uniform else _kv_of_q_tensor(heads, q.device)

    if meta.num_decode:
        q_dec, out_dec = q[:meta.num_decode], out[:meta.num_decode]
        if not _decode_native(q_dec, out_dec, k_cache, v_cache, meta, heads, scale, window,
                              *scales):
            _decode_torch(q_dec, out_dec, k_cache, v_cache, meta, heads, scale, kv_of_q, *scales)

    for p in meta.prefills:
        rows = slice(p.start, p.start + p.length)
        if p.block_ids is None:
            keys, values = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
        else:
            keys, values = cache.gather(p.block_ids, p.context_length, q.dtype)
        if kv_of_q is not None:
            keys, values = keys.index_select(0, kv_of_q), values.index_select(0, kv_of_q)
        o = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1).unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0),
            attn_mask=p.mask, is_causal=p.mask is None, scale=scale,
            enable_gqa=keys.shape[0] != heads.num_q)
        out[rows] = o[0].transpose(0, 1)
    return out


# The C kernels' element type codes (workers/kernels/vector_math.h); int8 for caches only.
_NATIVE_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
NATIVE_CACHE_DTYPES = {**_NATIVE_DTYPES, torch.int8: 3}


def _decode_native(q, out, k_cache, v_cache, meta: AttentionMetadata, heads: HeadLayout,
                   scale: float, window: int | None, k_scales=None, v_scales=None) -> bool:
    """The C kernel (CPU): reads keys and values in place, no gathered copy. False when it
    does not apply here."""
    # q's rows may be strided (a view into the q/k/v projection); within a row, contiguous.
    if (q.device.type != "cpu" or q.dtype not in _NATIVE_DTYPES
            or k_cache.dtype not in NATIVE_CACHE_DTYPES or q.stride(2) != 1
            or q.stride(1) != q.shape[2] or not out.is_contiguous()):
        return False
    lib = paged_decode_library()
    if lib is None:
        return False
    num_kv, num_blocks, block_size, head_dim = k_cache.shape
    kv_of_q = _kv_of_q_tensor(heads, q.device)
    status = lib.paged_decode_attention(
        out.data_ptr(), q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
        None if k_scales is None else k_scales.data_ptr(),
        None if v_scales is None else v_scales.data_ptr(),
        meta.decode_block_ids.data_ptr(), meta.decode_blocks_per_seq,
        meta.decode_context_lens.data_ptr(), kv_of_q.data_ptr(), q.shape[0], heads.num_q,
        num_kv, num_blocks, block_size, head_dim, scale, window or 0, _NATIVE_DTYPES[q.dtype],
        NATIVE_CACHE_DTYPES[k_cache.dtype], torch.get_num_threads())
    if status == -2:
        raise IndexError(f"a decode's block table holds a block index outside the KV cache of "
                         f"{num_blocks} blocks")
    return status == 0


@lru_cache(maxsize=None)
def _kv_of_q_tensor(heads: HeadLayout, device: torch.device) -> torch.Tensor:
    """Made once per layout, not once per layer and step."""
    return torch.tensor(heads.kv_of_q, dtype=torch.long, device=device)


def _decode_torch(q, out, k_cache, v_cache, meta: AttentionMetadata, heads: HeadLayout,
                  scale: float, kv_of_q: torch.Tensor | None, k_scales=None,
                  v_scales=None) -> None:
    """Per group of decodes, gather the blocks they use, then one SDPA call (any device)."""
    for g in meta.decode_groups:
        _decode_group(q[g.start:g.end], out[g.start:g.end], k_cache, v_cache, g, meta.workspace,
                      heads, scale, kv_of_q, k_scales, v_scales)


def _decode_group(q, out, k_cache, v_cache, g: DecodeGroup, workspace: Workspace,
                  heads: HeadLayout, scale: float, kv_of_q: torch.Tensor | None,
                  k_scales=None, v_scales=None) -> None:
    num_kv, _, block_size, head_dim = k_cache.shape
    nd = q.shape[0]
    shape = (num_kv, g.block_ids.numel(), block_size, head_dim)
    keys = workspace.get(0, shape)
    values = workspace.get(1, shape)
    torch.index_select(k_cache, 1, g.block_ids, out=keys)
    torch.index_select(v_cache, 1, g.block_ids, out=values)
    if k_scales is not None:  # int8: each vector times its scale
        keys = dequantize(keys, k_scales.index_select(1, g.block_ids), q.dtype)
        values = dequantize(values, v_scales.index_select(1, g.block_ids), q.dtype)
    keys = keys.view(num_kv, nd, -1, head_dim).to(q.dtype)
    values = values.view(num_kv, nd, -1, head_dim).to(q.dtype)
    if kv_of_q is None:
        group = heads.num_q // num_kv
        # [H_kv, nd, group, D]: the group's queries share one key set, no KV copies.
        q = q.reshape(nd, num_kv, group, head_dim).permute(1, 0, 2, 3)
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=g.mask, scale=scale)
        out.copy_(o.permute(1, 0, 2, 3).reshape(nd, heads.num_q, head_dim))
    else:
        keys, values = keys.index_select(0, kv_of_q), values.index_select(0, kv_of_q)
        o = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(2), keys, values,
                                           attn_mask=g.mask, scale=scale)
        out.copy_(o.squeeze(2).transpose(0, 1))

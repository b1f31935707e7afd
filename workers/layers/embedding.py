"""Vocab-parallel embedding and LM head: each rank owns a contiguous range of token ids."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..parallel import ParallelContext, split_range
from .cpu_gemm import PackableLinear


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, ctx: ParallelContext,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.ctx = ctx
        self.vocab_range = split_range(vocab_size, ctx.tp_size, ctx.tp_rank)
        rows = self.vocab_range[1] - self.vocab_range[0]
        self.weight = nn.Parameter(torch.empty(rows, hidden_size, dtype=dtype, device=device),
                                   requires_grad=False)

    def load(self, source) -> None:
        start, end = self.vocab_range
        self.weight.copy_(source[start:end])

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.ctx.tp_size == 1:
            return F.embedding(token_ids, self.weight)
        start, end = self.vocab_range
        mine = (token_ids >= start) & (token_ids < end)
        local = F.embedding((token_ids - start) * mine, self.weight)
        local = local * mine.unsqueeze(-1).to(local.dtype)
        # Exactly one rank contributes each row, so the sum is exact.
        if self.ctx.sequence_parallel:
            return self.ctx.reduce_scatter_tokens(local)
        return self.ctx.all_reduce(local)


class ParallelLMHead(PackableLinear):
    """Logits for this rank's vocab range, gathered so every rank sees the full vocabulary."""

    def __init__(self, vocab_size: int, hidden_size: int, ctx: ParallelContext,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.ctx = ctx
        self.sizes = [end - start for start, end in
                      (split_range(vocab_size, ctx.tp_size, r) for r in range(ctx.tp_size))]
        self.vocab_range = split_range(vocab_size, ctx.tp_size, ctx.tp_rank)
        rows = self.vocab_range[1] - self.vocab_range[0]
        self.weight = nn.Parameter(torch.empty(rows, hidden_size, dtype=dtype, device=device),
                                   requires_grad=False)
        self.bias = None

    def load(self, source) -> None:
        start, end = self.vocab_range
        self.weight.copy_(source[start:end])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.matmul(hidden, None)
        return self.ctx.all_gather(logits, self.sizes, dim=-1)

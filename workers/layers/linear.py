"""Megatron-style linear layers. Each rank holds a slice of the weight and loads only that slice.

Weights are loaded from lazy tensor slices (safetensors' `get_slice`), so `source[a:b]` reads
only rows a..b from disk and no rank ever materialises the whole matrix.
"""

from __future__ import annotations

import torch
from torch import nn

from ..parallel import ParallelContext
from .cpu_gemm import PackableLinear


class ColumnParallelLinear(PackableLinear):
    """y = x W^T + b with W's output rows split across ranks; each rank returns its part of y.

    Several checkpoint tensors may be stacked into one weight (q, k and v; gate and up) so that
    one matmul does the work of several. `parts` maps each checkpoint tensor's id to the rows of
    it that this rank keeps; they are stacked in the order given.
    """

    def __init__(self, in_features: int, parts: dict[str, tuple[int, int]], bias: bool,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.layout: dict[str, tuple[int, int, int]] = {}
        offset = 0
        for part_id, (start, end) in parts.items():
            self.layout[part_id] = (start, end, offset)
            offset += end - start
        self.part_sizes = [end - start for start, end in parts.values()]
        self.weight = nn.Parameter(torch.empty(offset, in_features, dtype=dtype, device=device),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(offset, dtype=dtype, device=device),
                                  requires_grad=False) if bias else None)

    def load(self, part_id: str, weight_source, bias_source=None, scale_source=None) -> None:
        """scale_source: a saved int8 checkpoint's scales (its weights are int8 values, held
        exactly in this float weight until quantize.py makes them int8 again)."""
        start, end, offset = self.layout[part_id]
        self.weight[offset:offset + end - start].copy_(weight_source[start:end])
        if self.bias is not None:
            self.bias[offset:offset + end - start].copy_(bias_source[start:end])
        if scale_source is not None:
            if self.loaded_scale is None:
                self.loaded_scale = torch.empty(self.weight.shape[0], dtype=torch.float32,
                                                device=self.weight.device)
            self.loaded_scale[offset:offset + end - start].copy_(scale_source[start:end])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


class RowParallelLinear(PackableLinear):
    """y = x W^T + b with W's input columns split across ranks, then summed over ranks.

    The input arrives already split (the output of a column-parallel layer), so the only
    communication is the sum: an all-reduce, or under sequence parallelism a reduce-scatter that
    leaves each rank 1/TP of the tokens.
    """

    def __init__(self, in_range: tuple[int, int], out_features: int, bias: bool,
                 ctx: ParallelContext, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.in_range = in_range
        self.ctx = ctx
        self.weight = nn.Parameter(
            torch.empty(out_features, in_range[1] - in_range[0], dtype=dtype, device=device),
            requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype, device=device),
                                  requires_grad=False) if bias else None)

    def load(self, weight_source, bias_source=None, scale_source=None) -> None:
        start, end = self.in_range
        self.weight.copy_(weight_source[:, start:end])
        if self.bias is not None:
            self.bias.copy_(bias_source[:])
        if scale_source is not None:  # one per output row: every rank holds them all
            self.loaded_scale = scale_source[:].float().to(self.weight.device)

    def activation_absmax(self, x: torch.Tensor) -> torch.Tensor | None:
        """W8A8: each rank holds a slice of every row of x; quantizing each slice over its own
        range would make the result depend on the layout, so the ranks share each row's max."""
        if self.ctx.tp_size == 1:
            return None
        return self.ctx.all_reduce_max(x.abs().amax(dim=-1).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x, None)
        if self.ctx.sequence_parallel:
            y = self.ctx.reduce_scatter_tokens(y)
        else:
            y = self.ctx.all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y

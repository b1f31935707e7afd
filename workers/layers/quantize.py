"""Weight quantization of a shard's linear layers, applied once at load time.

`int8-weight` (weight-only): symmetric, one scale per output channel, W ~= q * s with q in
[-127, 127] and s = max|W[row]| / 127. Activations stay as they are (float32 sums on CPU,
in gemm.c), so the only error is each weight's rounding, at most s / 2. Every shard quantizes
only the slices it holds: a column-parallel layer keeps whole rows on each rank; a row-parallel
layer's rows are split by input columns, so its ranks agree on each row's maximum with one
all-reduce, and every layout stores the int8 values and scales TP=1 stores.

`w8a8-smoothquant`: the same int8 weights, over a checkpoint smoothed first
(workers/smoothquant.py), and int8 activations: each row of a linear layer's input is
quantized symmetrically on the fly (one scale per token), and the products are summed in int32
(workers/kernels/gemm_int8.c).

`llm-int8` (LLM.int8()): the same int8 weights and per-token int8 activations, except the
input feature dimensions where any value of the batch exceeds a threshold (default 6.0): those
columns are multiplied in float32 against the dequantized weights and added back, since a few
large features would otherwise set every token's scale and crush the rest.

The LM head stays in the model's dtype, as vLLM's and transformers' int8 schemes leave it by
default: its logits pick every token, and tied models share it with the embedding.
"""

from __future__ import annotations

import torch
from torch import nn

from ..parallel import ParallelContext
from .cpu_gemm import PackableLinear
from .embedding import ParallelLMHead
from .linear import RowParallelLinear

QUANTIZATIONS = ("none", "int8-weight", "w8a8-smoothquant", "llm-int8")


def int8_per_row(weight: torch.Tensor,
                 row_absmax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [n, k], scale float32 [n]) with weight ~= q * scale[:, None]; row_absmax
    (default: this weight's own) sets each row's range."""
    if row_absmax is None:
        row_absmax = weight.abs().amax(dim=1)
    # An all-zero row keeps scale 1 (its q is 0 either way), so no division by zero.
    absmax = row_absmax.float()
    scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    q = torch.round(weight.float() / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_linears(model: nn.Module, scheme: str, ctx: ParallelContext,
                     outlier_threshold: float = 6.0) -> int:
    """Quantize the model's linear layers in place; returns how many were quantized."""
    if scheme not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}; got {scheme!r}")
    if scheme == "none":
        return 0
    count = 0
    for module in model.modules():
        if not isinstance(module, PackableLinear) or isinstance(module, ParallelLMHead):
            continue
        weight = module.weight.detach()
        if module.loaded_scale is not None:  # saved quantized: the int8 values as they were
            q, scale = weight.round().clamp_(-127, 127).to(torch.int8), module.loaded_scale
            module.loaded_scale = None
        else:
            absmax = weight.abs().amax(dim=1).float()
            if isinstance(module, RowParallelLinear):
                ctx.all_reduce_max(absmax)
            q, scale = int8_per_row(weight, absmax)
        module.set_int8_weight(q, scale,
                               int8_activations=scheme in ("w8a8-smoothquant", "llm-int8"))
        if scheme == "llm-int8":
            module.outlier_threshold = outlier_threshold
        count += 1
    return count

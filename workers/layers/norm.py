"""RMSNorm computed the way transformers computes it (fp32 variance), so outputs match; with
the residual add before it fused in (see fused.py)."""

from __future__ import annotations

import torch
from torch import nn

from .fused import add_rms_norm


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype, device=device),
                                   requires_grad=False)

    def load(self, source) -> None:
        self.weight.copy_(source[:])

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(x + residual), x + residual): the normed input of the next sublayer and
        the residual stream it adds to."""
        return add_rms_norm(x, residual, self.weight, self.eps)

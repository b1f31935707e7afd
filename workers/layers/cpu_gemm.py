"""Linear layers' weights packed once at load time for the CPU's GEMM.

float32 on CPU: our own kernel (workers/kernels/gemm.c) over weights stored as contiguous
panels of output columns. At decode batch sizes a step streams every weight once, and the
panels are read in order at the memory's full bandwidth; with many rows the panel stays in
cache while the rows go by. Otherwise oneDNN's packed layout (bf16 with AVX-512), else the
weights as they are and `F.linear` (GPU). Packing once saves the repacking `F.linear` does on
every call. bench/README.md has the measurements behind this choice.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import gemm_library

# oneDNN chooses its packed layout for a typical number of rows; any row count works.
_ROWS_HINT = 64


class PackableLinear(nn.Module):
    """Base of our linear layers: y = x W^T (+ b), W [out, in] optionally packed for the CPU."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    packed: str | None = None  # "panels" (gemm.c) or "onednn"
    out_features = 0

    def pack_for_cpu(self) -> str | None:
        if self.packed or self.weight.device.type != "cpu":
            return self.packed
        weight = self.weight.detach()
        self.out_features = weight.shape[0]
        lib = gemm_library() if weight.dtype == torch.float32 else None
        if lib is not None:
            packed, self.packed = pack_panels(weight, lib.gemm_panel_width()), "panels"
        elif _onednn_available():
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(weight, _ROWS_HINT)
            except RuntimeError:  # e.g. bf16 on a CPU without AVX-512
                return None
            self.packed = "onednn"
        else:
            return None
        self.weight = nn.Parameter(packed, requires_grad=False)
        return self.packed

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.packed == "panels":
            return linear_panels(x, self.weight, self.out_features, bias)
        if self.packed == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.weight, bias, "none",
                                                      [], "")
        return F.linear(x, self.weight, bias)


def pack_panels(weight: torch.Tensor, width: int) -> torch.Tensor:
    """[n, k] -> [ceil(n / width), k, width]: panel p is rows p*width.. of W, transposed,
    zero-padded past n."""
    n, k = weight.shape
    panels = -(-n // width)
    padded = torch.zeros(panels * width, k, dtype=weight.dtype)
    padded[:n] = weight
    return padded.view(panels, width, k).transpose(1, 2).contiguous()


def linear_panels(x: torch.Tensor, packed: torch.Tensor, n: int,
                  bias: torch.Tensor | None) -> torch.Tensor:
    k = packed.shape[1]
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape[0], n, dtype=x.dtype)
    _linear_f32()(x2.data_ptr(), x2.shape[0], x2.stride(0), packed.data_ptr(), n, k,
                  None if bias is None else bias.data_ptr(), y.data_ptr(), n,
                  torch.get_num_threads())
    return y if x.dim() == 2 else y.view(*x.shape[:-1], n)


@lru_cache(maxsize=1)
def _linear_f32():
    return gemm_library().linear_f32


def _onednn_available() -> bool:
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))

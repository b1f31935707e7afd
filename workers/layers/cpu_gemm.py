"""Linear layers' weights packed once at load time for the CPU's GEMM.

Two layouts, one chosen per shard (`cpu_gemm`; keeping both would double the weights' memory):
- `panels`: contiguous panels of output columns for our own kernel (workers/kernels/gemm.c):
  a decode step of a few rows streams each panel once at memory bandwidth; many rows run
  BLIS-style;
- `onednn`: oneDNN's packed layout (`F.linear` would repack the weight on every call).
`auto` picks by what was measured side by side (bench/README.md): on an AMD EPYC (Zen 4/5)
the panels decode 1.1-1.8x faster at batch 1, with throughput and prefill equal within that
machine's noise; on an Intel Xeon (Sapphire Rapids) they decode ~20% faster but oneDNN
prefills 11-25% faster and gives up to 15% more throughput. So auto is oneDNN on Intel CPUs and the
panels elsewhere. GPU weights stay as they are (`F.linear`).

int8 weights (quantization `int8-weight`, workers/layers/quantize.py) always take the panels
on CPU: gemm.c widens them in registers, so they stream at a quarter of float32's bytes. So do
2:4 sparse weights (sparsity `2:4`, workers/sparsity.py), float32 or int8, packed as their
kept values and places (the zeros are not stored); on CUDA those become torch's
semi-structured sparse tensors (16-bit weights) where the GPU has sparse tensor cores.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import gemm_int8_library, gemm_library

# oneDNN chooses its packed layout for a typical number of rows; any row count works.
_ROWS_HINT = 64


class PackableLinear(nn.Module):
    """Base of our linear layers: y = x W^T (+ b), W [out, in] optionally packed for the CPU."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    packed: str | None = None  # "panels" (gemm.c), "panels-2:4", "w8a8", "onednn" or "cuda-2:4"
    out_features = 0
    weight_scale: nn.Parameter | None  # int8 weights: float32, one per output row
    # int8 activations too (W8A8): each row of x is quantized to int8 on the fly
    int8_activations = False
    # LLM.int8: input columns holding any |x| above this stay out of the int8 product and
    # are multiplied in float32 (against the dequantized int8 weights) and added back
    outlier_threshold: float | None = None
    # two of every four consecutive input weights of a row are zero: pack them compactly
    sparse_24 = False
    # int8 scales read from a saved quantized checkpoint (quantize.py uses them as they are)
    loaded_scale: torch.Tensor | None = None

    def __init__(self):
        super().__init__()
        self.register_parameter("weight_scale", None)
        self.register_parameter("weight_colsum", None)  # W8A8 on CPU: sum of each column
        self.register_parameter("weight_places", None)  # 2:4 on CPU: where kept values sit

    def set_int8_weight(self, q: torch.Tensor, scale: torch.Tensor,
                        int8_activations: bool = False) -> None:
        """Hold int8 weights q [out, in] with weight ~= q * scale[:, None] from now on."""
        assert not self.packed, "quantize before packing"
        self.weight = nn.Parameter(q, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)
        self.int8_activations = int8_activations

    def pack_for_cpu(self, layout: str = "onednn") -> str | None:
        """Pack the weight for `layout` (panels or onednn, see resolve_cpu_gemm); returns the
        layout it got, or None where it stays as it is."""
        if self.packed or self.weight.device.type != "cpu":
            return self.packed
        weight = self.weight.detach()
        self.out_features = weight.shape[0]
        int8 = weight.dtype == torch.int8
        if int8 and self.int8_activations:
            lib = gemm_int8_library()
            if lib is None:  # no C compiler: matmul runs the torch reference
                return None
            self.weight_colsum = nn.Parameter(weight.sum(dim=1, dtype=torch.int32),
                                              requires_grad=False)
            self.weight = nn.Parameter(pack_w8a8(weight, lib.gemm_int8_panel_width()),
                                       requires_grad=False)
            self.packed = "w8a8"
            return self.packed
        if self.sparse_24 and (int8 or weight.dtype == torch.float32):
            lib = gemm_library()
            if lib is None:  # no C compiler: the zeros are multiplied as they are
                return None
            values, places = pack_panels_24(weight, lib.gemm_panel_width())
            self.weight_places = nn.Parameter(places, requires_grad=False)
            self.weight = nn.Parameter(values, requires_grad=False)
            self.packed = "panels-2:4"
            return self.packed
        panels = int8 or (weight.dtype == torch.float32 and layout == "panels")
        lib = gemm_library() if panels else None
        if lib is not None:
            packed, self.packed = pack_panels(weight, lib.gemm_panel_width()), "panels"
        elif int8:  # no C compiler: matmul dequantizes on each call
            return None
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

    def pack_for_cuda(self) -> str | None:
        """2:4 sparse 16-bit weights on a GPU with sparse tensor cores (compute capability 8.0
        or newer) become torch's semi-structured sparse tensors, which F.linear multiplies
        with cuSPARSELt or CUTLASS. Anything else (int8 weights, float32, shapes the kernels
        do not take) stays dense: the zeros are multiplied."""
        weight = self.weight.detach()
        if (self.packed or not self.sparse_24 or weight.device.type != "cuda"
                or weight.dtype not in (torch.float16, torch.bfloat16)
                or torch.cuda.get_device_capability(weight.device)[0] < 8):
            return self.packed
        from torch.sparse import to_sparse_semi_structured

        try:
            sparse = to_sparse_semi_structured(weight)
        except (RuntimeError, ValueError):  # e.g. a dimension not a multiple of 64
            return None
        self.weight = nn.Parameter(sparse, requires_grad=False)
        self.packed = "cuda-2:4"
        return self.packed

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.outlier_threshold is not None:
            large = x.abs() > self.outlier_threshold
            if large.any():
                return self._matmul_with_outliers(x, bias, large)
        return self._matmul(x, bias)

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        scale = self.weight_scale
        if self.packed == "w8a8":
            y = linear_w8a8(x.float(), self.weight, self.weight_colsum, scale,
                            self.out_features, None if bias is None else bias.float(),
                            self.activation_absmax(x))
            return y.to(x.dtype)
        if self.int8_activations:  # W8A8 without gemm_int8.c (a GPU, or no C compiler)
            y = w8a8_reference(x, self.weight, scale, self.activation_absmax(x))
            return y if bias is None else y + bias
        if self.packed in ("panels", "panels-2:4"):
            places = self.weight_places
            if scale is None:
                return linear_panels(x, self.weight, self.out_features, bias, places=places)
            # gemm.c sums int8 weights against float32 activations (bf16 models convert).
            y = linear_panels(x.float(), self.weight, self.out_features,
                              None if bias is None else bias.float(), scale, places)
            return y.to(x.dtype)
        if scale is not None:  # int8 weights without gemm.c (a GPU, or no C compiler)
            y = F.linear(x, self.weight.to(x.dtype)) * scale.to(x.dtype)
            return y if bias is None else y + bias
        if self.packed == "cuda-2:4":  # the sparse kernels take 2-D inputs
            y = F.linear(x.reshape(-1, x.shape[-1]), self.weight, bias)
            return y.view(*x.shape[:-1], y.shape[-1])
        if self.packed == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.weight, bias, "none",
                                                      [], "")
        return F.linear(x, self.weight, bias)


    def activation_absmax(self, x: torch.Tensor) -> torch.Tensor | None:
        """Each row's range for quantizing x to int8; None: the row's own (see
        RowParallelLinear, whose rows are split over ranks)."""
        return None

    def _matmul_with_outliers(self, x: torch.Tensor, bias: torch.Tensor | None,
                              large: torch.Tensor) -> torch.Tensor:
        """LLM.int8's decomposition: each token's outlier features in float32 (against the
        dequantized weights' columns), the rest in int8. Outliers are decided per token, not
        per batch as in the paper, so a request's output does not depend on its batch mates:
        a column another token needs in float32 meets this token's zero there."""
        outliers = torch.where(large, x, x.new_zeros(()))
        y = self._matmul(x - outliers, bias)
        columns = large.reshape(-1, x.shape[-1]).any(dim=0).nonzero().squeeze(1)
        w = self.int8_columns(columns).float() * self.weight_scale[:, None]  # [out, columns]
        return y + (outliers[..., columns].float() @ w.T).to(y.dtype)

    def int8_columns(self, columns: torch.Tensor) -> torch.Tensor:
        """The int8 weights' columns [out, len(columns)], read from whichever layout holds them."""
        w = self.weight
        if self.packed == "w8a8":  # [panels, k / 4, width, 4]
            picked = w[:, columns // 4, :, columns % 4]  # [len(columns), panels, width]
            return picked.reshape(len(columns), -1)[:, :self.out_features].T
        return w[:, columns]


CPU_GEMMS = ("auto", "panels", "onednn")


def resolve_cpu_gemm(name: str) -> tuple[str, str]:
    """The float32 weight layout for this CPU and why (for the start message)."""
    if name not in CPU_GEMMS:
        raise ValueError(f"cpu_gemm must be one of {', '.join(CPU_GEMMS)}; got {name!r}")
    if name != "auto":
        return name, "as configured"
    if _cpu_vendor() == "GenuineIntel" and _onednn_available():
        return "onednn", "auto: oneDNN on Intel CPUs (faster prefill and throughput measured)"
    if gemm_library() is None:
        return "onednn", "auto: gemm.c did not build"
    return "panels", "auto: gemm.c panels (faster batch-1 decode measured off Intel)"


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""
    return line.split(":", 1)[-1].strip()


def pack_panels(weight: torch.Tensor, width: int) -> torch.Tensor:
    """[n, k] -> [ceil(n / width), k, width]: panel p is rows p*width.. of W, transposed,
    zero-padded past n."""
    n, k = weight.shape
    panels = -(-n // width)
    padded = torch.zeros(panels * width, k, dtype=weight.dtype)
    padded[:n] = weight
    return padded.view(panels, width, k).transpose(1, 2).contiguous()


def pack_panels_24(weight: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2:4 sparse [n, k] -> (values [ceil(n / width), k / 4, 2, width], places uint8
    [ceil(n / width), k / 4, width]): for each group of four k of a column, the two kept
    weights and their places in the group (first | second << 2), zero-padded past n."""
    n, k = weight.shape
    if k % 4:
        raise ValueError(f"2:4 sparsity needs the input size to be a multiple of 4, got {k}")
    groups = weight.reshape(n, k // 4, 4)
    kept = groups != 0
    if (kept.sum(dim=-1) > 2).any():
        raise ValueError("the weight is not 2:4 sparse: a group of four holds more than two "
                         "nonzero values")
    # The nonzero places first (then the lowest), in increasing order; a group with fewer
    # than two nonzeros keeps a zero or two.
    rank = kept.to(torch.int16) * 8 - torch.arange(4, dtype=torch.int16)
    at = rank.topk(2, dim=-1).indices.sort(dim=-1).values  # [n, k / 4, 2]
    values = groups.gather(-1, at)
    places = (at[..., 0] | (at[..., 1] << 2)).to(torch.uint8)  # [n, k / 4]
    panels = -(-n // width)
    padded_values = torch.zeros(panels * width, k // 4, 2, dtype=weight.dtype)
    padded_values[:n] = values
    padded_places = torch.zeros(panels * width, k // 4, dtype=torch.uint8)
    padded_places[:n] = places
    return (padded_values.view(panels, width, k // 4, 2).permute(0, 2, 3, 1).contiguous(),
            padded_places.view(panels, width, k // 4).transpose(1, 2).contiguous())


def pack_w8a8(q: torch.Tensor, width: int) -> torch.Tensor:
    """int8 [n, k] -> [ceil(n / width), ceil(k / 4), width, 4]: four consecutive k of a column
    side by side (VNNI's layout), zero-padded."""
    n, k = q.shape
    panels, kp = -(-n // width), -(-k // 4) * 4
    padded = torch.zeros(panels * width, kp, dtype=torch.int8)
    padded[:n, :k] = q
    return padded.view(panels, width, kp // 4, 4).permute(0, 2, 1, 3).contiguous()


def linear_w8a8(x: torch.Tensor, packed: torch.Tensor, colsum: torch.Tensor,
                scale: torch.Tensor, n: int, bias: torch.Tensor | None,
                row_absmax: torch.Tensor | None = None) -> torch.Tensor:
    """row_absmax (float32, one per row of x): the range each row is quantized over, where
    it is not the row's own (a row split over tensor ranks)."""
    k = x.shape[-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    if x2.shape[0]:
        absmax = None if row_absmax is None else row_absmax.reshape(-1).contiguous()
        status = _linear_w8a8()(x2.data_ptr(), x2.shape[0], x2.stride(0),
                                None if absmax is None else absmax.data_ptr(), packed.data_ptr(),
                                colsum.data_ptr(), scale.data_ptr(), n, k,
                                None if bias is None else bias.data_ptr(), y.data_ptr(), n,
                                torch.get_num_threads())
        if status != 0:
            raise MemoryError("linear_w8a8: out of memory for the quantized rows")
    return y if x.dim() == 2 else y.view(*x.shape[:-1], n)


def w8a8_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                   row_absmax: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8 in torch: x quantized per row as gemm_int8.c does it, the products summed in
    float32 (exact while partial sums stay below 2^24, close beyond)."""
    absmax = (x.float().abs().amax(dim=-1, keepdim=True) if row_absmax is None
              else row_absmax.reshape(*x.shape[:-1], 1))
    xs = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    xq = torch.round(x.float() / xs).clamp_(-127, 127)
    return (F.linear(xq, q.float()) * xs * scale).to(x.dtype)


def linear_panels(x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None,
                  scale: torch.Tensor | None = None,
                  places: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., k] float32 times packed panels of float32, or of int8 with `scale` (float32, one
    per output column); with `places`, the panels are 2:4 sparse (pack_panels_24)."""
    k = packed.shape[1] * (4 if places is not None else 1)
    int8 = packed.dtype == torch.int8
    assert int8 == (scale is not None), "int8 panels come with their scales, float32 without"
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape[0], n, dtype=x.dtype)
    _linear_panels()(x2.data_ptr(), x2.shape[0], x2.stride(0), packed.data_ptr(),
                     None if places is None else places.data_ptr(), int(int8),
                     None if scale is None else scale.data_ptr(), n, k,
                     None if bias is None else bias.data_ptr(), y.data_ptr(), n,
                     torch.get_num_threads())
    return y if x.dim() == 2 else y.view(*x.shape[:-1], n)


@lru_cache(maxsize=1)
def _linear_w8a8():
    return gemm_int8_library().linear_w8a8


@lru_cache(maxsize=1)
def _linear_panels():
    return gemm_library().linear_panels


def _onednn_available() -> bool:
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))

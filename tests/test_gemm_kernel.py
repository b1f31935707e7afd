"""The packed-panel GEMM (workers/kernels/gemm.c) against float64 matmul, over the shapes the
model code gives it: decode batches of 1-8 rows, the rows left over after each tile of rows,
prefill chunks, column counts that are not a multiple of the panel, k spanning several passes,
bias, strided rows."""

import pytest
import torch
import torch.nn.functional as F

from shardserve.workers.kernels import gemm_library
from shardserve.workers.layers.cpu_gemm import (PackableLinear, linear_panels, pack_panels,
                                                resolve_cpu_gemm)


@pytest.fixture(scope="module")
def width():
    lib = gemm_library()
    assert lib is not None, "the GEMM kernel must build on this machine (a C compiler is here)"
    return lib.gemm_panel_width()


def assert_within_float32_bound(y, x, w, bias=None):
    """Any order of summing k products in float32 stays within k * eps * (|x| @ |w|^T)."""
    ref = x.double() @ w.double().T
    bound = x.shape[-1] * 2 ** -24 * (x.double().abs() @ w.double().abs().T) + 1e-30
    if bias is not None:
        ref, bound = ref + bias.double(), bound + 2 ** -24 * bias.double().abs()
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert ((y.double() - ref).abs() <= bound).all(), float(((y.double() - ref).abs() / bound).max())


@pytest.mark.parametrize("rows", [0, 1, 2, 3, 5, 6, 7, 8, 9, 15, 17, 64, 301])
@pytest.mark.parametrize("n, k", [(960, 576), (3072, 576), (576, 1536), (33, 20), (100, 1203)])
def test_linear_matches_float64(width, rows, n, k):
    """k = 1536 and 1203 take several passes over k; the bias is added once, after the last."""
    torch.manual_seed(rows * 7 + n + k)
    x, w = torch.randn(rows, k), torch.randn(n, k)
    bias = torch.randn(n) if rows % 2 else None
    assert_within_float32_bound(linear_panels(x, pack_panels(w, width), n, bias), x, w, bias)


def test_bias_strided_rows_and_batch_dims(width):
    torch.manual_seed(0)
    w, bias = torch.randn(77, 300), torch.randn(77)
    wide = torch.randn(9, 400)
    x = wide[:, 50:350]  # rows strided, as a view into a wider tensor
    assert_within_float32_bound(linear_panels(x, pack_panels(w, width), 77, bias), x, w, bias)
    x3 = torch.randn(2, 5, 300)
    y = linear_panels(x3, pack_panels(w, width), 77, bias)
    assert y.shape == (2, 5, 77)
    assert_within_float32_bound(y.view(10, 77), x3.view(10, 300), w, bias)


@pytest.mark.parametrize("gemm", ["panels", "onednn"])
def test_layers_pack_and_match_f_linear(width, gemm):
    """A linear layer packed at load time computes what it computed before packing."""
    torch.manual_seed(1)
    layer = PackableLinear()
    layer.weight = torch.nn.Parameter(torch.randn(200, 64), requires_grad=False)
    x = torch.randn(4, 64)
    before = F.linear(x, layer.weight)
    assert layer.pack_for_cpu(gemm) == gemm
    if gemm == "panels":
        assert layer.weight.shape == (-(-200 // width), 64, width)
    torch.testing.assert_close(layer.matmul(x, None), before, rtol=1e-5, atol=1e-5)


def test_cpu_gemm_auto_picks_a_layout_this_cpu_has_and_names_why():
    layout, reason = resolve_cpu_gemm("auto")
    assert layout in ("panels", "onednn") and reason.startswith("auto")
    assert resolve_cpu_gemm("panels") == ("panels", "as configured")
    with pytest.raises(ValueError, match="cpu_gemm must be one of auto, panels, onednn"):
        resolve_cpu_gemm("mkl")


def quantize_rows(w):
    """Symmetric int8 per output row: the layout and scales the int8 weight-only path uses."""
    scale = w.abs().amax(dim=1).clamp(min=1e-30) / 127
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 64])
@pytest.mark.parametrize("n, k", [(960, 576), (576, 1536), (33, 20), (100, 1203)])
def test_int8_panels_match_float64_of_dequantized_weights(width, rows, n, k):
    """int8 weights widened in registers and scaled per column give what float64 gives for
    the dequantized weights, within the float32 bound (the scale is one more rounding)."""
    torch.manual_seed(rows + n + k)
    x, w = torch.randn(rows, k), torch.randn(n, k)
    q, scale = quantize_rows(w)
    bias = torch.randn(n) if rows % 2 else None
    y = linear_panels(x, pack_panels(q, width), n, bias, scale)
    dequantized = q.double() * scale.double()[:, None]
    ref = x.double() @ dequantized.T
    bound = (k + 1) * 2 ** -24 * (x.double().abs() @ dequantized.abs().T) + 1e-30
    if bias is not None:
        ref, bound = ref + bias.double(), bound + 2 ** -24 * bias.double().abs()
    assert ((y.double() - ref).abs() <= bound).all(), float(((y.double() - ref).abs() / bound).max())


@pytest.mark.parametrize("gemm", ["panels", "onednn"])
def test_either_layout_gives_transformers_tokens(tiny_model, gemm):
    """Whichever layout `auto` picks on a machine, the other one stays token-exact too."""
    from tiny import hf_greedy, mixed_prompts

    from shardserve import LLM, SamplingParams

    model_dir = tiny_model("llama-gqa")
    prompts, max_tokens = mixed_prompts()
    llm = LLM(str(model_dir), dtype="float32", cpu_gemm=gemm)
    shard = llm.engine.executor.shard
    assert shard.model.layers[0].mlp.gate_up_proj.packed == gemm
    assert shard.describe()["cpu_gemm"] == gemm
    results = llm.generate(prompts, [SamplingParams(max_tokens=n, temperature=0)
                                     for n in max_tokens])
    assert [r.token_ids for r in results] == hf_greedy(model_dir, prompts, max_tokens)

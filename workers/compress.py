"""Compressed checkpoints: which weights a shard serves (pruned, smoothed, saved int8), and
writing them once to a directory that serves without calibrating again.

A shard asks for a quantization and a sparsity (ShardSpec); what it loads is derived from the
model directory, each step cached: the 2:4-pruned copy (workers/sparsity.py), then for
w8a8-smoothquant the smoothed copy (workers/smoothquant.py). A directory written by
`shardserve compress` says in config.json what it holds, and that is what is served:
- `shardserve_sparsity`, `shardserve_smoothquant`: as their modules write them;
- `shardserve_quantization`: {"scheme": ...}; each quantized linear's weight is stored as int8
  values (`<name>.weight`) beside one float32 scale per output row (`<name>.weight_scale`),
  exactly the values quantize.py computes at load time, so serving the saved directory gives
  the same outputs as quantizing at start. (transformers cannot load these int8 weights;
  the pruned and smoothed checkpoints without int8 it loads as ordinary models.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from .calibration import copy_side_files, read_tensors
from .layers.cpu_gemm import PackableLinear
from .layers.embedding import ParallelLMHead
from .layers.linear import RowParallelLinear
from .layers.quantize import int8_per_row
from .parallel import ParallelContext
from .sparsity import PRUNED, checkpoint_sparsity, sparse_checkpoint, write_recovered

MARKER = "shardserve_quantization"


def checkpoint_quantization(model_dir: Path) -> str | None:
    """The scheme a saved int8 checkpoint holds, or None."""
    marker = json.loads((Path(model_dir) / "config.json").read_text()).get(MARKER)
    return None if marker is None else marker["scheme"]


def compressed_checkpoint(model_dir: Path, spec) -> tuple[Path, str, str]:
    """(the directory to load, the quantization and the sparsity served) for a ShardSpec."""
    stored = checkpoint_quantization(model_dir)
    quantization = spec.quantization
    if stored is not None:
        if quantization not in ("none", stored):
            raise ValueError(f"{model_dir} holds {stored} weights; it cannot be served with "
                             f"quantization {quantization} (serve it with none or {stored}, "
                             "or compress the original model)")
        quantization = stored
    sparsity = "2:4" if checkpoint_sparsity(model_dir) is not None else spec.sparsity
    if sparsity == "2:4":
        model_dir = sparse_checkpoint(model_dir, spec.sparsity_score)
    if quantization == "w8a8-smoothquant":
        from .smoothquant import smoothquant_checkpoint

        model_dir = smoothquant_checkpoint(model_dir, spec.smoothquant_alpha)
    return Path(model_dir), quantization, sparsity


def mark_2_4_sparse(model: nn.Module, ctx: ParallelContext) -> None:
    """Have the decoder layers' linears packed as 2:4 sparse (their weights are pruned)."""
    for module in model.modules():
        if not isinstance(module, PackableLinear) or isinstance(module, ParallelLMHead):
            continue
        if isinstance(module, RowParallelLinear) and module.in_range[0] % 4:
            raise ValueError(f"2:4 sparsity at tensor_parallel_size {ctx.tp_size}: a rank's "
                             f"slice of a row starts at input {module.in_range[0]}, inside a "
                             "group of four; choose a TP size that splits the heads and the "
                             "intermediate size into multiples of 4")
        module.sparse_24 = True


def write_compressed(model_dir: Path, out: Path, quantization: str, sparsity: str,
                     sparsity_score: str = "activation", smoothquant_alpha: float = 0.5,
                     recovery=None) -> tuple[str, str]:
    """Write model_dir, pruned / smoothed / int8 as asked, as a directory to serve; returns
    the quantization and sparsity it holds (a compressed model_dir keeps its own).
    recovery (a DistillConfig): fine-tune the 2:4-pruned model towards the dense one first."""
    from safetensors.torch import save_file

    from .shard import ShardSpec

    spec = ShardSpec(model=str(model_dir), quantization=quantization, sparsity=sparsity,
                     sparsity_score=sparsity_score, smoothquant_alpha=smoothquant_alpha)
    source, quantization, sparsity = compressed_checkpoint(model_dir, spec)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new directory for the compressed model")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if recovery is not None:
        if sparsity != "2:4":
            raise ValueError("recovery fine-tunes a 2:4-pruned model; ask for sparsity 2:4")
        write_recovered(Path(model_dir), source, tmp / "recovered", recovery)
        source = tmp / "recovered"
    config = json.loads((source / "config.json").read_text())
    if quantization == "none":
        for f in source.iterdir():
            if f.is_file():
                shutil.copy(f, tmp / f.name)
    else:
        tensors = read_tensors(source)
        for i in range(config["num_hidden_layers"]):
            for name in PRUNED:
                key = f"model.layers.{i}.{name}"
                tensors[f"{key}.weight"], tensors[f"{key}.weight_scale"] = int8_per_row(
                    tensors[f"{key}.weight"].float())
        save_file({k: v.contiguous() for k, v in tensors.items()},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        copy_side_files(source, tmp)
        config[MARKER] = {"scheme": quantization, "quantized_from": str(source),
                          "weights": "int8, one float32 scale per output row (.weight_scale)"}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    shutil.rmtree(tmp / "recovered", ignore_errors=True)
    tmp.rename(out)
    return quantization, sparsity

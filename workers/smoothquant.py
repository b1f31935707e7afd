"""SmoothQuant: move the activations' outliers into the weights, so both quantize to int8.

Per input channel j of a linear layer, s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), with
max|X_j| measured on a calibration text; then X' = X / s and W' = W * s compute the same
product, and X' has a far smaller range. The division is folded into whatever produces X, so
it costs nothing at run time and the model stays the same function:
- q, k, v and gate, up: their input is an RMSNorm's output, so the norm's weight is divided;
- down: its input is silu(gate) * up, so up's rows are divided.
(o_proj's input is attention over v; folding there would need one factor per KV head shared
by its query heads; it is left unsmoothed and quantized per token like the rest.)

The smoothed model is an ordinary Hugging Face checkpoint (transformers loads it and computes
what the original computes, up to float rounding); it is written once per (model, alpha) into
the cache, with its settings in config.json under `shardserve_smoothquant`, and every shard of
every layout loads it and quantizes its own slices (workers/layers/quantize.py). Calibration
runs on the texts workers/calibration.py names.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .calibration import (CALIBRATION_TEXTS, cache_key, copy_side_files, input_statistics,
                          read_tensors)

log = logging.getLogger(__name__)

MARKER = "shardserve_smoothquant"


def smoothquant_checkpoint(model_dir: Path, alpha: float) -> Path:
    """The smoothed copy of model_dir in the cache, made on first use (one process per node
    makes it, the others wait for it); model_dir itself when it is already smoothed."""
    model_dir = Path(model_dir)
    marker = json.loads((model_dir / "config.json").read_text()).get(MARKER)
    if marker is not None:
        if marker.get("alpha") != alpha:
            log.warning("%s was smoothed with alpha %s; serving it as it is (alpha %s is not "
                        "applied)", model_dir, marker.get("alpha"), alpha)
        return model_dir
    from .loader import build_once, cache_dir

    digest = cache_key(model_dir, repr(alpha))
    target = cache_dir() / "models" / f"{model_dir.name}-smoothquant-{digest}"
    return build_once(target, lambda tmp: write_smoothed(model_dir, alpha, tmp))


def smoothing_factors(act_max: torch.Tensor, weights: list[torch.Tensor],
                      alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) over the weights that read channel j."""
    w_max = torch.stack([w.float().abs().amax(dim=0) for w in weights]).amax(dim=0)
    s = act_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


def write_smoothed(model_dir: Path, alpha: float, out: Path) -> None:
    from safetensors.torch import save_file

    stats, calibration_tokens = input_statistics(model_dir)
    maxima = {name: s.absmax for name, s in stats.items()}
    tensors = {name: t.float() for name, t in read_tensors(model_dir).items()}
    num_layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    for i in range(num_layers):
        p = f"model.layers.{i}"
        attn = [f"{p}.self_attn.{n}_proj.weight" for n in "qkv"]
        mlp_in = [f"{p}.mlp.gate_proj.weight", f"{p}.mlp.up_proj.weight"]
        for producer, readers, key in ((f"{p}.input_layernorm.weight", attn, "self_attn.qkv"),
                                       (f"{p}.post_attention_layernorm.weight", mlp_in,
                                        "mlp.gate_up")):
            s = smoothing_factors(maxima[f"{p}.{key}"], [tensors[r] for r in readers], alpha)
            tensors[producer] = tensors[producer] / s
            for r in readers:
                tensors[r] = tensors[r] * s
        down, up = f"{p}.mlp.down_proj.weight", f"{p}.mlp.up_proj.weight"
        s = smoothing_factors(maxima[f"{p}.mlp.down"], [tensors[down]], alpha)
        tensors[down] = tensors[down] * s
        tensors[up] = tensors[up] / s[:, None]
        if f"{p}.mlp.up_proj.bias" in tensors:
            tensors[f"{p}.mlp.up_proj.bias"] = tensors[f"{p}.mlp.up_proj.bias"] / s
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    copy_side_files(model_dir, out)
    config = json.loads((model_dir / "config.json").read_text())
    config[MARKER] = {"alpha": alpha, "smoothed_from": str(model_dir),
                      "calibration": [str(p) for p in CALIBRATION_TEXTS],
                      "calibration_tokens": calibration_tokens}
    config["torch_dtype"] = config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2))

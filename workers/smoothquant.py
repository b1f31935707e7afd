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
reads Debian's Apache-2.0 and GPL-2 licence texts at run time; perplexity is evaluated on the
GPL-3 (cluster/quality.py), a different text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CALIBRATION_TEXTS = (Path("/usr/share/common-licenses/Apache-2.0"),
                     Path("/usr/share/common-licenses/GPL-2"))
CALIBRATION_WINDOW = 512
CALIBRATION_WINDOWS = 8  # 4096 tokens
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

    key = [str(model_dir.resolve()), repr(alpha)]
    for f in sorted(model_dir.glob("*.safetensors")) + list(CALIBRATION_TEXTS):
        stat = f.stat()
        key.append(f"{f}:{stat.st_size}:{stat.st_mtime_ns}")
    digest = hashlib.sha256("\n".join(key).encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{model_dir.name}-smoothquant-{digest}"
    return build_once(target, lambda tmp: write_smoothed(model_dir, alpha, tmp))


def calibration_windows(tokenizer, window: int = CALIBRATION_WINDOW) -> list[list[int]]:
    """Up to CALIBRATION_WINDOWS consecutive windows of `window` tokens of the texts."""
    missing = [str(p) for p in CALIBRATION_TEXTS if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"SmoothQuant calibrates on Debian's licence texts; missing: "
                                f"{', '.join(missing)} (apt-get install base-files)")
    windows = []
    for path in CALIBRATION_TEXTS:
        ids = tokenizer(path.read_text(errors="replace"), add_special_tokens=False)["input_ids"]
        windows += [ids[i:i + window] for i in range(0, len(ids) - window + 1, window)]
    if not windows:
        raise ValueError(f"the calibration texts give fewer than {window} tokens with this "
                         "model's tokenizer; SmoothQuant cannot calibrate")
    return windows[:CALIBRATION_WINDOWS]


def activation_maxima(model_dir: Path) -> tuple[dict[str, torch.Tensor], int]:
    """max |x| per input channel of every linear layer's input over the calibration text,
    keyed by checkpoint prefix (model.layers.N.self_attn.qkv, .mlp.gate_up, .mlp.down), and
    how many tokens that was."""
    from transformers import AutoTokenizer

    from .layers.linear import ColumnParallelLinear, RowParallelLinear
    from .shard import Shard, ShardSpec

    shard = Shard(ShardSpec(model=str(model_dir), dtype="float32"))
    maxima: dict[str, torch.Tensor] = {}
    hooks = []
    for index, layer in enumerate(shard.model.layers):
        prefix = f"model.layers.{index}"
        for name, module in ((f"{prefix}.self_attn.qkv", layer.self_attn.qkv_proj),
                             (f"{prefix}.mlp.gate_up", layer.mlp.gate_up_proj),
                             (f"{prefix}.mlp.down", layer.mlp.down_proj)):
            assert isinstance(module, (ColumnParallelLinear, RowParallelLinear))

            def record(_module, args, name=name):
                seen = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float()
                maxima[name] = torch.maximum(maxima[name], seen) if name in maxima else seen

            hooks.append(module.register_forward_pre_hook(record))
    window = min(CALIBRATION_WINDOW, shard.shape.max_context_len)
    windows = calibration_windows(AutoTokenizer.from_pretrained(model_dir), window)
    for window in windows:
        shard.score(window)
    for hook in hooks:
        hook.remove()
    shard.shutdown()
    return maxima, sum(len(w) for w in windows)


def smoothing_factors(act_max: torch.Tensor, weights: list[torch.Tensor],
                      alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) over the weights that read channel j."""
    w_max = torch.stack([w.float().abs().amax(dim=0) for w in weights]).amax(dim=0)
    s = act_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


def write_smoothed(model_dir: Path, alpha: float, out: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    maxima, calibration_tokens = activation_maxima(model_dir)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(f, framework="pt") as source:
            for name in source.keys():
                tensors[name] = source.get_tensor(name).float()
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
    for f in model_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and not f.name.endswith(".index.json"):
            shutil.copy(f, out / f.name)
    config = json.loads((model_dir / "config.json").read_text())
    config[MARKER] = {"alpha": alpha, "smoothed_from": str(model_dir),
                      "calibration": [str(p) for p in CALIBRATION_TEXTS],
                      "calibration_tokens": calibration_tokens}
    config["torch_dtype"] = config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2))

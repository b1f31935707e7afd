"""Rotary position embedding from a precomputed cos/sin table indexed by position.

The table is built on the shard's own device with the same formula, dtype steps and kernels
as transformers, so the rotated queries and keys are bit-identical to theirs there. Scaled
variants (linear, llama3, yarn, ...) take their inverse frequencies from transformers' own
ROPE_INIT_FUNCTIONS.

Dynamic NTK scaling depends on the sequence's length as well as the position: transformers
recomputes the frequencies for a forward pass whose sequence is longer than
max_position_embeddings. Here each token gets the frequencies of its own sequence's length
at the step that computes it (its chunk's end), which is what transformers does when it
generates one sequence with its prompt in one piece.

cos/sin are looked up once per step (`cos_sin`) and shared by every layer; they are applied
to q and k in fused.py, together with the cache write.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ..models import rope_parameters

# Length-dependent variants not implemented here; refused at load with this name.
_UNSUPPORTED = {"longrope": "its short/long factors switch with the sequence length"}


def rope_type(hf_config) -> str:
    kind = rope_parameters(hf_config)["rope_type"]
    if kind in _UNSUPPORTED or (kind != "default" and kind not in ROPE_INIT_FUNCTIONS):
        supported = ["default", *sorted(k for k in ROPE_INIT_FUNCTIONS if k not in _UNSUPPORTED)]
        reason = f" ({_UNSUPPORTED[kind]})" if kind in _UNSUPPORTED else ""
        raise ValueError(f"rope_type {kind!r} is not supported{reason}; supported: "
                         + ", ".join(supported))
    return kind


def inverse_frequencies(hf_config, head_dim: int, seq_len: int | None = None
                        ) -> tuple[torch.Tensor, float]:
    """fp32 inverse frequencies and the attention scaling of cos/sin, computed on the CPU as
    transformers computes them when it builds a model, whatever device the caller builds on
    (the shard builds its model under its GPU's device context)."""
    kind = rope_type(hf_config)
    with torch.device("cpu"):
        if kind == "default":
            base = rope_parameters(hf_config)["rope_theta"]
            return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[kind](hf_config, "cpu", seq_len=seq_len)
    return inv_freq.float(), float(scaling)


class RotaryEmbedding(nn.Module):
    def __init__(self, hf_config, head_dim: int, max_positions: int, dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        self.hf_config, self.head_dim, self.dtype = hf_config, head_dim, dtype
        self.dynamic = rope_type(hf_config) == "dynamic"
        self.trained_len = hf_config.max_position_embeddings
        self._long_tables: dict[int, tuple[torch.Tensor, float]] = {}
        inv_freq, scaling = inverse_frequencies(hf_config, head_dim)
        positions = torch.arange(max_positions, dtype=torch.int64, device=device)
        cos, sin = self._table(positions, inv_freq.to(device), scaling)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _table(self, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float):
        # transformers' steps: fp32 positions x inv_freq, duplicated, cos/sin, scaled, cast.
        freqs = positions.float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scaling).to(self.dtype), (emb.sin() * scaling).to(self.dtype)

    def cos_sin(self, positions: torch.Tensor, seq_lens: torch.Tensor | None = None):
        """cos, sin [T, D] for the step's tokens. seq_lens [T] (dynamic scaling only): the
        length of each token's sequence at this step."""
        cos, sin = self.cos[positions], self.sin[positions]
        if not self.dynamic or seq_lens is None:
            return cos, sin
        long = seq_lens > self.trained_len
        if not bool(long.any()):
            return cos, sin
        for length in seq_lens[long].unique().tolist():
            rows = (seq_lens == length).nonzero().squeeze(1)
            inv_freq, scaling = self._long_frequencies(int(length), positions.device)
            cos[rows], sin[rows] = self._table(positions[rows], inv_freq, scaling)
        return cos, sin

    def _long_frequencies(self, length: int, device: torch.device) -> tuple[torch.Tensor, float]:
        if length not in self._long_tables:
            if len(self._long_tables) > 4096:  # bound the cache; a step needs a handful
                self._long_tables.clear()
            inv_freq, scaling = inverse_frequencies(self.hf_config, self.head_dim, length)
            self._long_tables[length] = (inv_freq.to(device), scaling)
        return self._long_tables[length]

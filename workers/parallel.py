"""Where this shard sits in the layout, how it splits a dimension, and its TP collectives.

With tp_size == 1 every collective is a no-op, so the same model code runs unsharded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


def split_range(total: int, parts: int, index: int) -> tuple[int, int]:
    """The [start, end) of part `index` when `total` items are dealt as evenly as possible.

    The first `total % parts` parts get one item more; this lets TP=2 serve a model with an
    odd number of heads (SmolLM2 has 9).
    """
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


@dataclass
class ParallelContext:
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    tp_group: "dist.ProcessGroup | None" = None
    sequence_parallel: bool = False

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            dist.all_reduce(x, group=self.tp_group)
        return x

    def all_reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.tp_group)
        return x

    def all_gather(self, x: torch.Tensor, sizes: list[int], dim: int) -> torch.Tensor:
        """Concatenate every rank's `x` along `dim`; rank r's part has sizes[r] rows there."""
        if self.tp_size == 1:
            return x
        # gloo needs equal sizes: pad every part to the largest, then trim.
        largest = max(sizes)
        pad_shape = list(x.shape)
        pad_shape[dim] = largest
        padded = x.new_zeros(pad_shape)
        padded.narrow(dim, 0, x.shape[dim]).copy_(x)
        parts = [torch.empty_like(padded) for _ in range(self.tp_size)]
        dist.all_gather(parts, padded, group=self.tp_group)
        return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim=dim)

    def reduce_scatter_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, keep this rank's 1/TP slice of the tokens (dim 0, divisible by TP)."""
        chunk = x.shape[0] // self.tp_size
        out = x.new_empty((chunk,) + tuple(x.shape[1:]))
        if _backend_supports_reduce_scatter(self.tp_group):
            dist.reduce_scatter_tensor(out, x.contiguous(), group=self.tp_group)
            return out
        # gloo has no reduce-scatter: all-reduce and keep our slice. Same result, more traffic.
        dist.all_reduce(x, group=self.tp_group)
        return x[self.tp_rank * chunk:(self.tp_rank + 1) * chunk].contiguous()

    def all_gather_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of reduce_scatter_tokens: every rank's token slice, concatenated on dim 0."""
        out = x.new_empty((x.shape[0] * self.tp_size,) + tuple(x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=self.tp_group)
        return out


def _backend_supports_reduce_scatter(group: "dist.ProcessGroup | None") -> bool:
    return dist.get_backend(group) == "nccl"

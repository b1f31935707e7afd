"""Memory planning from the model config alone: weights, KV bytes per token, what fits.

KV bytes per token = 2 (K and V) x layers x kv_heads x head_dim x bytes per element.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardserve.workers.memory import human_bytes
from shardserve.workers.models import ModelShape
from shardserve.workers.parallel import split_range

BYTES_PER_ELEMENT = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class MemoryPlan:
    dtype: str
    parameters: int
    weights_bytes: int
    kv_bytes_per_token: int
    kv_bytes_per_token_mha: int  # the same model with one KV head per query head
    memory_bytes: int
    kv_budget_bytes: int
    max_tokens_in_cache: int
    seq_len: int
    kv_bytes_per_sequence: int
    max_sequences: int
    # Per shard, with tensor and pipeline parallelism: the largest shard sets the limit.
    tensor_parallel_size: int
    pipeline_parallel_size: int
    shard_weights_bytes: int
    shard_kv_bytes_per_token: int


def plan_memory(shape: ModelShape, dtype: str, memory_bytes: int, seq_len: int,
                tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1) -> MemoryPlan:
    element = BYTES_PER_ELEMENT[dtype]
    params = shape.num_parameters()
    weights = params * element
    per_token = shape.kv_bytes_per_token(element)
    mha = 2 * shape.num_layers * shape.num_heads * shape.head_dim * element

    # The busiest shard: most layers, most KV heads (heads are dealt out, KV heads replicated
    # when fewer than ranks), most weights.
    stage_layers = max(b - a for a, b in (split_range(shape.num_layers, pipeline_parallel_size, s)
                                          for s in range(pipeline_parallel_size)))
    group = shape.num_heads // shape.num_kv_heads
    kv_heads = 0
    for rank in range(tensor_parallel_size):
        q_start, q_end = split_range(shape.num_heads, tensor_parallel_size, rank)
        kv_heads = max(kv_heads, (q_end - 1) // group + 1 - q_start // group)
    shard_per_token = 2 * stage_layers * kv_heads * shape.head_dim * element
    shard_weights = (weights // (tensor_parallel_size * pipeline_parallel_size)
                     if tensor_parallel_size * pipeline_parallel_size > 1 else weights)

    budget = max(0, memory_bytes - shard_weights)
    tokens = budget // shard_per_token if shard_per_token else 0
    return MemoryPlan(
        dtype=dtype, parameters=params, weights_bytes=weights, kv_bytes_per_token=per_token,
        kv_bytes_per_token_mha=mha, memory_bytes=memory_bytes, kv_budget_bytes=budget,
        max_tokens_in_cache=tokens, seq_len=seq_len, kv_bytes_per_sequence=per_token * seq_len,
        max_sequences=tokens // seq_len, tensor_parallel_size=tensor_parallel_size,
        pipeline_parallel_size=pipeline_parallel_size, shard_weights_bytes=shard_weights,
        shard_kv_bytes_per_token=shard_per_token)


def format_plan(shape: ModelShape, plan: MemoryPlan) -> str:
    saving = plan.kv_bytes_per_token_mha / plan.kv_bytes_per_token
    attention = ("MHA" if shape.num_kv_heads == shape.num_heads
                 else "MQA" if shape.num_kv_heads == 1 else "GQA")
    lines = [
        f"model            {shape.architecture}: {shape.num_layers} layers, hidden "
        f"{shape.hidden_size}, {shape.num_heads} heads / {shape.num_kv_heads} KV heads "
        f"({attention}), head_dim {shape.head_dim}, vocab {shape.vocab_size}",
        f"parameters       {plan.parameters / 1e9:.2f} B",
        f"weights          {human_bytes(plan.weights_bytes)} ({plan.dtype})",
        f"KV per token     {human_bytes(plan.kv_bytes_per_token)} ({plan.kv_bytes_per_token:,} "
        f"bytes) = 2 x {shape.num_layers} "
        f"layers x {shape.num_kv_heads} KV heads x {shape.head_dim} head_dim x "
        f"{BYTES_PER_ELEMENT[plan.dtype]} bytes",
    ]
    if attention != "MHA":
        lines.append(f"                 {attention} saves {saving:.0f}x against MHA "
                     f"({human_bytes(plan.kv_bytes_per_token_mha)} per token)")
    lines += [
        f"KV per sequence  {human_bytes(plan.kv_bytes_per_sequence)} for {plan.seq_len} tokens",
    ]
    if plan.tensor_parallel_size * plan.pipeline_parallel_size > 1:
        lines.append(
            f"per shard        TP={plan.tensor_parallel_size} x PP={plan.pipeline_parallel_size}"
            f": weights {human_bytes(plan.shard_weights_bytes)}, KV per token "
            f"{human_bytes(plan.shard_kv_bytes_per_token)}")
    lines += [
        f"memory budget    {human_bytes(plan.memory_bytes)} per shard, "
        f"{human_bytes(plan.kv_budget_bytes)} left for KV after weights",
        f"fits             {plan.max_tokens_in_cache:,} tokens = {plan.max_sequences} "
        f"sequences of {plan.seq_len} tokens",
    ]
    return "\n".join(lines)

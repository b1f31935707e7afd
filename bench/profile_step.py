"""Where shardserve's time goes: the offline engine on the benchmark workload, with timers
around each phase of a step (the C decode kernel and Python work included, which
torch.profiler does not see), then torch.profiler's busiest torch ops over a shorter run.

    python bench/profile_step.py                      # 32 requests, SmolLM2 fp32, in this process
    python bench/profile_step.py --num-requests 8 --dtype bfloat16 --profiler-requests 4
    python bench/profile_step.py --batch1    # one 256-token prompt, then 128 decoded tokens

The timers wrap functions from the outside, so the product code has none. (Not named
profile.py: in bench/ that name would shadow the standard library's `profile` module, which
torch imports, for every script there.) Nested phases
(indented) are parts of the phase above them.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.workload import (BATCH1_DECODE_TOKENS, BATCH1_PROMPT_TOKENS,  # noqa: E402
                            BenchRequest, make_workload)

TOTALS: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)


def timed(name: str, owner, attribute: str) -> None:
    """Replace owner.attribute with a wrapper that adds its time to TOTALS[name]."""
    original = getattr(owner, attribute)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            TOTALS[name] += time.perf_counter() - start
            CALLS[name] += 1

    setattr(owner, attribute, wrapper)


def instrument() -> list[tuple[str, int]]:
    """The phases, in the order printed, with their nesting depth."""
    from shardserve.cluster import engine, scheduler
    from shardserve.cluster.detokenizer import IncrementalDetokenizer
    from shardserve.workers import shard
    from shardserve.workers.layers import attention, cpu_gemm, norm
    from shardserve.workers.models import llama

    phases = [
        ("step", 0, engine.Engine, "step"),
        ("schedule", 1, scheduler.Scheduler, "schedule"),
        ("plan (per sequence)", 1, engine.Engine, "_sequence_step"),
        ("shard execute", 1, shard.Shard, "_execute"),
        ("attention metadata", 2, shard, "build_metadata"),
        ("model forward", 2, llama.LlamaForCausalLM, "forward"),
        ("linears (gemm.c panels or oneDNN)", 3, cpu_gemm.PackableLinear, "matmul"),
        ("attention: prefill SDPA + decode", 3, llama, "paged_attention"),
        ("decode kernel (C)", 4, attention, "_decode_native"),
        ("RMSNorm with the residual add", 3, norm.RMSNorm, "forward"),
        ("rotary + KV cache write", 3, llama, "rotary_and_cache"),
        ("SiLU-and-mul", 3, llama, "silu_and_mul"),
        ("logits (final norm + LM head)", 2, llama.LlamaForCausalLM, "compute_logits"),
        ("sampling", 2, shard, "sample_and_verify"),
        ("apply tokens, stop checks", 1, engine.Engine, "_apply"),
        ("detokenize", 2, IncrementalDetokenizer, "add_token"),
    ]
    for name, _, owner, attribute in phases:
        timed(name, owner, attribute)
    return [(name, depth) for name, depth, _, _ in phases]


def report(phases: list[tuple[str, int]], wall: float, steps: int) -> None:
    step = TOTALS["step"] or wall
    print(f"\n{'phase':52s} {'total s':>8s} {'% step':>7s} {'ms/step':>8s} {'calls':>8s}")
    for name, depth in phases:
        label = "  " * depth + name
        print(f"{label:52s} {TOTALS[name]:8.2f} {100 * TOTALS[name] / step:6.1f}% "
              f"{1000 * TOTALS[name] / max(steps, 1):8.2f} {CALLS[name]:8d}")
    outside = wall - step
    print(f"{'outside step() (the caller loop)':52s} {outside:8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--profiler-requests", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--max-num-batched-tokens", type=int, default=1024)
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--cpu-gemm", default="auto")
    parser.add_argument("--batch1", action="store_true",
                        help="the batch-1 latency request instead: one 256-token prompt, then "
                             "128 decoded tokens, run --num-requests times one after another")
    args = parser.parse_args()

    import torch

    from shardserve import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, kv_cache_memory="4GiB",
              max_num_batched_tokens=args.max_num_batched_tokens,
              kv_cache_dtype=args.kv_cache_dtype, cpu_gemm=args.cpu_gemm)

    def workload(count: int) -> list[BenchRequest]:
        if not args.batch1:
            return make_workload(count)
        prompt = make_workload(1, (BATCH1_PROMPT_TOKENS,) * 2, (1, 1), seed=1)[0]
        return [BenchRequest(prompt.prompt_token_ids, 1 + BATCH1_DECODE_TOKENS)] * count

    def run(count: int) -> float:
        requests = workload(count)
        start = time.perf_counter()
        if args.batch1:  # one at a time
            for r in requests:
                llm.generate([r.prompt_token_ids],
                             SamplingParams(max_tokens=r.max_tokens, temperature=0,
                                            ignore_eos=True))
        else:
            llm.generate([r.prompt_token_ids for r in requests],
                         [SamplingParams(max_tokens=r.max_tokens, temperature=0,
                                         ignore_eos=True) for r in requests])
        return time.perf_counter() - start

    run(2)  # warm-up: kernel compile, first allocations
    phases = instrument()
    wall = run(args.num_requests)
    steps = CALLS["step"]
    generated = sum(r.max_tokens for r in workload(args.num_requests))
    print(f"{args.num_requests} requests, {generated} generated tokens in {wall:.1f} s "
          f"({generated / wall:.1f} tok/s), {steps} steps, {torch.get_num_threads()} threads, "
          f"dtype {args.dtype}, KV cache {args.kv_cache_dtype}, cpu_gemm {args.cpu_gemm}")
    report(phases, wall, steps)

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run(args.profiler_requests)
    print(f"\ntorch.profiler over {args.profiler_requests} requests (self CPU time of torch "
          "ops; the C kernel and Python are not in it):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()

"""The scheduler's token budget per step (`max_num_batched_tokens`): throughput vs latency.

    python bench/batched_tokens.py                          # 64 requests, 256..4096
    python bench/batched_tokens.py --values 512,2048 --num-requests 16

A larger budget packs more prefill tokens into a step: fewer, fuller steps (better GEMM
efficiency), but every running decode waits for the whole step, so the longest step is the
inter-token stall a streaming user sees. Per value, in one process, one after another: generated
tokens/s, mean and p90 time to first token (all requests arrive at once), and the median, p99
and longest step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.workload import make_workload  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--values", default="256,512,1024,2048,4096")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    from shardserve import LLM, SamplingParams
    from shardserve.cluster import engine

    steps: list[float] = []
    original = engine.Engine.step

    def timed_step(self, *a, **k):
        start = time.perf_counter()
        try:
            return original(self, *a, **k)
        finally:
            steps.append(time.perf_counter() - start)

    engine.Engine.step = timed_step
    requests = make_workload(args.num_requests)
    params = [SamplingParams(max_tokens=r.max_tokens, temperature=0, ignore_eos=True)
              for r in requests]
    generated = sum(r.max_tokens for r in requests)
    print("| max_num_batched_tokens | gen tok/s | TTFT mean s | TTFT p90 s | step p50 ms | "
          "step p99 ms | longest step ms |\n|---|---|---|---|---|---|---|", flush=True)
    for value in [int(v) for v in args.values.split(",")]:
        llm = LLM(args.model, dtype=args.dtype, kv_cache_memory="4GiB",
                  max_num_batched_tokens=value)
        llm.generate([requests[0].prompt_token_ids], SamplingParams(max_tokens=2))  # warm-up
        steps.clear()
        start = time.perf_counter()
        outputs = llm.generate([r.prompt_token_ids for r in requests], params)
        wall = time.perf_counter() - start
        llm.shutdown()
        ttft = sorted(o.time_to_first_token_s for o in outputs)
        ordered = sorted(steps)
        print(f"| {value} | {generated / wall:.1f} | {statistics.mean(ttft):.2f} | "
              f"{ttft[int(0.9 * (len(ttft) - 1))]:.2f} | {1e3 * ordered[len(ordered) // 2]:.0f} | "
              f"{1e3 * ordered[int(0.99 * (len(ordered) - 1))]:.0f} | {1e3 * ordered[-1]:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()

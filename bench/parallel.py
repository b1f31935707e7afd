"""Tensor and pipeline parallelism on SmolLM2: step latency, throughput and pipeline bubble.

    unshare -n sh -c 'ip link set lo up && python bench/parallel.py'

(Ray's head probes cloud metadata addresses when it starts; the network namespace keeps that
on this machine.) Each layout runs the same workload through shard actors on a local Ray
cluster. The bubble is the share of the run a pipeline stage spent not computing: 1 - (its
busy time / wall time), averaged over stages. On a machine with fewer cores than shards the
shards also compete for CPU, which the numbers include.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.workload import make_workload  # noqa: E402
from shardserve import LLM, SamplingParams  # noqa: E402
from shardserve.cluster.launch import ensure_ray  # noqa: E402

LAYOUTS = [  # (tensor_parallel_size, pipeline_parallel_size, micro_batches)
    (1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 2, 2), (1, 2, 4), (2, 2, 2)]


def run(tp: int, pp: int, micro: int, requests, dtype: str, budget: int) -> dict:
    llm = LLM("smollm2", use_ray=True, dtype=dtype, tensor_parallel_size=tp,
              pipeline_parallel_size=pp, micro_batches=micro, kv_cache_memory="1GiB",
              max_num_batched_tokens=budget)
    engine, executor = llm.engine, llm.engine.executor
    for i, r in enumerate(requests):
        engine.add_request(str(i), r.prompt_token_ids,
                           SamplingParams(max_tokens=r.max_tokens, temperature=0,
                                          ignore_eos=True))
    before = executor.stats()
    decode_steps, all_steps, generated = [], [], 0
    start = time.perf_counter()
    while engine.has_unfinished():
        prefilling = any(s.num_uncomputed_tokens > 1 for s in engine.scheduler.running) or \
            bool(engine.scheduler.waiting)
        t = time.perf_counter()
        outputs = engine.step()
        elapsed = time.perf_counter() - t
        all_steps.append(elapsed)
        if not prefilling:
            decode_steps.append(elapsed)
        generated += sum(len(o.delta_token_ids) for o in outputs)
    wall = time.perf_counter() - start
    after = executor.stats()
    busy = [a["busy_seconds"] - b["busy_seconds"] for a, b in zip(after, before)]
    stage_busy = [max(busy[s * tp:(s + 1) * tp]) for s in range(pp)]
    llm.shutdown()
    return {
        "tp": tp, "pp": pp, "micro_batches": micro, "wall_s": round(wall, 2),
        "tokens_per_s": round(generated / wall, 1),
        "step_ms": round(1000 * sum(all_steps) / len(all_steps), 1),
        "decode_step_ms": round(1000 * sum(decode_steps) / max(1, len(decode_steps)), 1),
        "bubble": round(1 - sum(stage_busy) / (pp * wall), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-num-batched-tokens", type=int, default=1024)
    parser.add_argument("--out", default="bench/results/parallel.json")
    args = parser.parse_args()

    import ray

    ensure_ray()  # a new local cluster
    requests = make_workload(args.num_requests, prompt_len=(32, 256), output_len=(32, 96))
    rows = []
    for tp, pp, micro in LAYOUTS:
        row = run(tp, pp, micro, requests, args.dtype, args.max_num_batched_tokens)
        rows.append(row)
        print(row, flush=True)
    base = rows[0]["tokens_per_s"]
    print("\n| TP | PP | micro-batches | tok/s | vs TP1 PP1 | mean step (ms) | "
          "decode step (ms) | bubble |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tp']} | {r['pp']} | {r['micro_batches']} | {r['tokens_per_s']} | "
              f"{r['tokens_per_s'] / base:.2f}x | {r['step_ms']} | {r['decode_step_ms']} | "
              f"{r['bubble'] if r['pp'] > 1 else '-'} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"requests": args.num_requests, "rows": rows},
                                         indent=2))
    ray.shutdown()


if __name__ == "__main__":
    main()

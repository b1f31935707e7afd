"""Prefix caching on and off, side by side in one run (SmolLM2, fp32, greedy, EOS ignored).

    python bench/prefix_caching.py                    # writes bench/results/prefix_caching.json

Workloads, each submitted all at once to the offline engine:
- shared: 64 chat requests with one ~400-token system prompt (the start of the GPL-3 text
  Debian installs, read at run time) and a distinct short question each, 32 tokens out;
- plain: bench/workload.py's 64 random-token requests (prompts 32..512, outputs 16..256),
  where nothing is shared: what the cache costs when it cannot help.
Every (workload, setting) runs in a fresh process, so neither run warms the other. Reported:
time to first token p50/p99 (from submission), generated tokens/s, wall time, the prompt
tokens served from the cache, and whether the outputs equal those with caching off.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LICENSE = Path("/usr/share/common-licenses/GPL-3")


def shared_prompts(tokenizer, count: int, prefix_tokens: int) -> list[list[int]]:
    ids = tokenizer(LICENSE.read_text(), add_special_tokens=False)["input_ids"]
    system = tokenizer.decode(ids[:prefix_tokens])
    out = []
    for i in range(count):
        rendered = tokenizer.apply_chat_template(
            [{"role": "system", "content": system},
             {"role": "user", "content": f"Question {i + 1}: in one sentence, what does "
                                         f"paragraph {i % 7 + 1} of this licence allow?"}],
            add_generation_prompt=True, tokenize=False)
        out.append(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return out


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def child(args) -> None:
    """One workload with caching on or off; prints its row as JSON."""
    sys.path.insert(0, str(REPO))
    from bench.workload import make_workload
    from shardserve import LLM, SamplingParams

    llm = LLM("smollm2", dtype="float32", kv_cache_memory=args.kv_cache_memory,
              enable_prefix_caching=args.caching == "on")
    if args.workload == "shared":
        prompts = shared_prompts(llm.tokenizer, args.requests, args.prefix_tokens)
        params = [SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)] * len(prompts)
    else:
        requests = make_workload(args.requests)
        prompts = [r.prompt_token_ids for r in requests]
        params = [SamplingParams(max_tokens=r.max_tokens, temperature=0, ignore_eos=True)
                  for r in requests]
    llm.generate([prompts[0][:16]], SamplingParams(max_tokens=2))  # first-call costs
    llm.engine.kv.drop_prefix_cache()
    start = time.perf_counter()
    results = llm.generate(prompts, params)
    wall = time.perf_counter() - start
    ttft = [r.time_to_first_token_s for r in results]
    generated = sum(len(r.token_ids) for r in results)
    print(json.dumps({
        "workload": args.workload, "caching": args.caching, "requests": len(results),
        "prompt_tokens": sum(len(p) for p in prompts), "generated_tokens": generated,
        "cached_prompt_tokens": sum(r.num_cached_tokens for r in results),
        "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": percentile(ttft, 0.99),
        "wall_s": wall, "generated_tokens_per_s": generated / wall,
        "token_ids": [r.token_ids for r in results]}))
    llm.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prefix-tokens", type=int, default=400)
    parser.add_argument("--kv-cache-memory", default="4GiB")
    parser.add_argument("--workloads", default="shared,plain")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "prefix_caching.json"))
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--caching", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.workload:
        return child(args)
    rows = []
    for workload in args.workloads.split(","):
        for caching in ("off", "on"):
            out = subprocess.run(
                [sys.executable, __file__, "--workload", workload, "--caching", caching,
                 "--requests", str(args.requests), "--prefix-tokens", str(args.prefix_tokens),
                 "--kv-cache-memory", args.kv_cache_memory],
                check=True, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            rows.append(row)
            print(f"{workload:6} caching {caching:3}: TTFT p50 {row['ttft_p50_s']:.2f} s, "
                  f"p99 {row['ttft_p99_s']:.2f} s, {row['generated_tokens_per_s']:.1f} "
                  f"tok/s, {row['cached_prompt_tokens']} prompt tokens cached", flush=True)
    print("\n| workload | prefix caching | TTFT p50 | TTFT p99 | generated tok/s | wall | "
          "prompt tokens from cache | outputs = off |\n|---|---|---|---|---|---|---|---|")
    by_key = {(r["workload"], r["caching"]): r for r in rows}
    for r in rows:
        off = by_key[(r["workload"], "off")]
        same = sum(a == b for a, b in zip(r["token_ids"], off["token_ids"]))
        r["identical_to_off"] = same
        ratio = (f" ({off['ttft_p50_s'] / r['ttft_p50_s']:.1f}x lower)"
                 if r["caching"] == "on" else "")
        speed = (f" ({r['generated_tokens_per_s'] / off['generated_tokens_per_s']:.2f}x)"
                 if r["caching"] == "on" else "")
        print(f"| {r['workload']} | {r['caching']} | {r['ttft_p50_s']:.2f} s{ratio} | "
              f"{r['ttft_p99_s']:.2f} s | {r['generated_tokens_per_s']:.1f}{speed} | "
              f"{r['wall_s']:.1f} s | {r['cached_prompt_tokens']} / {r['prompt_tokens']} | "
              f"{same}/{r['requests']} |")
    for r in rows:
        del r["token_ids"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

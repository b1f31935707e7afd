"""Offline throughput: shardserve continuous batching vs static batching vs transformers.

    python bench/throughput.py                      # the full issue workload, fp32 and bf16
    python bench/throughput.py --num-requests 16 --dtypes float32

Workload (bench/workload.py): 64 requests, prompt lengths uniform in [32, 512], output lengths
uniform in [16, 256], EOS ignored, seed 0. Tokens/s counts the tokens the requests asked for;
a static batch that runs past a short request's end does not get credit for the extra steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.workload import BenchRequest, make_workload  # noqa: E402
from shardserve import LLM, SamplingParams  # noqa: E402
from shardserve.workers.loader import resolve_model  # noqa: E402


def run_shardserve(requests: list[BenchRequest], dtype: str, policy: str, batch: int,
                   model: str, budget: int) -> float:
    llm = LLM(model, dtype=dtype, scheduling_policy=policy, max_num_seqs=batch,
              max_num_batched_tokens=budget, kv_cache_memory="4GiB")
    params = [SamplingParams(max_tokens=r.max_tokens, temperature=0, ignore_eos=True)
              for r in requests]
    start = time.perf_counter()
    results = llm.generate([r.prompt_token_ids for r in requests], params)
    wall = time.perf_counter() - start
    assert [len(r.token_ids) for r in results] == [r.max_tokens for r in requests]
    llm.shutdown()
    return wall


def run_transformers(requests: list[BenchRequest], dtype: str, batch: int, model: str) -> float:
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    hf = AutoModelForCausalLM.from_pretrained(resolve_model(model), dtype=torch_dtype).eval()
    pad = hf.generation_config.pad_token_id or 0
    start = time.perf_counter()
    for i in range(0, len(requests), batch):
        group = requests[i:i + batch]
        width = max(len(r.prompt_token_ids) for r in group)
        ids = torch.tensor([[pad] * (width - len(r.prompt_token_ids)) + r.prompt_token_ids
                            for r in group])
        mask = torch.tensor([[0] * (width - len(r.prompt_token_ids))
                             + [1] * len(r.prompt_token_ids) for r in group])
        longest = max(r.max_tokens for r in group)
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=longest,
                              min_new_tokens=longest, do_sample=False, pad_token_id=pad)
        assert out.shape[1] == width + longest
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--systems", default="continuous,static,transformers")
    parser.add_argument("--batch", type=int, default=16, help="static batch size")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=1024,
                        help="tokens per step (1024 suits a few CPU cores; GPUs want more)")
    parser.add_argument("--out", default="bench/results/throughput.json")
    args = parser.parse_args()

    requests = make_workload(args.num_requests)
    total = sum(r.max_tokens for r in requests)
    print(f"{len(requests)} requests, {sum(len(r.prompt_token_ids) for r in requests)} prompt "
          f"tokens, {total} output tokens; torch threads {torch.get_num_threads()}")
    rows = []
    for dtype in args.dtypes.split(","):
        for system in args.systems.split(","):
            if system == "continuous":
                wall = run_shardserve(requests, dtype, "continuous", args.max_num_seqs,
                                      args.model, args.max_num_batched_tokens)
            elif system == "static":
                wall = run_shardserve(requests, dtype, "static", args.batch, args.model,
                                      args.max_num_batched_tokens)
            else:
                wall = run_transformers(requests, dtype, args.batch, args.model)
            rows.append({"dtype": dtype, "system": system, "wall_s": round(wall, 1),
                         "tokens_per_s": round(total / wall, 1)})
            print(f"{dtype:9} {system:13} {wall:8.1f} s {total / wall:8.1f} tok/s", flush=True)
    print("\n| dtype | system | wall (s) | generated tok/s | vs transformers |")
    print("|---|---|---|---|---|")
    for row in rows:
        base = next((r for r in rows if r["dtype"] == row["dtype"]
                     and r["system"] == "transformers"), None)
        ratio = f"{base['wall_s'] / row['wall_s']:.2f}x" if base else "-"
        print(f"| {row['dtype']} | {row['system']} | {row['wall_s']} | {row['tokens_per_s']} "
              f"| {ratio} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"requests": len(requests), "output_tokens": total,
                                          "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

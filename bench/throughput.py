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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.systems import run_shardserve, run_transformers  # noqa: E402
from bench.workload import make_workload  # noqa: E402


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
                                      args.max_num_batched_tokens, args.model).wall_s
            elif system == "static":
                wall = run_shardserve(requests, dtype, "static", args.batch,
                                      args.max_num_batched_tokens, args.model).wall_s
            else:
                wall = run_transformers(requests, dtype, args.batch, args.model).wall_s
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

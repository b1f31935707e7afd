"""The `shardserve` command.

    shardserve plan --model DIR [--dtype float16] [--memory 16GiB] [--seq-len 4096]
"""

from __future__ import annotations

import argparse
import sys


def cmd_plan(args: argparse.Namespace) -> int:
    from transformers import AutoConfig

    from shardserve.workers.models import model_shape

    from .config import parse_bytes
    from .plan import format_plan, plan_memory

    if args.model == "smollm2":
        from shardserve.workers.loader import resolve_model

        args.model = str(resolve_model(args.model))
    shape = model_shape(AutoConfig.from_pretrained(args.model))
    memory = parse_bytes(args.memory) if args.memory else _available_memory()
    plan = plan_memory(shape, args.dtype, memory, args.seq_len, args.tensor_parallel_size,
                       args.pipeline_parallel_size)
    print(format_plan(shape, plan))
    return 0


def _available_memory() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read /proc/meminfo; pass --memory")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardserve",
                                     description="Distributed LLM inference on Ray")
    sub = parser.add_subparsers(dest="command", required=True)

    plan = sub.add_parser("plan", help="weights, KV bytes per token and what fits in memory")
    plan.add_argument("--model", default="smollm2",
                      help="a Hugging Face model directory (only config.json is read)")
    plan.add_argument("--dtype", default="float16", choices=["float32", "bfloat16", "float16"])
    plan.add_argument("--memory", help="memory per shard, e.g. 24GiB (default: free memory now)")
    plan.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence")
    plan.add_argument("--tensor-parallel-size", "--tp", type=int, default=1)
    plan.add_argument("--pipeline-parallel-size", "--pp", type=int, default=1)
    plan.set_defaults(func=cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The systems the benchmarks time, each run the same way on the same workload: shardserve's
offline API and transformers' `generate` (static batches). vLLM runs in a venv of its own
(bench/run_vllm.py) and reports the same `Run`.

    python bench/systems.py shardserve --out run.json [--num-requests 64] [--dtype float32]
    python bench/systems.py transformers --out run.json

As a command it runs one system in this process and writes a `Run` as JSON, so that
bench/compare.py can start each system in a fresh process of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.workload import BenchRequest, batch1_latency, make_workload  # noqa: E402


@dataclass
class Run:
    system: str
    dtype: str
    startup_s: float  # building the engine and loading the model (vLLM: its compile too)
    wall_s: float  # generating every request, startup excluded
    generated_tokens: int
    prompt_tokens: int
    token_ids: list[list[int]]  # per request, to compare greedy outputs across systems
    settings: dict
    batch1_prefill_ms: float | None = None  # bench.workload.batch1_latency
    batch1_decode_ms: float | None = None


def run_shardserve(requests: list[BenchRequest], dtype: str = "float32",
                   policy: str = "continuous", max_num_seqs: int = 64,
                   max_num_batched_tokens: int = 1024, model: str = "smollm2",
                   kv_cache_memory: str = "4GiB", **options) -> Run:
    from shardserve import LLM, SamplingParams

    settings = dict(dtype=dtype, scheduling_policy=policy, max_num_seqs=max_num_seqs,
                    max_num_batched_tokens=max_num_batched_tokens,
                    kv_cache_memory=kv_cache_memory, **options)
    start = time.perf_counter()
    llm = LLM(model, **settings)
    startup = time.perf_counter() - start
    params = [SamplingParams(max_tokens=r.max_tokens, temperature=0, ignore_eos=True)
              for r in requests]
    start = time.perf_counter()
    results = llm.generate([r.prompt_token_ids for r in requests], params)
    wall = time.perf_counter() - start
    assert [len(r.token_ids) for r in results] == [r.max_tokens for r in requests]
    prefill, decode = batch1_latency(lambda prompt, n: llm.generate(
        [prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)))
    llm.shutdown()
    name = "shardserve" if policy == "continuous" else f"shardserve-{policy}"
    return Run(name, dtype, startup, wall, sum(r.max_tokens for r in requests),
               sum(len(r.prompt_token_ids) for r in requests), [r.token_ids for r in results],
               settings, prefill, decode)


def run_transformers(requests: list[BenchRequest], dtype: str = "float32", batch: int = 16,
                     model: str = "smollm2") -> Run:
    """Static batches of `batch`, left-padded, each run to its longest output, EOS ignored.
    Only the tokens each request asked for count."""
    import torch
    from transformers import AutoModelForCausalLM

    from shardserve.workers.loader import resolve_model

    start = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(resolve_model(model),
                                              dtype=getattr(torch, dtype)).eval()
    startup = time.perf_counter() - start
    # EOS ignored as the engines ignore it: it may be generated, it just does not stop a
    # request (min_new_tokens would mask it instead, and change the greedy choices).
    hf.generation_config.eos_token_id = None
    pad = hf.generation_config.pad_token_id or 0
    token_ids = []
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
                              do_sample=False, pad_token_id=pad)
        token_ids += [out[j, width:width + r.max_tokens].tolist() for j, r in enumerate(group)]
    wall = time.perf_counter() - start
    return Run("transformers", dtype, startup, wall, sum(r.max_tokens for r in requests),
               sum(len(r.prompt_token_ids) for r in requests), token_ids,
               {"batch": batch, "padding": "left"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("system", choices=["shardserve", "shardserve-static", "transformers"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch", type=int, default=16, help="static batch size")
    parser.add_argument("--max-num-batched-tokens", type=int, default=1024)
    parser.add_argument("--kv-cache-memory", default="4GiB")
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--quantization", default="none")
    parser.add_argument("--cpu-gemm", default="auto")
    parser.add_argument("--sparsity", default="none")
    parser.add_argument("--decode-layers", choices=["native", "python"], default="native",
                        help="python: the per-kernel path instead of workers/kernels/"
                             "decode_layers.c (set before the engine starts its workers)")
    args = parser.parse_args()
    if args.decode_layers == "python":
        os.environ["SHARDSERVE_DECODE_LAYERS"] = "python"
    requests = make_workload(args.num_requests)
    if args.system == "transformers":
        run = run_transformers(requests, args.dtype, args.batch, args.model)
    else:
        policy = "static" if args.system == "shardserve-static" else "continuous"
        run = run_shardserve(requests, args.dtype, policy,
                             args.batch if policy == "static" else 64,
                             args.max_num_batched_tokens, args.model, args.kv_cache_memory,
                             kv_cache_dtype=args.kv_cache_dtype, quantization=args.quantization,
                             cpu_gemm=args.cpu_gemm, sparsity=args.sparsity)
        if args.kv_cache_dtype != "auto":
            run.system += f" (KV {args.kv_cache_dtype})"
    Path(args.out).write_text(json.dumps(asdict(run)))


if __name__ == "__main__":
    main()

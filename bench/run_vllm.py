"""vLLM's offline `LLM.generate` on the benchmark workload; runs in vLLM's own venv
(bench/compare.py builds it) and writes the same JSON as bench/systems.py.

    .venv-vllm/bin/python bench/run_vllm.py --model-dir DIR --out run.json

Prompts go in as token ids, greedy (temperature 0), EOS ignored, no detokenizing, and the KV
cache gets the same budget as shardserve's (VLLM_CPU_KVCACHE_SPACE, GiB). Startup is the
`LLM(...)` call, which on CPU includes vLLM's compile step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# vLLM and the workload only: this venv has no shardserve.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.workload import batch1_latency, make_workload  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, help="a Hugging Face directory")
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kv-cache-gib", type=int, default=4)
    parser.add_argument("--max-num-batched-tokens", type=int, default=1024)
    args = parser.parse_args()
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_cache_gib)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    requests = make_workload(args.num_requests)
    settings = {"dtype": args.dtype, "max_num_seqs": 64,
                "max_num_batched_tokens": args.max_num_batched_tokens,
                "kv_cache_gib": args.kv_cache_gib}
    start = time.perf_counter()
    llm = LLM(model=args.model_dir, dtype=args.dtype, max_num_seqs=64,
              max_num_batched_tokens=args.max_num_batched_tokens, seed=0)
    startup = time.perf_counter() - start
    prompts = [TokensPrompt(prompt_token_ids=r.prompt_token_ids) for r in requests]
    params = [SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True,
                             detokenize=False) for r in requests]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    token_ids = [list(o.outputs[0].token_ids) for o in outputs]
    assert [len(t) for t in token_ids] == [r.max_tokens for r in requests]
    prefill, decode = batch1_latency(lambda prompt, n: llm.generate(
        [TokensPrompt(prompt_token_ids=prompt)],
        SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, detokenize=False),
        use_tqdm=False))
    Path(args.out).write_text(json.dumps({
        "system": "vllm-cpu", "dtype": args.dtype, "startup_s": startup, "wall_s": wall,
        "generated_tokens": sum(r.max_tokens for r in requests),
        "prompt_tokens": sum(len(r.prompt_token_ids) for r in requests),
        "token_ids": token_ids, "settings": settings, "batch1_prefill_ms": prefill,
        "batch1_decode_ms": decode}))


if __name__ == "__main__":
    main()

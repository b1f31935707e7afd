"""The `shardserve` command.

    shardserve serve [--config deploy/cpu-single-node.yaml] [--address auto|HOST:PORT]
    shardserve generate "prompt" [--chat] [--stream] [--max-tokens N] [--target HOST:PORT]
                        [--tls [--tls-ca-file CA.pem]]   (API key: env SHARDSERVE_API_KEY)
    shardserve health [--target HOST:PORT] [--service liveness] [--tls ...]   (for probes)
    shardserve plan --model DIR [--dtype float16] [--memory 16GiB] [--seq-len 4096]
    shardserve quality [--model M] [--quantization int8-weight,llm-int8] [--sparsity none,2:4]
                       [--text FILE]
    shardserve smooth --model M --out DIR [--alpha 0.5]
    shardserve compress --model M --out DIR [--quantization Q] [--sparsity 2:4]
    shardserve distill --teacher M --layers K --out DIR [--minutes 30]
    shardserve distill --teacher M --head --out DIR [--minutes 20]
"""

from __future__ import annotations

import argparse
import sys

from .config import QUANTIZATIONS, SPARSITIES, SPARSITY_SCORES


def cmd_plan(args: argparse.Namespace) -> int:
    from transformers import AutoConfig

    from shardserve.workers.models import model_shape

    from .config import parse_bytes
    from .plan import format_plan, plan_memory

    if args.model == "smollm2":
        from shardserve.workers.loader import resolve_model

        args.model = str(resolve_model(args.model))
    shape = model_shape(AutoConfig.from_pretrained(args.model))
    if args.memory:
        memory = parse_bytes(args.memory)
    else:
        from shardserve.workers.memory import host_memory

        memory = host_memory().available_bytes
    plan = plan_memory(shape, args.dtype, memory, args.seq_len, args.tensor_parallel_size,
                       args.pipeline_parallel_size)
    print(format_plan(shape, plan))
    return 0


def cmd_quality(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .quality import Compression, report, run

    text = Path(args.text)
    quantizations, sparsities = args.quantization.split(","), args.sparsity.split(",")
    for kind, given, known in (("quantization", quantizations, QUANTIZATIONS),
                               ("sparsity", sparsities, SPARSITIES)):
        unknown = [q for q in given if q not in known]
        if unknown:
            print(f"error: unknown {kind} {', '.join(unknown)}; choose from "
                  f"{', '.join(known)}", file=sys.stderr)
            return 2
    # every combination asked for that the server would serve (2:4 takes int8-weight at most)
    compressions = [Compression(q, s) for s in sparsities for q in quantizations
                    if s == "none" or q in ("none", "int8-weight")]
    print(report(run(args.model, compressions, text, args.window, args.dtype,
                     sparsity_score=args.sparsity_score), text))
    return 0


def _new_directory(path: str):
    """path as a Path, or None (said on stderr) when something is there already."""
    from pathlib import Path

    out = Path(path)
    if out.exists():
        print(f"error: {out} exists; choose a new directory", file=sys.stderr)
        return None
    return out


def cmd_compress(args: argparse.Namespace) -> int:
    from shardserve.workers.compress import write_compressed
    from shardserve.workers.loader import resolve_model

    from .config import EngineConfig

    out = _new_directory(args.out)
    if out is None:
        return 2
    try:  # the combinations the server refuses are refused here, with the same words
        EngineConfig(model=args.model, quantization=args.quantization, sparsity=args.sparsity,
                     sparsity_score=args.sparsity_score, smoothquant_alpha=args.alpha)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.recover_minutes and args.sparsity != "2:4":
        print("error: --recover-minutes fine-tunes a 2:4-pruned model; add --sparsity 2:4",
              file=sys.stderr)
        return 2
    recovery = None
    if args.recover_minutes:
        from shardserve.workers.distillation import DistillConfig

        recovery = DistillConfig(seconds=args.recover_minutes * 60)
    quantization, sparsity = write_compressed(resolve_model(args.model), out,
                                              args.quantization, args.sparsity,
                                              args.sparsity_score, args.alpha, recovery)
    print(f"wrote {out} (quantization {quantization}, sparsity {sparsity}); serve it with "
          f"model: {out} (no calibration at start)")
    return 0


def cmd_smooth(args: argparse.Namespace) -> int:
    from shardserve.workers.loader import resolve_model
    from shardserve.workers.smoothquant import write_smoothed

    out = _new_directory(args.out)
    if out is None:
        return 2
    write_smoothed(resolve_model(args.model), args.alpha, out)
    print(f"wrote the smoothed checkpoint to {out}; serve it with quantization: "
          f"w8a8-smoothquant (no calibration at start)")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from pathlib import Path

    from shardserve.workers.distillation import DistillConfig

    from .distill import describe, run

    out = Path(args.out)
    resumable = any((out / f).exists() for f in ("checkpoint.pt", "teacher_generations.json"))
    if out.exists() and not resumable and any(out.iterdir()):
        print(f"error: {out} exists and holds no checkpoint to resume; choose a new directory",
              file=sys.stderr)
        return 2
    if (out / "checkpoint.pt").exists():
        print(f"resuming from {out / 'checkpoint.pt'}", flush=True)
    if (args.layers is None) == (not args.head):
        print("error: give either --layers K (a student model) or --head (a draft head)",
              file=sys.stderr)
        return 2
    config = DistillConfig(seconds=args.minutes * 60, max_steps=args.steps, window=args.window,
                           learning_rate=args.learning_rate, temperature=args.temperature,
                           ce_weight=args.ce_weight, seed=args.seed,
                           max_text_tokens=args.text_tokens)
    if args.head:
        from shardserve.workers.draft_head import HeadTrainConfig

        from .distill import describe_head, run_head

        head_config = HeadTrainConfig(seconds=args.minutes * 60, max_steps=args.steps,
                                      depth=args.depth, temperature=args.temperature,
                                      learning_rate=args.head_learning_rate, seed=args.seed)
        try:
            head_report = run_head(args.teacher, out, config, head_config, args.generations,
                                   vocabulary=args.draft_vocab, inner_size=args.inner_size)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(describe_head(head_report, out))
        return 0
    try:
        report = run(args.teacher, args.layers, out, config, args.generations,
                     vocabulary=args.draft_vocab)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(describe(report, out))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import dataclasses
    import signal
    import threading

    from .auth import load_api_keys, server_credentials
    from .config import load_config

    engine_config, server_config = load_config(args.config)
    overrides = {k: v for k, v in (("address", args.address), ("host", args.host),
                                   ("port", args.port), ("metrics_port", args.metrics_port),
                                   ("http_port", args.http_port))
                 if v is not None}
    server_config = dataclasses.replace(server_config, **overrides)
    if args.model:
        engine_config = engine_config.with_overrides(model=args.model)
    if args.quantization:
        engine_config = engine_config.with_overrides(quantization=args.quantization)
    if args.sparsity:
        engine_config = engine_config.with_overrides(sparsity=args.sparsity)

    # Read here, where SHARDSERVE_API_KEY is set; a bad key or TLS file fails before Ray starts.
    api_keys = load_api_keys(server_config)
    server_credentials(server_config)

    import ray

    from .launch import ensure_ray
    from .service import start_server_actor

    where = server_config.address or "a new local Ray cluster"
    print(f"starting shardserve: model {engine_config.model}, TP="
          f"{engine_config.parallel.tensor_parallel_size} x PP="
          f"{engine_config.parallel.pipeline_parallel_size} x "
          f"{engine_config.parallel.replicas} replica(s) on {where}", flush=True)
    ensure_ray(server_config.address)
    actor, info = start_server_actor(engine_config, server_config, api_keys)

    def reachable(bound: str) -> str:
        return info["node_ip"] if bound in ("0.0.0.0", "::", "") else bound

    host, tls = reachable(info["host"]), server_config.tls_cert_file is not None
    print(f"shardserve is serving {engine_config.model} on {host}:{info['grpc_port']} (gRPC, "
          f"{'TLS' if tls else 'plaintext'}, API keys "
          f"{f'on ({len(api_keys)})' if api_keys else 'off'})"
          + (f", metrics on http://{reachable(info['metrics_host'])}:{info['metrics_port']}"
             "/metrics" if info["metrics_port"] else ""), flush=True)
    if info["http_port"]:
        print(f"OpenAI-compatible HTTP on {'https' if tls else 'http'}://{host}:"
              f"{info['http_port']}/v1", flush=True)
    kv_reason = ("auto: the model's dtype, token-exact" if engine_config.kv_cache_dtype == "auto"
                 else "as configured")
    weights = (f"weights {info['weight_bytes'] / 2 ** 20:.0f} MiB"
               + "".join(f" ({info[k]})" for k in ("quantization", "sparsity")
                         if info[k] != "none"))
    print(f"model dtype {info['dtype']} ({info['dtype_reason']}), {weights}; KV cache "
          f"{info['kv_cache_dtype']} ({kv_reason}), {info['kv_cache_tokens']} tokens; "
          f"{info['threads']} CPU threads per shard", flush=True)
    if info["cpu_gemm"]:
        print(f"CPU GEMM: {info['cpu_gemm']} ({info['cpu_gemm_reason']})", flush=True)
    print(f"try: {'SHARDSERVE_API_KEY=... ' if api_keys else ''}shardserve generate --target "
          f"{host}:{info['grpc_port']}{' --tls' if tls else ''} \"Hello\"", flush=True)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(5):
        try:
            ray.get(actor.ping.remote(), timeout=30)
        except Exception as e:  # noqa: BLE001 - the server is gone: say so and exit
            print(f"error: the server actor stopped: {e}", file=sys.stderr)
            return 1
    grace = server_config.drain_grace_s
    print(f"draining: no new requests; those in flight get {grace:g} s to finish "
          "(server.drain_grace_s)", flush=True)
    code = 0
    try:
        aborted = ray.get(actor.drain.remote(grace), timeout=grace + 60)
    except Exception as e:  # noqa: BLE001 - stop the server anyway, and say the drain failed
        print(f"error: the drain failed ({e}); stopping now", file=sys.stderr)
        aborted, code = 0, 1
    print("shutting down" + (f" ({aborted} request(s) aborted after the grace period)"
                             if aborted else ""), flush=True)
    ray.get(actor.stop.remote(), timeout=60)
    ray.kill(actor)
    ray.shutdown()
    return code


def _client(args: argparse.Namespace, timeout: float | None):
    from .auth import client_api_key
    from .client import Client

    return Client(args.target, timeout=timeout, api_key=client_api_key(), tls=args.tls,
                  tls_ca_file=args.tls_ca_file, tls_server_name=args.tls_server_name)


def cmd_generate(args: argparse.Namespace) -> int:
    import grpc

    prompt = args.prompt
    if args.chat or args.system:
        prompt = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}]
    options = {"max_tokens": args.max_tokens, "temperature": args.temperature,
               "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed,
               "stop": args.stop or None}
    with _client(args, args.timeout) as client:
        try:
            if args.stream:
                final = None
                for chunk in client.generate_stream(prompt, **options):
                    print(chunk.text, end="", flush=True)
                    final = chunk
                print()
                usage = final.usage if final else None
                reason = final.finish_reason if final else 0
            else:
                response = client.generate(prompt, **options)
                print(response.text)
                usage, reason = response.usage, response.finish_reason
        except grpc.RpcError as e:
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    from shardserve.proto import shardserve_pb2 as pb

    print(f"[{pb.FinishReason.Name(reason).removeprefix('FINISH_REASON_').lower()}: "
          f"{usage.prompt_tokens} prompt + {usage.completion_tokens} generated tokens]",
          file=sys.stderr)
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when the service is SERVING: an exec probe for a server with TLS, where
    kubelet's own gRPC probe cannot go (it speaks plaintext only)."""
    import grpc

    with _client(args, args.timeout) as client:
        try:
            status = client.health(args.service)
        except grpc.RpcError as e:
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    print(status)
    return 0 if status == "SERVING" else 1


def _add_connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of the server")
    parser.add_argument("--tls", action="store_true",
                        help="connect with TLS (the system's roots verify the server)")
    parser.add_argument("--tls-ca-file",
                        help="PEM CA (or the self-signed certificate) to verify the server "
                             "with; implies --tls")
    parser.add_argument("--tls-server-name",
                        help="the name the server's certificate must hold, when not the "
                             "target's host")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardserve",
                                     description="Distributed LLM inference on Ray")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the gRPC server (default: SmolLM2 on a local "
                                         "Ray cluster)")
    serve.add_argument("--config", help="serving config YAML (see deploy/)")
    serve.add_argument("--address", help="Ray cluster to join: auto (this node's) or HOST:PORT; "
                                         "default: start a local one")
    serve.add_argument("--model", help="override the config's model")
    serve.add_argument("--quantization", choices=QUANTIZATIONS,
                       help="override the config's quantization (int8-weight: int8 weights, "
                            "a quarter of float32's bytes)")
    serve.add_argument("--sparsity", choices=SPARSITIES,
                       help="override the config's sparsity (2:4: two of every four weights "
                            "pruned at start, stored compactly)")
    serve.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    serve.add_argument("--port", type=int, help="gRPC port (default 50051)")
    serve.add_argument("--metrics-port", type=int, help="Prometheus port (default 9400)")
    serve.add_argument("--http-port", type=int,
                       help="OpenAI-compatible HTTP API port (default 8000)")
    serve.set_defaults(func=cmd_serve)

    quality = sub.add_parser("quality", help="perplexity of the model, and with a quantization "
                                             "or sparsity, on a fixed English text")
    quality.add_argument("--model", default="smollm2")
    quality.add_argument("--quantization", default="none",
                         help=f"one or several, comma-separated: {', '.join(QUANTIZATIONS)}")
    quality.add_argument("--sparsity", default="none",
                         help=f"one or several, comma-separated: {', '.join(SPARSITIES)} "
                              "(each with each quantization that composes with it)")
    quality.add_argument("--sparsity-score", default="activation", choices=SPARSITY_SCORES)
    quality.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    quality.add_argument("--text", default="/usr/share/common-licenses/GPL-3",
                         help="plain-text file to score (default: Debian's GPL-3)")
    quality.add_argument("--window", type=int, default=512, help="tokens per scored window")
    quality.set_defaults(func=cmd_quality)

    smooth = sub.add_parser("smooth", help="calibrate and write a SmoothQuant-smoothed "
                                           "checkpoint, to serve with w8a8-smoothquant")
    smooth.add_argument("--model", default="smollm2")
    smooth.add_argument("--out", required=True)
    smooth.add_argument("--alpha", type=float, default=0.5, help="migration strength in [0, 1]")
    smooth.set_defaults(func=cmd_smooth)

    compress = sub.add_parser("compress", help="write a quantized and/or 2:4-pruned copy of a "
                                               "model, to serve without calibrating again")
    compress.add_argument("--model", default="smollm2")
    compress.add_argument("--out", required=True)
    compress.add_argument("--quantization", default="none", choices=QUANTIZATIONS)
    compress.add_argument("--sparsity", default="none", choices=SPARSITIES)
    compress.add_argument("--sparsity-score", default="activation", choices=SPARSITY_SCORES)
    compress.add_argument("--recover-minutes", type=float, default=0,
                          help="2:4: fine-tune the pruned model towards the dense one for "
                               "this long (distillation on Debian's texts), then write it")
    compress.add_argument("--alpha", type=float, default=0.5,
                          help="SmoothQuant's migration strength in [0, 1]")
    compress.set_defaults(func=cmd_compress)

    distill = sub.add_parser("distill", help="train a small draft model from a teacher (KL to "
                                             "its softened logits) for speculative decoding")
    distill.add_argument("--teacher", default="smollm2")
    distill.add_argument("--layers", type=int,
                         help="the student's layers, taken evenly from the teacher's")
    distill.add_argument("--head", action="store_true",
                         help="distill a draft head instead (workers/draft_head.py): a small "
                              "MLP stepping on from the target's last hidden state")
    distill.add_argument("--inner-size", type=int, default=1536,
                         help="--head: the width of the head's MLP")
    distill.add_argument("--depth", type=int, default=3,
                         help="--head: draft steps unrolled in training")
    distill.add_argument("--head-learning-rate", type=float, default=1e-3)
    distill.add_argument("--out", required=True, help="where the student (and its training "
                                                      "checkpoint, to resume from) goes")
    distill.add_argument("--minutes", type=float, default=20, help="training time budget "
                         "(the teacher's answers come first: 8 min for SmolLM2's 384 here)")
    distill.add_argument("--steps", type=int, help="or a step budget, whichever ends first")
    distill.add_argument("--window", type=int, default=256, help="tokens per sequence")
    distill.add_argument("--generations", type=int, default=384,
                         help="teacher answers to chat requests to train on, beside the text")
    distill.add_argument("--text-tokens", type=int, default=150_000,
                         help="at most this much of Debian's text to train on")
    distill.add_argument("--learning-rate", type=float, default=3e-4)
    distill.add_argument("--temperature", type=float, default=1.0,
                         help="softens both distributions in the KL term")
    distill.add_argument("--ce-weight", type=float, default=0.0,
                         help="weight of a cross-entropy term on the text")
    distill.add_argument("--draft-vocab", type=int, default=8192,
                         help="tokens the draft's LM head scores when it serves, the most "
                              "frequent in the training text (0: the whole vocabulary)")
    distill.add_argument("--seed", type=int, default=0)
    distill.set_defaults(func=cmd_distill)

    gen = sub.add_parser("generate", help="send a prompt to a running server (API key, "
                                          "if it needs one: env SHARDSERVE_API_KEY)")
    gen.add_argument("prompt")
    _add_connection_options(gen)
    gen.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    gen.add_argument("--chat", action="store_true",
                     help="send the prompt as a user message through the model's chat template")
    gen.add_argument("--system", help="a system message to go before it (implies --chat)")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="a stop string (repeatable)")
    gen.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    gen.set_defaults(func=cmd_generate)

    health = sub.add_parser("health", help="exit 0 when a running server's health service "
                                           "says SERVING (a probe that speaks TLS)")
    _add_connection_options(health)
    health.add_argument("--service", default="",
                        help='"" (serving requests), liveness, or shardserve.v1.Generation')
    health.add_argument("--timeout", type=float, default=5.0, help="deadline in seconds")
    health.set_defaults(func=cmd_health)

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
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Online serving load: latency vs throughput of the gRPC server at several request rates.

    # against a server that is already running
    python bench/load.py --target 127.0.0.1:50051
    # or let the benchmark start `shardserve serve` for the run and stop it at the end
    unshare -n sh -c 'ip link set lo up && python bench/load.py --start-server \\
        --config deploy/cpu-single-node.yaml'
    python bench/plot_load.py       # bench/results/load.json -> bench/results/load.png
    # a quick smoke run
    unshare -n sh -c 'ip link set lo up && python bench/load.py --start-server \\
        --num-requests 6 --rates 1,inf --max-output-tokens 16 --out /tmp/load.json'

--start-server starts a local Ray cluster, and a Ray head probes cloud metadata addresses when
it starts: run the WHOLE command inside a loopback-only network namespace, as above (the
benchmark does not do it for you). Client and server then talk over that namespace's loopback.

Workload (bench/workload.py, the one bench/throughput.py uses): 64 requests, prompts of 32-512
random tokens, 16-256 output tokens, seed 0 (--seed changes it and the arrival times). For
each rate in --rates the requests arrive as a Poisson process (exponential gaps; `inf` sends
them all at once), each one a GenerateStream call with temperature 0, ignore_eos and the
workload's max_tokens. A rate starts only when every request of the previous one has finished.

Per rate (failed requests are left out of the latencies, and their tokens out of throughput):
  wall          first send to last end; the first request is sent at once
  req/s, tok/s  completed requests and generated tokens over the wall time
  TTFT          send to the first token, as the client sees it (queueing + prefill + network)
  ITL           every gap between consecutive tokens of a request, pooled over all requests
                (like vLLM's benchmark_serving), so long requests weigh more than short ones;
                tokens that come in one message share its arrival time (a gap of 0)
  E2E           send to the end of the stream
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.workload import BenchRequest, make_workload  # noqa: E402
from shardserve.cluster.client import build_request  # noqa: E402
from shardserve.proto import shardserve_pb2 as pb  # noqa: E402
from shardserve.proto import shardserve_pb2_grpc as pb_grpc  # noqa: E402


@dataclass
class RequestRecord:
    """One request's timeline, in seconds since its rate's start."""
    index: int
    prompt_tokens: int
    max_tokens: int
    send: float = 0.0
    token_times: list[float] = field(default_factory=list)
    end: float = 0.0
    error: str | None = None


# ---------------------------------------------------------------------------------------------
# Sending the load


def arrival_offsets(num_requests: int, rate: float, seed: int) -> list[float]:
    """Send times from the start. The gaps are unit exponentials scaled by 1/rate, drawn from
    the same seed for every rate, so each rate replays the same arrival pattern, only faster."""
    if rate == float("inf"):
        return [0.0] * num_requests
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for _ in range(num_requests):
        offsets.append(t)
        t += rng.expovariate(1.0) / rate
    return offsets


async def send_one(stub: pb_grpc.GenerationStub, request: BenchRequest, record: RequestRecord,
                   t0: float, offset: float, request_id: str, timeout: float | None) -> None:
    await asyncio.sleep(max(0.0, t0 + offset - time.perf_counter()))
    record.send = time.perf_counter() - t0
    call = stub.GenerateStream(
        build_request(request.prompt_token_ids, max_tokens=request.max_tokens, temperature=0,
                      ignore_eos=True, request_id=request_id),
        timeout=timeout)
    try:
        async for message in call:
            now = time.perf_counter() - t0
            record.token_times.extend([now] * len(message.token_ids))
        if len(record.token_times) != request.max_tokens:
            # ignore_eos makes every request run to max_tokens; fewer means something cut it.
            record.error = f"got {len(record.token_times)} of {request.max_tokens} tokens"
    except grpc.aio.AioRpcError as e:
        record.error = f"{e.code().name}: {e.details()}"
    finally:
        record.end = time.perf_counter() - t0


async def run_rate(stub: pb_grpc.GenerationStub, requests: list[BenchRequest], rate: float,
                   label: str, seed: int, timeout: float | None) -> list[RequestRecord]:
    records = [RequestRecord(i, len(r.prompt_token_ids), r.max_tokens)
               for i, r in enumerate(requests)]
    offsets = arrival_offsets(len(requests), rate, seed)
    # Every request is a task from the start, sleeping until its send time: a slow stream
    # never delays the next arrival, which is what makes the arrivals open-loop.
    t0 = time.perf_counter()
    await asyncio.gather(*(send_one(stub, r, rec, t0, off, f"load-{label}-{i}", timeout)
                           for i, (r, rec, off) in enumerate(zip(requests, records, offsets))))
    return records


async def warm_up(stub: pb_grpc.GenerationStub, request: BenchRequest) -> dict:
    """Wait until the server answers, run one short request through it (the first step of a
    fresh server is slow), and describe the server for the results."""
    await stub.Generate(build_request(request.prompt_token_ids[:32], max_tokens=4,
                                      temperature=0, ignore_eos=True),
                        wait_for_ready=True, timeout=600)
    info = await stub.ModelInfo(pb.ModelInfoRequest(), timeout=60)
    return {"model": info.model, "dtype": info.dtype,
            "tensor_parallel_size": info.tensor_parallel_size,
            "pipeline_parallel_size": info.pipeline_parallel_size, "replicas": info.replicas,
            "scheduling_policy": info.scheduling_policy, "max_num_seqs": info.max_num_seqs,
            "max_num_batched_tokens": info.max_num_batched_tokens,
            "kv_num_blocks": info.kv_num_blocks, "kv_block_size": info.kv_block_size}


async def run_all(target: str, requests: list[BenchRequest], rates: list[tuple[str, float]],
                  seed: int, timeout: float | None) -> tuple[dict, list[dict], dict]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        server = await warm_up(stub, requests[0])
        print(f"server: {server['model']} {server['dtype']}, TP={server['tensor_parallel_size']}"
              f" x PP={server['pipeline_parallel_size']} x {server['replicas']} replica(s), "
              f"max_num_seqs {server['max_num_seqs']}", flush=True)
        rows, details = [], {}
        for label, rate in rates:
            print(f"rate {label} req/s: sending {len(requests)} requests ...", flush=True)
            records = await run_rate(stub, requests, rate, label, seed, timeout)
            row = summarize(label, records)
            print(f"  {format_row(row)}", flush=True)
            rows.append(row)
            details[label] = [rounded_record(r) for r in records]
    return server, rows, details


# ---------------------------------------------------------------------------------------------
# Metrics


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(label: str, records: list[RequestRecord]) -> dict:
    ok = [r for r in records if r.error is None]
    wall = max(r.end for r in records) - min(r.send for r in records)
    ttft = [r.token_times[0] - r.send for r in ok if r.token_times]
    itl = [b - a for r in ok for a, b in zip(r.token_times, r.token_times[1:])]
    e2e = [r.end - r.send for r in ok]
    tokens = sum(len(r.token_times) for r in ok)
    errors = sorted({r.error for r in records if r.error})

    def secs(value: float | None) -> float | None:
        return None if value is None else round(value, 4)

    return {"rate": label, "completed": len(ok), "failed": len(records) - len(ok),
            "wall_s": round(wall, 2), "output_tokens": tokens,
            "request_rate": round(len(ok) / wall, 3),
            "output_tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_s": secs(percentile(ttft, 50)), "ttft_p99_s": secs(percentile(ttft, 99)),
            "itl_p50_s": secs(percentile(itl, 50)), "itl_p99_s": secs(percentile(itl, 99)),
            "e2e_p50_s": secs(percentile(e2e, 50)), "errors": errors}


def rounded_record(record: RequestRecord) -> dict:
    data = asdict(record)
    for key in ("send", "end"):
        data[key] = round(data[key], 4)
    data["token_times"] = [round(t, 4) for t in record.token_times]
    return data


TABLE_HEADER = ("| rate (req/s) | achieved req/s | output tok/s | TTFT p50 (s) | TTFT p99 (s) "
                "| ITL p50 (ms) | ITL p99 (ms) | E2E p50 (s) | failed |\n"
                "|---|---|---|---|---|---|---|---|---|")


def format_row(row: dict) -> str:
    def fmt(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
        return "-" if value is None else f"{value * scale:.{digits}f}"

    return (f"| {row['rate']} | {row['request_rate']:.3f} | {row['output_tokens_per_s']:.1f} "
            f"| {fmt(row['ttft_p50_s'])} | {fmt(row['ttft_p99_s'])} "
            f"| {fmt(row['itl_p50_s'], 1000, 1)} | {fmt(row['itl_p99_s'], 1000, 1)} "
            f"| {fmt(row['e2e_p50_s'])} | {row['failed']} |")


# ---------------------------------------------------------------------------------------------
# The server, when the benchmark starts its own


def free_ports(n: int) -> list[int]:
    # Holding all the sockets until every port is known keeps the OS from handing one out twice.
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@contextmanager
def started_server(config: str | None, log_path: str, startup_timeout: float = 600):
    """`shardserve serve` on free loopback ports for the duration of the block; yields its
    HOST:PORT. Its output goes to log_path, so that a full pipe can never stall it."""
    port, metrics_port, http_port = free_ports(3)
    command = [sys.executable, "-m", "shardserve.cluster.cli", "serve", "--host", "127.0.0.1",
               "--port", str(port), "--metrics-port", str(metrics_port),
               "--http-port", str(http_port)]
    if config:
        command += ["--config", config]
    env = dict(os.environ)
    print(f"starting the server (log: {log_path}): {' '.join(command[1:])}", flush=True)
    with open(log_path, "w") as log:
        # Its own session: a Ctrl-C on the benchmark reaches only the benchmark, which then
        # stops the server in order below instead of both racing to shut down.
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + startup_timeout
        while "is serving" not in Path(log_path).read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = Path(log_path).read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the server did not come up (exit code {process.poll()});"
                                   f" the end of its log:\n{tail}")
            time.sleep(0.5)
        print(f"server is up on 127.0.0.1:{port} (pid {process.pid})", flush=True)
        yield f"127.0.0.1:{port}"
    finally:
        stop_server(process)


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    # SIGINT is the server's clean shutdown: it stops the engine and its Ray cluster.
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        print(f"the server (pid {process.pid}) did not stop in 120 s; killing its process "
              "group", file=sys.stderr)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


# ---------------------------------------------------------------------------------------------


def parse_rates(text: str) -> list[tuple[str, float]]:
    rates = []
    for item in text.split(","):
        rate = float(item)
        if not rate > 0:
            raise argparse.ArgumentTypeError(f"rates must be positive, got {item}")
        rates.append((item.strip(), rate))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--target", default="127.0.0.1:50051",
                       help="HOST:PORT of a running server (default %(default)s)")
    where.add_argument("--start-server", action="store_true",
                       help="start `shardserve serve` for the run (inside `unshare -n`!)")
    parser.add_argument("--config", help="serving config YAML for --start-server")
    parser.add_argument("--server-log", help="where --start-server writes the server's output "
                                             "(default: a new file in the temp directory)")
    parser.add_argument("--rates", type=parse_rates, default=parse_rates("0.1,0.2,0.4,inf"),
                        help="requests/s, comma-separated; inf sends all at once (default "
                             "0.1,0.2,0.4,inf: around and below this CPU's saturation)")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="workload and arrival times")
    parser.add_argument("--max-prompt-tokens", type=int,
                        help="cut every prompt to at most this many tokens (smoke runs)")
    parser.add_argument("--max-output-tokens", type=int,
                        help="cap every request's max_tokens (smoke runs)")
    parser.add_argument("--request-timeout", type=float,
                        help="per-request deadline in seconds (default: none)")
    parser.add_argument("--out", default="bench/results/load.json")
    args = parser.parse_args()
    if args.config and not args.start_server:
        parser.error("--config goes with --start-server")

    requests = [BenchRequest(r.prompt_token_ids[:args.max_prompt_tokens],
                             min(r.max_tokens, args.max_output_tokens or r.max_tokens))
                for r in make_workload(args.num_requests, seed=args.seed)]
    print(f"{len(requests)} requests, {sum(len(r.prompt_token_ids) for r in requests)} prompt "
          f"tokens, {sum(r.max_tokens for r in requests)} output tokens", flush=True)

    def bench(target: str):
        return asyncio.run(run_all(target, requests, args.rates, args.seed,
                                   args.request_timeout))

    if args.start_server:
        log_path = args.server_log or tempfile.mkstemp(prefix="shardserve-load-",
                                                       suffix=".log")[1]
        with started_server(args.config, log_path) as target:
            server, rows, details = bench(target)
    else:
        server, rows, details = bench(args.target)

    print(f"\n{TABLE_HEADER}")
    for row in rows:
        print(format_row(row))
    for row in rows:
        for error in row["errors"]:
            print(f"rate {row['rate']}: {error}")
    result = {
        "workload": {"num_requests": len(requests), "seed": args.seed,
                     "max_prompt_tokens": args.max_prompt_tokens,
                     "max_output_tokens": args.max_output_tokens,
                     "prompt_tokens": sum(len(r.prompt_token_ids) for r in requests),
                     "output_tokens": sum(r.max_tokens for r in requests)},
        "server": server, "itl": "all gaps between consecutive tokens, pooled over requests",
        "rows": rows, "requests": details}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

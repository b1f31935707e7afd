"""The `shardserve` command as a user runs it: serve in one process, generate from another."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

SHARDSERVE = [sys.executable, "-m", "shardserve.cluster.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    config = tmp_path_factory.mktemp("cli") / "serve.yaml"
    config.write_text(f"""
model: {tiny_model("llama-gqa")}
dtype: float32
num_threads: 1
parallel: {{tensor_parallel_size: 2, num_cpus_per_shard: 0.5}}
kv_cache: {{num_kv_blocks: 64}}
""")
    port, metrics_port, http_port = free_port(), free_port(), free_port()
    log = open(config.with_suffix(".log"), "w+")
    proc = subprocess.Popen([*SHARDSERVE, "serve", "--config", str(config), "--host",
                             "127.0.0.1", "--port", str(port), "--metrics-port",
                             str(metrics_port), "--http-port", str(http_port)],
                            stdout=log, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.time() + 180
    while "is serving" not in open(log.name).read():
        assert proc.poll() is None, open(log.name).read()
        assert time.time() < deadline, open(log.name).read()
        time.sleep(0.5)
    yield proc, f"127.0.0.1:{port}", log.name
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)


def generate(target: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SHARDSERVE, "generate", "--target", target, *args],
                          capture_output=True, text=True, timeout=120)


def test_serve_says_where_it_listens_and_what_auto_chose(served):
    _, target, log = served
    assert f"on {target} (gRPC)" in open(log).read()
    assert "OpenAI-compatible HTTP on http://127.0.0.1:" in open(log).read()
    deadline = time.time() + 10
    while "CPU threads per shard" not in open(log).read() and time.time() < deadline:
        time.sleep(0.2)
    text = open(log).read()
    assert re.search(r"model dtype float32 \(as configured\), weights \d+ MiB; KV cache float32 "
                     r"\(auto: the model's dtype, token-exact\), 1024 tokens; 1 CPU threads "
                     r"per shard", text), text
    assert re.search(r"CPU GEMM: (panels|onednn) \(auto: ", text), text


def test_generate_and_stream(served):
    _, target, _ = served
    unary = generate(target, "w5 w6 w7", "--max-tokens", "6", "--temperature", "0")
    assert unary.returncode == 0, unary.stderr
    assert len(unary.stdout.split()) == 6
    assert "[length: 3 prompt + 6 generated tokens]" in unary.stderr
    streamed = generate(target, "w5 w6 w7", "--max-tokens", "6", "--temperature", "0",
                        "--stream")
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout.split() == unary.stdout.split()


def test_generate_chat(served):
    _, target, _ = served
    # --system w10 + "w12" through the tiny template: w3 w10 w4 w12 w5 (tests/tiny.py).
    result = generate(target, "w12", "--system", "w10", "--max-tokens", "3", "--temperature",
                      "0")
    assert result.returncode == 0, result.stderr
    assert "[length: 5 prompt + 3 generated tokens]" in result.stderr
    chat = generate(target, "w12", "--chat", "--max-tokens", "3", "--temperature", "0")
    assert "[length: 3 prompt + 3 generated tokens]" in chat.stderr


def test_generate_reports_bad_input(served):
    _, target, _ = served
    result = generate(target, "w5", "--max-tokens", "0")
    assert result.returncode == 1
    assert "INVALID_ARGUMENT: max_tokens must be a positive integer" in result.stderr


def test_ctrl_c_stops_the_server(served):
    proc, _, log = served
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=90) == 0, open(log).read()
    assert "shutting down" in open(log).read()


def test_a_bad_config_is_refused_with_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: smollm2\nscheduler: {max_num_seqz: 4}\n")
    result = subprocess.run([*SHARDSERVE, "serve", "--config", str(bad)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert "unknown key(s) max_num_seqz in scheduler" in result.stderr


def test_quality_prints_perplexity_beside_the_unmodified_model(tiny_model, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{(i * 7) % 50 + 2}" for i in range(300)))
    result = subprocess.run([*SHARDSERVE, "quality", "--model", str(tiny_model("llama-gqa")),
                             "--quantization", "int8-weight,llm-int8", "--text", str(text),
                             "--window", "64"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"perplexity on {text} (295 tokens scored)"
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert set(rows) == {"none", "int8-weight", "llm-int8"}  # the label is the first word
    assert rows["none"][1] == "+0.0000"
    assert float(rows["int8-weight"][2]) < float(rows["none"][2])  # fewer weight bytes
    bad = subprocess.run([*SHARDSERVE, "quality", "--quantization", "int4"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown quantization int4" in bad.stderr


def test_the_offline_api_imports_neither_ray_nor_grpc(tiny_model):
    """One in-process shard needs neither; importing them would slow every offline start."""
    code = (f"import sys\nfrom shardserve import LLM, SamplingParams\n"
            f"llm = LLM({str(tiny_model('llama-gqa'))!r}, dtype='float32')\n"
            "llm.generate([[5, 6]], SamplingParams(max_tokens=2))\n"
            "print(sorted(m for m in ('ray', 'grpc') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"

"""The `shardserve` command as a user runs it: serve in one process, generate from another.

The server runs with TLS and an API key from SHARDSERVE_API_KEY, as the Helm chart runs it;
SIGTERM drains it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest

SHARDSERVE = [sys.executable, "-m", "shardserve.cluster.cli"]
API_KEY = "cli-test-key"
DRAIN_GRACE_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory, self_signed_cert):
    cert, key = self_signed_cert
    config = tmp_path_factory.mktemp("cli") / "serve.yaml"
    config.write_text(f"""
model: {tiny_model("llama-gqa")}
dtype: float32
num_threads: 1
parallel: {{tensor_parallel_size: 2, num_cpus_per_shard: 0.5}}
kv_cache: {{num_kv_blocks: 64}}
server: {{tls_cert_file: {cert}, tls_key_file: {key}, drain_grace_s: {DRAIN_GRACE_S}}}
""")
    port, metrics_port, http_port = free_port(), free_port(), free_port()
    log = open(config.with_suffix(".log"), "w+")
    proc = subprocess.Popen([*SHARDSERVE, "serve", "--config", str(config), "--host",
                             "127.0.0.1", "--port", str(port), "--metrics-port",
                             str(metrics_port), "--http-port", str(http_port)],
                            stdout=log, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True,
                            env={**os.environ, "SHARDSERVE_API_KEY": API_KEY})
    deadline = time.time() + 180
    while "is serving" not in open(log.name).read():
        assert proc.poll() is None, open(log.name).read()
        assert time.time() < deadline, open(log.name).read()
        time.sleep(0.5)
    yield proc, f"127.0.0.1:{port}", log.name
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)


def generate(target: str, *args: str, api_key: str | None = API_KEY
             ) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SHARDSERVE_API_KEY"}
    if api_key is not None:
        env["SHARDSERVE_API_KEY"] = api_key
    return subprocess.run([*SHARDSERVE, "generate", "--target", target, "--tls-ca-file",
                           os.environ["SHARDSERVE_TEST_CA"], *args],
                          capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture(autouse=True)
def _trust_the_test_certificate(self_signed_cert, monkeypatch):
    monkeypatch.setenv("SHARDSERVE_TEST_CA", str(self_signed_cert[0]))


def test_serve_says_where_it_listens_and_what_auto_chose(served):
    _, target, log = served
    assert f"on {target} (gRPC, TLS, API keys on (1))" in open(log).read()
    assert "OpenAI-compatible HTTP on https://127.0.0.1:" in open(log).read()
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


def test_generate_needs_the_api_key(served):
    _, target, _ = served
    for key in (None, "not-the-key"):
        result = generate(target, "w5", "--max-tokens", "2", api_key=key)
        assert result.returncode == 1
        assert "UNAUTHENTICATED" in result.stderr and API_KEY not in result.stderr
    assert API_KEY not in open(served[2]).read()  # never logged


def test_health_command_speaks_tls(served):
    _, target, _ = served
    ca = os.environ["SHARDSERVE_TEST_CA"]
    ok = subprocess.run([*SHARDSERVE, "health", "--target", target, "--tls-ca-file", ca,
                         "--service", "liveness"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.strip() == "SERVING", ok.stderr
    plaintext = subprocess.run([*SHARDSERVE, "health", "--target", target, "--timeout", "3"],
                               capture_output=True, text=True, timeout=60)
    assert plaintext.returncode == 1 and "UNAVAILABLE" in plaintext.stderr


def test_the_http_api_takes_the_same_certificate_and_keys(served):
    """`serve` gives the OpenAI-compatible API the gRPC server's TLS files and API keys."""
    import ssl
    import urllib.error
    import urllib.request

    import openai

    _, _, log = served
    base = re.search(r"OpenAI-compatible HTTP on (https://127\.0\.0\.1:\d+)/v1",
                     open(log).read()).group(1)
    trusted = ssl.create_default_context(cafile=os.environ["SHARDSERVE_TEST_CA"])

    def client(key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0,
                             http_client=openai.DefaultHttpxClient(verify=trusted))

    with client(API_KEY) as keyed:
        model = keyed.models.list().data[0].id
        assert keyed.completions.create(model=model, prompt="w5 w6 w7", max_tokens=3,
                                        temperature=0).usage.completion_tokens == 3
    with client("not-the-key") as wrong, pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=model, prompt="w5", max_tokens=1)
    with urllib.request.urlopen(f"{base}/health", context=trusted) as response:
        assert response.status == 200  # probes need no key
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # no plaintext beside TLS
        urllib.request.urlopen(base.replace("https", "http") + "/health", timeout=5)


def _http_refusal_while_draining(log: str, ca) -> tuple[int, int]:
    """The HTTP API's /health status and a completion's status, during a drain."""
    import ssl
    import urllib.error
    import urllib.request

    import openai

    base = re.search(r"OpenAI-compatible HTTP on (https://127\.0\.0\.1:\d+)/v1",
                     open(log).read()).group(1)
    trusted = ssl.create_default_context(cafile=str(ca))
    try:
        health = urllib.request.urlopen(f"{base}/health", context=trusted).status
    except urllib.error.HTTPError as e:
        health = e.code
    with openai.OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0,
                       http_client=openai.DefaultHttpxClient(verify=trusted)) as api:
        try:
            api.completions.create(model=api.models.list().data[0].id, prompt="w5",
                                   max_tokens=2)
            completion = 200
        except openai.APIStatusError as e:
            completion = e.status_code
    return health, completion


def test_sigterm_drains_then_exits(served, self_signed_cert):
    """SIGTERM while streams run: health turns NOT_SERVING (liveness stays SERVING), a new
    request is refused UNAVAILABLE because the server is draining, every stream still gets
    all its tokens, and the process exits 0 within the grace period."""
    from shardserve.cluster.client import Client
    from shardserve.proto import shardserve_pb2 as pb

    proc, target, log = served
    client = Client(target, timeout=120, api_key=API_KEY, tls_ca_file=str(self_signed_cert[0]))
    n, max_tokens = 3, 240
    streams = [client.generate_stream([5, 6, 7], max_tokens=max_tokens, temperature=0,
                                      ignore_eos=True) for _ in range(n)]
    firsts = [next(s) for s in streams]  # all admitted and running
    results: dict[int, list] = {}

    def finish(i):
        results[i] = [firsts[i], *streams[i]]

    readers = [threading.Thread(target=finish, args=(i,)) for i in range(n)]
    for t in readers:
        t.start()
    signalled = time.time()
    proc.send_signal(signal.SIGTERM)
    deadline = time.time() + 10
    while client.health() != "NOT_SERVING":
        assert time.time() < deadline, "health did not turn NOT_SERVING"
        time.sleep(0.05)
    assert client.health("shardserve.v1.Generation") == "NOT_SERVING"
    assert client.health("liveness") == "SERVING"
    with pytest.raises(grpc.RpcError) as err:
        client.generate([5], max_tokens=2)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "draining" in err.value.details()
    refused = _http_refusal_while_draining(log, self_signed_cert[0])
    assert refused == (503, 503), refused
    still_running = sum(t.is_alive() for t in readers)
    for t in readers:
        t.join(timeout=DRAIN_GRACE_S)
    for i in range(n):
        chunks = results[i]
        assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert sum(len(c.token_ids) for c in chunks) == max_tokens
        assert chunks[-1].usage.completion_tokens == max_tokens
    client.close()
    assert proc.wait(timeout=DRAIN_GRACE_S) == 0, open(log).read()
    assert time.time() - signalled < DRAIN_GRACE_S
    text = open(log).read()
    assert "draining: no new requests" in text and "shutting down" in text
    assert "aborted after the grace period" not in text
    # The checks above ran while the streams were still going (else they prove little).
    assert still_running > 0


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

"""Several hosts on one machine: network namespaces joined by a bridge, a Ray head on one,
Ray workers on two others, the server on the head, the client on a fourth. Pipeline stages run
on different hosts. One host is cut off (its link down) during generation."""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import time
from pathlib import Path

import pytest
from netns import Hosts, namespaces_supported

from shardserve import LLM, SamplingParams

# Ray notices a silent node in ~5 s instead of the default ~65 s.
FAST_HEALTH_CHECKS = ('{"health_check_initial_delay_ms":1000,"health_check_period_ms":1000,'
                      '"health_check_timeout_ms":1000,"health_check_failure_threshold":3}')
STORE = str(150 * 1024 ** 2)
# Every host shares one Ray auth token, as a real cluster distributes its token to its nodes.
ENV = {"RAY_USAGE_STATS_ENABLED": "0", "GLOO_SOCKET_IFNAME": "eth0", "RAY_AUTH_MODE": "token",
       "RAY_AUTH_TOKEN": secrets.token_hex(32)}
PY = sys.executable
RAY = os.path.join(os.path.dirname(sys.executable), "ray")  # the venv's, whatever PATH says
RAY_TMP = f"/tmp/ssmh{os.getpid()}"

STREAM_SCRIPT = """
import sys, grpc
from shardserve.cluster.client import Client
client = Client(sys.argv[1])
try:
    for i, chunk in enumerate(client.generate_stream([5, 6, 7], max_tokens=240, temperature=0,
                                                     ignore_eos=True)):
        if i == 3:
            print("streaming", flush=True)
    print("finished", flush=True)
except grpc.RpcError as e:
    print("status", e.code().name, e.details(), flush=True)
"""


def wait_for_line(path: Path, text: str, timeout: float, proc=None) -> None:
    deadline = time.time() + timeout
    while text not in (path.read_text() if path.exists() else ""):
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited:\n{path.read_text()[-3000:]}")
        if time.time() > deadline:
            raise AssertionError(f"{text!r} not seen in {path}:\n{path.read_text()[-3000:]}")
        time.sleep(0.3)


def ray_dir(name: str) -> str:
    # Short: Ray's unix socket paths under it must stay within 107 bytes.
    return f"{RAY_TMP}/{name}"


def start_worker(host, head_ip: str, logs: Path):
    # Its own temp dir: hosts share this machine's filesystem, and two raylets writing one
    # session directory at the same time trip over each other's sockets.
    stamp = f"{host.name}-{time.time():.0f}"
    return host.popen([RAY, "start", "--block", f"--address={head_ip}:6379",
                       f"--node-ip-address={host.ip}", "--num-cpus=2",
                       f'--resources={{"{host.name}": 1}}', f"--object-store-memory={STORE}",
                       f"--temp-dir={ray_dir(stamp)}"],
                      str(logs / f"ray-{stamp}.log"), ENV)


def wait_for_nodes(head, count: int, timeout: float = 60) -> None:
    probe = (f"import ray, time; ray.init(address='{head.ip}:6379', log_to_driver=False)\n"
             f"deadline = time.time() + {timeout}\n"
             f"while len([n for n in ray.nodes() if n['Alive']]) < {count}:\n"
             "    assert time.time() < deadline, ray.nodes()\n"
             "    time.sleep(0.5)\n")
    result = head.run([PY, "-c", probe], timeout=timeout + 30, env={**os.environ, **ENV})
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory, tiny_model):
    reason = namespaces_supported()
    if reason:
        print(f"SKIPPED multi-host tests: {reason}")
        pytest.skip(reason)
    logs = tmp_path_factory.mktemp("multihost")
    hosts = Hosts(["head", "w1", "w2", "client"])
    try:
        head = hosts["head"]
        head.popen([RAY, "start", "--head", "--block", f"--node-ip-address={head.ip}",
                    "--port=6379", "--num-cpus=0", '--resources={"head": 1}',
                    f"--object-store-memory={STORE}", "--include-dashboard=false",
                    "--disable-usage-stats", f"--temp-dir={ray_dir('head')}",
                    f"--system-config={FAST_HEALTH_CHECKS}"], str(logs / "ray-head.log"), ENV)
        wait_for_line(logs / "ray-head.log", "Ray runtime started", 90)
        for count, name in enumerate(("w1", "w2"), start=2):
            start_worker(hosts[name], head.ip, logs)
            wait_for_nodes(head, count)

        config = logs / "serve.yaml"
        config.write_text(f"""
model: {tiny_model("llama-gqa")}
dtype: float32
num_threads: 1
parallel:
  tensor_parallel_size: 2
  pipeline_parallel_size: 2
  placement_strategy: stage
  num_cpus_per_shard: 1
  placement_timeout_s: 10
  collective_timeout_s: 20
  step_timeout_s: 60
kv_cache: {{num_kv_blocks: 64}}
""")
        server = head.popen([PY, "-m", "shardserve.cluster.cli", "serve", "--address",
                             f"{head.ip}:6379", "--config", str(config), "--host", head.ip,
                             "--port", "50051", "--metrics-port", "9400"],
                            str(logs / "server.log"), ENV)
        wait_for_line(logs / "server.log", "is serving", 180, server)
        yield hosts, f"{head.ip}:50051", logs, server
    finally:
        hosts.close()
        for log in Path(RAY_TMP).glob("head/session_*/logs/worker-*"):
            if "ServerActor" in log.read_text(errors="replace"):
                shutil.copy(log, logs)
        shutil.rmtree(RAY_TMP, ignore_errors=True)


def client_call(hosts, code: str, *args: str, timeout: float = 120) -> str:
    result = hosts["client"].run([PY, "-c", code, *args], timeout=timeout,
                                 env={**os.environ, **ENV})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_generation_across_hosts_matches_the_offline_api(hosts, tiny_model):
    hosts_, target, _, _ = hosts
    info = client_call(hosts_, "import sys; from shardserve.cluster.client import Client\n"
                       "m = Client(sys.argv[1]).model_info()\n"
                       "print([(s.pipeline_stage, s.node_id) for s in m.shards])", target)
    placed = eval(info)  # noqa: S307 - our own repr of a list of tuples
    stage_nodes = {stage: {node for s, node in placed if s == stage} for stage in (0, 1)}
    assert all(len(nodes) == 1 for nodes in stage_nodes.values()), "a TP group shares a host"
    assert stage_nodes[0] != stage_nodes[1], "the two stages run on different hosts"

    expected = LLM(str(tiny_model("llama-gqa")), dtype="float32").generate(
        [[5, 6, 7]], SamplingParams(max_tokens=12, temperature=0))[0]
    out = client_call(hosts_, "import sys; from shardserve.cluster.client import Client\n"
                      "r = Client(sys.argv[1]).generate([5, 6, 7], max_tokens=12, "
                      "temperature=0)\nprint(list(r.token_ids))", target)
    assert eval(out) == expected.token_ids  # noqa: S307


def test_a_host_cut_off_ends_its_requests_and_the_server_stays_up(hosts):
    hosts_, target, logs, server = hosts
    stream_log = logs / "stream.log"
    hosts_["client"].popen([PY, "-c", STREAM_SCRIPT, target], str(stream_log))
    wait_for_line(stream_log, "streaming", 60)
    hosts_["w2"].cut_off()
    wait_for_line(stream_log, "status", 90)
    status = stream_log.read_text()
    assert "status UNAVAILABLE" in status and "model shard failed" in status, status
    assert server.poll() is None, "the server must stay up"

    health = ("import sys; from shardserve.cluster.client import Client\n"
              "print(Client(sys.argv[1], timeout=10).health())")
    # The health service follows the engine within about a second.
    deadline = time.time() + 30
    while client_call(hosts_, health, target).strip() != "NOT_SERVING":
        assert time.time() < deadline, "health never turned NOT_SERVING"
    liveness = health.replace(".health()", '.health("liveness")')
    assert client_call(hosts_, liveness, target).strip() == "SERVING"

    # The host comes back: a fresh Ray node joins and the server recovers by itself.
    hosts_["w2"].reconnect()
    hosts_["w2"].kill_all()
    start_worker(hosts_["w2"], hosts_["head"].ip, logs)
    deadline = time.time() + 120
    while client_call(hosts_, health, target).strip() != "SERVING":
        assert time.time() < deadline, (logs / "server.log").read_text()[-3000:]
        time.sleep(2)
    out = client_call(hosts_, "import sys; from shardserve.cluster.client import Client\n"
                      "r = Client(sys.argv[1]).generate([5, 6, 7], max_tokens=4, "
                      "temperature=0)\nprint(len(r.token_ids))", target)
    assert out.strip() == "4"

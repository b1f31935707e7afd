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


def cache_of(name: str) -> Path:
    """Each host's own shardserve cache: hosts share this machine's disk, but not this."""
    return Path(RAY_TMP) / f"cache-{name}"


def host_env(name: str) -> dict:
    return {**ENV, "SHARDSERVE_CACHE": str(cache_of(name))}


# A directory w2 does not see (a tmpfs over it in w2's mount namespace): one a node lacks.
HIDDEN_ON_W2 = f"{RAY_TMP}/only-on-some-hosts"


def start_worker(host, head_ip: str, logs: Path):
    # Its own temp dir: hosts share this machine's filesystem, and two raylets writing one
    # session directory at the same time trip over each other's sockets.
    stamp = f"{host.name}-{time.time():.0f}"
    start = [RAY, "start", "--block", f"--address={head_ip}:6379",
             f"--node-ip-address={host.ip}", "--num-cpus=2",
             f'--resources={{"{host.name}": 1}}', f"--object-store-memory={STORE}",
             f"--temp-dir={ray_dir(stamp)}"]
    # Workers do not see the head's cache (a tmpfs over it in their mount namespace), and w2
    # does not see HIDDEN_ON_W2 either: the disks of separate machines.
    hidden = [cache_of("head")] + ([HIDDEN_ON_W2] if host.name == "w2" else [])
    mounts = " && ".join(f'mount -t tmpfs none "{path}"' for path in hidden)
    start = ["sh", "-c", f'{mounts} && exec "$@"', "sh", *start]
    return host.popen(start, str(logs / f"ray-{stamp}.log"), host_env(host.name))


def wait_for_nodes(head, count: int, timeout: float = 60) -> None:
    probe = (f"import ray, time; ray.init(address='{head.ip}:6379', log_to_driver=False)\n"
             f"deadline = time.time() + {timeout}\n"
             f"while len([n for n in ray.nodes() if n['Alive']]) < {count}:\n"
             "    assert time.time() < deadline, ray.nodes()\n"
             "    time.sleep(0.5)\n")
    result = head.run([PY, "-c", probe], timeout=timeout + 30, env={**os.environ, **ENV})
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Ray head (no CPUs) and two workers of 2 CPUs, each on a host of its own."""
    reason = namespaces_supported()
    if reason:
        print(f"SKIPPED multi-host tests: {reason}")
        pytest.skip(reason)
    logs = tmp_path_factory.mktemp("multihost")
    for path in (Path(HIDDEN_ON_W2), cache_of("head")):
        path.mkdir(parents=True, exist_ok=True)
    hosts = Hosts(["head", "w1", "w2", "client"])
    try:
        head = hosts["head"]
        head.popen([RAY, "start", "--head", "--block", f"--node-ip-address={head.ip}",
                    "--port=6379", "--num-cpus=0", '--resources={"head": 1}',
                    f"--object-store-memory={STORE}", "--include-dashboard=false",
                    "--disable-usage-stats", f"--temp-dir={ray_dir('head')}",
                    f"--system-config={FAST_HEALTH_CHECKS}"], str(logs / "ray-head.log"),
                   host_env("head"))
        wait_for_line(logs / "ray-head.log", "Ray runtime started", 90)
        for count, name in enumerate(("w1", "w2"), start=2):
            start_worker(hosts[name], head.ip, logs)
            wait_for_nodes(head, count)
        yield hosts, logs
    finally:
        hosts.close()
        for log in Path(RAY_TMP).glob("head/session_*/logs/worker-*"):
            if "ServerActor" in log.read_text(errors="replace"):
                shutil.copy(log, logs)
        shutil.rmtree(RAY_TMP, ignore_errors=True)


def serve(hosts, logs: Path, name: str, config: str, wait: str = "is serving"):
    """`shardserve serve` on the head host with this config; waits for `wait` in its log."""
    path = logs / f"{name}.yaml"
    path.write_text(config)
    head = hosts["head"]
    server = head.popen([PY, "-m", "shardserve.cluster.cli", "serve", "--address",
                         f"{head.ip}:6379", "--config", str(path), "--host", head.ip,
                         "--port", "50051", "--metrics-port", "9400"],
                        str(logs / f"{name}.log"), host_env("head"))
    wait_for_line(logs / f"{name}.log", wait, 300, server if wait == "is serving" else None)
    return server


def stop_server(server) -> None:
    server.terminate()  # the CLI stops its server actor and shards on SIGTERM
    server.wait(timeout=90)


@pytest.fixture(scope="module")
def hosts(cluster, tiny_model):
    """The tiny model served TP=2 x PP=2: a TP group per host."""
    hosts, logs = cluster
    server = serve(hosts, logs, "server", f"""
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
    yield hosts, f"{hosts['head'].ip}:50051", logs, server
    if server.poll() is None:
        stop_server(server)


def client_call(hosts, code: str, *args: str, timeout: float = 120) -> str:
    result = hosts["client"].run([PY, "-c", code, *args], timeout=timeout,
                                 env={**os.environ, **ENV})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def converted_models(host: str) -> list[Path]:
    return sorted(cache_of(host).glob("models/SmolLM2-135M-Instruct*/config.json"))


def test_the_default_gguf_model_is_converted_on_every_host(cluster):
    """The embedded default (a GGUF file in a Python package) is served with its pipeline
    stages on two hosts that share no cache: each host converts it for itself."""
    hosts, logs = cluster
    server = serve(hosts, logs, "smollm2", """
model: smollm2
dtype: float32
max_model_len: 512
parallel: {pipeline_parallel_size: 2, num_cpus_per_shard: 2, placement_timeout_s: 30}
kv_cache: {kv_cache_memory: 64MiB}
""")
    try:
        target = f"{hosts['head'].ip}:50051"
        stages = client_call(hosts, "import sys; from shardserve.cluster.client import Client\n"
                             "m = Client(sys.argv[1]).model_info()\n"
                             "print(len({s.node_id for s in m.shards}))", target)
        assert stages.strip() == "2"  # one stage per worker host
        for host in ("head", "w1", "w2"):  # the router's engine, and each stage's shard
            assert converted_models(host), f"{host} did not convert the model"
        expected = LLM("smollm2", dtype="float32", max_model_len=512,
                       kv_cache_memory="64MiB").generate(
            ["The capital of France is"], SamplingParams(max_tokens=8, temperature=0))[0]
        out = client_call(hosts, "import sys; from shardserve.cluster.client import Client\n"
                          "r = Client(sys.argv[1]).generate('The capital of France is', "
                          "max_tokens=8, temperature=0)\nprint(list(r.token_ids))", target)
        assert eval(out) == expected.token_ids  # noqa: S307 - our own repr of a list
    finally:
        stop_server(server)


def test_a_model_directory_a_host_lacks_fails_at_start_naming_host_and_path(cluster,
                                                                            tiny_model):
    hosts, logs = cluster
    shutil.copytree(tiny_model("llama-gqa"), HIDDEN_ON_W2, dirs_exist_ok=True)
    server = serve(hosts, logs, "hidden", f"""
model: {HIDDEN_ON_W2}
dtype: float32
parallel: {{pipeline_parallel_size: 2, num_cpus_per_shard: 2, placement_timeout_s: 30}}
kv_cache: {{num_kv_blocks: 16}}
""", wait="error:")
    assert server.wait(timeout=60) != 0
    log = (logs / "hidden.log").read_text()
    assert f"on node " in log and f"({hosts['w2'].ip})" in log, log[-3000:]
    assert f"model '{HIDDEN_ON_W2}' is neither a Hugging Face directory" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


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

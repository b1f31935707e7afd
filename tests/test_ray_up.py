"""`ray up` with the local provider over ssh: a head and a worker, each a network namespace
with its own sshd; `ray up` runs on a third ("the user's machine"), `shardserve serve --address
auto` on the head through `ray exec`, and the client calls the server from the third.

The autoscaler is v1 (`RAY_UP_enable_autoscaler_v2=0`): with v2 (Ray's default since 2.50) the
head comes up but the local provider's workers are never started (ray-project/ray#57153).
Everything is torn down by namespace (never `ray stop` / `ray down`: they would stop every Ray
process on this machine)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray_up_hosts import (VENV_BIN, SshdUnavailable, SshHosts, cluster_config,
                          ssh_hosts_unsupported, write_cluster_config)

from shardserve import LLM, SamplingParams

RAY = os.path.join(VENV_BIN, "ray")
PY = sys.executable
LAUNCHER = "client"  # where `ray up` / `ray exec` run and the client calls from

NODES_PROBE = """
import json, sys, time, ray
ray.init(address="auto", log_to_driver=False)
deadline = time.time() + float(sys.argv[1])
while len([n for n in ray.nodes() if n["Alive"]]) < int(sys.argv[2]):
    if time.time() > deadline:
        sys.exit("nodes: " + json.dumps([(n["NodeManagerAddress"], n["Alive"])
                                         for n in ray.nodes()]))
    time.sleep(0.5)
print("NODE" "S:", " ".join(sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])))
"""


def wait_for_line(path: Path, text: str, timeout: float, proc=None, context=lambda: "") -> None:
    deadline = time.time() + timeout
    while text not in (path.read_text(errors="replace") if path.exists() else ""):
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited before {text!r}:\n"
                                 f"{path.read_text(errors='replace')[-3000:]}{context()}")
        if time.time() > deadline:
            raise AssertionError(f"{text!r} not seen in {path}:\n"
                                 f"{path.read_text(errors='replace')[-3000:]}{context()}")
        time.sleep(0.3)


def head_monitor_logs(hosts: SshHosts) -> str:
    """The head autoscaler's logs: where a worker that never joins says why."""
    logs = hosts.tmpdir("head") / "ray" / "session_latest" / "logs"
    out = []
    for name in ("monitor.out", "monitor.err"):
        path = logs / name
        if path.exists():
            out.append(f"\n--- head {name} ---\n{path.read_text(errors='replace')[-2500:]}")
    return "".join(out)


def launcher(hosts: SshHosts, args: list[str], log: Path, timeout: float
             ) -> subprocess.CompletedProcess:
    """A Ray cluster launcher command (`ray up`, `ray exec`) on the launcher host."""
    result = hosts[LAUNCHER].run(args, timeout=timeout, env=hosts.local_env(LAUNCHER))
    log.write_text(f"$ {shlex.join(args)}\n{result.stdout}\n--- stderr ---\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def ray_up_cluster(tmp_path_factory, tiny_model):
    reason = ssh_hosts_unsupported()
    if reason:
        print(f"SKIPPED ray up test: {reason}")
        pytest.skip(reason)
    logs = tmp_path_factory.mktemp("ray_up")
    try:
        hosts = SshHosts(["head", "w1", LAUNCHER], ssh_names=["head", "w1"])
    except SshdUnavailable as e:
        print(f"SKIPPED ray up test: {e}")
        pytest.skip(str(e))
    try:
        config = write_cluster_config(cluster_config(hosts, "head", ["w1"]),
                                      hosts.tmpdir(LAUNCHER) / "cluster.yaml")
        shutil.copy(config, logs)
        started = time.time()
        up = launcher(hosts, [RAY, "up", "-y", "--no-config-cache", "--disable-usage-stats",
                              "--log-style", "record", str(config)], logs / "ray-up.log", 150)
        assert up.returncode == 0, (f"ray up failed:\n{up.stdout[-4000:]}\n{up.stderr[-3000:]}"
                                    + head_monitor_logs(hosts))
        print(f"ray up: head ready after {time.time() - started:.1f}s")

        # The head's autoscaler starts the worker over ssh after `ray up` returns.
        probe = launcher(hosts, [RAY, "exec", "--no-config-cache", "--log-style", "record",
                                 str(config), shlex.join([PY, "-c", NODES_PROBE, "90", "2"])],
                         logs / "nodes.log", 150)
        assert probe.returncode == 0 and "NODES:" in probe.stdout, (
            f"the worker never joined:\n{probe.stdout[-3000:]}\n{probe.stderr[-2000:]}"
            + head_monitor_logs(hosts))
        nodes = probe.stdout.rsplit("NODES:", 1)[1].split()[:2]
        print(f"ray up: both nodes joined after {time.time() - started:.1f}s: {nodes}")

        serve_config = hosts.tmpdir(LAUNCHER) / "serve.yaml"
        serve_config.write_text(f"""\
model: {tiny_model("llama-gqa")}
dtype: float32
num_threads: 1
parallel:
  tensor_parallel_size: 1
  pipeline_parallel_size: 2
  placement_strategy: STRICT_SPREAD
  num_cpus_per_shard: 1
  placement_timeout_s: 60
kv_cache: {{num_kv_blocks: 64}}
""")
        head_ip = hosts["head"].ip
        serve = shlex.join([PY, "-m", "shardserve.cluster.cli", "serve", "--address", "auto",
                            "--config", str(serve_config), "--host", head_ip, "--port",
                            "50051", "--metrics-port", "9400"])
        # In the foreground of a `ray exec` session that stays open while the server runs.
        server = hosts[LAUNCHER].popen([RAY, "exec", "--no-config-cache", "--log-style",
                                        "record", str(config), serve], str(logs / "server.log"),
                                       hosts.local_env(LAUNCHER))
        wait_for_line(logs / "server.log", "is serving", 150, server,
                      lambda: head_monitor_logs(hosts))
        print(f"ray up: serving after {time.time() - started:.1f}s")
        yield hosts, f"{head_ip}:50051", sorted(nodes), server
    finally:
        session_logs = hosts.tmpdir("head") / "ray" / "session_latest" / "logs"
        for name in ("monitor.out", "monitor.err", "monitor.log"):
            if (session_logs / name).exists():
                shutil.copy(session_logs / name, logs)
        hosts.close()


def client_call(hosts: SshHosts, code: str, *args: str, timeout: float = 60) -> str:
    result = hosts[LAUNCHER].run([PY, "-c", code, *args], timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.timeout(300)
def test_ray_up_cluster_serves_across_hosts(ray_up_cluster, tiny_model):
    hosts, target, node_ips, server = ray_up_cluster
    assert node_ips == sorted([hosts["head"].ip, hosts["w1"].ip])

    info = client_call(hosts, "import sys; from shardserve.cluster.client import Client\n"
                       "m = Client(sys.argv[1], timeout=30).model_info()\n"
                       "print(len({s.node_id for s in m.shards}), len(m.shards))", target)
    assert info.split() == ["2", "2"], f"the two pipeline stages share a host: {info}"

    out = client_call(hosts, "import sys; from shardserve.cluster.client import Client\n"
                      "r = Client(sys.argv[1], timeout=60).generate([5, 6, 7], max_tokens=8, "
                      "temperature=0)\nprint(list(r.token_ids))", target)
    expected = LLM(str(tiny_model("llama-gqa")), dtype="float32").generate(
        [[5, 6, 7]], SamplingParams(max_tokens=8, temperature=0))[0]
    assert eval(out) == expected.token_ids  # noqa: S307 - our own repr of a list of ints
    assert server.poll() is None, "the server must still be running"

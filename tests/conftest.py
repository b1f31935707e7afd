"""Test session setup: network isolation, tiny models, the real SmolLM2.

Every test runs inside a network namespace with only loopback (`unshare -n`): a Ray head
probes cloud metadata addresses when it starts, and no test may send traffic off this machine.
`make test` starts pytest that way; a plain `pytest` re-executes itself inside one.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _network_is_isolated() -> bool:
    interfaces = os.listdir("/sys/class/net") if os.path.isdir("/sys/class/net") else []
    return all(name == "lo" for name in interfaces)


def pytest_configure(config) -> None:
    if _network_is_isolated() or os.environ.get("SHARDSERVE_TEST_NETNS") == "1":
        return
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.exit("tests must run without a route off this machine: run them as root (they "
                    "enter a loopback-only network namespace with `unshare -n`)", returncode=4)
    os.environ["SHARDSERVE_TEST_NETNS"] = "1"
    # Re-run this very pytest command inside a fresh network namespace with loopback up.
    os.execvp("unshare", ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
                          sys.executable, "-m", "pytest", *config.invocation_params.args])


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(variant) -> a saved random model directory, built once per session."""
    from tiny import make_tiny_model

    made: dict[str, Path] = {}

    def get(variant: str = "llama-gqa") -> Path:
        if variant not in made:
            made[variant] = make_tiny_model(tmp_path_factory.mktemp(variant), variant)
        return made[variant]

    return get


@pytest.fixture(scope="session")
def tiny_head(tiny_model, tmp_path_factory):
    """tiny_head(variant) -> a draft head distilled from that tiny model (built once)."""
    from shardserve.cluster.distill import run_head
    from shardserve.workers.distillation import DistillConfig
    from shardserve.workers.draft_head import HeadTrainConfig

    made = {}

    def get(variant: str = "llama-gqa"):
        if variant not in made:
            out = tmp_path_factory.mktemp(f"head-{variant}")
            run_head(str(tiny_model(variant)), out, DistillConfig(window=32, max_text_tokens=64),
                     HeadTrainConfig(max_steps=60, depth=3), generations=24, progress=False,
                     vocabulary=300)
            made[variant] = out
        return made[variant]

    return get


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from shardserve.workers.loader import resolve_model

    return resolve_model("smollm2")


WORKER_NODES = ("node_a", "node_b")


def add_worker_node(cluster, name: str):
    return cluster.add_node(num_cpus=2, resources={name: 1}, object_store_memory=150 * 1024 ** 2)


def restore_worker_nodes(cluster) -> None:
    """Gives the session cluster back its two live worker nodes after a test that removed one,
    so a failure there cannot starve every later test of CPUs."""
    import ray

    alive = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    for node in [n for n in cluster.worker_nodes if n.node_id not in alive]:
        cluster.remove_node(node, allow_graceful=False)
    for name in WORKER_NODES:
        if not any(name in resources for resources in alive.values()):
            add_worker_node(cluster, name)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster of a head with no CPUs and two worker nodes that hold two shards
    each: a TP group of two fills a node, so pipeline stages land on different nodes."""
    import ray
    from ray.cluster_utils import Cluster

    # Two cores run every node and test here: a raylet busy behind model loading can miss
    # Ray's default 5 health checks (~15 s) and be marked dead. Tests that remove a node do it
    # gracefully, so a more patient detector costs them nothing.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": 150 * 1024 ** 2, "include_dashboard": False,
        "_system_config": {"health_check_failure_threshold": 20}})
    for name in WORKER_NODES:
        add_worker_node(cluster, name)
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def self_signed_cert(tmp_path_factory) -> tuple[Path, Path]:
    """(certificate, private key) PEM files for 127.0.0.1 and localhost, made with openssl."""
    import subprocess

    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-days", "1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key

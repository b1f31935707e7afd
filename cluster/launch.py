"""Shards on a Ray cluster: placement, start-up, and driving one step through the pipeline.

Layout: `pipeline_parallel_size` stages, each of `tensor_parallel_size` shard actors. By
default each stage gets its own placement group with STRICT_PACK, so a TP group (which talks
on every layer) shares a node, while stages (which pass hidden states once per step) may land
on different nodes. Another Ray strategy (PACK, SPREAD, STRICT_SPREAD, ...) places all shards
of a replica as one group instead.

Each batch flows through the stages as a chain of Ray tasks. The engine keeps several
batches (lanes) in flight, so stage s works on one batch while stage s+1 works on another.
Every rank's task is watched, not only the one that returns the result: an error on any rank
reaches the engine at once with its own message, instead of as another rank's collective
timing out minutes later.

Each shard resolves the model on its own node (nodes need not share a filesystem; the default
GGUF model is converted on every node that runs a shard).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from shardserve.workers.loader import resolve_model
from shardserve.workers.models import ModelShape, model_shape
from shardserve.workers.parallel import split_range
from shardserve.workers.shard import Shard, ShardSpec
from shardserve.workers.step import StepPlan, StepResult

from .config import EngineConfig
from .executor import ExecutorError

log = logging.getLogger(__name__)


def ensure_ray(address: str | None = None) -> None:
    """Join the Ray cluster at `address` ("auto": the one on this node), or start a local one."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # address="local": a new cluster even when another one runs on this node (a plain
        # ray.init() would join it). Its object store is sized for hidden states, not the
        # default 30% of RAM.
        ray.init(address="local", include_dashboard=False,
                 object_store_memory=512 * 1024 ** 2)


def stage_layers(num_layers: int, pp: int, layers_per_stage: list[int] | None
                 ) -> list[tuple[int, int]]:
    if layers_per_stage is None:
        return [split_range(num_layers, pp, s) for s in range(pp)]
    if sum(layers_per_stage) != num_layers:
        raise ValueError(f"parallel.stage_layers {layers_per_stage} adds up to "
                         f"{sum(layers_per_stage)} layers, the model has {num_layers}")
    bounds, start = [], 0
    for n in layers_per_stage:
        bounds.append((start, start + n))
        start += n
    return bounds


def check_layout(shape: ModelShape, config: EngineConfig) -> None:
    """Fail at start, with the reason, for a layout that cannot divide this model."""
    tp, pp = config.parallel.tensor_parallel_size, config.parallel.pipeline_parallel_size
    problems = []
    if tp > shape.num_heads:
        problems.append(f"tensor_parallel_size {tp} exceeds the {shape.num_heads} attention "
                        "heads: every rank needs at least one head")
    if tp > shape.intermediate_size or tp > shape.vocab_size:
        problems.append(f"tensor_parallel_size {tp} is larger than the MLP or the vocabulary")
    if pp > shape.num_layers:
        problems.append(f"pipeline_parallel_size {pp} exceeds the {shape.num_layers} layers")
    if problems:
        raise ValueError("cannot shard this model: " + "; ".join(problems))


@ray.remote(num_cpus=0)
def _rendezvous_address() -> str:
    """A free TCP port on the node this runs on, for a TP group's torch.distributed init."""
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return f"tcp://{ray.util.get_node_ip_address()}:{port}"


class RayExecutor:
    def __init__(self, config: EngineConfig, address: str | None = None):
        self.config = config
        self.address = address
        self.model_dir = str(resolve_model(config.model))
        from transformers import AutoConfig

        self.shape = model_shape(AutoConfig.from_pretrained(self.model_dir))
        check_layout(self.shape, config)
        self.layers = stage_layers(self.shape.num_layers, config.parallel.pipeline_parallel_size,
                                   config.parallel.stage_layers)
        self._kv: tuple[int, int] | None = None
        self.stages: list[list] = []
        self._groups: list = []
        self._start()

    # --- start and stop -------------------------------------------------------------------

    def _start(self) -> None:
        ensure_ray(self.address)
        p = self.config.parallel
        tp, pp = p.tensor_parallel_size, p.pipeline_parallel_size
        gpus = p.num_gpus_per_shard
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        bundle = {"CPU": p.num_cpus_per_shard, **({"GPU": gpus} if gpus else {})}

        if p.placement_strategy == "stage":
            self._groups = [placement_group([bundle] * tp, strategy="STRICT_PACK")
                            for _ in range(pp)]
            slots = [[(self._groups[s], r) for r in range(tp)] for s in range(pp)]
        else:
            group = placement_group([bundle] * (tp * pp), strategy=p.placement_strategy)
            self._groups = [group]
            slots = [[(group, s * tp + r) for r in range(tp)] for s in range(pp)]
        for group in self._groups:
            try:
                ray.get(group.ready(), timeout=p.placement_timeout_s)
            except ray.exceptions.GetTimeoutError:
                self._remove_groups()
                raise RuntimeError(
                    f"could not place {tp * pp} shards ({bundle} each, strategy "
                    f"{p.placement_strategy}) within {p.placement_timeout_s:.0f}s; the "
                    f"cluster has {ray.available_resources()} free") from None

        nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
        shards_per_node: dict[str, int] = {}
        bundle_nodes = {}
        for group in {id(g): g for g in self._groups}.values():
            table = ray.util.placement_group_table(group)["bundles_to_node_id"]
            for index, node in table.items():
                bundle_nodes[(id(group), index)] = node
                shards_per_node[node] = shards_per_node.get(node, 0) + 1

        self.stages = []
        for s in range(pp):
            init_method = None
            if tp > 1:
                group0, index0 = slots[s][0]
                init_method = ray.get(_rendezvous_address.options(
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        group0, placement_group_bundle_index=index0)).remote())
            ranks = []
            for r in range(tp):
                group, index = slots[s][r]
                node = bundle_nodes[(id(group), index)]
                threads = self.config.num_threads or max(
                    1, int(nodes[node]["Resources"].get("CPU", 1)) // shards_per_node[node])
                spec = ShardSpec.from_config(
                    self.config, tp_rank=r, tp_size=tp, pp_rank=s, pp_size=pp,
                    layer_range=self.layers[s], sequence_parallel=p.sequence_parallel,
                    num_threads=threads, dist_init_method=init_method,
                    dist_timeout_s=p.collective_timeout_s)
                actor = ray.remote(Shard).options(
                    num_cpus=p.num_cpus_per_shard, num_gpus=gpus,
                    max_concurrency=1, max_restarts=0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        group, placement_group_bundle_index=index),
                    runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}},
                ).remote(spec)
                ranks.append(actor)
            self.stages.append(ranks)
        try:
            self.shard_info = ray.get([a.describe.remote() for stage in self.stages
                                       for a in stage])
        except ray.exceptions.RayError as e:
            self.shutdown()
            raise RuntimeError(f"shards failed to start: {describe_ray_error(e)}") from None
        # Shards on one node share its host memory; GPU shards share only a GPU.
        domains = [info["memory_domain"] for info in self.shard_info]
        self._memory_shares = [domains.count(d) for d in domains]

    def _all_shards(self) -> list:
        return [a for stage in self.stages for a in stage]

    def _remove_groups(self) -> None:
        for group in self._groups:
            try:
                remove_placement_group(group)
            except Exception:  # noqa: BLE001 - best effort during teardown
                pass
        self._groups = []

    def shutdown(self) -> None:
        for actor in self._all_shards():
            ray.kill(actor)
        self.stages = []
        self._remove_groups()

    def restart(self) -> None:
        """Replace every shard (after one failed) and restore the KV pools."""
        self.shutdown()
        self._start()
        if self._kv:
            self.allocate_kv(*self._kv)

    # --- the executor interface -----------------------------------------------------------

    def kv_blocks_that_fit(self, block_size: int, budget_bytes: int | None,
                           memory_fraction: float) -> int:
        """The number every shard can hold: the minimum over shards. Shards sharing memory
        (a node's host memory, or one GPU) share its fraction."""
        return min(self._on_every_shard(
            lambda a, shares: a.kv_blocks_that_fit.remote(block_size, budget_bytes,
                                                          memory_fraction / shares)))

    def allocate_kv(self, num_blocks: int, block_size: int) -> None:
        self._on_every_shard(lambda a, _: a.allocate_kv.remote(num_blocks, block_size))
        self._kv = (num_blocks, block_size)

    def _on_every_shard(self, call) -> list:
        """Call every shard; a shard's own ValueError (say, a KV budget that does not fit)
        comes back as that ValueError."""
        refs = [call(a, shares) for a, shares in zip(self._all_shards(), self._memory_shares)]
        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, ValueError):
                raise ValueError(str(e.cause)) from None
            raise

    def submit(self, plan: StepPlan) -> "InFlightStep":
        """Chain the plan through the stages. Each stage's TP ranks all get the plan; rank 0
        passes the hidden states on, and the last stage's rank 0 returns the result."""
        step = InFlightStep()
        hidden = None
        for s, stage in enumerate(self.stages):
            outs = [shard.execute.remote(plan, hidden) for shard in stage]
            # Rank 0's hidden states are not fetched here: an error in them reaches every
            # rank of the next stage, whose tasks are watched.
            for r, ref in enumerate(outs):
                if r > 0 or s == len(self.stages) - 1:
                    step.watch(ref, s, r)
            hidden = outs[0]
        step.result_ref = hidden
        return step

    def wait_any(self, handles: dict[int, "InFlightStep"]) -> tuple[int, StepResult]:
        """The first step whose every watched rank has finished; the first rank error seen
        fails at once, naming the shard that raised it."""
        timeout = self.config.parallel.step_timeout_s
        deadline = time.monotonic() + timeout
        while True:
            watched = {ref: key for key, step in handles.items() for ref in step.pending}
            ready, _ = ray.wait(list(watched), num_returns=1,
                                timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise ExecutorError(f"no step finished within {timeout}s "
                                    "(parallel.step_timeout_s); a shard is stuck")
            ref = ready[0]
            key, step = watched[ref], handles[watched[ref]]
            try:
                value = ray.get(ref)
            except ray.exceptions.RayError as e:
                raise ExecutorError(self._failure(step, ref, e)) from e
            del step.pending[ref]
            if ref == step.result_ref:
                step.result = value
            if not step.pending:
                return key, step.result

    def _failure(self, step: "InFlightStep", ref, first: BaseException) -> str:
        """What failed, told by its cause: when one rank dies or raises, its peers fail too
        (their collectives lose a member), so the other ranks get a moment to report, and a
        death or an error of the shard's own beats a collective that merely broke."""
        failures = [(first, *step.pending[ref])]
        others = [r for r in step.pending if r != ref]
        if others:
            ready, _ = ray.wait(others, num_returns=len(others), timeout=FAILURE_GRACE_S)
            for other in ready:
                try:
                    ray.get(other)
                except ray.exceptions.RayError as e:
                    failures.append((e, *step.pending[other]))
        error, stage, rank = min(failures, key=lambda f: _symptom_rank(f[0]))
        text = f"a model shard failed: {self._where(error, stage, rank)}: "
        return text + describe_ray_error(error)

    def _where(self, error: BaseException, stage: int, rank: int) -> str:
        """The shard an error came from: the one whose process raised it (its pid is in the
        message; an error passes down the pipeline to later stages), else the one watched."""
        pids = re.findall(r"pid[=: ]+(\d+)", str(error))
        tp = self.config.parallel.tensor_parallel_size
        for index, info in enumerate(self.shard_info):
            if pids and str(info["pid"]) == pids[0]:
                stage, rank = divmod(index, tp)
                break
        host = self.shard_info[stage * tp + rank]["hostname"]
        return f"stage {stage} rank {rank} on {host}"

    def stats(self) -> list[dict]:
        """Per shard: busy seconds and steps (micro-batches) run, for bubble measurements."""
        return ray.get([a.stats.remote() for a in self._all_shards()])

    def describe(self) -> dict:
        return {"shards": self.shard_info}


@dataclass(eq=False)
class InFlightStep:
    """One submitted step: the rank tasks still running (with their stage and rank)."""

    pending: dict = field(default_factory=dict)  # ObjectRef -> (stage, rank)
    result_ref: object = None
    result: StepResult | None = None

    def watch(self, ref, stage: int, rank: int) -> None:
        self.pending[ref] = (stage, rank)


# How long the other ranks of a failed step get to report their own errors.
FAILURE_GRACE_S = 1.0
_COLLECTIVE_ERRORS = ("DistBackendError", "gloo", "NCCL", "Connection closed by peer",
                      "Connection reset")


def _symptom_rank(e: BaseException) -> int:
    """0: a shard's process died; 1: a shard raised an error of its own; 2: a collective
    broke because a peer went away."""
    if isinstance(e, ray.exceptions.RayActorError):
        return 0
    text = describe_ray_error(e)
    return 2 if any(mark in text for mark in _COLLECTIVE_ERRORS) else 1


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def describe_ray_error(e: BaseException) -> str:
    """The error a shard raised, in one line: "ValueError: ..." rather than Ray's traceback."""
    cause = getattr(e, "cause", None)
    if isinstance(e, ray.exceptions.RayTaskError) and cause is not None:
        return f"{type(cause).__name__}: {cause}"
    lines = [line.strip() for line in _ANSI.sub("", str(e)).splitlines() if line.strip()]
    if isinstance(e, ray.exceptions.ActorDiedError) and "creation task" not in str(e):
        return f"{type(e).__name__}: the shard's process died ({lines[0] if lines else e!r})"
    return lines[-1] if lines else f"{type(e).__name__}"

"""Shards on a Ray cluster: placement, start-up, and driving one step through the pipeline.

Layout: `pipeline_parallel_size` stages, each of `tensor_parallel_size` shard actors. By
default each stage gets its own placement group with STRICT_PACK, so a TP group (which talks
on every layer) shares a node, while stages (which pass hidden states once per step) may land
on different nodes. Another Ray strategy (PACK, SPREAD, STRICT_SPREAD, ...) places all shards
of a replica as one group instead.

Each batch flows through the stages as a chain of Ray tasks. The engine keeps several
batches (lanes) in flight, so stage s works on one batch while stage s+1 works on another.
"""

from __future__ import annotations

import logging
import os
import socket

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
                spec = ShardSpec(model=self.model_dir, dtype=self.config.dtype,
                                 device=self.config.device, tp_rank=r, tp_size=tp, pp_rank=s,
                                 pp_size=pp, layer_range=self.layers[s],
                                 sequence_parallel=p.sequence_parallel, num_threads=threads,
                                 dist_init_method=init_method,
                                 dist_timeout_s=p.collective_timeout_s, seed=self.config.seed)
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
            raise RuntimeError(f"shards failed to start: {e}") from None
        self._node_shares = {id(a): shards_per_node[bundle_nodes[(id(slots[s][r][0]),
                                                                  slots[s][r][1])]]
                             for s in range(pp) for r, a in enumerate(self.stages[s])}

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
        """The number every shard can hold: the minimum over shards. Shards sharing a node
        share its memory fraction."""
        counts = ray.get([a.kv_blocks_that_fit.remote(
            block_size, budget_bytes, memory_fraction / self._node_shares[id(a)])
            for a in self._all_shards()])
        return min(counts)

    def allocate_kv(self, num_blocks: int, block_size: int) -> None:
        self._kv = (num_blocks, block_size)
        ray.get([a.allocate_kv.remote(num_blocks, block_size) for a in self._all_shards()])

    def submit(self, plan: StepPlan) -> ray.ObjectRef:
        """Chain the plan through the stages; returns the last stage's result reference.
        Each stage's TP ranks all get the plan; rank 0 passes the hidden states on."""
        hidden = None
        for stage in self.stages:
            outs = [shard.execute.remote(plan, hidden) for shard in stage]
            hidden = outs[0]
        return hidden

    def wait_any(self, handles: dict[int, ray.ObjectRef]) -> tuple[int, StepResult]:
        keys = {ref: key for key, ref in handles.items()}
        ready, _ = ray.wait(list(keys), num_returns=1,
                            timeout=self.config.parallel.step_timeout_s)
        if not ready:
            raise ExecutorError(f"no step finished within {self.config.parallel.step_timeout_s}"
                                "s (parallel.step_timeout_s); a shard is stuck")
        try:
            return keys[ready[0]], ray.get(ready[0])
        except ray.exceptions.RayError as e:
            raise ExecutorError(f"a model shard failed: {type(e).__name__}: "
                                f"{_first_line(e)}") from e

    def stats(self) -> list[dict]:
        """Per shard: busy seconds and steps (micro-batches) run, for bubble measurements."""
        return ray.get([a.stats.remote() for a in self._all_shards()])

    def describe(self) -> dict:
        return {"shards": self.shard_info}


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[-1] if text else repr(e)

"""How the engine reaches its shards. `LocalExecutor` runs a single shard in this process;
`cluster.launch.RayExecutor` runs shard actors across a Ray cluster. Both answer the same calls."""

from __future__ import annotations

from typing import Protocol

from shardserve.workers.step import StepPlan, StepResult


class ExecutorError(RuntimeError):
    """A shard failed; the requests of the step cannot complete."""


class Executor(Protocol):
    def kv_blocks_that_fit(self, block_size: int, budget_bytes: int | None,
                           memory_fraction: float) -> int: ...

    def allocate_kv(self, num_blocks: int, block_size: int) -> None: ...

    def execute(self, plan: StepPlan) -> StepResult: ...

    def describe(self) -> dict: ...

    def shutdown(self) -> None: ...


class LocalExecutor:
    def __init__(self, spec):
        from shardserve.workers.shard import Shard

        self.shard = Shard(spec)

    def kv_blocks_that_fit(self, block_size, budget_bytes, memory_fraction) -> int:
        return self.shard.kv_blocks_that_fit(block_size, budget_bytes, memory_fraction)

    def allocate_kv(self, num_blocks: int, block_size: int) -> None:
        self.shard.allocate_kv(num_blocks, block_size)

    def execute(self, plan: StepPlan) -> StepResult:
        return self.shard.execute(plan)

    def describe(self) -> dict:
        return {"shards": [self.shard.describe()]}

    def shutdown(self) -> None:
        self.shard.shutdown()

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

    def submit(self, plan: StepPlan) -> object:
        """Start a step; returns a handle to wait on."""

    def wait_any(self, handles: dict[int, object]) -> tuple[int, StepResult]:
        """Wait until one of the submitted steps is done: its key and result. Raises
        ExecutorError when a shard failed."""

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

    def submit(self, plan: StepPlan) -> StepResult:
        return self.shard.execute(plan)  # in-process: done by the time it returns

    def wait_any(self, handles: dict[int, StepResult]) -> tuple[int, StepResult]:
        key = next(iter(handles))
        return key, handles[key]

    def describe(self) -> dict:
        return {"shards": [self.shard.describe()]}

    def shutdown(self) -> None:
        self.shard.shutdown()

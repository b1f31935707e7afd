"""The router: owns the engines (one per replica) and runs each engine's loop on a thread.

Requests arrive from the gRPC servicer on the asyncio event loop; each engine loop thread
admits them between steps, runs steps while there is work, and hands every step's outputs back
to the waiting coroutines. Cancelling a request (client gone, deadline passed) reaches the
engine before its next step, so its KV blocks are free within one step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from shardserve.workers.step import SamplingParams

from .config import EngineConfig
from .engine import Engine, EngineUnavailableError
from .metrics import Metrics
from .outputs import RequestOutput

log = logging.getLogger(__name__)

# While the shards are down, how often the loop tries to bring them back.
RESTART_RETRY_S = 5.0

OUTCOMES = {"stop": "completed", "length": "completed", "abort": "cancelled", "error": "failed"}


class OverloadedError(RuntimeError):
    """The waiting queue is full."""


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    deliver: Callable[[RequestOutput], None]


@dataclass
class _Abort:
    request_id: str


class EngineLoop:
    """One engine driven by one thread. Only this thread touches the engine's mutable state."""

    def __init__(self, engine: Engine, replica: int, metrics: Metrics):
        self.engine = engine
        self.replica = str(replica)
        self.metrics = metrics
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._deliver: dict[str, Callable[[RequestOutput], None]] = {}
        self._last_token_time: dict[str, float] = {}
        self._lock = threading.Lock()
        self.outstanding = 0  # accepted and not finished, counted from the caller's side
        self._preemptions_seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"engine-loop-{replica}",
                                        daemon=True)
        metrics.kv_blocks_total.labels(self.replica).set(engine.kv.num_blocks)
        self._thread.start()

    @property
    def num_waiting(self) -> int:
        return max(0, self.outstanding - self.engine.num_running)

    def submit(self, command: _Add) -> None:
        with self._lock:
            self.outstanding += 1
        self._commands.put(command)

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def stop(self) -> None:
        self._stop.set()
        self._commands.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        last_restart = 0.0
        while not self._stop.is_set():
            try:
                if not self.engine.healthy and time.time() - last_restart > RESTART_RETRY_S:
                    last_restart = time.time()
                    self.engine.try_restart()
                self._apply_commands(block=not self.engine.has_unfinished())
                if self.engine.has_unfinished():
                    self._publish(self.engine.step())
                self._update_gauges()
            except Exception:  # noqa: BLE001 - the loop must survive to fail requests cleanly
                log.exception("engine loop error; failing the requests in flight")
                self._publish(self.engine.fail_all("internal error in the engine loop; "
                                                   "see the server log", code="internal"))

    def _apply_commands(self, block: bool) -> None:
        while True:
            try:
                command = self._commands.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            if command is None:
                return
            if isinstance(command, _Abort):
                if command.request_id in self._deliver:
                    self._publish([self.engine.abort_request(command.request_id)])
                continue
            if command.request_id in self._deliver:
                command.deliver(_rejected(command, f"request id {command.request_id!r} is "
                                                   "already in use", "invalid_argument"))
                with self._lock:
                    self.outstanding -= 1
                continue
            self._deliver[command.request_id] = command.deliver
            try:
                self.engine.add_request(command.request_id, command.prompt_token_ids,
                                        command.params, command.arrival_time)
            except ValueError as e:
                self._publish([_rejected(command, str(e), "invalid_argument")])
            except EngineUnavailableError as e:
                self._publish([_rejected(command, str(e), "unavailable")])

    def _publish(self, outputs: list[RequestOutput | None]) -> None:
        now = time.time()
        for out in outputs:
            if out is None:
                continue
            deliver = self._deliver.get(out.request_id)
            if out.delta_token_ids:
                self.metrics.generated_tokens.inc(len(out.delta_token_ids))
                last = self._last_token_time.get(out.request_id)
                if last is None:
                    self.metrics.time_to_first_token.observe(now - out.arrival_time)
                else:
                    self.metrics.inter_token_latency.observe(now - last)
                self._last_token_time[out.request_id] = now
            if out.finished:
                self.metrics.requests.labels(OUTCOMES.get(out.finish_reason, "failed")).inc()
                self._deliver.pop(out.request_id, None)
                self._last_token_time.pop(out.request_id, None)
                with self._lock:
                    self.outstanding -= 1
            if deliver is not None:
                try:
                    deliver(out)
                except RuntimeError:  # the caller's event loop is gone (server stopping)
                    pass

    def _update_gauges(self) -> None:
        e, m = self.engine, self.metrics
        m.queue_depth.labels(self.replica).set(e.num_waiting)
        m.running.labels(self.replica).set(e.num_running)
        m.kv_blocks_used.labels(self.replica).set(e.kv.num_used_blocks)
        preemptions = e.scheduler.num_preemptions
        if preemptions > self._preemptions_seen:
            m.preemptions.inc(preemptions - self._preemptions_seen)
            self._preemptions_seen = preemptions


def _rejected(command: _Add, message: str, code: str) -> RequestOutput:
    return RequestOutput(request_id=command.request_id, prompt_token_ids=command.prompt_token_ids,
                         token_ids=[], text="", delta_token_ids=[], delta_text="", finished=True,
                         finish_reason="error", error=message, error_code=code,
                         arrival_time=command.arrival_time)


class Router:
    def __init__(self, config: EngineConfig, address: str | None = None):
        from .launch import RayExecutor

        self.config = config
        self.metrics = Metrics()
        self.engines = [Engine(config, RayExecutor(config, address))
                        for _ in range(config.parallel.replicas)]
        self.loops = [EngineLoop(engine, i, self.metrics) for i, engine in enumerate(self.engines)]
        self._ids = itertools.count()
        self._active: set[str] = set()  # request ids in flight, across replicas

    @property
    def engine(self) -> Engine:
        """Replica 0: tokenizer, limits and validation are the same in every replica."""
        return self.engines[0]

    @property
    def healthy(self) -> bool:
        return all(e.healthy for e in self.engines)

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        return self.engine.tokenize(prompt)

    def tokenize_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self.engine.tokenize_chat(messages)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        try:
            self.engine.validate(prompt_token_ids, params)
        except ValueError:
            self.metrics.requests.labels("rejected_invalid").inc()
            raise

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as the engine produces them, ending with a finished one.
        Closing the iterator early (the caller was cancelled) aborts the request."""
        self.validate(prompt_token_ids, params)
        loop = min(self.loops, key=lambda lp: lp.outstanding)
        limit = self.config.scheduler.max_waiting_requests
        if sum(lp.num_waiting for lp in self.loops) >= limit * len(self.loops):
            self.metrics.requests.labels("rejected_overloaded").inc()
            raise OverloadedError(f"the server has {limit} requests waiting per replica, its "
                                  "limit (scheduler.max_waiting_requests); retry later")
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._active:
            self.metrics.requests.labels("rejected_invalid").inc()
            raise ValueError(f"request_id {request_id!r} is already in use by a request in "
                             "flight; choose a unique id")
        self._active.add(request_id)
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        event_loop = asyncio.get_running_loop()
        loop.submit(_Add(request_id, prompt_token_ids, params, time.time(),
                         lambda out: event_loop.call_soon_threadsafe(outputs.put_nowait, out)))
        self.metrics.prompt_tokens.inc(len(prompt_token_ids))
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                finished = out.finished
                yield out
        finally:
            self._active.discard(request_id)
            if not finished:
                loop.abort(request_id)

    def stop(self) -> None:
        for loop in self.loops:
            loop.stop()
        for engine in self.engines:
            engine.shutdown()

"""The router: owns the engines (one per replica) and runs each engine's loop on a thread.

Requests arrive from the gRPC servicer on the asyncio event loop and go to the serving
replica with the least outstanding work; each engine loop thread admits them between steps,
runs steps while there is work, and hands every step's outputs back to the waiting
coroutines. Cancelling a request (client gone, deadline passed, or Abort by its request id
from any connection) reaches the engine before its next step, so its KV blocks are free within
one step, and its reader gets a last output with finish reason "abort".

Draining (shutdown): new requests are refused, those in flight run to their end for a grace
period, and whatever is left then is aborted.

Replicas keep the server available: when one replica's shards fail, its unfinished requests
move to a serving replica (they are recomputed there from their tokens, as after a
preemption), it restarts in the background, and the server is healthy while any replica
serves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from shardserve.workers.step import SamplingParams

from .config import EngineConfig
from .engine import DOWN, Engine, EngineUnavailableError, abort_sequence, fail_sequence
from .metrics import Metrics
from .outputs import RequestOutput
from .sequence import Sequence
from .speculative import SpeculationStats

log = logging.getLogger(__name__)

# While a replica's shards are down, how often its loop tries to bring them back.
RESTART_RETRY_S = 5.0

# Draining: how often to look whether the requests in flight have ended, and how long aborted
# ones may take to deliver their last output.
DRAIN_POLL_S = 0.05
ABORT_WAIT_S = 10.0

OUTCOMES = {"stop": "completed", "length": "completed", "abort": "cancelled", "error": "failed"}


class OverloadedError(RuntimeError):
    """The waiting queue is full."""


class DrainingError(EngineUnavailableError):
    """The server is shutting down: it finishes the requests it has and takes no new ones."""


DRAINING_MESSAGE = ("the server is draining (shutting down): it finishes the requests in "
                    "flight and accepts no new ones; retry on another server")


class OutputStream:
    """A request's outputs on their way from an engine thread to the coroutine that reads them.

    Outputs the reader has not taken yet are merged into one, so a reader that falls behind
    (a slow client) holds the request's new tokens and text once, whatever the number of steps.
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._pending: RequestOutput | None = None
        self._ready = asyncio.Event()

    def push(self, out: RequestOutput) -> None:
        """From any thread. Raises RuntimeError when the reader's event loop is closed."""
        self._loop.call_soon_threadsafe(self._put, out)

    def _put(self, out: RequestOutput) -> None:
        self._pending = out if self._pending is None else self._pending.merge(out)
        self._ready.set()

    async def get(self) -> RequestOutput:
        await self._ready.wait()
        self._ready.clear()
        out, self._pending = self._pending, None
        return out


@dataclass(eq=False)
class Ticket:
    """One accepted request as the router tracks it, whichever replica holds it now."""

    request_id: str
    deliver: Callable[[RequestOutput], None]
    loop: "EngineLoop"  # the replica that holds it; changes when it moves
    cancelled: bool = False  # set by the caller's side; a request on its way is dropped

    def cancel(self) -> None:
        self.cancelled = True
        self.loop.abort(self)


@dataclass
class _Add:
    ticket: Ticket
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float


@dataclass
class _Adopt:
    moved: list[tuple[Sequence, Ticket]]


@dataclass
class _Abort:
    ticket: Ticket


class EngineLoop:
    """One engine driven by one thread. Only this thread touches the engine's mutable state."""

    def __init__(self, engine: Engine, replica: int, metrics: Metrics,
                 peers: Callable[[], list["EngineLoop"]]):
        self.engine = engine
        self.replica = replica
        self.metrics = metrics
        self._peers = peers
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._tickets: dict[str, Ticket] = {}
        self._last_token_time: dict[str, float] = {}
        self._lock = threading.Lock()
        self.outstanding = 0  # accepted and not finished, counted from the caller's side
        self._preemptions_seen = 0
        self._prefix_seen = (0, 0)  # the scheduler's queried and hit tokens, last published
        self._restarts_seen = 0
        self._speculation_seen = SpeculationStats()
        self._stop = threading.Event()
        engine.on_failure = self._hand_over
        self._thread = threading.Thread(target=self._run, name=f"engine-loop-{replica}",
                                        daemon=True)
        metrics.kv_blocks_total.labels(str(replica)).set(engine.kv.num_blocks)
        self._thread.start()

    @property
    def serving(self) -> bool:
        return self.engine.healthy

    @property
    def num_waiting(self) -> int:
        return max(0, self.outstanding - self.engine.num_running)

    def _count(self, change: int) -> None:
        with self._lock:
            self.outstanding += change

    def submit(self, command: _Add) -> None:
        command.ticket.loop = self
        self._count(1)
        self._commands.put(command)

    def adopt(self, moved: list[tuple[Sequence, Ticket]]) -> None:
        for _, ticket in moved:
            ticket.loop = self
        self._count(len(moved))
        self._commands.put(_Adopt(moved))

    def abort(self, ticket: Ticket) -> None:
        self._commands.put(_Abort(ticket))

    def stop(self) -> None:
        self._stop.set()
        self._commands.put(None)
        self._thread.join(timeout=30)

    def _serving_peer(self) -> EngineLoop | None:
        peers = [p for p in self._peers() if p is not self and p.serving]
        return min(peers, key=lambda p: p.outstanding) if peers else None

    def _hand_over(self, engine: Engine) -> None:
        """This replica's shards failed (called on this loop's thread, before they restart):
        a serving replica takes its unfinished requests."""
        peer = self._serving_peer()
        if peer is None:
            return
        moved = [(seq, self._tickets.pop(seq.request_id)) for seq in engine.take_unfinished()]
        for seq, _ in moved:
            self._last_token_time.pop(seq.request_id, None)
        self._count(-len(moved))
        if moved:
            log.warning("replica %d failed: %d request(s) move to replica %d", self.replica,
                        len(moved), peer.replica)
            peer.adopt(moved)

    def _run(self) -> None:
        last_restart = 0.0
        while not self._stop.is_set():
            try:
                if self.engine.state == DOWN and time.time() - last_restart > RESTART_RETRY_S:
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
                self._abort(command.ticket)
            elif isinstance(command, _Adopt):
                for seq, ticket in command.moved:
                    self._admit_moved(seq, ticket)
            else:
                self._admit(command)

    def _admit(self, command: _Add) -> None:
        ticket = command.ticket

        def aborted() -> RequestOutput:
            return RequestOutput(
                request_id=ticket.request_id, prompt_token_ids=command.prompt_token_ids,
                delta_token_ids=[], delta_text="", finished=True, finish_reason="abort",
                arrival_time=command.arrival_time, token_ids=[], text="")

        if self._passed_on(ticket, lambda peer: peer.submit(command), aborted):
            return
        try:
            self.engine.add_request(ticket.request_id, command.prompt_token_ids, command.params,
                                    command.arrival_time)
        except (ValueError, EngineUnavailableError) as e:
            code = "invalid_argument" if isinstance(e, ValueError) else "unavailable"
            self._publish([RequestOutput(
                request_id=ticket.request_id, prompt_token_ids=command.prompt_token_ids,
                delta_token_ids=[], delta_text="", finished=True, finish_reason="error",
                error=str(e), error_code=code, arrival_time=command.arrival_time, token_ids=[],
                text="")])

    def _admit_moved(self, seq: Sequence, ticket: Ticket) -> None:
        if self._passed_on(ticket, lambda peer: peer.adopt([(seq, ticket)]),
                           lambda: abort_sequence(seq)):
            return
        try:
            self.engine.adopt(seq)
        except (ValueError, EngineUnavailableError) as e:
            self._publish([fail_sequence(seq, f"its replica failed and this one cannot take it: "
                                              f"{e}", "unavailable")])

    def _passed_on(self, ticket: Ticket, hand_to: Callable[["EngineLoop"], None],
                   aborted: Callable[[], RequestOutput]) -> bool:
        """True when this replica does not admit the request: it was cancelled on its way
        (its reader, if still there, gets the `aborted` output: an Abort from another
        connection leaves one waiting), or this replica is not serving and another is (the
        request goes there). Otherwise the ticket is this replica's from now on."""
        if ticket.cancelled:
            self._tickets[ticket.request_id] = ticket
            self._publish([aborted()])  # counts it as finished, and cancelled
            return True
        peer = None if self.engine.healthy else self._serving_peer()
        if peer is not None:
            self._count(-1)
            hand_to(peer)
            return True
        self._tickets[ticket.request_id] = ticket
        return False

    def _abort(self, ticket: Ticket) -> None:
        if ticket.request_id in self._tickets:
            self._publish([self.engine.abort_request(ticket.request_id)])
        elif ticket.loop is not self:
            ticket.loop.abort(ticket)  # it moved to another replica before the abort came

    def _publish(self, outputs: list[RequestOutput | None]) -> None:
        now = time.time()
        for out in outputs:
            if out is None:
                continue
            ticket = self._tickets.get(out.request_id)
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
                self._tickets.pop(out.request_id, None)
                self._last_token_time.pop(out.request_id, None)
                self._count(-1)
            if ticket is not None:
                try:
                    ticket.deliver(out)
                except RuntimeError:  # the caller's event loop is gone (server stopping)
                    pass

    def _update_gauges(self) -> None:
        e, m, replica = self.engine, self.metrics, str(self.replica)
        m.queue_depth.labels(replica).set(e.num_waiting)
        m.running.labels(replica).set(e.num_running)
        m.kv_blocks_used.labels(replica).set(e.kv.num_used_blocks)
        m.kv_blocks_cached.labels(replica).set(e.kv.num_cached_blocks)
        prefix = (e.scheduler.prefix_queried_tokens, e.scheduler.prefix_hit_tokens)
        if prefix != self._prefix_seen:
            m.prefix_queried_tokens.inc(prefix[0] - self._prefix_seen[0])
            m.prefix_hit_tokens.inc(prefix[1] - self._prefix_seen[1])
            self._prefix_seen = prefix
        m.replica_serving.labels(replica).set(1 if e.healthy else 0)
        preemptions = e.scheduler.num_preemptions
        if preemptions > self._preemptions_seen:
            m.preemptions.inc(preemptions - self._preemptions_seen)
            self._preemptions_seen = preemptions
        now, seen = e.speculation, self._speculation_seen
        for counter, field in ((m.speculative_proposed, "proposed_tokens"),
                               (m.speculative_ngram_proposed, "ngram_proposed_tokens"),
                               (m.speculative_accepted, "accepted_tokens"),
                               (m.speculative_verified, "verified"),
                               (m.speculative_disabled, "disabled_steps"),
                               (m.speculative_seconds.labels("draft"), "propose_seconds"),
                               (m.speculative_seconds.labels("verify"), "verify_seconds")):
            if getattr(now, field) > getattr(seen, field):
                counter.inc(getattr(now, field) - getattr(seen, field))
        self._speculation_seen = dataclasses.replace(now)
        if e.num_restarts > self._restarts_seen:
            m.shard_restarts.labels(replica).inc(e.num_restarts - self._restarts_seen)
            self._restarts_seen = e.num_restarts


@dataclass(frozen=True)
class ReplicaStatus:
    replica: int
    state: str  # serving, restarting or down
    restarts: int  # times its shards were restarted after a failure
    running: int
    waiting: int
    finished: int  # requests it ended (completed, cancelled or failed)
    kv_blocks_total: int
    kv_blocks_free: int  # cached prefixes included: they are given up on demand
    kv_blocks_cached: int


class Router:
    def __init__(self, config: EngineConfig, address: str | None = None):
        from .launch import RayExecutor

        self.config = config
        self.metrics = Metrics()
        self.engines = [Engine(config, RayExecutor(config, address))
                        for _ in range(config.parallel.replicas)]
        self.loops = [EngineLoop(engine, i, self.metrics, lambda: self.loops)
                      for i, engine in enumerate(self.engines)]
        self._ids = itertools.count()
        # Requests in flight on every replica; those with a request id also by it, for Abort.
        # Only the event loop's thread touches these.
        self._in_flight: set[Ticket] = set()
        self._by_request_id: dict[str, Ticket] = {}
        self.draining = False

    @property
    def engine(self) -> Engine:
        """Replica 0: tokenizer, limits and validation are the same in every replica."""
        return self.engines[0]

    @property
    def healthy(self) -> bool:
        """Serving while at least one replica serves."""
        return any(loop.serving for loop in self.loops)

    def replicas(self) -> list[ReplicaStatus]:
        # Read from the event loop while the engine threads change them: each is one int (or
        # len()) read under the GIL, so it is a value it had during the last step, never torn;
        # a snapshot a step old is what a load report can promise anyway.
        return [ReplicaStatus(loop.replica, loop.engine.state, loop.engine.num_restarts,
                              loop.engine.num_running, loop.num_waiting,
                              loop.engine.num_finished, loop.engine.kv.num_blocks,
                              loop.engine.kv.num_free_blocks, loop.engine.kv.num_cached_blocks)
                for loop in self.loops]

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
        Closing the iterator early (the caller was cancelled) aborts the request, and so does
        `abort(request_id)`.

        The engines know the request by an id the router makes; `request_id` (the client's,
        or the one the front end made for it) only has to be unique among those in flight."""
        if self.draining:
            raise DrainingError(DRAINING_MESSAGE)
        self.validate(prompt_token_ids, params)
        serving = [lp for lp in self.loops if lp.serving]
        if not serving:
            raise EngineUnavailableError("no replica is serving: the model shards are down; "
                                         "retry later")
        limit = self.config.scheduler.max_waiting_requests
        if sum(lp.num_waiting for lp in serving) >= limit * len(serving):
            self.metrics.requests.labels("rejected_overloaded").inc()
            raise OverloadedError(f"the server has {limit} requests waiting per replica, its "
                                  "limit (scheduler.max_waiting_requests); retry later")
        if request_id is not None and request_id in self._by_request_id:
            self.metrics.requests.labels("rejected_invalid").inc()
            raise ValueError(f"request_id {request_id!r} is already in use by a request "
                             "in flight; choose a unique id")
        loop = self._choose_replica(serving, prompt_token_ids)
        stream = OutputStream()
        ticket = Ticket(str(next(self._ids)), stream.push, loop)
        self._in_flight.add(ticket)
        if request_id is not None:
            self._by_request_id[request_id] = ticket
        loop.submit(_Add(ticket, prompt_token_ids, params, time.time()))
        self.metrics.prompt_tokens.inc(len(prompt_token_ids))
        finished = False
        try:
            while not finished:
                out = await stream.get()
                finished = out.finished
                yield out
        finally:
            self._in_flight.discard(ticket)
            if request_id is not None:
                self._by_request_id.pop(request_id, None)
            if not finished:
                ticket.cancel()

    def _choose_replica(self, serving: list[EngineLoop], prompt_token_ids: list[int]
                        ) -> EngineLoop:
        """The least loaded serving replica, unless one within a few requests of it holds
        more of this prompt in its prefix cache (prefix-aware balancing): computing a long
        shared prefix again costs more than waiting behind a few requests."""
        least = min(serving, key=lambda lp: lp.outstanding)
        if len(serving) == 1:
            return least
        slack = max(1, self.config.scheduler.max_num_seqs // 4)
        near = [lp for lp in serving if lp.outstanding <= least.outstanding + slack]
        # Read from this thread while the engine threads change their caches: a lookup sees
        # a name or not, and a stale answer only costs a recomputed block.
        cached = {lp.replica: lp.engine.kv.cached_prefix_len(prompt_token_ids) for lp in near}
        best = max(near, key=lambda lp: (cached[lp.replica], -lp.outstanding))
        return best if cached[best.replica] else least

    def abort(self, request_id: str) -> bool:
        """Abort the request in flight with this id; its reader gets a last output with
        finish reason "abort". False when no such request is in flight (or it is already
        being aborted)."""
        ticket = self._by_request_id.get(request_id)
        if ticket is None or ticket.cancelled:
            return False
        ticket.cancel()
        return True

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    async def drain(self, grace_s: float) -> int:
        """Refuse new requests; wait up to grace_s for those in flight to end, then abort
        the rest and wait for their readers to get their abort outputs. Returns how many
        were aborted."""
        self.draining = True
        deadline = time.monotonic() + grace_s
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        left = [t for t in self._in_flight if not t.cancelled]
        for ticket in left:
            ticket.cancel()
        if left:
            log.warning("drain: %d request(s) still running after %.1f s were aborted",
                        len(left), grace_s)
        # Aborts reach the engines before their next step, but a reader blocked writing to a
        # client that does not read keeps its ticket until the write goes, so this wait is
        # bounded too.
        deadline = time.monotonic() + ABORT_WAIT_S
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        return len(left)

    def stop(self) -> None:
        for loop in self.loops:
            loop.stop()
        for engine in self.engines:
            engine.shutdown()

"""The engine loop: validate and queue requests, schedule a step, run it on the shards, apply
the sampled tokens, stop sequences, free their blocks, and report what changed.

It is synchronous and owns no threads; the offline `LLM` calls `step()` in a loop and the
router actor calls it from its engine thread.
"""

from __future__ import annotations

import itertools
import logging
import random
import time

from shardserve.workers.loader import resolve_model
from shardserve.workers.models import model_shape
from shardserve.workers.step import SamplingParams, SequenceStep, StepPlan

from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer
from .executor import Executor, ExecutorError
from .kv_manager import KVCacheManager
from .outputs import RequestOutput, TokenLogprob
from .scheduler import ScheduledSequence, Scheduler
from .sequence import Sequence

log = logging.getLogger(__name__)

# A request in flight when shards fail is recomputed once; a second failure ends it.
MAX_FAILURES_PER_REQUEST = 1


class EngineUnavailableError(RuntimeError):
    """The shards are down; requests cannot be served until they restart."""


class Engine:
    def __init__(self, config: EngineConfig, executor: Executor | None = None):
        from transformers import AutoConfig, AutoTokenizer

        self.config = config
        self.model_dir = resolve_model(config.model)
        self.hf_config = AutoConfig.from_pretrained(self.model_dir)
        self.shape = model_shape(self.hf_config)  # fails early for an unsupported model
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        limit = self.shape.max_position_embeddings
        self.max_model_len = min(config.max_model_len or limit, limit)
        self.eos_token_ids = self._eos_token_ids()
        self.executor = executor or self._local_executor()

        cache = config.kv_cache
        num_blocks = cache.num_kv_blocks or self.executor.kv_blocks_that_fit(
            cache.block_size, cache.kv_cache_memory, cache.kv_memory_fraction)
        # More blocks than max_num_seqs full-length sequences can use is wasted memory.
        useful = config.scheduler.max_num_seqs * -(-self.max_model_len // cache.block_size)
        num_blocks = min(num_blocks, useful)
        self.executor.allocate_kv(num_blocks, cache.block_size)
        self.kv = KVCacheManager(num_blocks, cache.block_size)
        s = config.scheduler
        # One lane per micro-batch in flight; only pipeline parallelism has more than one.
        self.num_lanes = 1
        if config.parallel.pipeline_parallel_size > 1:
            self.num_lanes = (config.parallel.micro_batches
                              or config.parallel.pipeline_parallel_size)
        self.scheduler = Scheduler(self.kv, s.max_num_seqs, s.max_num_batched_tokens,
                                   s.scheduling_policy, self.num_lanes)
        self._in_flight: dict[int, tuple[object, list[ScheduledSequence]]] = {}
        self._seq_ids = itertools.count()
        self._step_ids = itertools.count()
        self._rng = random.Random(config.seed)
        self._requests: dict[str, Sequence] = {}
        self._detokenizers: dict[int, IncrementalDetokenizer] = {}
        self._logprobs: dict[int, list[TokenLogprob]] = {}
        self._first_token_times: dict[int, float] = {}
        self.healthy = True

    def _local_executor(self) -> Executor:
        from shardserve.workers.shard import ShardSpec

        from .executor import LocalExecutor

        if self.config.num_shards > 1 or self.config.parallel.replicas > 1:
            raise ValueError("tensor/pipeline parallelism and replicas run on Ray: "
                             "pass a RayExecutor (LLM does this for you)")
        c = self.config
        return LocalExecutor(ShardSpec(model=str(self.model_dir), dtype=c.dtype, device=c.device,
                                       num_threads=c.num_threads, seed=c.seed))

    def _eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        sources = [self.hf_config]
        try:
            from transformers import GenerationConfig

            sources.insert(0, GenerationConfig.from_pretrained(self.model_dir))
        except OSError:
            pass
        for source in sources:
            eos = getattr(source, "eos_token_id", None)
            if eos is not None:
                ids.update(eos if isinstance(eos, list) else [eos])
        if not ids and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    # --- requests ---------------------------------------------------------------------------

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer(prompt).input_ids if prompt else []
        return list(prompt)

    def tokenize_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """A conversation as prompt tokens, through the model's chat template, ending with the
        opening of the assistant's turn. Raises ValueError saying what to change."""
        if not self.tokenizer.chat_template:
            raise ValueError("this model has no chat template: send the prompt as text or "
                             "token ids")
        if not messages:
            raise ValueError("chat has no messages: give at least one")
        for i, m in enumerate(messages):
            if not (isinstance(m.get("role"), str) and m["role"]
                    and isinstance(m.get("content"), str)):
                raise ValueError(f"chat message {i} needs a non-empty role and a content string")
        from jinja2.exceptions import TemplateError

        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                      tokenize=False)
        except TemplateError as e:
            raise ValueError(f"the model's chat template refused the messages: {e}") from None
        # The template writes the special tokens itself.
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError saying what to change; nothing is queued for a bad request."""
        vocab = self.shape.vocab_size
        if not prompt_token_ids:
            raise ValueError("prompt is empty: give at least one token of text")
        bad = [t for t in prompt_token_ids if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary "
                             f"(0..{vocab - 1})")
        params.validate(vocab)
        n, limit = len(prompt_token_ids), self.max_model_len
        if n >= limit:
            raise ValueError(f"prompt has {n} tokens but the context limit is {limit} "
                             "(max_model_len): shorten the prompt")
        if n + params.max_tokens > limit:
            raise ValueError(f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds "
                             f"the context limit of {limit}: set max_tokens <= {limit - n}")
        if n + params.max_tokens > self.kv.capacity_tokens:
            raise ValueError(
                f"prompt + max_tokens = {n + params.max_tokens} tokens but the KV cache holds "
                f"{self.kv.capacity_tokens}: lower max_tokens or raise kv_cache.kv_cache_memory")

    def add_request(self, request_id: str, prompt: str | list[int],
                    params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> list[int]:
        """Queue a request; returns its prompt token ids. Raises ValueError for bad input."""
        params = params or SamplingParams()
        if not self.healthy:
            raise EngineUnavailableError("the model shards are down and could not be "
                                         "restarted yet; retry later (see the server log)")
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        token_ids = self.tokenize(prompt)
        self.validate(token_ids, params)
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        seq = Sequence(next(self._seq_ids), request_id, token_ids, params, seed,
                       arrival_time or time.time())
        self._requests[request_id] = seq
        self._detokenizers[seq.seq_id] = IncrementalDetokenizer(self.tokenizer, token_ids,
                                                                params.stop)
        if params.logprobs is not None:
            self._logprobs[seq.seq_id] = []
        self.scheduler.add(seq)
        return token_ids

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Cancel a request; its blocks are free when this returns.

        That is safe even while its batch is in flight: every shard runs batches in the order
        they were sent, so that batch writes its KV before any later batch that reuses the
        blocks writes its own."""
        seq = self._requests.get(request_id)
        if seq is None or seq.is_finished:
            return None
        self.scheduler.finish(seq, "abort")
        return self._output(seq, [], [], "")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._in_flight)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    # --- the step ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Send a batch for every idle lane, then apply the first batch that comes back.

        With one lane (no pipeline parallelism) this is: schedule, run, apply. With several,
        up to one batch per lane is in flight, so every pipeline stage has work.
        """
        for lane in range(self.num_lanes):
            if lane in self._in_flight:
                continue
            scheduled = self.scheduler.schedule(lane)
            if not scheduled:
                continue
            plan = StepPlan(next(self._step_ids), [self._sequence_step(s) for s in scheduled])
            try:
                self._in_flight[lane] = (self.executor.submit(plan), scheduled)
            except ExecutorError as e:
                return self._recover(str(e))
        if not self._in_flight:
            return []
        try:
            lane, result = self.executor.wait_any(
                {lane: handle for lane, (handle, _) in self._in_flight.items()})
        except ExecutorError as e:
            return self._recover(str(e))
        _, scheduled = self._in_flight.pop(lane)
        return self._apply(scheduled, result)

    def _apply(self, scheduled: list[ScheduledSequence], result) -> list[RequestOutput]:
        sampled = {t.seq_id: t for t in result.tokens}
        outputs = []
        now = time.time()
        for item in scheduled:
            seq = item.seq
            if seq.is_finished:
                continue  # cancelled while its batch was in flight
            seq.num_computed_tokens += item.num_tokens
            token = sampled.get(seq.seq_id)
            if token is None:
                continue  # a prompt chunk that did not reach the end yet
            self._first_token_times.setdefault(seq.seq_id, now)
            seq.output_token_ids.append(token.token_id)
            logprobs = []
            if seq.params.logprobs is not None:
                logprobs = [TokenLogprob(token.token_id, token.logprob,
                                         token.top_logprobs or [])]
                self._logprobs[seq.seq_id].extend(logprobs)
            reason = self._stop_reason(seq, token.token_id)
            if reason:
                self.scheduler.finish(seq, reason)
            outputs.append(self._output(seq, [token.token_id], logprobs,
                                        self._detokenizers[seq.seq_id].release(seq.is_finished)))
        return outputs

    def _sequence_step(self, item: ScheduledSequence) -> SequenceStep:
        seq = item.seq
        start = seq.num_computed_tokens
        return SequenceStep(
            seq_id=seq.seq_id,
            token_ids=seq.token_ids(start, start + item.num_tokens),
            start_position=start,
            block_table=self.kv.block_table(seq.seq_id),
            sample=item.samples,
            params=seq.params,
            seed=seq.seed,
            num_generated=len(seq.output_token_ids),
        )

    def _stop_reason(self, seq: Sequence, token_id: int) -> str | None:
        p = seq.params
        if self._detokenizers[seq.seq_id].add_token(token_id):
            return "stop"
        if token_id in p.stop_token_ids:
            return "stop"
        if not p.ignore_eos and token_id in self.eos_token_ids:
            return "stop"
        if len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _recover(self, error: str) -> list[RequestOutput]:
        """A shard failed and every KV cache is suspect. Restart the shards and recompute the
        requests that were in flight (as after a preemption); a request caught in a second
        failure, or any request when the restart fails, ends with the error."""
        log.error("step failed: %s", error)
        self._in_flight.clear()
        in_flight = list(self.scheduler.running)
        for seq in reversed(in_flight):
            self.scheduler.preempt(seq)
        try:
            restart = getattr(self.executor, "restart", None)
            if restart is None:
                raise ExecutorError("this executor cannot restart")
            restart()
            self.healthy = True
        except Exception as e:  # noqa: BLE001 - any restart failure leaves the engine down
            self.healthy = False
            return self.fail_all(f"{error}; restarting the shards failed: {e}")
        outputs = []
        for seq in in_flight:
            seq.num_failures += 1
            if seq.num_failures > MAX_FAILURES_PER_REQUEST:
                self.scheduler.finish(seq, "error")
                outputs.append(self._output(seq, [], [], "", error=error,
                                            error_code="unavailable"))
        log.warning("shards restarted; %d request(s) will be recomputed",
                    len(in_flight) - len(outputs))
        return outputs

    def try_restart(self) -> bool:
        """After a failed restart: try again to bring the shards back (the loop calls this
        now and then, so the server recovers by itself when the cluster does)."""
        if self.healthy:
            return True
        try:
            self.executor.restart()
            self.healthy = True
            log.warning("shards restarted; serving again")
        except Exception as e:  # noqa: BLE001 - still down; the caller retries later
            log.error("restarting the shards failed again: %s", e)
        return self.healthy

    def fail_all(self, message: str, code: str = "unavailable") -> list[RequestOutput]:
        """End every queued and running request with an error; blocks are freed."""
        self._in_flight.clear()
        outputs = []
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self.scheduler.finish(seq, "error")
            outputs.append(self._output(seq, [], [], "", error=message, error_code=code))
        return outputs

    def _output(self, seq: Sequence, delta_ids: list[int], delta_logprobs: list[TokenLogprob],
                delta_text: str, error: str | None = None,
                error_code: str | None = None) -> RequestOutput:
        detok = self._detokenizers[seq.seq_id]
        out = RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=list(seq.output_token_ids),
            text=detok.text,
            delta_token_ids=delta_ids,
            delta_text=delta_text,
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            logprobs=delta_logprobs if seq.params.logprobs is not None else None,
            error=error,
            error_code=error_code,
            arrival_time=seq.arrival_time,
            first_token_time=self._first_token_times.get(seq.seq_id),
            num_preemptions=seq.num_preemptions,
        )
        if seq.is_finished:
            self._forget(seq)
        return out

    def _forget(self, seq: Sequence) -> None:
        self._requests.pop(seq.request_id, None)
        self._detokenizers.pop(seq.seq_id, None)
        self._first_token_times.pop(seq.seq_id, None)
        self._logprobs.pop(seq.seq_id, None)

    def shutdown(self) -> None:
        self.executor.shutdown()

"""The engine loop: validate and queue requests, schedule a step, run it on the shards, apply
the sampled tokens, stop sequences, free their blocks, and report what changed.

It is synchronous and owns no threads; the offline `LLM` calls `step()` in a loop and the
router actor calls it from its engine thread.

Failures stay as small as they can: a sequence whose token cannot be sampled or stopped ends
alone (INTERNAL), its batch mates go on. Only a failed shard (an executor error) restarts the
shards; the requests it caught are recomputed, on another replica when one is serving.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Callable

from shardserve.workers.loader import resolve_model
from shardserve.workers.models import model_shape
from shardserve.workers.step import SampledToken, SamplingParams, SequenceStep, StepPlan

from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer
from .executor import Executor, ExecutorError
from .kv_manager import KVCacheManager
from .outputs import RequestOutput, TokenLogprob
from .scheduler import ScheduledSequence, Scheduler
from .sequence import Sequence, SequenceStatus, next_seq_id
from .speculative import (DraftHeadProposer, DraftModel, SpeculationStats, draft_vocabulary,
                          ngram_proposal)

log = logging.getLogger(__name__)

# A request in flight when shards fail is recomputed once; a second failure ends it.
MAX_FAILURES_PER_REQUEST = 1

# Engine.state: serving; restarting its shards after a failure; down (a restart failed, and
# the router retries it now and then).
SERVING, RESTARTING, DOWN = "serving", "restarting", "down"


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
        limit = self.shape.max_context_len
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
        self.kv = KVCacheManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        first_shard = self.executor.describe()["shards"][0]
        log.info("KV cache: %d blocks of %d tokens (%d tokens), stored as %s", num_blocks,
                 cache.block_size, self.kv.capacity_tokens, first_shard["kv_cache_dtype"])
        if self.kv.capacity_tokens < self.max_model_len:
            log.warning("the KV cache holds %d tokens, fewer than max_model_len (%d): longer "
                        "requests are refused", self.kv.capacity_tokens, self.max_model_len)
        s = config.scheduler
        # One lane per micro-batch in flight; only pipeline parallelism has more than one.
        self.num_lanes = 1
        if config.parallel.pipeline_parallel_size > 1:
            self.num_lanes = (config.parallel.micro_batches
                              or config.parallel.pipeline_parallel_size)
        self.max_num_batched_tokens = (s.max_num_batched_tokens
                                       or default_batched_tokens(first_shard["device"]))
        self.scheduler = Scheduler(self.kv, s.max_num_seqs, self.max_num_batched_tokens,
                                   s.scheduling_policy, self.num_lanes)
        self.speculation = SpeculationStats()
        self.draft: DraftModel | None = None
        self.draft_head: DraftHeadProposer | None = None
        if config.speculative.method == "draft":
            self.draft = self._draft_model(num_blocks, cache.block_size)
        elif config.speculative.method == "draft_head":
            sp = config.speculative
            self.draft_head = DraftHeadProposer(sp.draft_model, self.model_dir,
                                                self.shape.vocab_size,
                                                self.shape.tie_word_embeddings,
                                                sp.draft_min_probability)
            log.info("speculative decoding with the draft head %s (int8 weights), up to %d "
                     "tokens per step", sp.draft_model, sp.num_tokens)
        # lane -> (handle, its sequences, when it was sent)
        self._in_flight: dict[int, tuple[object, list[ScheduledSequence], float]] = {}
        self._step_ids = itertools.count()
        self._rng = random.Random(config.seed)
        self._requests: dict[str, Sequence] = {}
        self.state = SERVING
        self.num_restarts = 0
        self.num_finished = 0
        # Called (with this engine) when its shards failed, before they restart: the router
        # uses it to move the unfinished requests to a replica that is serving.
        self.on_failure: Callable[[Engine], None] | None = None

    def _local_executor(self) -> Executor:
        from shardserve.workers.shard import ShardSpec

        from .executor import LocalExecutor

        if self.config.num_shards > 1 or self.config.parallel.replicas > 1:
            raise ValueError("tensor/pipeline parallelism and replicas run on Ray: "
                             "pass a RayExecutor (LLM does this for you)")
        return LocalExecutor(ShardSpec.from_config(self.config))

    def _draft_model(self, num_blocks: int, block_size: int) -> DraftModel:
        from shardserve.workers.loader import resolve_model
        from shardserve.workers.shard import ShardSpec, resolve_device

        c, sp = self.config, self.config.speculative
        quantization = sp.draft_quantization
        if quantization == "auto":  # int8 weights stream half the bytes of 16-bit on a CPU
            quantization = "int8-weight" if resolve_device(c.device).type == "cpu" else "none"
        head = draft_vocabulary(resolve_model(sp.draft_model), self.shape.vocab_size)
        spec = ShardSpec(model=sp.draft_model, dtype=c.dtype, quantization=quantization,
                         kv_cache_dtype=c.kv_cache_dtype, device=c.device, cpu_gemm=c.cpu_gemm,
                         num_threads=c.num_threads, seed=c.seed, head_token_ids=head)
        draft = DraftModel(spec, num_blocks, block_size, self.shape.vocab_size,
                           sp.draft_min_probability)
        log.info("speculative decoding with the draft model %s (%s weights, a head of %s "
                 "tokens), up to %d tokens per step", sp.draft_model, quantization,
                 len(head) if head else "all", sp.num_tokens)
        return draft

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

    @property
    def healthy(self) -> bool:
        return self.state == SERVING

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
        n, limit = len(prompt_token_ids), self.max_model_len
        if n >= limit:
            raise ValueError(f"prompt has {n} tokens but the context limit is {limit} "
                             "(max_model_len): shorten the prompt")
        bad = [t for t in prompt_token_ids if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary "
                             f"(0..{vocab - 1})")
        params.validate(vocab)
        sp = self.config.speculative
        if params.speculative_tokens:
            if sp.method == "none":
                raise ValueError("speculative_tokens: this server does not speculate "
                                 "(speculative.method is none); leave it unset or 0")
            if params.speculative_tokens > sp.num_tokens:
                raise ValueError(f"speculative_tokens {params.speculative_tokens} exceeds the "
                                 f"server's speculative.num_tokens ({sp.num_tokens})")
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
        seq = Sequence(next_seq_id(), request_id, token_ids, params, seed,
                       arrival_time or time.time(),
                       IncrementalDetokenizer(self.tokenizer, token_ids, params.stop))
        self._requests[request_id] = seq
        self.scheduler.add(seq)
        return token_ids

    def adopt(self, seq: Sequence) -> None:
        """Take over a request another replica started (its shards failed): it is recomputed
        here from its prompt and the tokens it already generated, ahead of newer requests."""
        if not self.healthy:
            raise EngineUnavailableError("this replica is not serving")
        if seq.request_id in self._requests:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        needed = len(seq.prompt_token_ids) + seq.params.max_tokens
        if needed > self.kv.capacity_tokens:
            raise ValueError(f"the request needs {needed} tokens of KV cache; this replica "
                             f"holds {self.kv.capacity_tokens}")
        self._requests[seq.request_id] = seq
        self.scheduler.add(seq, front=True)

    def take_unfinished(self) -> list[Sequence]:
        """Remove every unfinished request, its blocks freed, for another replica to finish."""
        seqs = sorted(self.scheduler.running + list(self.scheduler.waiting),
                      key=lambda s: s.arrival_time)
        for seq in seqs:
            self.scheduler.remove(seq)
            del self._requests[seq.request_id]
        return seqs

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
            self._plan_lookahead(lane)
            scheduled = self.scheduler.schedule(lane)
            if not scheduled:
                continue
            self._propose(scheduled)
            plan = StepPlan(next(self._step_ids), [self._sequence_step(s) for s in scheduled],
                            return_hidden=self.draft_head is not None)
            sent = time.perf_counter()  # before submit: a local executor runs the step in it
            try:
                self._in_flight[lane] = (self.executor.submit(plan), scheduled, sent)
            except ExecutorError as e:
                return self._recover(str(e))
        if not self._in_flight:
            return []
        try:
            lane, result = self.executor.wait_any(
                {lane: handle for lane, (handle, _, _) in self._in_flight.items()})
        except ExecutorError as e:
            return self._recover(str(e))
        _, scheduled, sent = self._in_flight.pop(lane)
        if any(item.draft for item in scheduled):
            elapsed = time.perf_counter() - sent
            self.speculation.verify_seconds += elapsed
            for item in scheduled:
                if item.draft:
                    item.seq.verify_seconds += elapsed
        return self._apply(scheduled, result)

    # --- speculative decoding ---------------------------------------------------------------

    def _plan_lookahead(self, lane: int) -> None:
        """How many draft tokens each decoding sequence of the lane may verify this step."""
        sp = self.config.speculative
        if sp.method == "none":  # lookahead stays 0: nothing to do on every step
            return
        running = [s for s in self.scheduler.running if s.lane == lane]
        for seq in running:
            seq.lookahead = 0
        decoding = [s for s in running if s.num_uncomputed_tokens == 1]
        # Counting the sequences still prefilling or waiting too: they will decode soon, and
        # a draft that started on the first few would pay for catching up on their prompts
        # only to be switched off a step or two later.
        if sp.disable_above_batch and \
                len(running) + len(self.scheduler.waiting) > sp.disable_above_batch:
            self.speculation.disabled_steps += 1
            return
        for seq in decoding:
            p = seq.params
            k = sp.num_tokens if p.speculative_tokens is None else p.speculative_tokens
            # the target always adds a token of its own: room for k drafts plus that one
            k = min(k, p.max_tokens - len(seq.output_token_ids) - 1,
                    self.max_model_len - seq.num_tokens - 1)
            if self.draft is not None:
                k = min(k, self.draft.max_context_len - seq.num_tokens)
                if not sp.ngram_first and self._draft_too_far_behind(seq):
                    k = 0  # (with ngram_first, an n-gram proposal may still come)
            seq.lookahead = max(k, 0)

    @staticmethod
    def _draft_too_far_behind(seq: Sequence) -> bool:
        """A sequence that decoded without its draft for longer than it has left (the tail
        of a large batch) would make the draft catch up on all of that for a few steps of
        use: it finishes without."""
        unseen = seq.num_tokens - max(seq.num_draft_computed, len(seq.prompt_token_ids))
        return unseen > seq.params.max_tokens - len(seq.output_token_ids)

    def _propose(self, scheduled: list[ScheduledSequence]) -> None:
        """Fill in the drafts of the sequences the scheduler made room for."""
        wanted = [item for item in scheduled if item.num_lookahead]
        if not wanted:
            return
        start = time.perf_counter()
        sp = self.config.speculative
        drafts: list[list[int]] = [[] for _ in wanted]
        if (self.draft is None and self.draft_head is None) or sp.ngram_first:
            drafts = [ngram_proposal(item.seq.token_ids(0, item.seq.num_tokens),
                                     item.num_lookahead, sp.ngram_max, sp.ngram_min)
                      for item in wanted]
            self.speculation.ngram_proposed_tokens += sum(map(len, drafts))
        if self.draft is not None:
            # with ngram_first, the draft proposes where the lookup found nothing
            asks = [i for i, item in enumerate(wanted) if not drafts[i] and not
                    (sp.ngram_first and self._draft_too_far_behind(item.seq))]
            proposed = self.draft.propose([(wanted[i].seq, wanted[i].num_lookahead,
                                            self.kv.block_table(wanted[i].seq.seq_id))
                                           for i in asks])
            for i, draft in zip(asks, proposed):
                drafts[i] = draft
        if self.draft_head is not None:
            asks = [i for i in range(len(wanted)) if not drafts[i]]
            proposed = self.draft_head.propose([(wanted[i].seq, wanted[i].num_lookahead)
                                                for i in asks])
            for i, draft in zip(asks, proposed):
                drafts[i] = draft
        for item, draft in zip(wanted, drafts):
            item.draft = draft
            item.num_tokens = item.seq.num_uncomputed_tokens + len(draft)
        elapsed = time.perf_counter() - start
        self.speculation.propose_seconds += elapsed
        for item in wanted:
            item.seq.draft_seconds += elapsed

    def _apply(self, scheduled: list[ScheduledSequence], result) -> list[RequestOutput]:
        sampled: dict[int, list[SampledToken]] = {}
        for t in result.tokens:  # a sequence that verified drafts has several, in order
            sampled.setdefault(t.seq_id, []).append(t)
        outputs = []
        now = time.time()
        for item in scheduled:
            seq = item.seq
            if seq.is_finished:
                continue  # cancelled while its batch was in flight
            tokens = sampled.get(seq.seq_id)
            if item.draft:
                # KV is valid for the last real token and the kept drafts; the rest is
                # rolled back (written over when those positions are computed again).
                kept = sum(1 for t in tokens[:-1] if not t.error) if tokens else 0
                seq.num_computed_tokens += kept + 1
                known = seq.num_tokens  # before the new tokens
                seq.num_draft_computed = min(seq.num_draft_computed, known + kept)
                seq.num_draft_tokens += len(item.draft)
                seq.num_accepted_tokens += kept
                seq.num_verify_steps += 1
                self.speculation.verified += 1
                self.speculation.proposed_tokens += len(item.draft)
                self.speculation.accepted_tokens += kept
            else:
                seq.num_computed_tokens += item.num_tokens
            # Before the new tokens are appended (a finishing sequence frees its blocks then):
            # the blocks this step filled become reusable prefixes.
            self.kv.cache_computed_blocks(seq.seq_id, min(seq.num_computed_tokens,
                                                          seq.num_tokens), seq.token_ids)
            if tokens is None:
                continue  # a prompt chunk that did not reach the end yet
            if self.draft_head is not None:
                seq.last_hidden = result.hidden_states.get(seq.seq_id)
            try:
                out = None
                for token in tokens:
                    step_out = self._append_token(seq, token, now)
                    out = step_out if out is None else out.merge(step_out)
                    if seq.is_finished:
                        break  # a stop inside an accepted run: nothing past it
                outputs.append(out)
                if item.num_lookahead and not seq.is_finished:
                    self.kv.truncate(seq.seq_id, seq.num_tokens)
            except Exception as e:  # noqa: BLE001 - one request's failure stays its own
                log.exception("request %s failed while its token was applied", seq.request_id)
                outputs.append(self._fail(seq, f"internal error while applying this request's "
                                               f"token ({type(e).__name__}); see the server log",
                                          "internal"))
        return outputs

    def _append_token(self, seq: Sequence, token: SampledToken, now: float) -> RequestOutput:
        if token.error:
            log.error("request %s: %s", seq.request_id, token.error)
            return self._fail(seq, token.error, "internal")
        if seq.first_token_time is None:
            seq.first_token_time = now
        seq.output_token_ids.append(token.token_id)
        logprobs = []
        if seq.params.logprobs is not None:
            logprobs = [TokenLogprob(token.token_id, token.logprob, token.top_logprobs or [])]
        reason = self._stop_reason(seq, token.token_id)
        if reason:
            self.scheduler.finish(seq, reason)
        return self._output(seq, [token.token_id], logprobs,
                            seq.detokenizer.release(seq.is_finished))

    def _fail(self, seq: Sequence, message: str, code: str) -> RequestOutput:
        """End one request with an error; its blocks are freed."""
        self.scheduler.finish(seq, "error")
        return self._output(seq, [], [], "", error=message, error_code=code)

    def _sequence_step(self, item: ScheduledSequence) -> SequenceStep:
        seq = item.seq
        start = seq.num_computed_tokens
        draft = item.draft or []
        return SequenceStep(
            seq_id=seq.seq_id,
            token_ids=seq.token_ids(start, start + item.num_tokens - len(draft)) + draft,
            start_position=start,
            block_table=self.kv.block_table(seq.seq_id),
            sample=item.samples,
            params=seq.params,
            seed=seq.seed,
            num_generated=len(seq.output_token_ids),
            num_draft=len(draft),
        )

    def _stop_reason(self, seq: Sequence, token_id: int) -> str | None:
        p = seq.params
        if seq.detokenizer.add_token(token_id):
            return "stop"
        if token_id in p.stop_token_ids:
            return "stop"
        if not p.ignore_eos and token_id in self.eos_token_ids:
            return "stop"
        if len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    # --- shard failures ---------------------------------------------------------------------

    def _recover(self, error: str) -> list[RequestOutput]:
        """A shard failed and every KV cache is suspect. The requests that were in flight
        become recomputable (as after a preemption); one caught in a second failure ends with
        the error. The router may move the rest to another replica, then the shards restart;
        whatever is left here is recomputed after the restart, or ends if it fails."""
        log.error("step failed: %s", error)
        self._in_flight.clear()
        self.state = RESTARTING
        caught = list(self.scheduler.running)
        for seq in reversed(caught):
            self.scheduler.preempt(seq)
        outputs = []
        for seq in caught:
            seq.num_failures += 1
            if seq.num_failures > MAX_FAILURES_PER_REQUEST:
                outputs.append(self._fail(seq, error, "unavailable"))
        if self.on_failure is not None:
            self.on_failure(self)
        try:
            self._restart_shards()
        except Exception as e:  # noqa: BLE001 - any restart failure leaves the engine down
            log.error("restarting the shards failed: %s", e)
            self.state = DOWN
            return outputs + self.fail_all(f"{error}; restarting the shards failed: {e}")
        log.warning("shards restarted; %d request(s) will be recomputed",
                    len(self._requests))
        return outputs

    def _restart_shards(self) -> None:
        restart = getattr(self.executor, "restart", None)
        if restart is None:
            raise ExecutorError("this executor cannot restart")
        # The new shards' KV caches are empty: no block holds a cached prefix any more.
        self.kv.drop_prefix_cache()
        restart()
        self.num_restarts += 1
        self.state = SERVING

    def try_restart(self) -> bool:
        """After a failed restart: try again to bring the shards back (the loop calls this
        now and then, so the server recovers by itself when the cluster does)."""
        if self.healthy:
            return True
        try:
            self._restart_shards()
            log.warning("shards restarted; serving again")
        except Exception as e:  # noqa: BLE001 - still down; the caller retries later
            log.error("restarting the shards failed again: %s", e)
        return self.healthy

    def fail_all(self, message: str, code: str = "unavailable") -> list[RequestOutput]:
        """End every queued and running request with an error; blocks are freed."""
        self._in_flight.clear()
        return [self._fail(seq, message, code)
                for seq in list(self.scheduler.running) + list(self.scheduler.waiting)]

    # --- outputs ----------------------------------------------------------------------------

    def _output(self, seq: Sequence, delta_ids: list[int], delta_logprobs: list[TokenLogprob],
                delta_text: str, error: str | None = None,
                error_code: str | None = None) -> RequestOutput:
        out = output_of(seq, delta_ids, delta_logprobs, delta_text, error, error_code)
        if seq.is_finished:
            self._requests.pop(seq.request_id, None)
            self.num_finished += 1
        return out

    def shutdown(self) -> None:
        self.executor.shutdown()
        if self.draft is not None:
            self.draft.shutdown()


def output_of(seq: Sequence, delta_ids: list[int], delta_logprobs: list[TokenLogprob],
              delta_text: str, error: str | None = None,
              error_code: str | None = None) -> RequestOutput:
    """What the caller is told about `seq` now: this step's deltas, and at the end the whole
    output."""
    out = RequestOutput(
        request_id=seq.request_id,
        prompt_token_ids=seq.prompt_token_ids,
        delta_token_ids=delta_ids,
        delta_text=delta_text,
        finished=seq.is_finished,
        finish_reason=seq.finish_reason,
        logprobs=delta_logprobs if seq.params.logprobs is not None else None,
        error=error,
        error_code=error_code,
        arrival_time=seq.arrival_time,
        first_token_time=seq.first_token_time,
        num_preemptions=seq.num_preemptions,
        num_cached_tokens=seq.num_cached_tokens,
        num_draft_tokens=seq.num_draft_tokens,
        num_accepted_tokens=seq.num_accepted_tokens,
        num_verify_steps=seq.num_verify_steps,
        draft_seconds=seq.draft_seconds,
        verify_seconds=seq.verify_seconds,
    )
    if seq.is_finished:
        out.token_ids = list(seq.output_token_ids)
        out.text = seq.detokenizer.text if seq.detokenizer else ""
    return out


def abort_sequence(seq: Sequence) -> RequestOutput:
    """End a request that no engine holds (cancelled on its way between replicas)."""
    seq.status = SequenceStatus.FINISHED
    seq.finish_reason = "abort"
    return output_of(seq, [], [], "")


def fail_sequence(seq: Sequence, message: str, code: str) -> RequestOutput:
    """End a request that no engine holds (it was on its way between replicas)."""
    seq.status = SequenceStatus.FINISHED
    seq.finish_reason = "error"
    return output_of(seq, [], [], "", message, code)


def default_batched_tokens(device: str) -> int:
    """The scheduler's default token budget per step. On CPU a step's time grows with its
    tokens while throughput stays level past ~256 (bench/README.md), so 512 keeps the longest
    stall a stream sees near a second; a GPU runs 2048 tokens in one step's time."""
    return 512 if device == "cpu" else 2048

"""The offline Python API.

    from shardserve import LLM, SamplingParams
    llm = LLM()                                   # SmolLM2-135M, no download
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0))
    print(out[0].text, out[0].token_ids, out[0].finish_reason)
    llm.chat([{"role": "user", "content": "What is the capital of France?"}])

Prompts are text or lists of token ids. With more than one shard (tensor or pipeline
parallelism) or `use_ray=True`, the shards run as Ray actors on the current Ray cluster
(a local one is started when none is running).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from shardserve.workers.step import SamplingParams

from .config import EngineConfig
from .engine import Engine
from .outputs import TokenLogprob


@dataclass
class CompletionResult:
    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None
    num_preemptions: int = 0
    time_to_first_token_s: float | None = None  # from submission to the first generated token
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


class LLM:
    def __init__(self, model: str = "smollm2", config: EngineConfig | None = None,
                 use_ray: bool = False, **options):
        """`options` are any EngineConfig fields by name, e.g. dtype="float32",
        tensor_parallel_size=2, num_kv_blocks=64, scheduling_policy="static"."""
        config = (config or EngineConfig()).with_overrides(model=model, **options)
        if config.parallel.replicas > 1:
            raise ValueError("replicas are served by `shardserve serve` (the router balances "
                             "requests across them); the offline LLM runs one copy")
        executor = None
        if use_ray or config.num_shards > 1:
            from .launch import RayExecutor

            executor = RayExecutor(config)
        self.engine = Engine(config, executor)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | list[int] | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 ) -> list[CompletionResult]:
        """Run every prompt to completion; results come back in the order of `prompts`."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(sampling_params, list):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} sampling params for "
                             f"{len(prompts)} prompts")
        ids = [f"offline-{next(self._ids)}" for _ in prompts]
        # Validate everything before queueing anything, so a bad prompt leaves no work behind.
        token_lists = [self.engine.tokenize(p) for p in prompts]
        for tokens, params in zip(token_lists, sampling_params):
            self.engine.validate(tokens, params)
        for request_id, tokens, params in zip(ids, token_lists, sampling_params):
            self.engine.add_request(request_id, tokens, params)
        results: dict[str, CompletionResult] = {}
        logprobs: dict[str, list[TokenLogprob]] = {i: [] for i in ids}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.logprobs:
                    logprobs[out.request_id].extend(out.logprobs)
                if out.finished:
                    if out.error:
                        raise RuntimeError(f"request {out.request_id} failed: {out.error}")
                    results[out.request_id] = CompletionResult(
                        out.request_id, out.prompt_token_ids, out.text, out.token_ids,
                        out.finish_reason,
                        logprobs[out.request_id] if out.logprobs is not None else None,
                        out.num_preemptions,
                        None if out.first_token_time is None
                        else out.first_token_time - out.arrival_time,
                        out.num_cached_tokens)
        return [results[i] for i in ids]

    def chat(self, conversations: list[dict[str, str]] | list[list[dict[str, str]]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             ) -> list[CompletionResult]:
        """Answer one conversation ([{"role": "user", "content": "..."}, ...]) or a list of
        them; the model's chat template turns each into its prompt."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        return self.generate([self.engine.tokenize_chat(c) for c in conversations],
                             sampling_params)

    def shutdown(self) -> None:
        self.engine.shutdown()

"""The benchmark workload shared by every benchmark: fixed-seed random prompts and output lengths.

Prompts are random token ids (no special tokens) so that lengths are exact; outputs ignore EOS
so every request generates exactly its output length.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    max_tokens: int


def make_workload(num_requests: int = 64, prompt_len: tuple[int, int] = (32, 512),
                  output_len: tuple[int, int] = (16, 256), vocab_size: int = 49152,
                  seed: int = 0, first_token_id: int = 100) -> list[BenchRequest]:
    rng = random.Random(seed)
    requests = []
    for _ in range(num_requests):
        n = rng.randint(*prompt_len)
        prompt = [rng.randrange(first_token_id, vocab_size) for _ in range(n)]
        requests.append(BenchRequest(prompt, rng.randint(*output_len)))
    return requests


# Batch-1 latency: one 256-token prompt, its prefill alone (one output token), then 128 more.
BATCH1_PROMPT_TOKENS, BATCH1_DECODE_TOKENS = 256, 128


def batch1_latency(generate) -> tuple[float, float]:
    """(ms to prefill the prompt, ms per decoded token), best of three, for
    `generate(prompt_token_ids, max_tokens)` that runs one request to completion. Every call
    gets a prompt of its own (same length, other tokens), so no engine answers from a prefix
    cache what it is meant to compute."""
    def prompt(seed: int) -> list[int]:
        return make_workload(1, (BATCH1_PROMPT_TOKENS,) * 2, (1, 1), seed=seed)[0].prompt_token_ids

    prefill, decode = float("inf"), float("inf")
    for trial in range(3):
        start = time.perf_counter()
        generate(prompt(2 * trial + 1), 1)
        first = time.perf_counter() - start
        start = time.perf_counter()
        generate(prompt(2 * trial + 2), 1 + BATCH1_DECODE_TOKENS)
        whole = time.perf_counter() - start
        prefill = min(prefill, first)
        decode = min(decode, (whole - first) / BATCH1_DECODE_TOKENS)
    return 1000 * prefill, 1000 * decode

"""The benchmark workload shared by every benchmark: fixed-seed random prompts and output lengths.

Prompts are random token ids (no special tokens) so that lengths are exact; outputs ignore EOS
so every request generates exactly its output length.
"""

from __future__ import annotations

import random
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

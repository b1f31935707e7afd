"""The benchmark's batch-1 timing measures computation, not a cache."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.workload import BATCH1_DECODE_TOKENS, BATCH1_PROMPT_TOKENS, batch1_latency  # noqa: E402


def test_every_batch1_call_gets_a_prompt_of_its_own():
    """A repeated prompt would be answered from a prefix cache (shardserve's, vLLM's): each
    call must get distinct tokens of the same length."""
    calls = []
    batch1_latency(lambda prompt, n: calls.append((tuple(prompt), n)))
    assert [n for _, n in calls] == [1, 1 + BATCH1_DECODE_TOKENS] * 3
    prompts = [p for p, _ in calls]
    assert all(len(p) == BATCH1_PROMPT_TOKENS for p in prompts)
    assert len(set(prompts)) == len(prompts)

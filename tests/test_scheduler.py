"""Scheduling decisions (pure Python, no model): admission, budgets, preemption, static mode."""

from __future__ import annotations

from shardserve.cluster.kv_manager import KVCacheManager
from shardserve.cluster.scheduler import Scheduler
from shardserve.cluster.sequence import Sequence, SequenceStatus
from shardserve.workers.step import SamplingParams


def seq(seq_id: int, prompt_len: int) -> Sequence:
    return Sequence(seq_id, str(seq_id), list(range(prompt_len)), SamplingParams(), 0, 0.0)


def advance(scheduled) -> None:
    """What the engine does after a step: mark tokens computed, append a sampled token."""
    for item in scheduled:
        sampled = item.samples
        item.seq.num_computed_tokens += item.num_tokens
        if sampled:
            item.seq.output_token_ids.append(0)


def test_prefill_and_decode_share_a_step():
    sched = Scheduler(KVCacheManager(100, 4), max_num_seqs=8, max_num_batched_tokens=64)
    a = seq(0, 10)
    sched.add(a)
    advance(sched.schedule())  # a's prefill
    b = seq(1, 20)
    sched.add(b)
    step = sched.schedule()
    assert [(s.seq.seq_id, s.num_tokens) for s in step] == [(0, 1), (1, 20)]


def test_token_budget_chunks_a_long_prompt():
    sched = Scheduler(KVCacheManager(100, 4), max_num_seqs=8, max_num_batched_tokens=16)
    a = seq(0, 40)
    sched.add(a)
    chunks = []
    while not a.output_token_ids:
        step = sched.schedule()
        chunks.append(step[0].num_tokens)
        assert step[0].samples == (sum(chunks) == 40)
        advance(step)
    assert chunks == [16, 16, 8]


def test_max_num_seqs_caps_the_running_set():
    sched = Scheduler(KVCacheManager(100, 4), max_num_seqs=2, max_num_batched_tokens=1000)
    for i in range(3):
        sched.add(seq(i, 4))
    assert len(sched.schedule()) == 2
    assert len(sched.waiting) == 1


def test_the_newest_sequence_is_preempted_when_blocks_run_out():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=1000)
    old, new = seq(0, 8), seq(1, 4)
    sched.add(old)
    sched.add(new)
    advance(sched.schedule())  # old: 2 blocks + 1 token, new: 1 block; 1 block free after
    # Both need one more block for their next token; only one is free.
    for _ in range(4):
        step = sched.schedule()
        advance(step)
    assert new.num_preemptions >= 1 and old.num_preemptions == 0
    assert new.status is SequenceStatus.WAITING and new.num_computed_tokens == 0
    assert sched.waiting[0] is new  # it comes back first


def test_static_policy_admits_only_when_the_batch_is_done():
    sched = Scheduler(KVCacheManager(100, 4), max_num_seqs=2, max_num_batched_tokens=1000,
                      policy="static")
    a, b, c = seq(0, 4), seq(1, 4), seq(2, 4)
    for s in (a, b, c):
        sched.add(s)
    advance(sched.schedule())
    assert {s.seq_id for s in sched.running} == {0, 1}
    sched.finish(a, "length")
    step = sched.schedule()
    assert [s.seq.seq_id for s in step] == [1]  # c waits although a slot is free
    sched.finish(b, "length")
    assert [s.seq.seq_id for s in sched.schedule()] == [2]


def test_finish_frees_blocks_at_once():
    kv = KVCacheManager(10, 4)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=100)
    a = seq(0, 10)
    sched.add(a)
    advance(sched.schedule())
    assert kv.num_free_blocks < 10
    sched.finish(a, "abort")
    assert kv.num_free_blocks == 10 and not sched.has_unfinished()

"""Prefix caching: block names, sharing, eviction and counts (no model); then greedy tokens
equal to transformers' with the cache on, in mixed batches, with preemption and chunked
prefill; a second request with the same long prefix computes only its new tokens."""

from __future__ import annotations

import time

import pytest
import torch
from tiny import VOCAB, hf_greedy, shared_prefix_prompts

from shardserve import LLM, SamplingParams
from shardserve.cluster.kv_manager import KVCacheManager, block_hashes
from shardserve.cluster.scheduler import Scheduler
from shardserve.cluster.sequence import Sequence


def computed(kv: KVCacheManager, seq_id: int, tokens: list[int]) -> None:
    """What the engine does once a sequence's tokens are in the shards' caches."""
    assert kv.allocate(seq_id, len(tokens))
    kv.cache_computed_blocks(seq_id, len(tokens), lambda a, b: tokens[a:b])


def test_a_block_name_covers_every_token_before_it():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = block_hashes([9, 2, 3, 4, 5, 6, 7, 8], 4)
    assert len(a) == 2 and a[0] != b[0]
    assert a[1] != b[1], "same tokens after a different prefix must not share a name"
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 4) == a  # a partial block has no name
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4, start=1, parent=a[0]) == a[1:]


def test_a_new_sequence_starts_with_the_cached_blocks_of_its_prefix():
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=True)
    first = list(range(100, 110))  # two full blocks and two tokens
    computed(kv, 0, first)
    assert kv.num_cached_blocks == 2
    second = first[:8] + [7, 7, 7]
    assert kv.cached_prefix_len(second) == 8
    assert kv.share_cached_prefix(1, second) == 8
    assert kv.block_table(1) == kv.block_table(0)[:2]
    # a prompt that is all cached still computes its last token (for its logits)
    assert kv.share_cached_prefix(2, first[:8]) == 4
    for seq_id in (0, 1, 2):
        kv.free(seq_id)
    assert kv.num_free_blocks == kv.num_blocks  # cached blocks are free for the taking
    assert kv.num_cached_blocks == 2


def test_cached_blocks_are_evicted_least_recently_used_when_the_pool_is_needed():
    kv = KVCacheManager(num_blocks=6, block_size=4, enable_prefix_caching=True)
    old, new = list(range(8)), list(range(50, 58))
    computed(kv, 0, old)
    kv.free(0)
    computed(kv, 1, new)
    kv.free(1)
    assert kv.num_cached_blocks == 4
    assert kv.allocate(2, 8)  # the two unnamed blocks go first: nothing evicted
    assert kv.allocator.num_evicted == 0 and kv.num_cached_blocks == 4
    assert kv.allocate(3, 4)  # now the least recently used: the tail of `old`
    assert kv.allocator.num_evicted == 1
    assert kv.cached_prefix_len(old + [0]) == 4 and kv.cached_prefix_len(new + [0]) == 8
    kv.free(2)
    kv.free(3)
    kv.drop_prefix_cache()
    assert kv.num_cached_blocks == 0 and kv.num_free_blocks == kv.num_blocks
    assert kv.cached_prefix_len(new + [0]) == 0


def test_off_means_no_names_and_no_hits():
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    computed(kv, 0, list(range(12)))
    assert kv.num_cached_blocks == 0 and kv.share_cached_prefix(1, list(range(13))) == 0


def test_the_scheduler_computes_only_what_the_cache_lacks():
    kv = KVCacheManager(num_blocks=20, block_size=4, enable_prefix_caching=True)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64)
    prefix = list(range(200, 216))
    a = Sequence(0, "a", prefix + [1, 2], SamplingParams(), 0, 0.0)
    sched.add(a)
    (item,) = sched.schedule()
    assert item.num_tokens == 18
    a.num_computed_tokens += item.num_tokens
    kv.cache_computed_blocks(a.seq_id, a.num_computed_tokens, a.token_ids)
    b = Sequence(1, "b", prefix + [3, 4, 5], SamplingParams(), 0, 0.0)
    sched.add(b)
    a.output_token_ids.append(9)
    step = sched.schedule()
    assert [(s.seq.request_id, s.num_tokens) for s in step] == [("a", 1), ("b", 3)]
    assert b.num_computed_tokens == 16 and b.num_cached_tokens == 16
    assert kv.block_table(1)[:4] == kv.block_table(0)[:4]
    assert (sched.prefix_queried_tokens, sched.prefix_hit_tokens) == (18 + 19, 16)


def test_a_sequence_that_cannot_be_admitted_gives_its_cached_blocks_back():
    kv = KVCacheManager(num_blocks=5, block_size=4, enable_prefix_caching=True)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64)
    prefix = list(range(8))
    computed(kv, 99, prefix)
    kv.free(99)
    holder = Sequence(0, "holder", list(range(300, 312)), SamplingParams(), 0, 0.0)
    sched.add(holder)
    sched.schedule()  # three of the five blocks: the unnamed ones first
    big = Sequence(1, "big", prefix + list(range(40, 52)), SamplingParams(), 0, 0.0)
    sched.add(big)
    assert [s.seq.request_id for s in sched.schedule()] == ["holder"]
    assert big.num_computed_tokens == 0 and kv.block_table(1) == []
    assert kv.num_free_blocks == 2 and kv.num_cached_blocks == 2


# --- with a model --------------------------------------------------------------------------

def greedy(llm: LLM, prompts, max_tokens):
    results = llm.generate(prompts, [SamplingParams(max_tokens=n, temperature=0)
                                     for n in max_tokens])
    kv = llm.engine.kv
    assert kv.num_free_blocks == kv.num_blocks, "blocks leaked after the run"
    return results


@pytest.mark.parametrize("options", [
    {},
    {"max_num_batched_tokens": 24},  # prefixes computed in chunks, beside decodes
    {"num_kv_blocks": 14},  # preemption: recomputed sequences find their own blocks cached
    {"scheduling_policy": "static", "max_num_seqs": 3},
], ids=["mixed", "chunked", "preemption", "static"])
def test_greedy_tokens_are_transformers_with_the_cache_on_and_off(tiny_model, options):
    model_dir = tiny_model("llama-gqa")
    prompts, max_tokens = shared_prefix_prompts(8)
    expected = hf_greedy(model_dir, prompts, max_tokens)
    for enabled in (True, False):
        llm = LLM(str(model_dir), dtype="float32", block_size=8,
                  enable_prefix_caching=enabled, **options)
        first = greedy(llm, prompts, max_tokens)
        again = greedy(llm, prompts[::-1], max_tokens[::-1])[::-1]  # now all cached
        assert [r.token_ids for r in first] == expected
        assert [r.token_ids for r in again] == expected
        hits = llm.engine.scheduler.prefix_hit_tokens
        if enabled:
            assert hits > 0 and llm.engine.kv.num_cached_blocks > 0
            assert all(r.num_cached_tokens > 0 for r in again)
        else:
            assert hits == 0 and llm.engine.kv.num_cached_blocks == 0
        if "num_kv_blocks" in options:
            assert llm.engine.scheduler.num_preemptions > 0


def test_the_cache_is_evicted_for_new_work_and_dropped_on_demand(tiny_model):
    model_dir = tiny_model("llama-mqa")
    llm = LLM(str(model_dir), dtype="float32", block_size=8, num_kv_blocks=16)
    g = torch.Generator().manual_seed(5)
    for _ in range(4):  # 4 x 64 tokens of distinct prompts through a 128-token pool
        prompt = torch.randint(2, VOCAB - 1, (60,), generator=g).tolist()
        greedy(llm, [prompt], [4])
    assert llm.engine.kv.allocator.num_evicted > 0
    assert llm.engine.kv.num_cached_blocks <= llm.engine.kv.num_blocks
    llm.engine.kv.drop_prefix_cache()
    assert llm.engine.kv.num_cached_blocks == 0
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_a_second_request_with_the_same_long_prefix_computes_only_its_new_tokens():
    """SmolLM2 with a ~400-token system prompt: the second question's prompt is served from
    the cache but for its last block or so, and its first token comes several times sooner."""
    llm = LLM(dtype="float32", num_threads=2)
    system = ("You are a careful assistant. Answer briefly and exactly. " * 40).strip()

    def ask(question):
        start = time.perf_counter()
        result = llm.chat([{"role": "system", "content": system},
                           {"role": "user", "content": question}],
                          SamplingParams(max_tokens=1, temperature=0))[0]
        return result, time.perf_counter() - start

    ask("Warm up?")  # first-call costs (threads, buffers) out of the timing
    llm.engine.kv.drop_prefix_cache()
    cold, cold_s = ask("What is the capital of France?")
    hits_before = llm.engine.scheduler.prefix_hit_tokens
    warm, warm_s = ask("What is the capital of Italy?")
    hits = llm.engine.scheduler.prefix_hit_tokens - hits_before
    _, again_s = ask("What is the capital of Spain?")
    warm_s = min(warm_s, again_s)  # the machine is shared: one slow call is not the cache's
    prompt_len = len(warm.prompt_token_ids)
    assert prompt_len > 400 and cold.num_cached_tokens == 0
    new_tokens = prompt_len - warm.num_cached_tokens
    assert new_tokens <= 2 * llm.engine.kv.block_size + 16, new_tokens
    assert hits == warm.num_cached_tokens
    assert warm_s * 3 < cold_s, (warm_s, cold_s)

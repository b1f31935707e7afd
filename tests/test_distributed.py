"""Shards as Ray actors on a local multi-node Ray cluster: every layout gives transformers'
greedy tokens; a killed shard is replaced and its requests recomputed."""

from __future__ import annotations

import time

import pytest
import ray
from tiny import hf_greedy, mixed_prompts, shared_prefix_prompts

from shardserve import LLM, SamplingParams


def serve(model_dir, **options) -> LLM:
    return LLM(str(model_dir), use_ray=True, dtype="float32", num_threads=1,
               num_cpus_per_shard=1, **options)


def nodes_of(llm: LLM) -> list[list[str]]:
    """Node id of every shard, as [stage][rank]."""
    info = llm.engine.executor.describe()["shards"]
    pp = llm.engine.config.parallel.pipeline_parallel_size
    tp = llm.engine.config.parallel.tensor_parallel_size
    return [[info[s * tp + r]["node_id"] for r in range(tp)] for s in range(pp)]


LAYOUTS = [
    # variant, tp, pp, sequence_parallel, placement
    ("llama-mha", 2, 1, False, "STRICT_SPREAD"),
    ("llama-gqa", 1, 2, False, "STRICT_SPREAD"),
    ("llama-gqa", 2, 2, False, "stage"),
    ("llama-mqa", 2, 2, False, "stage"),  # one KV head, replicated on both ranks
    ("llama-gqa-untied", 2, 1, False, "STRICT_SPREAD"),  # 6 heads / 3 KV: a KV head shared
    ("qwen2-gqa", 2, 2, False, "stage"),
    ("llama-mha", 2, 1, True, "STRICT_SPREAD"),
    ("llama-gqa", 2, 2, True, "stage"),
]


@pytest.mark.parametrize("variant, tp, pp, sp, placement", LAYOUTS)
def test_layouts_match_transformers(ray_cluster, tiny_model, variant, tp, pp, sp, placement):
    model_dir = tiny_model(variant)
    prompts, max_tokens = mixed_prompts()
    expected = hf_greedy(model_dir, prompts, max_tokens)
    llm = serve(model_dir, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                sequence_parallel=sp, placement_strategy=placement)
    try:
        nodes = nodes_of(llm)
        if placement == "STRICT_SPREAD":
            flat = [n for stage in nodes for n in stage]
            assert len(set(flat)) == len(flat), "shards should sit on different nodes"
        else:
            assert all(len(set(stage)) == 1 for stage in nodes), "a TP group shares a node"
            assert len({stage[0] for stage in nodes}) == pp, "stages on different nodes"
        results = llm.generate(prompts, [SamplingParams(max_tokens=n, temperature=0)
                                         for n in max_tokens])
        assert [r.token_ids for r in results] == expected
        assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks
    finally:
        llm.shutdown()


def test_preemption_across_shards(ray_cluster, tiny_model):
    model_dir = tiny_model("llama-gqa")
    prompts, max_tokens = mixed_prompts(8)
    expected = hf_greedy(model_dir, prompts, max_tokens)
    llm = serve(model_dir, tensor_parallel_size=2, pipeline_parallel_size=2,
                num_kv_blocks=20, block_size=8, micro_batches=3)
    try:
        results = llm.generate(prompts, [SamplingParams(max_tokens=n, temperature=0)
                                         for n in max_tokens])
        assert llm.engine.scheduler.num_preemptions > 0
        assert [r.token_ids for r in results] == expected
        assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks
    finally:
        llm.shutdown()


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2), (2, 2)])
def test_prefix_caching_in_every_layout(ray_cluster, tiny_model, tp, pp):
    """Shared prefixes across shards, with preemption: one block table decision, every shard
    reads the same cached blocks; tokens equal transformers' the first time and when cached."""
    model_dir = tiny_model("llama-gqa")
    prompts, max_tokens = shared_prefix_prompts(8)
    expected = hf_greedy(model_dir, prompts, max_tokens)
    llm = serve(model_dir, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                num_kv_blocks=20, block_size=8)
    try:
        params = [SamplingParams(max_tokens=n, temperature=0) for n in max_tokens]
        assert [r.token_ids for r in llm.generate(prompts, params)] == expected
        again = llm.generate(prompts, params)
        assert [r.token_ids for r in again] == expected
        assert all(r.num_cached_tokens > 0 for r in again)
        assert llm.engine.scheduler.num_preemptions > 0
        assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks
    finally:
        llm.shutdown()


def test_an_error_on_a_rank_reaches_the_engine_at_once_with_its_own_message(ray_cluster,
                                                                            tiny_model):
    """A plan no shard can run (a block outside the pool) fails every rank with its own
    error; the engine hears it in seconds, not after the 120 s collective timeout."""
    from shardserve.cluster.executor import ExecutorError
    from shardserve.workers.step import SequenceStep, StepPlan

    llm = serve(tiny_model("llama-gqa"), tensor_parallel_size=2, num_kv_blocks=16,
                collective_timeout_s=120)
    try:
        executor = llm.engine.executor
        bad = SequenceStep(seq_id=0, token_ids=[5, 6], start_position=0, block_table=[10 ** 6],
                           sample=True, params=SamplingParams(temperature=0), seed=0,
                           num_generated=0)
        start = time.time()
        with pytest.raises(ExecutorError, match=r"a model shard failed: stage 0 rank [01] on .*"
                                                r"(IndexError|RuntimeError).*index"):
            executor.wait_any({0: executor.submit(StepPlan(0, [bad]))})
        assert time.time() - start < 20
    finally:
        llm.shutdown()


def test_a_layout_that_cannot_divide_the_model_fails_at_start(ray_cluster, tiny_model):
    with pytest.raises(ValueError, match="tensor_parallel_size 8 exceeds the 4 attention heads"):
        serve(tiny_model("llama-gqa"), tensor_parallel_size=8)
    with pytest.raises(ValueError, match="pipeline_parallel_size 3 exceeds the 2 layers"):
        serve(tiny_model("llama-gqa"), pipeline_parallel_size=3)


def _step_until_tokens(engine, count: int) -> list:
    outputs = []
    while sum(len(o.delta_token_ids) for o in outputs) < count:
        outputs += engine.step()
    return outputs


def test_killed_shard_is_replaced_and_requests_recomputed(ray_cluster, tiny_model):
    model_dir = tiny_model("llama-gqa")
    prompts, max_tokens = mixed_prompts(4)
    expected = hf_greedy(model_dir, prompts, max_tokens)
    llm = serve(model_dir, tensor_parallel_size=2, pipeline_parallel_size=2)
    engine = llm.engine
    try:
        for i, (p, n) in enumerate(zip(prompts, max_tokens)):
            engine.add_request(f"r{i}", p, SamplingParams(max_tokens=n, temperature=0))
        outputs = _step_until_tokens(engine, 8)
        victim = engine.executor.stages[1][1]
        ray.kill(victim)
        while engine.has_unfinished():
            outputs += engine.step()
        final = {o.request_id: o for o in outputs if o.finished}
        assert all(o.error is None for o in final.values())
        assert [final[f"r{i}"].token_ids for i in range(4)] == expected
        assert engine.executor.stages[1][1] != victim
        assert engine.kv.num_free_blocks == engine.kv.num_blocks
    finally:
        llm.shutdown()


def test_second_failure_ends_requests_with_an_error_and_the_engine_serves_again(
        ray_cluster, tiny_model):
    model_dir = tiny_model("llama-gqa")
    prompts, _ = mixed_prompts(3)
    llm = serve(model_dir, tensor_parallel_size=2)
    engine = llm.engine
    try:
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, SamplingParams(max_tokens=100, temperature=0,
                                                          ignore_eos=True))
        outputs = _step_until_tokens(engine, 3)
        ray.kill(engine.executor.stages[0][0])
        outputs += engine.step()  # recovered: requests are recomputed
        outputs += _step_until_tokens(engine, 3)
        ray.kill(engine.executor.stages[0][1])
        while engine.has_unfinished():
            outputs += engine.step()
        failed = [o for o in outputs if o.finished]
        assert len(failed) == 3
        # The error names the rank that died, not its peer's broken collective.
        assert all(o.finish_reason == "error" and "model shard failed: stage 0 rank 1" in o.error
                   and "process died" in o.error for o in failed), failed[0].error
        assert engine.kv.num_free_blocks == engine.kv.num_blocks
        again = llm.generate([prompts[0]], SamplingParams(max_tokens=5, temperature=0))[0]
        assert again.token_ids == hf_greedy(model_dir, [prompts[0]], [5])[0]
    finally:
        llm.shutdown()

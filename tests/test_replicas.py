"""Replicas keep the server available: one replica's node goes away, the other serves."""

from __future__ import annotations

import threading
import time

import ray

from conftest import WORKER_NODES, add_worker_node, restore_worker_nodes
from test_server import metrics, start, wait_for
from tiny import mixed_prompts

from shardserve import LLM, SamplingParams


def node_named(cluster, node_id: str):
    return next(n for n in cluster.worker_nodes if n.node_id == node_id)


def test_a_dead_replica_is_skipped_its_requests_move_and_it_comes_back(ray_cluster, tiny_model):
    """Replica 1's node goes away while requests stream on both replicas: its requests move to
    replica 0 and finish with the right tokens, new requests keep succeeding, health stays
    SERVING, ModelInfo and the metrics say replica 1 is down, and it restarts by itself once
    the cluster has room again."""
    model_dir = tiny_model("llama-gqa")
    client, info, stop = start(model_dir, replicas=2, tensor_parallel_size=2,
                               num_cpus_per_shard=1, placement_timeout_s=3)
    health, watching = [], threading.Event()

    def watch():
        while not watching.is_set():
            health.append(client.health())
            time.sleep(0.1)

    try:
        shards = client.model_info().shards
        nodes = {r: {s.node_id for s in shards if s.replica == r} for r in (0, 1)}
        assert all(len(n) == 1 for n in nodes.values()) and nodes[0] != nodes[1]
        victim = node_named(ray_cluster, next(iter(nodes[1])))
        victim_resources = next(n["Resources"] for n in ray.nodes()
                                if n["NodeID"] == victim.node_id)

        prompts, max_tokens = mixed_prompts(6)
        offline = LLM(str(model_dir), dtype="float32").generate(
            prompts, [SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)] * 6)
        streamed: dict[int, list[int]] = {}
        started = threading.Barrier(7)

        def stream(i):
            ids = []
            for n, chunk in enumerate(client.generate_stream(prompts[i], max_tokens=60,
                                                             temperature=0, ignore_eos=True)):
                ids += chunk.token_ids
                if n == 2:
                    started.wait(timeout=60)
            streamed[i] = ids

        watcher = threading.Thread(target=watch)
        watcher.start()
        threads = [threading.Thread(target=stream, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        started.wait(timeout=60)  # every stream has tokens: both replicas are busy
        ray_cluster.remove_node(victim)
        for t in threads:
            t.join(timeout=120)
        assert [streamed.get(i) for i in range(6)] == [o.token_ids for o in offline]

        wait_for(lambda: client.model_info().replica_states[1].state == "down", timeout=60)
        for prompt, expected in zip(prompts[:3], offline):
            assert list(client.generate(prompt, max_tokens=60, temperature=0,
                                        ignore_eos=True).token_ids) == expected.token_ids
        states = client.model_info().replica_states
        assert [r.state for r in states] == ["serving", "down"]
        assert metrics(info)['shardserve_replica_serving{replica="1"}'] == 0
        assert set(health) == {"SERVING"}

        # The node comes back: the replica restarts in the background and serves again.
        add_worker_node(ray_cluster, next(k for k in victim_resources if k in WORKER_NODES))
        wait_for(lambda: client.model_info().replica_states[1].state == "serving", timeout=90)
        assert client.model_info().replica_states[1].restarts == 1
        wait_for(lambda: metrics(info)['shardserve_replica_serving{replica="1"}'] == 1)
        assert set(health) == {"SERVING"}
    finally:
        watching.set()
        stop()
        restore_worker_nodes(ray_cluster)


def test_requests_sharing_a_prefix_go_to_the_replica_that_has_it_cached(ray_cluster,
                                                                        tiny_model):
    """Replica 1 computes prefix B while replica 0 is busy; once both are idle (equal load,
    where least-loaded would pick replica 0), B's next request still goes to replica 1 and
    is served from its cache."""
    from tiny import shared_prefix_prompts

    client, info, stop = start(tiny_model("llama-gqa"), replicas=2, num_kv_blocks=64,
                               block_size=8)
    try:
        (a, _), (b, b_again) = (shared_prefix_prompts(2, seed=s)[0] for s in (7, 8))
        busy = client.generate_stream(a, max_tokens=200, temperature=0, ignore_eos=True)
        next(busy)  # replica 0 is working on a
        first = client.generate(b, max_tokens=4, temperature=0)
        assert first.usage.cached_prompt_tokens == 0
        assert [r.finished for r in client.model_info().replica_states] == [0, 1]
        for _ in busy:
            pass
        wait_for(lambda: all(r.running == 0 for r in client.model_info().replica_states))
        again = client.generate(b_again, max_tokens=4, temperature=0)
        assert again.usage.cached_prompt_tokens == 40  # the shared prefix, five blocks
        assert [r.finished for r in client.model_info().replica_states] == [1, 2]
        values = metrics(info)
        assert values["shardserve_prefix_cache_hit_tokens_total"] == 40
        assert values['shardserve_kv_blocks_cached{replica="1"}'] >= 5
    finally:
        stop()

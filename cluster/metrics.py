"""Prometheus metrics of the router, served over HTTP by prometheus_client."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        # A registry per router, so several routers in one process (tests) do not collide.
        self.registry = r = CollectorRegistry()
        self.requests = Counter("shardserve_requests", "Requests by outcome: completed, "
                                "cancelled, failed, rejected_invalid, rejected_overloaded",
                                ["outcome"], registry=r)
        self.prompt_tokens = Counter("shardserve_prompt_tokens", "Prompt tokens accepted",
                                     registry=r)
        self.generated_tokens = Counter("shardserve_generated_tokens", "Tokens generated",
                                        registry=r)
        self.time_to_first_token = Histogram(
            "shardserve_time_to_first_token_seconds", "Arrival to first generated token",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            "shardserve_inter_token_latency_seconds", "Time between consecutive tokens of a "
            "request", buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("shardserve_queue_depth", "Requests waiting to be scheduled",
                                 ["replica"], registry=r)
        self.running = Gauge("shardserve_running_sequences", "Sequences in the running batch",
                             ["replica"], registry=r)
        self.kv_blocks_used = Gauge("shardserve_kv_blocks_used", "KV cache blocks in use",
                                    ["replica"], registry=r)
        self.kv_blocks_total = Gauge("shardserve_kv_blocks_total", "KV cache blocks in the pool",
                                     ["replica"], registry=r)
        # prefix caching: hit rate = hit / queried
        self.kv_blocks_cached = Gauge("shardserve_kv_blocks_cached", "KV cache blocks holding a "
                                      "reusable prefix (in use or not)", ["replica"], registry=r)
        self.prefix_queried_tokens = Counter("shardserve_prefix_cache_queried_tokens",
                                             "Tokens of admitted sequences looked up in the "
                                             "prefix cache", registry=r)
        self.prefix_hit_tokens = Counter("shardserve_prefix_cache_hit_tokens",
                                         "Tokens of admitted sequences whose KV the prefix "
                                         "cache held (not computed again)", registry=r)
        self.replica_serving = Gauge("shardserve_replica_serving", "1 while the replica's "
                                     "shards serve, 0 while they restart or are down",
                                     ["replica"], registry=r)
        self.shard_restarts = Counter("shardserve_shard_restarts", "Times a replica's shards "
                                      "were restarted after a shard failed", ["replica"],
                                      registry=r)
        self.preemptions = Counter("shardserve_preemptions", "Sequences preempted for lack of "
                                   "KV blocks", registry=r)
        # speculative decoding: acceptance rate = accepted / proposed; mean accepted length
        # = (accepted + verified) / verified
        self.speculative_proposed = Counter("shardserve_speculative_proposed_tokens",
                                            "Draft tokens proposed", registry=r)
        self.speculative_ngram_proposed = Counter(
            "shardserve_speculative_ngram_proposed_tokens",
            "Of the draft tokens proposed, those from n-gram lookup", registry=r)
        self.speculative_accepted = Counter("shardserve_speculative_accepted_tokens",
                                            "Draft tokens the model kept", registry=r)
        self.speculative_verified = Counter("shardserve_speculative_verified",
                                            "Sequence-steps that verified drafts", registry=r)
        self.speculative_disabled = Counter("shardserve_speculative_disabled_steps",
                                            "Steps without speculation because more "
                                            "sequences ran or waited than "
                                            "speculative.disable_above_batch",
                                            registry=r)
        self.speculative_seconds = Counter("shardserve_speculative_seconds",
                                           "Time proposing drafts (phase=draft) and in the "
                                           "steps that verified them (phase=verify)",
                                           ["phase"], registry=r)
        self._http = None

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint (/metrics); returns the bound port."""
        self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

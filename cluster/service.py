"""The server actor: router, gRPC server, OpenAI-compatible HTTP API and metrics endpoint in
one Ray actor process.

`shardserve serve` starts one on its own node (so the address it prints is reachable where the
user ran it); the actor places the shards, starts serving and reports where it listens. On
SIGTERM the command calls `drain`: health goes NOT_SERVING, new requests are refused, those
in flight get `server.drain_grace_s` to finish.

API keys arrive as an argument: the actor runs in a Ray worker process, which does not see
the environment `shardserve serve` was started with (SHARDSERVE_API_KEY). TLS files are read
here; the actor runs on the node the command runs on.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict, dataclass

from .auth import server_credentials
from .config import EngineConfig, ServerConfig
from .openai_api import start_http_server
from .router import Router
from .server import start_grpc_server

log = logging.getLogger(__name__)

HEALTH_POLL_S = 1.0
# After a drain, how long the gRPC server waits for the last messages of ended calls to go out.
GRPC_STOP_GRACE_S = 5.0


@dataclass
class Listening:
    grpc_port: int
    metrics_port: int | None
    http_port: int | None
    host: str
    metrics_host: str
    node_ip: str
    # What `auto` settings resolved to on the shards, and why; printed at start.
    dtype: str
    dtype_reason: str
    kv_cache_dtype: str
    quantization: str
    sparsity: str
    weight_bytes: int  # summed over one replica's shards
    cpu_gemm: str  # the CPU weight layout and why ("" on GPU)
    cpu_gemm_reason: str
    kv_cache_tokens: int
    threads: int


class ServerActor:
    def __init__(self, engine_config: EngineConfig, server_config: ServerConfig,
                 api_keys: frozenset[str] = frozenset()):
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.engine_config = engine_config
        self.server_config = server_config
        self._api_keys = api_keys
        self.router: Router | None = None
        self._grpc = None
        self._http = None
        self._reporter = None
        self._health_task = None

    async def start(self) -> dict:
        import ray

        c = self.server_config
        credentials = server_credentials(c)  # a bad file fails before the shards load
        # Loading shards blocks; keep the event loop free while it happens.
        self.router = await asyncio.get_running_loop().run_in_executor(
            None, Router, self.engine_config, c.address)
        self._grpc, port, self._reporter = await start_grpc_server(
            self.router, self.engine_config.model, c.host, c.port, c.limits, credentials,
            self._api_keys)
        http_port = None
        if c.http_port is not None:
            # The same keys and certificate as gRPC: one policy for who may call.
            self._http, http_port = await start_http_server(
                self.router, self.engine_config.model, c.host, c.http_port, c.limits,
                self._api_keys, c.tls_cert_file, c.tls_key_file)
        metrics_port, metrics_host = None, c.metrics_host or c.host
        if c.metrics_port is not None:
            metrics_port = self.router.metrics.serve(metrics_host, c.metrics_port)
        self._health_task = asyncio.create_task(self._watch_health(self._reporter))
        shards = self.router.engine.executor.describe()["shards"]
        shard = shards[0]
        listening = Listening(port, metrics_port, http_port, c.host, metrics_host,
                              ray.util.get_node_ip_address(),
                              shard["dtype"], shard["dtype_reason"], shard["kv_cache_dtype"],
                              shard["quantization"], shard["sparsity"], sum(s["weight_bytes"] for s in shards),
                              shard["cpu_gemm"], shard["cpu_gemm_reason"],
                              self.router.engine.kv.capacity_tokens, shard["threads"])
        log.info("serving %s on %s:%d (%s, API keys %s)", self.engine_config.model, c.host, port,
                 "TLS" if credentials else "plaintext", "on" if self._api_keys else "off")
        return asdict(listening)

    async def _watch_health(self, reporter) -> None:
        serving = None
        while True:
            try:
                healthy = self.router.healthy and not self.router.draining
                if healthy != serving:
                    await reporter.set(healthy)
                    log.info("health: %s", "SERVING" if healthy else "NOT_SERVING")
                    serving = healthy
            except Exception:  # noqa: BLE001 - keep reporting whatever happens
                log.exception("health reporting failed")
            await asyncio.sleep(HEALTH_POLL_S)

    async def ping(self) -> bool:
        return True

    async def drain(self, grace_s: float) -> int:
        """Stop taking requests and let those in flight finish for up to grace_s seconds;
        returns how many were aborted because they were still running then."""
        log.info("draining: health NOT_SERVING, no new requests, %d in flight get %.1f s",
                 self.router.num_in_flight, grace_s)
        self.router.draining = True
        await self._reporter.set(False)
        aborted = await self.router.drain(grace_s)
        if self._http is not None:
            await self._http.stop()
            self._http = None
        if self._grpc is not None:
            await self._grpc.stop(grace=GRPC_STOP_GRACE_S)
            self._grpc = None
        log.info("drained (%d request(s) aborted)", aborted)
        return aborted

    async def stop(self) -> None:
        if self._health_task:
            self._health_task.cancel()
        if self._http is not None:
            await self._http.stop()
        if self._grpc is not None:
            await self._grpc.stop(grace=5)
        if self.router is not None:
            self.router.metrics.stop()
            await asyncio.get_running_loop().run_in_executor(None, self.router.stop)


def start_server_actor(engine_config: EngineConfig, server_config: ServerConfig,
                       api_keys: frozenset[str] = frozenset()):
    """Create the server actor on this node and start it; returns (actor, listening info).
    api_keys: cluster/auth.py load_api_keys, loaded where the environment is."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from .launch import describe_ray_error

    actor = ray.remote(ServerActor).options(
        num_cpus=0, max_concurrency=10_000, max_restarts=0,
        # Our blocking ray.get calls run on engine-loop threads, never on the event loop.
        runtime_env={"env_vars": {"RAY_WARN_BLOCKING_GET_INSIDE_ASYNC": "0"}},
        scheduling_strategy=NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False),
    ).remote(engine_config, server_config, api_keys)
    try:
        info = ray.get(actor.start.remote())
    except ray.exceptions.RayError as e:
        ray.kill(actor)
        raise RuntimeError(f"the server did not start: {describe_ray_error(e)}") from None
    return actor, info

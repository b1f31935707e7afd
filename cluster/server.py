"""The gRPC front end: the Generation service, grpc.health.v1 and server reflection.

Every request is checked before it is queued: its bytes must parse, its fields must be within
the server's limits (`server.limits`) and valid for the model. Bad input gets
INVALID_ARGUMENT with a message that names the field or the limit, a full queue
RESOURCE_EXHAUSTED, no serving replica (or a server that is draining) UNAVAILABLE. A client
that cancels or disconnects, or whose deadline passes, has its request aborted; so has one
named in an Abort call from any connection (its call ends with finish reason ABORT). Anything
unexpected while handling a request ends that request alone with INTERNAL (and frees its
blocks); the server goes on. With API keys (cluster/auth.py) the Generation service refuses
calls without one UNAUTHENTICATED; health and reflection stay open.

The Generation methods take raw bytes and parse them here, so that a message that does not
parse is the client's error (INVALID_ARGUMENT), not the UNKNOWN grpc would answer.
Admission (admission.py, shared with the HTTP API) tokenizes and applies chat templates on
worker threads, so a large prompt never stalls other streams or health checks.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shardserve.proto import shardserve_pb2 as pb
from shardserve.workers.step import SamplingParams

from .admission import Admission
from .auth import ApiKeyInterceptor
from .engine import EngineUnavailableError
from .limits import RequestLimits, check_request
from .outputs import RequestOutput, TokenLogprob
from .router import DRAINING_MESSAGE, OverloadedError, Router

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name
FINISH_REASONS = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
                  "abort": pb.FINISH_REASON_ABORT}


def sampling_params(request: pb.GenerateRequest) -> SamplingParams:
    """The request's sampling options, with the server defaults for unset fields."""
    options = {}
    for name in ("max_tokens", "temperature", "top_k", "top_p", "seed", "logprobs",
                 "speculative_tokens"):
        if request.HasField(name):
            options[name] = getattr(request, name)
    return SamplingParams(stop=tuple(request.stop), stop_token_ids=tuple(request.stop_token_ids),
                          ignore_eos=request.ignore_eos, **options)


def _logprobs(entries: list[TokenLogprob] | None) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=e.token_id, logprob=e.logprob,
                            top_logprobs=[pb.TopLogprob(token_id=t, logprob=lp)
                                          for t, lp in e.top_logprobs])
            for e in entries or []]


def _chat_messages(request: pb.GenerateRequest) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in request.chat.messages]


class GenerationServicer:
    def __init__(self, router: Router, model_name: str, limits: RequestLimits):
        self.router = router
        self.model_name = model_name
        self.limits = limits
        self.admission = Admission(router, limits)

    async def _start(self, request: pb.GenerateRequest, label: str,
                     context) -> AsyncIterator[RequestOutput]:
        """Check and submit; aborts the RPC with the right status on bad input."""
        if self.router.draining:  # before any work is done for it
            await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)
        try:
            kind = request.WhichOneof("prompt")
            params = sampling_params(request)
            token_ids = await self.admission.prompt_tokens(
                text=request.text if kind == "text" else None,
                token_ids=request.token_ids.ids if kind == "token_ids" else None,
                chat=_chat_messages(request) if kind == "chat" else None,
                stop=params.stop, stop_token_ids=params.stop_token_ids,
                request_id=request.request_id)
            await self.admission.validate(token_ids, params)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if not self.router.healthy:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "no replica is serving: the model shards are down; retry later")
        return self.router.generate(token_ids, params, label)

    async def _outputs(self, request, label: str, context) -> AsyncIterator[RequestOutput]:
        stream = await self._start(request, label, context)
        try:
            async for out in stream:
                if out.error:
                    code = grpc.StatusCode[(out.error_code or "internal").upper()]
                    await context.abort(code, out.error)
                yield out
        except OverloadedError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except EngineUnavailableError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        finally:
            await stream.aclose()

    # --- the methods ------------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        label = request.request_id or _server_request_id()
        text, token_ids, logprobs, final = [], [], [], None
        async for out in self._outputs(request, label, context):
            text.append(out.delta_text)
            token_ids += out.delta_token_ids
            logprobs += out.logprobs or []
            final = out
        ttft = (final.first_token_time - final.arrival_time) if final.first_token_time else 0.0
        return pb.GenerateResponse(
            request_id=label, text="".join(text), token_ids=token_ids,
            finish_reason=FINISH_REASONS.get(final.finish_reason, 0),
            usage=pb.Usage(prompt_tokens=len(final.prompt_token_ids),
                           completion_tokens=len(token_ids),
                           draft_tokens=final.num_draft_tokens,
                           accepted_draft_tokens=final.num_accepted_tokens,
                           cached_prompt_tokens=final.num_cached_tokens,
                           speculative_steps=final.num_verify_steps,
                           draft_seconds=final.draft_seconds,
                           verify_seconds=final.verify_seconds),
            logprobs=_logprobs(logprobs), time_to_first_token_s=ttft)

    async def GenerateStream(self, request: pb.GenerateRequest, context
                             ) -> AsyncIterator[pb.GenerateStreamResponse]:
        label = request.request_id or _server_request_id()
        generated = 0
        async for out in self._outputs(request, label, context):
            generated += len(out.delta_token_ids)
            message = pb.GenerateStreamResponse(
                request_id=label, text=out.delta_text, token_ids=out.delta_token_ids,
                logprobs=_logprobs(out.logprobs))
            if out.finished:
                message.finish_reason = FINISH_REASONS.get(out.finish_reason, 0)
                message.usage.prompt_tokens = len(out.prompt_token_ids)
                message.usage.completion_tokens = generated
                message.usage.draft_tokens = out.num_draft_tokens
                message.usage.accepted_draft_tokens = out.num_accepted_tokens
                message.usage.cached_prompt_tokens = out.num_cached_tokens
                message.usage.speculative_steps = out.num_verify_steps
                message.usage.draft_seconds = out.draft_seconds
                message.usage.verify_seconds = out.verify_seconds
            yield message

    async def ModelInfo(self, request: pb.ModelInfoRequest, context) -> pb.ModelInfoResponse:
        router, engine = self.router, self.router.engine
        c, shape = router.config, engine.shape
        shards = []
        for replica, e in enumerate(router.engines):
            tp = c.parallel.tensor_parallel_size
            for index, info in enumerate(e.executor.describe()["shards"]):
                shards.append(pb.ShardInfo(
                    pipeline_stage=index // tp, tensor_rank=index % tp, replica=replica,
                    node_id=info.get("node_id") or "", hostname=info.get("hostname", ""),
                    device=info.get("device", ""), first_layer=info["layers"][0],
                    end_layer=info["layers"][1]))
        replicas = [pb.ReplicaInfo(replica=r.replica, state=r.state, restarts=r.restarts,
                                   running=r.running, waiting=r.waiting, finished=r.finished)
                    for r in router.replicas()]
        first_shard = engine.executor.describe()["shards"][0]
        return pb.ModelInfoResponse(
            model=self.model_name, architecture=shape.architecture,
            dtype=first_shard["dtype"], kv_cache_dtype=first_shard["kv_cache_dtype"],
            quantization=first_shard["quantization"], sparsity=first_shard["sparsity"],
            weight_bytes=sum(s["weight_bytes"] for s in engine.executor.describe()["shards"]),
            vocab_size=shape.vocab_size,
            max_model_len=engine.max_model_len, num_layers=shape.num_layers,
            num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
            tensor_parallel_size=c.parallel.tensor_parallel_size,
            pipeline_parallel_size=c.parallel.pipeline_parallel_size,
            replicas=c.parallel.replicas, sequence_parallel=c.parallel.sequence_parallel,
            kv_block_size=engine.kv.block_size, kv_num_blocks=engine.kv.num_blocks,
            max_num_seqs=c.scheduler.max_num_seqs,
            max_num_batched_tokens=engine.max_num_batched_tokens,
            max_waiting_requests=c.scheduler.max_waiting_requests,
            scheduling_policy=c.scheduler.scheduling_policy, shards=shards,
            eos_token_ids=sorted(engine.eos_token_ids), replica_states=replicas)

    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        try:
            check_request(self.limits, text=request.text)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        tokenizer = self.router.engine.tokenizer

        def tokenize() -> pb.TokenizeResponse:
            ids = tokenizer(request.text,
                            add_special_tokens=request.add_special_tokens).input_ids
            return pb.TokenizeResponse(token_ids=ids, tokens=tokenizer.convert_ids_to_tokens(ids))

        return await self.admission.off_loop(tokenize)

    async def Load(self, request: pb.LoadRequest, context) -> pb.LoadResponse:
        replicas = [pb.ReplicaLoad(replica=r.replica, state=r.state,
                                   kv_blocks_total=r.kv_blocks_total,
                                   kv_blocks_free=r.kv_blocks_free,
                                   kv_blocks_cached=r.kv_blocks_cached, running=r.running,
                                   waiting=r.waiting)
                    for r in self.router.replicas()]
        return pb.LoadResponse(
            replicas=replicas, waiting=sum(r.waiting for r in replicas),
            running=sum(r.running for r in replicas),
            kv_blocks_total=sum(r.kv_blocks_total for r in replicas),
            kv_blocks_free=sum(r.kv_blocks_free for r in replicas),
            kv_blocks_cached=sum(r.kv_blocks_cached for r in replicas),
            draining=self.router.draining)

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        try:
            check_request(self.limits, request_id=request.request_id)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return pb.AbortResponse(aborted=self.router.abort(request.request_id))


def _server_request_id() -> str:
    return f"srv-{uuid.uuid4().hex}"


# --- raw-bytes method handlers --------------------------------------------------------------

async def _parse(message_type, data: bytes, limits: RequestLimits, context):
    if len(data) > limits.max_message_bytes:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"the request message is {len(data):,} bytes, over the server's "
                            f"limit of {limits.max_message_bytes:,} "
                            "(server.limits.max_message_bytes)")
    try:
        return message_type.FromString(data)
    except DecodeError as e:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"the request is not a valid {message_type.DESCRIPTOR.full_name} "
                            f"message: {e}")


async def _internal_error(context, method: str) -> None:
    log.exception("%s failed", method)
    await context.abort(grpc.StatusCode.INTERNAL,
                        f"internal error in {method}; the request was ended (see the server log)")


def _unary(method: Callable[..., Awaitable], message_type, limits: RequestLimits):
    async def handler(data: bytes, context):
        request = await _parse(message_type, data, limits, context)
        try:
            return await method(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception:  # noqa: BLE001 - this request fails alone, the server goes on
            await _internal_error(context, method.__name__)

    return handler


def _streaming(method: Callable[..., AsyncIterator], message_type, limits: RequestLimits):
    async def handler(data: bytes, context):
        request = await _parse(message_type, data, limits, context)
        try:
            async for message in method(request, context):
                yield message
        except grpc.aio.AbortError:
            raise
        except Exception:  # noqa: BLE001 - this request fails alone, the server goes on
            await _internal_error(context, method.__name__)

    return handler


def generation_handler(servicer: GenerationServicer) -> grpc.GenericRpcHandler:
    limits, methods = servicer.limits, {}
    for name, (request_type, response_type) in {
            "Generate": (pb.GenerateRequest, pb.GenerateResponse),
            "GenerateStream": (pb.GenerateRequest, pb.GenerateStreamResponse),
            "ModelInfo": (pb.ModelInfoRequest, pb.ModelInfoResponse),
            "Tokenize": (pb.TokenizeRequest, pb.TokenizeResponse),
            "Load": (pb.LoadRequest, pb.LoadResponse),
            "Abort": (pb.AbortRequest, pb.AbortResponse)}.items():
        method = getattr(servicer, name)
        if name == "GenerateStream":
            methods[name] = grpc.unary_stream_rpc_method_handler(
                _streaming(method, request_type, limits),
                response_serializer=response_type.SerializeToString)
        else:
            methods[name] = grpc.unary_unary_rpc_method_handler(
                _unary(method, request_type, limits),
                response_serializer=response_type.SerializeToString)
    return grpc.method_handlers_generic_handler(SERVICE_NAME, methods)


# A health service name that is SERVING whenever the process answers, for liveness probes:
# while no replica serves (shards down or restarting) "" is NOT_SERVING, which should take the
# server out of rotation, not get it killed.
LIVENESS_SERVICE = "liveness"


class HealthReporter:
    """grpc.health.v1: "" and the Generation service are SERVING while at least one replica
    serves and the server is not draining; "liveness" always is."""

    def __init__(self, servicer: health.aio.HealthServicer):
        self.servicer = servicer

    async def set(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", SERVICE_NAME):
            await self.servicer.set(name, status)


async def start_grpc_server(router: Router, model_name: str, host: str, port: int,
                            limits: RequestLimits | None = None,
                            credentials: grpc.ServerCredentials | None = None,
                            api_keys: frozenset[str] = frozenset()
                            ) -> tuple[grpc.aio.Server, int, HealthReporter]:
    """credentials: TLS (cluster/auth.py server_credentials), None for plaintext.
    api_keys: with any, the Generation service needs one of them."""
    limits = limits or RequestLimits()
    # gRPC itself refuses messages past twice our limit (RESOURCE_EXHAUSTED) before reading
    # them; between the two, ours answers INVALID_ARGUMENT naming the limit.
    server = grpc.aio.server(
        interceptors=[ApiKeyInterceptor(api_keys, SERVICE_NAME)] if api_keys else None,
        options=[("grpc.so_reuseport", 0),
                 ("grpc.max_receive_message_length", 2 * limits.max_message_bytes)])
    server.add_generic_rpc_handlers((generation_handler(
        GenerationServicer(router, model_name, limits)),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{host}:{port}"
    bound = (server.add_secure_port(address, credentials) if credentials is not None
             else server.add_insecure_port(address))
    if bound == 0:
        raise RuntimeError(f"cannot listen on {host}:{port} (in use?); set server.port")
    await server.start()
    reporter = HealthReporter(health_servicer)
    await health_servicer.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    await reporter.set(router.healthy)
    return server, bound, reporter

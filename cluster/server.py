"""The gRPC front end: the Generation service, grpc.health.v1 and server reflection.

Every request is validated before it is queued; bad input gets INVALID_ARGUMENT with a message
that names the field, a full queue RESOURCE_EXHAUSTED, a down engine UNAVAILABLE. A client
that cancels or disconnects, or whose deadline passes, has its request aborted.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shardserve.proto import shardserve_pb2 as pb
from shardserve.proto import shardserve_pb2_grpc as pb_grpc
from shardserve.workers.step import SamplingParams

from .outputs import RequestOutput, TokenLogprob
from .router import OverloadedError, Router

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name
FINISH_REASONS = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
                  "abort": pb.FINISH_REASON_ABORT}
MAX_STOP_STRINGS = 16


def sampling_params(request: pb.GenerateRequest) -> SamplingParams:
    """The request's sampling options, with the server defaults for unset fields."""
    options = {}
    for name in ("max_tokens", "temperature", "top_k", "top_p", "seed", "logprobs"):
        if request.HasField(name):
            options[name] = getattr(request, name)
    if len(request.stop) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got "
                         f"{len(request.stop)}")
    return SamplingParams(stop=tuple(request.stop), stop_token_ids=tuple(request.stop_token_ids),
                          ignore_eos=request.ignore_eos, **options)


def _logprobs(entries: list[TokenLogprob] | None) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=e.token_id, logprob=e.logprob,
                            top_logprobs=[pb.TopLogprob(token_id=t, logprob=lp)
                                          for t, lp in e.top_logprobs])
            for e in entries or []]


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, router: Router, model_name: str):
        self.router = router
        self.model_name = model_name

    async def _start(self, request: pb.GenerateRequest, context) -> AsyncIterator[RequestOutput]:
        """Validate and submit; aborts the RPC with the right status on bad input."""
        try:
            params = sampling_params(request)
            kind = request.WhichOneof("prompt")
            if kind == "chat":
                token_ids = self.router.tokenize_chat(
                    [{"role": m.role, "content": m.content} for m in request.chat.messages])
            else:
                token_ids = self.router.tokenize(
                    request.text if kind == "text" else list(request.token_ids.ids))
            self.router.validate(token_ids, params)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if not self.router.healthy:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "the model shards are down; retry later")
        return self.router.generate(token_ids, params, request.request_id or None)

    async def _outputs(self, request, context) -> AsyncIterator[RequestOutput]:
        stream = await self._start(request, context)
        try:
            async for out in stream:
                if out.error:
                    await self._fail(out, context)
                yield out
        except OverloadedError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        finally:
            await stream.aclose()

    async def _fail(self, out: RequestOutput, context) -> None:
        code = grpc.StatusCode[(out.error_code or "internal").upper()]
        await context.abort(code, out.error)

    async def Generate(self, request, context):
        text, token_ids, logprobs, final = "", [], [], None
        async for out in self._outputs(request, context):
            text += out.delta_text
            token_ids += out.delta_token_ids
            logprobs += out.logprobs or []
            final = out
        ttft = (final.first_token_time - final.arrival_time) if final.first_token_time else 0.0
        return pb.GenerateResponse(
            request_id=final.request_id, text=text, token_ids=token_ids,
            finish_reason=FINISH_REASONS.get(final.finish_reason, 0),
            usage=pb.Usage(prompt_tokens=len(final.prompt_token_ids),
                           completion_tokens=len(token_ids)),
            logprobs=_logprobs(logprobs), time_to_first_token_s=ttft)

    async def GenerateStream(self, request, context):
        generated = 0
        async for out in self._outputs(request, context):
            generated += len(out.delta_token_ids)
            message = pb.GenerateStreamResponse(
                request_id=out.request_id, text=out.delta_text, token_ids=out.delta_token_ids,
                logprobs=_logprobs(out.logprobs))
            if out.finished:
                message.finish_reason = FINISH_REASONS.get(out.finish_reason, 0)
                message.usage.prompt_tokens = len(out.prompt_token_ids)
                message.usage.completion_tokens = generated
            yield message

    async def ModelInfo(self, request, context):
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
        return pb.ModelInfoResponse(
            model=self.model_name, architecture=shape.architecture,
            dtype=engine.executor.describe()["shards"][0]["dtype"], vocab_size=shape.vocab_size,
            max_model_len=engine.max_model_len, num_layers=shape.num_layers,
            num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
            tensor_parallel_size=c.parallel.tensor_parallel_size,
            pipeline_parallel_size=c.parallel.pipeline_parallel_size,
            replicas=c.parallel.replicas, sequence_parallel=c.parallel.sequence_parallel,
            kv_block_size=engine.kv.block_size, kv_num_blocks=engine.kv.num_blocks,
            max_num_seqs=c.scheduler.max_num_seqs,
            max_num_batched_tokens=c.scheduler.max_num_batched_tokens,
            max_waiting_requests=c.scheduler.max_waiting_requests,
            scheduling_policy=c.scheduler.scheduling_policy, shards=shards,
            eos_token_ids=sorted(engine.eos_token_ids))

    async def Tokenize(self, request, context):
        tokenizer = self.router.engine.tokenizer
        ids = tokenizer(request.text, add_special_tokens=request.add_special_tokens).input_ids
        return pb.TokenizeResponse(token_ids=ids, tokens=tokenizer.convert_ids_to_tokens(ids))


# A health service name that is SERVING whenever the process answers, for liveness probes:
# while the shards are down (and being restarted) "" is NOT_SERVING, which should take the
# server out of rotation, not get it killed.
LIVENESS_SERVICE = "liveness"


class HealthReporter:
    """grpc.health.v1: "" and the Generation service are SERVING while every engine's shards
    are up; "liveness" always is."""

    def __init__(self, servicer: health.aio.HealthServicer):
        self.servicer = servicer

    async def set(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", SERVICE_NAME):
            await self.servicer.set(name, status)


async def start_grpc_server(router: Router, model_name: str, host: str, port: int
                            ) -> tuple[grpc.aio.Server, int, HealthReporter]:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_GenerationServicer_to_server(GenerationServicer(router, model_name), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"cannot listen on {host}:{port} (in use?); set server.port")
    await server.start()
    reporter = HealthReporter(health_servicer)
    await health_servicer.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    await reporter.set(router.healthy)
    return server, bound, reporter

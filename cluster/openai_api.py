"""The OpenAI-compatible HTTP API, beside gRPC in the same server process.

    POST /v1/completions        prompt: text or token ids
    POST /v1/chat/completions   messages, through the model's chat template
    GET  /v1/models             the one model this server serves
    GET  /health                200 while a replica serves, else 503 (no API key needed)

A FastAPI app on uvicorn, run as a task in the server actor's event loop, so it shares the
router (and its continuous batches) with the gRPC servicer. Requests are admitted exactly as
over gRPC (admission.py: the `server.limits`, tokenization off the event loop, the model's own
checks), and answers and errors have OpenAI's shapes, so the official `openai` client and
tools built on it work unchanged. `stream: true` answers with server-sent events ending in
`data: [DONE]`. A client that disconnects, streaming or not, has its request aborted.

What the server cannot honour is refused (400) rather than silently answered differently:
n or best_of above 1, echo, suffix, logit_bias, non-zero presence or frequency penalties,
tools and a JSON response_format. Fields that do not change the output (user, metadata, ...)
are ignored. The model field may be left out; a model other than the served one gets 404
model_not_found, as vLLM and OpenAI answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from shardserve.workers.step import SamplingParams

from .admission import Admission
from .engine import EngineUnavailableError
from .limits import RequestLimits
from .outputs import RequestOutput, TokenLogprob
from .router import DRAINING_MESSAGE, OverloadedError, Router

log = logging.getLogger(__name__)

T = TypeVar("T")

# A failed request's RequestOutput.error_code -> HTTP status.
ERROR_STATUS = {"invalid_argument": 400, "unavailable": 503, "internal": 500}


# --- errors in OpenAI's shape ---------------------------------------------------------------

class APIError(Exception):
    """Answered as {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    @property
    def type(self) -> str:
        if self.status == 429:
            return "rate_limit_error"
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


@contextlib.contextmanager
def _generation_errors():
    """What the router raises when it refuses a request, as the HTTP answer to give."""
    try:
        yield
    except ValueError as e:
        raise APIError(400, str(e)) from None
    except OverloadedError as e:
        raise APIError(429, str(e), code="server_overloaded") from None
    except EngineUnavailableError as e:
        raise APIError(503, str(e), code="service_unavailable") from None


class _ClientGone(Exception):
    """The client disconnected before its answer; there is nobody to answer."""


def _failed(out: RequestOutput) -> APIError:
    status = ERROR_STATUS.get(out.error_code or "internal", 500)
    return APIError(status, out.error or "the request failed; see the server log")


# --- request bodies -------------------------------------------------------------------------

class StreamOptions(BaseModel):
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    """Fields both endpoints take. Fields not listed here are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # Extensions vLLM accepts too.
    top_k: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False

    def refuse_unsupported(self) -> None:
        """400 for what would change the answer in a way this server cannot give."""
        if self.n not in (None, 1):
            raise APIError(400, f"n: this server returns one choice per request, not {self.n}; "
                                "send several requests", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported; leave it unset or 0", param=name)
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported; leave it unset", param="logit_bias")

    def stops(self) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """The stop strings and stop token ids, as tuples."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return stop, tuple(self.stop_token_ids or ())

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        options = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                   "seed": self.seed, "logprobs": logprobs}
        stop, stop_token_ids = self.stops()
        return SamplingParams(max_tokens=max_tokens, stop=stop, stop_token_ids=stop_token_ids,
                              ignore_eos=self.ignore_eos,
                              **{k: v for k, v in options.items() if v is not None})


class CompletionRequest(_GenerationRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.best_of not in (None, 1):
            raise APIError(400, f"best_of: only 1 is supported, not {self.best_of}",
                           param="best_of")
        if self.echo:
            raise APIError(400, "echo is not supported; leave it false", param="echo")
        if self.suffix:
            raise APIError(400, "suffix is not supported; leave it unset", param="suffix")

    def one_prompt(self) -> str | list[int]:
        """The prompt as text or token ids; a batch of one counts as one."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, f"prompt: this server takes one prompt per request, not "
                                    f"{len(prompt)}; send several requests", param="prompt")
            prompt = prompt[0]
        return prompt


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[TextPart] | None = None

    def as_dict(self, index: int) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise APIError(400, f"messages[{index}].content: only text parts are supported",
                               param=f"messages[{index}].content")
            content = "\n".join(part.text for part in content)
        return {"role": self.role, "content": content or ""}


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools:
            raise APIError(400, "tools are not supported; leave tools unset", param="tools")
        kind = (self.response_format or {}).get("type", "text")
        if kind != "text":
            raise APIError(400, f"response_format {kind!r} is not supported; only text",
                           param="response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")


async def _parse(request: Request, model: type[BaseModel], limit: int) -> Any:
    """The request body as `model`, read no further than `limit` bytes."""
    body, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(400, f"the request body is over the server's limit of "
                                    f"{limit:,} bytes (server.limits.max_message_bytes)")
            body.append(chunk)
    except ClientDisconnect:
        raise _ClientGone() from None
    try:
        return model.model_validate_json(b"".join(body))
    except ValidationError as e:
        problems = [f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
                    for err in e.errors()[:5]]
        first = e.errors()[0]["loc"] if e.errors() else ()
        raise APIError(400, "; ".join(problems),
                       param=str(first[0]) if first else None) from None


# --- answers in OpenAI's shape --------------------------------------------------------------

class _Answer:
    """One request's outputs turned into OpenAI objects, whole or chunk by chunk; keeps what
    the chunks need across steps (token counts, the logprobs' text offset)."""

    prefix = ""
    whole_object = ""
    chunk_object = ""

    def __init__(self, model: str, tokenizer, with_logprobs: bool, include_usage: bool):
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.tokenizer = tokenizer
        self.with_logprobs = with_logprobs
        self.include_usage = include_usage
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _count(self, out: RequestOutput) -> None:
        self.prompt_tokens = len(out.prompt_token_ids)
        self.completion_tokens += len(out.delta_token_ids)
        self.cached_tokens = out.num_cached_tokens

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                # prompt tokens served from the prefix cache, where OpenAI reports them
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def whole(self, outputs: list[RequestOutput]) -> dict:
        for out in outputs:
            self._count(out)
        text = "".join(out.delta_text for out in outputs)
        entries = [e for out in outputs for e in out.logprobs or []]
        logprobs = self.logprobs(entries) if self.with_logprobs else None
        return {**self._head(self.whole_object),
                "choices": [self.whole_choice(text, logprobs,
                                              _finish_reason(outputs[-1].finish_reason))],
                "usage": self.usage()}

    def chunks(self, out: RequestOutput) -> list[dict]:
        """The stream's chunks for one output (none when it brings nothing new)."""
        self._count(out)
        reason = _finish_reason(out.finish_reason) if out.finished else None
        if not (out.delta_text or out.logprobs or reason):
            return []
        logprobs = self.logprobs(out.logprobs) if out.logprobs else None
        chunk = {**self._head(self.chunk_object),
                 "choices": [self.delta_choice(out.delta_text, logprobs, reason)]}
        if self.include_usage:
            chunk["usage"] = None
        chunks = [chunk]
        if out.finished and self.include_usage:
            chunks.append({**self._head(self.chunk_object), "choices": [],
                           "usage": self.usage()})
        return chunks

    def opening_chunks(self) -> list[dict]:
        return []

    # Each kind of answer says how its logprobs and its one choice look.

    def logprobs(self, entries: list[TokenLogprob]) -> dict: ...

    def whole_choice(self, text: str, logprobs: dict | None, reason: str) -> dict: ...

    def delta_choice(self, text: str, logprobs: dict | None, reason: str | None) -> dict: ...


class CompletionAnswer(_Answer):
    prefix = "cmpl"
    whole_object = chunk_object = "text_completion"

    def __init__(self, *args):
        super().__init__(*args)
        self.text_offset = 0  # where the next token's text starts in the completion

    def logprobs(self, entries: list[TokenLogprob]) -> dict:
        """The legacy logprobs object; offsets add up each token's own text."""
        tokens, offsets = [], []
        for e in entries:
            tokens.append(self.token_text(e.token_id))
            offsets.append(self.text_offset)
            self.text_offset += len(tokens[-1])
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{self.token_text(t): lp for t, lp in e.top_logprobs}
                                 for e in entries],
                "text_offset": offsets}

    def whole_choice(self, text, logprobs, reason):
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": reason}

    delta_choice = whole_choice


class ChatAnswer(_Answer):
    prefix = "chatcmpl"
    whole_object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def _entry(self, token_id: int, logprob: float) -> dict:
        text = self.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def logprobs(self, entries: list[TokenLogprob]) -> dict:
        return {"content": [{**self._entry(e.token_id, e.logprob),
                             "top_logprobs": [self._entry(t, lp) for t, lp in e.top_logprobs]}
                            for e in entries]}

    def whole_choice(self, text, logprobs, reason):
        return {"index": 0, "message": {"role": "assistant", "content": text},
                "logprobs": logprobs, "finish_reason": reason}

    def delta_choice(self, text, logprobs, reason):
        return {"index": 0, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                "finish_reason": reason}

    def opening_chunks(self) -> list[dict]:
        chunk = {**self._head(self.chunk_object),
                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}]}
        if self.include_usage:
            chunk["usage"] = None
        return [chunk]


def _finish_reason(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


# --- disconnects ----------------------------------------------------------------------------

async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (which aborts its request) if the client goes first.
    Starlette watches for that only while a streaming response is being sent."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
    if task.cancelled():
        raise _ClientGone()
    return task.result()


# --- the app --------------------------------------------------------------------------------

class OpenAIServer:
    """The routes; one per app, holding the router and the served model's name."""

    def __init__(self, router: Router, model_name: str, limits: RequestLimits):
        self.router = router
        self.model_name = model_name
        self.limits = limits
        self.admission = Admission(router, limits)
        self.created = int(time.time())

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves "
                                f"`{self.model_name}`", code="model_not_found", param="model")

    async def models(self) -> dict:
        return {"object": "list", "data": [self._model_card()]}

    async def model(self, model_id: str) -> dict:
        self._check_model(model_id)
        return self._model_card()

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created,
                "owned_by": "shardserve", "max_model_len": self.router.engine.max_model_len}

    async def health(self) -> Response:
        if self.router.draining:
            return APIError(503, DRAINING_MESSAGE, code="service_unavailable").response()
        if self.router.healthy:
            return Response(status_code=200)
        return APIError(503, "no replica is serving: the model shards are down",
                        code="service_unavailable").response()

    async def completions(self, request: Request) -> Response:
        body: CompletionRequest = await _parse(request, CompletionRequest,
                                               self.limits.max_message_bytes)
        self._check_model(body.model)
        body.refuse_unsupported()
        prompt = body.one_prompt()
        params = body.sampling_params(16 if body.max_tokens is None else body.max_tokens,
                                      body.logprobs)
        try:
            token_ids = await self.admission.prompt_tokens(
                text=prompt if isinstance(prompt, str) else None,
                token_ids=None if isinstance(prompt, str) else prompt,
                stop=params.stop, stop_token_ids=params.stop_token_ids)
            await self.admission.validate(token_ids, params)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        return await self._answer(request, body, token_ids, params, CompletionAnswer)

    async def chat_completions(self, request: Request) -> Response:
        body: ChatCompletionRequest = await _parse(request, ChatCompletionRequest,
                                                   self.limits.max_message_bytes)
        self._check_model(body.model)
        body.refuse_unsupported()
        chat = [m.as_dict(i) for i, m in enumerate(body.messages)]
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None \
            else body.max_tokens
        try:
            stop, stop_token_ids = body.stops()
            token_ids = await self.admission.prompt_tokens(chat=chat, stop=stop,
                                                           stop_token_ids=stop_token_ids)
            # Unset, a chat answer may run to the end of the context, as OpenAI's does.
            params = body.sampling_params(
                self.admission.room_for_output(len(token_ids)) if max_tokens is None
                else max_tokens, logprobs)
            await self.admission.validate(token_ids, params)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        return await self._answer(request, body, token_ids, params, ChatAnswer)

    async def _answer(self, request: Request, body: _GenerationRequest, token_ids: list[int],
                      params: SamplingParams, answer_type: type[_Answer]) -> Response:
        include_usage = bool(body.stream and body.stream_options
                             and body.stream_options.include_usage)
        answer = answer_type(self.model_name, self.router.engine.tokenizer,
                             params.logprobs is not None, include_usage)
        stream = self.router.generate(token_ids, params)
        try:
            if not body.stream:
                outputs = await _unless_disconnected(request, _collect(stream))
                if outputs[-1].error:
                    raise _failed(outputs[-1])
                return JSONResponse(answer.whole(outputs))
            # The first output comes before the response starts, so that a refusal (a full
            # queue, no serving replica) still gets its own status code.
            with _generation_errors():
                first = await _unless_disconnected(request, anext(stream))
        except BaseException:
            await stream.aclose()
            raise
        return StreamingResponse(_events(answer, first, stream), media_type="text/event-stream")


async def _collect(stream: AsyncIterator[RequestOutput]) -> list[RequestOutput]:
    with _generation_errors():
        return [out async for out in stream]


async def _events(answer: _Answer, first: RequestOutput,
                  stream: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
    """The stream's server-sent events. When the client goes, Starlette cancels this, and
    closing `stream` aborts the request."""
    try:
        if first.error:
            yield _sse(_failed(first).body())
            return
        for chunk in answer.opening_chunks():
            yield _sse(chunk)
        out = first
        while True:
            if out.error:
                yield _sse(_failed(out).body())
                return
            for chunk in answer.chunks(out):
                yield _sse(chunk)
            if out.finished:
                break
            out = await anext(stream)
        yield _sse("[DONE]")
    except Exception:  # noqa: BLE001 - this stream ends with an error event, the server goes on
        log.exception("streaming %s failed", answer.id)
        yield _sse(APIError(500, "internal error; the request was ended (see the server log)",
                            code="internal_error").body())
    finally:
        await stream.aclose()


def _api_key_check(api_keys: frozenset[str]):
    """A dependency that lets a request through only with `Authorization: Bearer <a key>`."""
    keys = [k.encode() for k in api_keys]

    async def check(request: Request) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # Compare with every key, always: the time taken says nothing about which one is near.
        matched = False
        for key in keys:
            matched |= hmac.compare_digest(given.strip().encode(), key)
        if scheme.lower() != "bearer" or not matched:
            raise APIError(401, "Incorrect or missing API key: send the header "
                                "`Authorization: Bearer <key>`", code="invalid_api_key")

    return check


def build_app(router: Router, model_name: str, limits: RequestLimits | None = None,
              api_keys: frozenset[str] = frozenset()) -> FastAPI:
    routes = OpenAIServer(router, model_name, limits or RequestLimits())
    # No generated docs: nothing else to guard, and nothing a client of this API needs.
    app = FastAPI(title="shardserve", docs_url=None, redoc_url=None, openapi_url=None)
    v1 = APIRouter(prefix="/v1",
                   dependencies=[Depends(_api_key_check(api_keys))] if api_keys else [])
    v1.add_api_route("/completions", routes.completions, methods=["POST"])
    v1.add_api_route("/chat/completions", routes.chat_completions, methods=["POST"])
    v1.add_api_route("/models", routes.models, methods=["GET"])
    v1.add_api_route("/models/{model_id:path}", routes.model, methods=["GET"])
    app.include_router(v1)
    app.add_api_route("/health", routes.health, methods=["GET"])

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> Response:
        return e.response()

    @app.exception_handler(_ClientGone)
    async def client_gone(request: Request, e: _ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        return APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}"
                        ).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> Response:
        # Starlette raises it again after this answer, and uvicorn logs it with its traceback.
        return APIError(500, "internal error; the request was ended (see the server log)",
                        code="internal_error").response()

    return app


# --- serving --------------------------------------------------------------------------------

class _EmbeddedServer(uvicorn.Server):
    """uvicorn as one task of our event loop: the process's signals stay with its owner."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HTTPServer:
    def __init__(self, server: uvicorn.Server, task: asyncio.Task):
        self._server = server
        self._task = task

    async def stop(self) -> None:
        """Stop listening, give open requests a few seconds, then end them."""
        self._server.should_exit = True
        await self._task


def _listen(host: str, port: int) -> socket.socket:
    # Bound here rather than by uvicorn, which exits the process when it cannot bind.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise RuntimeError(f"cannot listen on {host}:{port} for HTTP ({e.strerror}); set "
                           "server.http_port") from None
    return sock


async def start_http_server(router: Router, model_name: str, host: str, port: int,
                            limits: RequestLimits | None = None,
                            api_keys: frozenset[str] = frozenset(),
                            ssl_certfile: str | None = None, ssl_keyfile: str | None = None
                            ) -> tuple[HTTPServer, int]:
    """Serve the API on host:port (0: any free port) in the running event loop; returns the
    server and the port it listens on. With api_keys, /v1/* needs one of them."""
    sock = _listen(host, port)
    config = uvicorn.Config(
        build_app(router, model_name, limits, api_keys), lifespan="off",
        ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
        # Our logging setup stays as it is; no line per request (gRPC logs none either).
        log_config=None, access_log=False, timeout_graceful_shutdown=5)
    try:
        config.load()  # a bad certificate or key fails here, with its own error
    except BaseException:
        sock.close()
        raise
    server = _EmbeddedServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError(f"the HTTP server on {host}:{port} stopped while starting")
        await asyncio.sleep(0.01)
    return HTTPServer(server, task), sock.getsockname()[1]

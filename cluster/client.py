"""A small Python client over the generated stubs.

    from shardserve.cluster.client import Client
    with Client("127.0.0.1:50051") as client:
        print(client.generate("The capital of France is", max_tokens=8, temperature=0).text)
        chat = [{"role": "user", "content": "What is the capital of France?"}]
        print(client.generate(chat, max_tokens=32, temperature=0).text)
        for chunk in client.generate_stream("Once upon a time", max_tokens=32):
            print(chunk.text, end="", flush=True)

A server with TLS and API keys: `Client(target, api_key="...", tls=True,
tls_ca_file="ca.pem")` (without tls_ca_file the system's roots verify its certificate).
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardserve.proto import shardserve_pb2 as pb
from shardserve.proto import shardserve_pb2_grpc as pb_grpc

from .auth import bearer_metadata, channel_credentials

_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "seed", "logprobs",
                    "stop", "stop_token_ids", "ignore_eos", "request_id", "speculative_tokens")


Prompt = str | list[int] | list[dict[str, str]]


def build_request(prompt: Prompt, **options) -> pb.GenerateRequest:
    """prompt: text, token ids, or chat messages ({"role": ..., "content": ...} each)."""
    unknown = set(options) - set(_SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
    request = pb.GenerateRequest(**{k: v for k, v in options.items() if v is not None})
    if isinstance(prompt, str):
        request.text = prompt
    elif prompt and isinstance(prompt[0], dict):
        request.chat.messages.extend(pb.ChatMessage(**m) for m in prompt)
    else:
        request.token_ids.ids.extend(prompt)
    return request


class Client:
    """api_key goes with every Generation call (`authorization: Bearer <key>`); health
    checks need none. tls_server_name: the name to check the certificate against when it
    is not the target's host (a probe dialing 127.0.0.1 with a certificate for a DNS name)."""

    def __init__(self, target: str = "127.0.0.1:50051", timeout: float | None = None, *,
                 api_key: str | None = None, tls: bool = False, tls_ca_file: str | None = None,
                 tls_server_name: str | None = None):
        if tls or tls_ca_file:
            options = ([("grpc.ssl_target_name_override", tls_server_name)]
                       if tls_server_name else None)
            self.channel = grpc.secure_channel(target, channel_credentials(tls_ca_file),
                                               options=options)
        else:
            self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.timeout = timeout
        self._metadata = bearer_metadata(api_key) if api_key else None

    def generate(self, prompt: Prompt, timeout: float | None = None,
                 **options) -> pb.GenerateResponse:
        return self.stub.Generate(build_request(prompt, **options),
                                  timeout=timeout or self.timeout, metadata=self._metadata)

    def generate_stream(self, prompt: Prompt, timeout: float | None = None,
                        **options) -> Iterator[pb.GenerateStreamResponse]:
        """Messages as they arrive; `.cancel()` on the returned iterator cancels the request."""
        return self.stub.GenerateStream(build_request(prompt, **options),
                                        timeout=timeout or self.timeout,
                                        metadata=self._metadata)

    def model_info(self) -> pb.ModelInfoResponse:
        return self.stub.ModelInfo(pb.ModelInfoRequest(), timeout=self.timeout,
                                   metadata=self._metadata)

    def tokenize(self, text: str, add_special_tokens: bool = True) -> pb.TokenizeResponse:
        return self.stub.Tokenize(pb.TokenizeRequest(text=text,
                                                     add_special_tokens=add_special_tokens),
                                  timeout=self.timeout, metadata=self._metadata)

    def load(self) -> pb.LoadResponse:
        """Each replica's queue, running batch and free KV blocks, and the totals."""
        return self.stub.Load(pb.LoadRequest(), timeout=self.timeout, metadata=self._metadata)

    def abort(self, request_id: str) -> bool:
        """Abort a request in flight by its request_id (from any connection); False when no
        such request is in flight."""
        return self.stub.Abort(pb.AbortRequest(request_id=request_id), timeout=self.timeout,
                               metadata=self._metadata).aborted

    def health(self, service: str = "") -> str:
        """SERVING, NOT_SERVING, ... as the grpc.health.v1 service reports it."""
        response = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service),
                                          timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

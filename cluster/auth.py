"""Who may call: API keys and TLS, shared by the gRPC server and the HTTP front end.

API keys come from `server.api_key_file` (one key per line) and the SHARDSERVE_API_KEY
environment variable (comma-separated), never from the command line, so they stay out of
`ps` and shell history; they are never logged. A client sends `authorization: Bearer <key>`
(gRPC metadata or the HTTP header of that name); the compare takes the same time whichever
byte differs. TLS takes `server.tls_cert_file` and `server.tls_key_file`.

On gRPC only the Generation service is guarded: health checks and reflection stay open, so
probes and load balancers need no key.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

import grpc

API_KEY_ENV = "SHARDSERVE_API_KEY"
AUTHORIZATION = "authorization"  # gRPC metadata keys are lower case
_BEARER = "bearer "


def _split_env(value: str) -> list[str]:
    return [k.strip() for k in value.split(",") if k.strip()]


def load_api_keys(server_config) -> frozenset[str]:
    """Every API key the server accepts (empty: no key needed). Raises ValueError naming
    server.api_key_file when that file cannot be read or holds no key."""
    keys = set(_split_env(os.environ.get(API_KEY_ENV, "")))
    path = server_config.api_key_file
    if path is not None:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as e:
            raise ValueError(f"server.api_key_file {path} cannot be read: {e.strerror}") from None
        from_file = [line.strip() for line in lines if line.strip()]
        if not from_file:
            # An empty file must not quietly leave the server open.
            raise ValueError(f"server.api_key_file {path} holds no key; write one per line")
        keys.update(from_file)
    return frozenset(keys)


def client_api_key() -> str | None:
    """The key a client sends: the first in SHARDSERVE_API_KEY, or None."""
    keys = _split_env(os.environ.get(API_KEY_ENV, ""))
    return keys[0] if keys else None


def key_is_valid(header_value: str | None, keys: frozenset[str]) -> bool:
    """Whether an `authorization` value ("Bearer <key>") carries one of `keys`. With no keys
    configured nothing is valid: callers skip the check when `keys` is empty.

    Every key is compared, each with hmac.compare_digest, so the time taken does not say how
    much of a guess was right (nor which key it was near)."""
    if not header_value or header_value[:len(_BEARER)].lower() != _BEARER:
        return False
    offered = header_value[len(_BEARER):].strip().encode()
    valid = False
    for key in keys:
        valid |= hmac.compare_digest(offered, key.encode())
    return valid


def bearer_metadata(api_key: str) -> tuple[tuple[str, str], ...]:
    return ((AUTHORIZATION, f"Bearer {api_key}"),)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls to one service (`service`, e.g. shardserve.v1.Generation) without a
    valid key with UNAUTHENTICATED; every other service passes."""

    def __init__(self, keys: frozenset[str], service: str):
        if not keys:
            raise ValueError("ApiKeyInterceptor needs at least one key")
        self.keys = keys
        self.prefix = f"/{service}/"

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self.prefix):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        offered = metadata.get(AUTHORIZATION)
        if key_is_valid(offered, self.keys):
            return handler
        message = ("missing API key: send the gRPC metadata 'authorization: Bearer <key>' "
                   "(shardserve generate reads it from SHARDSERVE_API_KEY)" if offered is None
                   else "invalid API key: the 'authorization: Bearer <key>' sent is not one "
                        "of this server's keys")
        return _refusal(handler, message)


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the call with UNAUTHENTICATED."""
    async def refuse(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # never reached; makes this an async generator, as a streaming handler is

    # Our Generation handlers read raw bytes: no deserializer, and none is needed to refuse.
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_stream)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(refuse_stream)
    return grpc.unary_unary_rpc_method_handler(refuse)


def _read(path: str, key: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{key} {path} cannot be read: {e.strerror}") from None


def server_credentials(server_config) -> grpc.ServerCredentials | None:
    """TLS credentials from server.tls_cert_file and tls_key_file; None without TLS."""
    if server_config.tls_cert_file is None:
        return None
    cert = _read(server_config.tls_cert_file, "server.tls_cert_file")
    key = _read(server_config.tls_key_file, "server.tls_key_file")
    return grpc.ssl_server_credentials([(key, cert)])


def channel_credentials(tls_ca_file: str | None = None) -> grpc.ChannelCredentials:
    """TLS for a client: the CA (or self-signed certificate) in tls_ca_file, else the
    system's roots."""
    root = _read(tls_ca_file, "--tls-ca-file") if tls_ca_file else None
    return grpc.ssl_channel_credentials(root_certificates=root)

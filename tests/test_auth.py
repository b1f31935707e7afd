"""Who may call: API keys on the Generation service and TLS, against a real server on
127.0.0.1 (certificate made here with openssl); and the key loading and checks on their own."""

from __future__ import annotations

import grpc
import pytest

from shardserve.cluster.auth import key_is_valid, load_api_keys
from shardserve.cluster.client import Client
from shardserve.cluster.config import EngineConfig, ServerConfig
from shardserve.cluster.service import start_server_actor
from shardserve.proto import shardserve_pb2 as pb

KEYS = frozenset({"first-key", "second-key"})


@pytest.fixture(scope="module")
def tls_server(ray_cluster, tiny_model, self_signed_cert):
    import ray

    cert, key = self_signed_cert
    config = EngineConfig().with_overrides(model=str(tiny_model("llama-gqa")),
                                           dtype="float32", num_threads=1)
    # /metrics on another loopback address than gRPC (server.metrics_host)
    actor, info = start_server_actor(config, ServerConfig(
        host="127.0.0.1", port=0, metrics_port=0, metrics_host="127.0.0.2",
        tls_cert_file=str(cert), tls_key_file=str(key)), KEYS)
    yield f"127.0.0.1:{info['grpc_port']}", str(cert), info
    ray.get(actor.stop.remote())
    ray.kill(actor)


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def test_the_right_key_over_tls_is_served(tls_server):
    target, ca, _ = tls_server
    for key in sorted(KEYS):
        with Client(target, timeout=60, api_key=key, tls_ca_file=ca) as client:
            response = client.generate([5, 6, 7], max_tokens=3, temperature=0)
            assert len(response.token_ids) == 3
            assert [c.finish_reason for c in client.generate_stream(
                [5, 6], max_tokens=2)][-1] == pb.FINISH_REASON_LENGTH
            assert client.load().kv_blocks_total > 0
            assert client.abort("nothing-by-this-id") is False


def test_no_key_or_a_wrong_key_is_unauthenticated(tls_server):
    target, ca, _ = tls_server
    with Client(target, timeout=30, tls=True, tls_ca_file=ca) as anonymous:
        for call in (lambda: anonymous.generate([5], max_tokens=2),
                     lambda: list(anonymous.generate_stream([5], max_tokens=2)),
                     anonymous.model_info, anonymous.load, lambda: anonymous.abort("x")):
            err = refused(call)
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "missing API key" in err.details() and "Bearer" in err.details()
    for wrong in ("first-ke", "first-key-", "FIRST-KEY", "second-key first-key"):
        with Client(target, timeout=30, api_key=wrong, tls_ca_file=ca) as client:
            err = refused(lambda: client.generate([5], max_tokens=2))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "invalid API key" in err.details()
            assert wrong not in err.details()


def test_health_and_reflection_need_no_key(tls_server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    target, ca, _ = tls_server
    with Client(target, timeout=30, tls_ca_file=ca) as client:
        assert client.health() == "SERVING"
        assert client.health("liveness") == "SERVING"
        stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
        reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            list_services="")])))
        assert "shardserve.v1.Generation" in {s.name for s in
                                              reply.list_services_response.service}


def test_a_plaintext_client_cannot_talk_to_a_tls_server(tls_server):
    target, _, _ = tls_server
    with Client(target, timeout=5, api_key="first-key") as plaintext:
        assert refused(plaintext.health).code() == grpc.StatusCode.UNAVAILABLE
        assert refused(lambda: plaintext.generate([5], max_tokens=2)).code() == \
            grpc.StatusCode.UNAVAILABLE


def test_a_client_that_does_not_trust_the_certificate_is_refused(tls_server):
    target, _, _ = tls_server
    with Client(target, timeout=5, tls=True) as untrusting:  # the system's roots only
        assert refused(untrusting.health).code() == grpc.StatusCode.UNAVAILABLE


def test_metrics_listen_on_their_own_address(tls_server):
    import urllib.error
    import urllib.request

    _, _, info = tls_server
    assert info["metrics_host"] == "127.0.0.2"
    port = info["metrics_port"]
    text = urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=10).read()
    assert b"shardserve_requests_total" in text
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10)


# --- keys and settings on their own ------------------------------------------------------------

def test_keys_come_from_the_file_and_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "keys"
    path.write_text("alpha\n\n  beta  \n")
    monkeypatch.setenv("SHARDSERVE_API_KEY", "gamma, delta,")
    assert load_api_keys(ServerConfig(api_key_file=str(path))) == {"alpha", "beta", "gamma",
                                                                  "delta"}
    monkeypatch.delenv("SHARDSERVE_API_KEY")
    assert load_api_keys(ServerConfig()) == frozenset()
    path.write_text("\n \n")
    with pytest.raises(ValueError, match="server.api_key_file .* holds no key"):
        load_api_keys(ServerConfig(api_key_file=str(path)))
    with pytest.raises(ValueError, match="server.api_key_file .* cannot be read"):
        load_api_keys(ServerConfig(api_key_file=str(tmp_path / "missing")))


def test_key_is_valid_takes_a_bearer_header():
    keys = frozenset({"k1", "k2"})
    assert key_is_valid("Bearer k1", keys) and key_is_valid("bearer k2", keys)
    for header in (None, "", "k1", "Bearer", "Bearer ", "Bearer k3", "Basic k1", "Bearer k1k2"):
        assert not key_is_valid(header, keys), header
    assert not key_is_valid("Bearer k1", frozenset())


@pytest.mark.parametrize("options, message", [
    ({"tls_cert_file": "c.pem"}, "tls_cert_file and server.tls_key_file go together"),
    ({"tls_key_file": "k.pem"}, "tls_cert_file and server.tls_key_file go together"),
    ({"drain_grace_s": -1.0}, "server.drain_grace_s must be >= 0"),
])
def test_bad_server_settings_are_refused_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        ServerConfig(**options)


def test_an_unreadable_certificate_is_refused_by_name(tmp_path):
    from shardserve.cluster.auth import server_credentials

    with pytest.raises(ValueError, match="server.tls_cert_file .*missing.pem cannot be read"):
        server_credentials(ServerConfig(tls_cert_file=str(tmp_path / "missing.pem"),
                                        tls_key_file=str(tmp_path / "k.pem")))

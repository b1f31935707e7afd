"""End to end: the official `openai` client against the OpenAI-compatible HTTP API of a real
server on 127.0.0.1 (shard actors on a local Ray cluster), compared with the gRPC API."""

from __future__ import annotations

import json
import ssl
import subprocess
import time
import urllib.error
import urllib.request

import openai
import pytest
from test_server import blocks_in_use, metrics, wait_for
from tiny import make_tiny_model

from shardserve.cluster.client import Client
from shardserve.cluster.config import EngineConfig, ServerConfig
from shardserve.cluster.service import ServerActor

KEYS = ("key-one", "key-two")
CHAT = [{"role": "system", "content": "w10 w11"}, {"role": "user", "content": "w12 w13"}]


def _server_with_keyed_api():
    """The server actor, and a second HTTP API on the same router that needs an API key and
    speaks TLS. (Config keys for those are not this module's to add: the test passes them
    straight to start_http_server.) Defined here, Ray ships the class to the actor by value."""

    class KeyedServerActor(ServerActor):
        async def start_keyed_http(self, keys: list[str], certfile: str, keyfile: str) -> int:
            from shardserve.cluster.openai_api import start_http_server

            self._keyed, port = await start_http_server(
                self.router, self.engine_config.model, "127.0.0.1", 0, self.server_config.limits,
                api_keys=frozenset(keys), ssl_certfile=certfile, ssl_keyfile=keyfile)
            return port

        async def stop(self) -> None:
            await self._keyed.stop()
            await super().stop()

    return KeyedServerActor


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    import ray

    # A context long enough for answers that outlast the client's patience.
    model = str(make_tiny_model(tmp_path_factory.mktemp("openai"), "llama-gqa",
                                max_position_embeddings=4096))
    config = EngineConfig().with_overrides(model=model, dtype="float32", num_threads=1,
                                           num_kv_blocks=512, block_size=8)
    actor = ray.remote(_server_with_keyed_api()).options(num_cpus=0, max_concurrency=1000).remote(
        config, ServerConfig(host="127.0.0.1", port=0, metrics_port=0, http_port=0))
    info = ray.get(actor.start.remote())
    cert, key = _self_signed_certificate(tmp_path_factory.mktemp("tls"))
    keyed_port = ray.get(actor.start_keyed_http.remote(list(KEYS), cert, key))
    grpc_client = Client(f"127.0.0.1:{info['grpc_port']}")
    api = openai.OpenAI(base_url=f"http://127.0.0.1:{info['http_port']}/v1", api_key="unused",
                        max_retries=0, timeout=60)
    yield api, grpc_client, info, (keyed_port, cert), model
    api.close()
    grpc_client.close()
    ray.get(actor.stop.remote())
    ray.kill(actor)


def _self_signed_certificate(directory) -> tuple[str, str]:
    cert, key = str(directory / "cert.pem"), str(directory / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", key, "-out", cert], check=True, capture_output=True)
    return cert, key


def _get(url: str, headers: dict | None = None,
         context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}),
                                    context=context) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_models_and_health(served):
    api, _, info, _, model = served
    assert [m.id for m in api.models.list().data] == [model]
    assert api.models.retrieve(model).owned_by == "shardserve"
    assert _get(f"http://127.0.0.1:{info['http_port']}/health")[0] == 200


def test_completion_gives_what_grpc_gives(served):
    api, grpc_client, _, _, model = served
    expected = grpc_client.generate("w12 w13 w14", max_tokens=8, temperature=0)
    response = api.completions.create(model=model, prompt="w12 w13 w14", max_tokens=8,
                                      temperature=0)
    assert response.id.startswith("cmpl-") and response.object == "text_completion"
    (choice,) = response.choices
    assert choice.text == expected.text
    assert choice.finish_reason == "length"
    assert response.usage.prompt_tokens == 3
    assert response.usage.completion_tokens == 8 and response.usage.total_tokens == 11
    # Token ids as the prompt, and the model field left out.
    by_ids = api.completions.create(model="", prompt=[12, 13, 14], max_tokens=8,
                                    temperature=0, extra_body={"model": None})
    assert by_ids.choices[0].text == expected.text


def test_streamed_completion_and_usage(served):
    api, grpc_client, _, _, model = served
    expected = grpc_client.generate("w20 w21", max_tokens=10, temperature=0)
    chunks = list(api.completions.create(model=model, prompt="w20 w21", max_tokens=10,
                                         temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    *text_chunks, last = chunks
    assert all(c.usage is None for c in text_chunks)
    assert last.choices == [] and last.usage.completion_tokens == len(expected.token_ids)
    assert text_chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_stream_is_server_sent_events_ending_in_done(served):
    _, _, info, _, model = served
    request = urllib.request.Request(
        f"http://127.0.0.1:{info['http_port']}/v1/chat/completions", method="POST",
        headers={"Content-Type": "application/json"},
        data=json.dumps({"model": model, "messages": CHAT, "max_tokens": 3, "stream": True,
                         "stream_options": {"include_usage": True}}).encode())
    with urllib.request.urlopen(request) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = response.read().decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: ") for e in events[:-1])
    usage = json.loads(events[-3].removeprefix("data: "))
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3


def test_chat_gives_what_grpc_gives(served):
    api, grpc_client, _, _, model = served
    expected = grpc_client.generate(CHAT, max_tokens=6, temperature=0)
    response = api.chat.completions.create(model=model, messages=CHAT, max_tokens=6,
                                           temperature=0)
    assert response.id.startswith("chatcmpl-") and response.object == "chat.completion"
    message = response.choices[0].message
    assert (message.role, message.content) == ("assistant", expected.text)
    # w3 w10 w11 w4 w12 w13 w5: the roles and the assistant's opening from the template
    assert response.usage.prompt_tokens == 7
    chunks = list(api.chat.completions.create(model=model, messages=CHAT, temperature=0,
                                              max_completion_tokens=6, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_logprobs(served):
    api, grpc_client, _, _, model = served
    expected = grpc_client.generate("w30 w31", max_tokens=4, temperature=0, logprobs=2)
    lp = api.completions.create(model=model, prompt="w30 w31", max_tokens=4, temperature=0,
                                logprobs=2).choices[0].logprobs
    assert lp.tokens == [f"w{e.token_id}" for e in expected.logprobs]
    assert lp.token_logprobs == pytest.approx([e.logprob for e in expected.logprobs], abs=1e-4)
    assert all(len(top) == 2 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)

    expected = grpc_client.generate(CHAT, max_tokens=3, temperature=0, logprobs=2)
    content = api.chat.completions.create(model=model, messages=CHAT, max_tokens=3,
                                          temperature=0, logprobs=True,
                                          top_logprobs=2).choices[0].logprobs.content
    assert [c.token for c in content] == [f"w{e.token_id}" for e in expected.logprobs]
    assert content[0].bytes == list(content[0].token.encode())
    assert all(len(c.top_logprobs) == 2 for c in content)
    assert content[0].logprob == pytest.approx(expected.logprobs[0].logprob, abs=1e-4)


@pytest.mark.parametrize("options, message", [
    ({"max_tokens": -1}, "max_tokens must be a positive integer"),
    ({"prompt": [5] * 5000}, "context limit"),
    ({"prompt": [5, 1000]}, "outside the vocabulary"),
    ({"n": 2}, "one choice per request"),
    ({"echo": True}, "echo is not supported"),
    ({"prompt": ["w1", "w2"]}, "one prompt per request"),
    ({"temperature": "hot"}, "temperature"),
    ({"stop": ["w1"] * 17}, "server.limits.max_stop_strings"),
])
def test_bad_completion_requests_are_400(served, options, message):
    api, _, _, _, model = served
    request = {"model": model, "prompt": "w5 w6", "max_tokens": 4, **options}
    with pytest.raises(openai.BadRequestError) as err:
        api.completions.create(**request)
    assert message in err.value.message
    assert err.value.body["type"] == "invalid_request_error"


def test_bad_chat_requests_are_400_and_other_models_404(served):
    api, _, _, _, model = served
    with pytest.raises(openai.BadRequestError, match="unknown role"):
        api.chat.completions.create(model=model, messages=[{"role": "robot", "content": "w1"}])
    with pytest.raises(openai.BadRequestError, match="chat has no messages"):
        api.chat.completions.create(model=model, messages=[])
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        api.chat.completions.create(model=model, messages=CHAT, top_logprobs=2)
    with pytest.raises(openai.NotFoundError) as err:
        api.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert err.value.code == "model_not_found"


def test_api_key_is_required_on_v1_only_over_tls(served):
    _, _, _, (port, cert), model = served
    base = f"https://127.0.0.1:{port}"
    trusted = ssl.create_default_context(cafile=cert)

    def client(key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0,
                             http_client=openai.DefaultHttpxClient(verify=trusted))

    status, body = _get(f"{base}/v1/models", context=trusted)
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    with client("wrong") as wrong, pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=model, prompt="w5", max_tokens=2)
    for key in KEYS:
        with client(key) as keyed:
            assert keyed.completions.create(model=model, prompt="w5", max_tokens=2,
                                            temperature=0).usage.completion_tokens == 2
    assert _get(f"{base}/health", context=trusted)[0] == 200
    with pytest.raises(urllib.error.URLError):  # the certificate is checked, not ignored
        _get(f"{base}/health")


def test_refusals_get_openai_statuses():
    from shardserve.cluster.engine import EngineUnavailableError
    from shardserve.cluster.openai_api import APIError, _generation_errors
    from shardserve.cluster.router import OverloadedError

    for error, status, kind in ((ValueError("bad"), 400, "invalid_request_error"),
                                (OverloadedError("full"), 429, "rate_limit_error"),
                                (EngineUnavailableError("down"), 503, "server_error")):
        with pytest.raises(APIError) as raised, _generation_errors():
            raise error
        assert (raised.value.status, raised.value.body()["error"]["type"]) == (status, kind)


def test_disconnect_during_a_stream_aborts_the_request(served):
    api, _, info, _, model = served
    cancelled = 'shardserve_requests_total{outcome="cancelled"}'
    before = metrics(info).get(cancelled, 0)
    stream = api.completions.create(model=model, prompt="w7 w8", max_tokens=200, temperature=0,
                                    stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))
    assert blocks_in_use(info) > 0
    stream.close()
    wait_for(lambda: metrics(info).get(cancelled, 0) == before + 1, timeout=30)
    wait_for(lambda: blocks_in_use(info) == 0)


def test_disconnect_while_waiting_for_a_whole_answer_aborts_it(served):
    _, _, info, _, model = served
    cancelled = 'shardserve_requests_total{outcome="cancelled"}'
    before = metrics(info).get(cancelled, 0)
    with openai.OpenAI(base_url=f"http://127.0.0.1:{info['http_port']}/v1", api_key="unused",
                       max_retries=0, timeout=0.5) as impatient:
        start = time.time()
        with pytest.raises(openai.APITimeoutError):
            impatient.completions.create(model=model, prompt="w7 w8", max_tokens=4000,
                                         temperature=0, extra_body={"ignore_eos": True})
    wait_for(lambda: metrics(info).get(cancelled, 0) == before + 1, timeout=30)
    wait_for(lambda: blocks_in_use(info) == 0)
    assert time.time() - start < 30


def test_usage_says_how_much_of_the_prompt_came_from_the_prefix_cache(served):
    api, grpc_client, _, _, model = served
    prompt = list(range(100, 141))  # 41 tokens: five full blocks of 8 can be reused
    first = api.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0)
    again = api.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == 40
    assert again.choices[0].text == first.choices[0].text

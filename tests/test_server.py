"""End to end: a real gRPC server on 127.0.0.1 in front of shard actors on a local Ray cluster."""

from __future__ import annotations

import asyncio
import re
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tiny import mixed_prompts

from shardserve import LLM, SamplingParams
from shardserve.cluster.client import Client
from shardserve.cluster.config import EngineConfig, ServerConfig
from shardserve.cluster.service import start_server_actor
from shardserve.proto import shardserve_pb2 as pb


def start(model_dir, **options):
    import ray

    config = EngineConfig().with_overrides(model=str(model_dir), dtype="float32", num_threads=1,
                                           **options)
    actor, info = start_server_actor(config, ServerConfig(host="127.0.0.1", port=0,
                                                          metrics_port=0, http_port=0))
    client = Client(f"127.0.0.1:{info['grpc_port']}")

    def stop():
        client.close()
        ray.get(actor.stop.remote())
        ray.kill(actor)

    return client, info, stop


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_model):
    client, info, stop = start(tiny_model("llama-gqa"), tensor_parallel_size=2,
                               num_kv_blocks=128, block_size=8)
    yield client, info
    stop()


def metrics(info) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{info['metrics_port']}/metrics").read()
    values = {}
    for line in text.decode().splitlines():
        match = re.match(r"^([a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$", line)
        if match:
            values[match.group(1)] = float(match.group(2))
    return values


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "condition not met in time"
        time.sleep(0.05)


def blocks_in_use(info) -> float:
    return sum(v for k, v in metrics(info).items() if k.startswith("shardserve_kv_blocks_used"))


def test_health_reports_serving(server):
    client, _ = server
    assert client.health() == "SERVING"
    assert client.health("shardserve.v1.Generation") == "SERVING"
    assert client.health("liveness") == "SERVING"


def test_concurrent_streams_get_what_the_offline_api_gives(server, tiny_model):
    client, _ = server
    prompts, max_tokens = mixed_prompts(6)
    params = [dict(max_tokens=n, temperature=0) if i % 2 == 0 else
              dict(max_tokens=n, temperature=0.9, top_p=0.9, seed=100 + i)
              for i, n in enumerate(max_tokens)]
    offline = LLM(str(tiny_model("llama-gqa")), dtype="float32").generate(
        prompts, [SamplingParams(**p) for p in params])

    received: dict[int, tuple[list[int], str, int]] = {}

    def stream(i):
        ids, text, final = [], "", None
        for chunk in client.generate_stream(prompts[i], **params[i]):
            ids += chunk.token_ids
            text += chunk.text
            final = chunk
        received[i] = (ids, text, final.finish_reason, final.usage.completion_tokens)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i, expected in enumerate(offline):
        ids, text, reason, usage = received[i]
        assert ids == expected.token_ids
        assert text == expected.text
        assert usage == len(expected.token_ids)
        assert reason == {"stop": pb.FINISH_REASON_STOP,
                          "length": pb.FINISH_REASON_LENGTH}[expected.finish_reason]


def test_unary_generate_and_logprobs(server):
    client, _ = server
    prompt = mixed_prompts(1)[0][0]
    response = client.generate(prompt, max_tokens=5, temperature=0, logprobs=2,
                               request_id="my-id")
    assert response.request_id == "my-id"
    assert len(response.token_ids) == 5 and response.usage.completion_tokens == 5
    assert [e.token_id for e in response.logprobs] == list(response.token_ids)
    assert all(len(e.top_logprobs) == 2 for e in response.logprobs)
    assert response.time_to_first_token_s > 0


def test_cancelled_stream_frees_its_blocks(server):
    client, info = server
    before = metrics(info).get('shardserve_requests_total{outcome="cancelled"}', 0)
    stream = client.generate_stream([5, 6, 7], max_tokens=200, temperature=0, ignore_eos=True)
    next(stream)
    next(stream)
    assert blocks_in_use(info) > 0
    stream.cancel()
    wait_for(lambda: blocks_in_use(info) == 0)
    wait_for(lambda: metrics(info).get('shardserve_requests_total{outcome="cancelled"}', 0)
             == before + 1)


def test_deadline_is_honoured(server):
    """The client's deadline passes long before the request could finish: the server stops
    it (cancelled, not completed), frees its blocks and generates nothing more for it."""
    client, info = server
    before = metrics(info)
    cancelled = 'shardserve_requests_total{outcome="cancelled"}'
    completed = 'shardserve_requests_total{outcome="completed"}'
    start = time.time()
    with pytest.raises(grpc.RpcError) as err:
        client.generate([5, 6, 7], max_tokens=240, temperature=0, ignore_eos=True, timeout=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.time() - start < 5
    wait_for(lambda: metrics(info).get(cancelled, 0) == before.get(cancelled, 0) + 1)
    wait_for(lambda: blocks_in_use(info) == 0)
    generated = metrics(info)["shardserve_generated_tokens_total"]
    time.sleep(1.0)
    after = metrics(info)
    assert after.get(completed, 0) == before.get(completed, 0)
    assert after["shardserve_generated_tokens_total"] == generated  # it really stopped
    assert generated - before.get("shardserve_generated_tokens_total", 0) < 240


@pytest.mark.parametrize("prompt, options, message", [
    ("", {}, "prompt is empty"),
    ([], {}, "prompt is empty"),
    ([7] * 300, {}, "context limit is 256"),
    ([7], {"max_tokens": 0}, "max_tokens must be a positive integer"),
    ([7], {"max_tokens": -3}, "max_tokens must be a positive integer"),
    ([7] * 10, {"max_tokens": 250}, "set max_tokens <= 246"),
    ([7], {"temperature": -1.0}, "temperature must be a number >= 0"),
    ([7], {"temperature": float("nan")}, "temperature must be a number >= 0"),
    ([7], {"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ([7], {"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ([7], {"top_k": -1}, "top_k must be an integer >= 0"),
    ([7], {"stop_token_ids": [123456]}, "not in the vocabulary"),
    ([7, 99999], {}, "outside the vocabulary"),
    ([{"role": "robot", "content": "w1"}], {}, "chat template refused the messages"),
    ([{"content": "w1"}], {}, "chat message 0 needs a non-empty role"),
])
def test_bad_input_is_invalid_argument(server, prompt, options, message):
    client, _ = server
    for call in (lambda: client.generate(prompt, **options),
                 lambda: list(client.generate_stream(prompt, **options))):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert re.search(message, err.value.details())


def test_a_huge_prompt_is_tokenized_off_the_event_loop(server):
    """Prompts at the byte limit are tokenized on worker threads: health checks answer
    promptly meanwhile (these prompts are then refused: too many tokens)."""
    client, _ = server
    huge = " ".join(f"w{i % 900}" for i in range(240_000))[:1024 * 1024]
    errors, latencies = [], []

    def send():
        try:
            client.generate(huge, max_tokens=1)
        except grpc.RpcError as e:
            errors.append(e.code())

    senders = [threading.Thread(target=send) for _ in range(16)]
    for t in senders:
        t.start()
    while any(t.is_alive() for t in senders):
        start = time.time()
        assert client.health() == "SERVING"
        latencies.append(time.time() - start)
    assert errors == [grpc.StatusCode.INVALID_ARGUMENT] * 16
    # Tokenized on the event loop instead, these prompts stall health checks again and again
    # for half a second and more; on worker threads at most a few checks wait a little.
    slowest = sorted(latencies)[-5:]
    assert len(latencies) >= 10 and slowest[0] < 0.25 and slowest[-1] < 1.5, slowest


def test_client_ids_never_collide_with_the_servers(server):
    """The server keeps its own ids: client ids that look like them, given while id-less
    requests are in flight, are fine; the response carries the client's id, or a fresh one."""
    client, _ = server
    results = {}

    def call(key, **options):
        results[key] = client.generate([5, 6, 7], max_tokens=20, temperature=0,
                                       ignore_eos=True, **options)

    calls = [threading.Thread(target=call, args=(f"none-{i}",)) for i in range(4)]
    calls += [threading.Thread(target=call, args=(str(i),), kwargs={"request_id": str(i)})
              for i in range(4)]
    for t in calls:
        t.start()
    for t in calls:
        t.join(timeout=60)
    assert len(results) == 8
    assert len({tuple(r.token_ids) for r in results.values()}) == 1
    assert [results[str(i)].request_id for i in range(4)] == ["0", "1", "2", "3"]
    made = {results[f"none-{i}"].request_id for i in range(4)}
    assert len(made) == 4 and all(m.startswith("srv-") for m in made)


def test_chat_goes_through_the_template_and_matches_the_offline_api(server, tiny_model):
    client, _ = server
    chat = [{"role": "system", "content": "w10 w11"}, {"role": "user", "content": "w12 w13"}]
    offline = LLM(str(tiny_model("llama-gqa")), dtype="float32").chat(
        chat, SamplingParams(max_tokens=6, temperature=0))[0]
    response = client.generate(chat, max_tokens=6, temperature=0)
    assert list(response.token_ids) == offline.token_ids
    # w3 w10 w11 w4 w12 w13 w5: the roles and the assistant's opening from the template
    assert response.usage.prompt_tokens == len(offline.prompt_token_ids) == 7
    streamed = [t for chunk in client.generate_stream(chat, max_tokens=6, temperature=0)
                for t in chunk.token_ids]
    assert streamed == offline.token_ids
    with pytest.raises(grpc.RpcError) as err:
        client.stub.Generate(pb.GenerateRequest(chat=pb.Chat()))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "chat has no messages" in err.value.details()


def test_duplicate_request_id_in_flight_is_rejected(server):
    client, _ = server
    stream = client.generate_stream([5, 6], max_tokens=100, ignore_eos=True, request_id="dup")
    next(stream)
    with pytest.raises(grpc.RpcError) as err:
        client.generate([5, 6], max_tokens=2, request_id="dup")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "already in use" in err.value.details()
    stream.cancel()


def test_abort_from_another_connection_ends_the_stream(server):
    """Abort by request id from a second channel: the stream on the first ends with ABORT
    and what it generated so far, its blocks are freed, and the id is no longer abortable."""
    client, info = server
    stream = client.generate_stream([5, 6, 7], max_tokens=240, temperature=0, ignore_eos=True,
                                    request_id="to-abort")
    first = next(stream)
    with Client(f"127.0.0.1:{info['grpc_port']}") as other:
        assert other.abort("to-abort") is True
        chunks = [first, *stream]
        assert chunks[-1].finish_reason == pb.FINISH_REASON_ABORT
        generated = sum(len(c.token_ids) for c in chunks)
        assert 0 < generated < 240 and chunks[-1].usage.completion_tokens == generated
        wait_for(lambda: blocks_in_use(info) == 0)
        assert other.abort("to-abort") is False  # ended: nothing in flight by that id
        assert other.abort("no-such-request") is False

        # Without a client id, the server-made one in every message can be aborted too.
        unnamed = client.generate_stream([5, 6], max_tokens=240, ignore_eos=True)
        label = next(unnamed).request_id
        assert label.startswith("srv-") and other.abort(label) is True
        assert list(unnamed)[-1].finish_reason == pb.FINISH_REASON_ABORT

        # A unary Generate ends the same way, with the text so far.
        result = {}
        call = threading.Thread(target=lambda: result.update(response=client.generate(
            [5, 6], max_tokens=240, ignore_eos=True, request_id="unary")))
        call.start()
        wait_for(lambda: other.load().running == 1)
        assert other.abort("unary") is True
        call.join(timeout=30)
        assert result["response"].finish_reason == pb.FINISH_REASON_ABORT
        assert result["response"].request_id == "unary"
        assert len(result["response"].token_ids) < 240


def test_a_request_aborted_before_its_replica_admits_it_still_ends(tiny_model):
    """An Abort can cancel a ticket while it is still queued for its engine loop: the loop
    never admits it, yet its reader (still waiting, unlike a cancelled caller) must get the
    last output, or it would wait forever. A real engine (in this process) behind the loop."""
    from shardserve.cluster.engine import Engine
    from shardserve.cluster.metrics import Metrics
    from shardserve.cluster.router import EngineLoop, OutputStream, Ticket, _Add
    from shardserve.workers.step import SamplingParams as Params

    engine = Engine(EngineConfig().with_overrides(model=str(tiny_model("llama-gqa")),
                                                  dtype="float32", num_kv_blocks=16))
    metrics_ = Metrics()
    loop = EngineLoop(engine, 0, metrics_, lambda: [loop])

    async def abort_on_the_way():
        stream = OutputStream()
        ticket = Ticket("0", stream.push, loop)
        ticket.cancelled = True  # as Ticket.cancel does before its _Abort reaches the loop
        loop.submit(_Add(ticket, [5, 6], Params(max_tokens=4), time.time()))
        loop.abort(ticket)
        return await asyncio.wait_for(stream.get(), timeout=10)

    try:
        out = asyncio.run(abort_on_the_way())
    finally:
        loop.stop()
        engine.shutdown()
    assert out.finished and out.finish_reason == "abort" and out.token_ids == []
    assert loop.outstanding == 0
    assert engine.num_finished == 0, "the cancelled request reached the engine"
    assert metrics_.requests.labels("cancelled")._value.get() == 1


def test_load_adds_up_and_is_all_free_when_idle(server):
    client, info = server
    wait_for(lambda: blocks_in_use(info) == 0)
    idle = client.load()
    (replica,) = idle.replicas
    assert (replica.replica, replica.state) == (0, "serving")
    assert replica.kv_blocks_total == replica.kv_blocks_free == 128
    assert idle.kv_blocks_total == idle.kv_blocks_free == 128
    assert idle.running == idle.waiting == 0 and not idle.draining

    stream = client.generate_stream([5, 6, 7], max_tokens=240, ignore_eos=True)
    next(stream)
    busy = client.load()
    assert busy.running == sum(r.running for r in busy.replicas) == 1
    assert busy.waiting == sum(r.waiting for r in busy.replicas) == 0
    assert busy.kv_blocks_free == sum(r.kv_blocks_free for r in busy.replicas) < 128
    assert busy.kv_blocks_total == 128
    stream.cancel()
    wait_for(lambda: client.load().kv_blocks_free == 128)
    # what the stream computed stays cached (free for the taking) until the pool needs it
    after = client.load()
    assert after.kv_blocks_cached == after.replicas[0].kv_blocks_cached > 0


def test_drain_aborts_what_outlives_the_grace_period(ray_cluster, tiny_model):
    """A stream still running when the grace period ends is aborted: it ends with ABORT and
    the tokens it had, not with a broken connection. (Health and refusals while draining:
    tests/test_cli.py, through SIGTERM.)"""
    import ray

    config = EngineConfig().with_overrides(model=str(tiny_model("llama-gqa")),
                                           dtype="float32", num_threads=1)
    actor, info = start_server_actor(config, ServerConfig(host="127.0.0.1", port=0,
                                                          metrics_port=None))
    client = Client(f"127.0.0.1:{info['grpc_port']}")
    try:
        stream = client.generate_stream([5, 6, 7], max_tokens=240, ignore_eos=True)
        first = next(stream)
        drained = actor.drain.remote(0.0)
        chunks = [first, *stream]
        assert chunks[-1].finish_reason == pb.FINISH_REASON_ABORT
        assert chunks[-1].usage.completion_tokens == sum(len(c.token_ids) for c in chunks)
        assert ray.get(drained, timeout=60) == 1
    finally:
        client.close()
        ray.get(actor.stop.remote())
        ray.kill(actor)


def test_model_info_tokenize_and_reflection(server):
    client, info = server
    model = client.model_info()
    assert model.architecture == "LlamaForCausalLM"
    assert model.tensor_parallel_size == 2 and len(model.shards) == 2
    assert model.max_model_len == 256 and model.kv_num_blocks == 128
    assert model.max_num_batched_tokens == 512  # unset: the CPU default the scheduler uses
    assert model.quantization == "none" and model.weight_bytes > 0
    tokens = client.tokenize("w5 w6 w7", add_special_tokens=False)
    assert list(tokens.token_ids) == [5, 6, 7] and list(tokens.tokens) == ["w5", "w6", "w7"]
    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        list_services="")])))
    names = {s.name for s in reply.list_services_response.service}
    assert {"shardserve.v1.Generation", "grpc.health.v1.Health"} <= names


def test_metrics_move(server):
    client, info = server
    before = metrics(info)
    client.generate([5, 6, 7], max_tokens=4, temperature=0, ignore_eos=True)
    after = metrics(info)
    key = 'shardserve_requests_total{outcome="completed"}'
    assert after[key] == before.get(key, 0) + 1
    assert after["shardserve_generated_tokens_total"] >= before.get(
        "shardserve_generated_tokens_total", 0) + 4
    assert after["shardserve_prompt_tokens_total"] >= before.get(
        "shardserve_prompt_tokens_total", 0) + 3
    assert after["shardserve_time_to_first_token_seconds_count"] > before.get(
        "shardserve_time_to_first_token_seconds_count", 0)
    assert after["shardserve_inter_token_latency_seconds_count"] >= before.get(
        "shardserve_inter_token_latency_seconds_count", 0) + 3
    assert after['shardserve_kv_blocks_total{replica="0"}'] == 128


def test_overloaded_queue_is_resource_exhausted(ray_cluster, tiny_model):
    client, info, stop = start(tiny_model("llama-gqa"), max_num_seqs=1, max_waiting_requests=1)
    try:
        running = client.generate_stream([5], max_tokens=200, ignore_eos=True)
        next(running)  # admitted: it is running
        waiting = client.generate_stream([6], max_tokens=200, ignore_eos=True)
        wait_for(lambda: metrics(info).get('shardserve_queue_depth{replica="0"}') == 1)
        with pytest.raises(grpc.RpcError) as err:
            client.generate([7], max_tokens=2)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_waiting_requests" in err.value.details()
        running.cancel()
        waiting.cancel()
        assert metrics(info)['shardserve_requests_total{outcome="rejected_overloaded"}'] == 1
    finally:
        stop()


def test_replicas_share_the_load_and_agree(ray_cluster, tiny_model):
    client, info, stop = start(tiny_model("qwen2-gqa"), replicas=2, pipeline_parallel_size=2,
                               placement_strategy="PACK")
    try:
        model = client.model_info()
        assert model.replicas == 2 and sorted({s.replica for s in model.shards}) == [0, 1]
        prompts, max_tokens = mixed_prompts(6)
        offline = LLM(str(tiny_model("qwen2-gqa")), dtype="float32").generate(
            prompts, [SamplingParams(max_tokens=n, temperature=0) for n in max_tokens])
        results = {}

        def call(i):
            results[i] = client.generate(prompts[i], max_tokens=max_tokens[i], temperature=0)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert [list(results[i].token_ids) for i in range(6)] == [o.token_ids for o in offline]
        served = {r.replica: r.finished for r in client.model_info().replica_states}
        assert served[0] > 0 and served[1] > 0 and sum(served.values()) == 6, served
        assert 'shardserve_kv_blocks_total{replica="1"}' in metrics(info)
        load = client.load()
        assert [r.replica for r in load.replicas] == [0, 1]
        assert load.kv_blocks_total == sum(r.kv_blocks_total for r in load.replicas) > 0
        assert load.kv_blocks_free == load.kv_blocks_total  # idle again
    finally:
        stop()

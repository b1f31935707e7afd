"""A bounded fuzz of the gRPC API: a few hundred requests, most of them hostile (extreme or
malformed values in every field, garbage bytes, oversized fields, random cancellations and
deadlines), sent concurrently so they share batches with well-formed ones.

What must hold: no UNKNOWN and no INTERNAL, bad input is INVALID_ARGUMENT, every well-formed
request (and every extreme one whose result is fixed, such as a tiny temperature, which is
greedy) completes with transformers' greedy tokens, and afterwards the server is SERVING,
every KV block is free and no shard was restarted.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import pytest
from test_server import blocks_in_use, metrics, wait_for
from tiny import VOCAB, hf_greedy

from shardserve.cluster.client import Client
from shardserve.cluster.config import EngineConfig, ServerConfig
from shardserve.cluster.limits import RequestLimits
from shardserve.cluster.service import start_server_actor
from shardserve.proto import shardserve_pb2 as pb

NUM_REQUESTS = 320
MAX_TOKENS = 10
LIMITS = RequestLimits(max_message_bytes=64 * 1024, max_prompt_bytes=2048,
                       max_chat_messages=8, max_stop_strings=4, max_stop_string_bytes=32,
                       max_stop_token_ids=8, max_request_id_bytes=64)
OK, INVALID = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT
F32_MAX, F32_TINY = 3.4028234663852886e38, 1.401298464324817e-45
I32_MAX, I64_MIN, I64_MAX = 2 ** 31 - 1, -2 ** 63, 2 ** 63 - 1


@dataclass
class Case:
    kind: str
    request: pb.GenerateRequest | bytes
    allowed: set  # status codes this case may end with
    expected: list[int] | None = None  # transformers' tokens, when they are fixed
    stream: bool = False
    cancel_after: int | None = None  # messages before the client cancels
    timeout: float = 60.0
    raw_method: str = "Generate"
    seen: list = field(default_factory=list)


@pytest.fixture(scope="module")
def fuzz_server(ray_cluster, tiny_model, tiny_head):
    import ray

    config = EngineConfig().with_overrides(model=str(tiny_model("llama-gqa")), dtype="float32",
                                           num_threads=1, tensor_parallel_size=2,
                                           num_kv_blocks=256, block_size=8, max_num_seqs=32,
                                           # every step speculates: hostile requests verify
                                           # drafts (n-gram lookup's, else the head's, from
                                           # hidden states the TP shards return) beside the
                                           # well-formed ones
                                           speculative={"method": "draft_head",
                                                        "draft_model": str(tiny_head()),
                                                        "ngram_first": True, "num_tokens": 3,
                                                        "disable_above_batch": 0})
    actor, info = start_server_actor(config, ServerConfig(host="127.0.0.1", port=0,
                                                          metrics_port=0, http_port=0,
                                                          limits=LIMITS))
    target = f"127.0.0.1:{info['grpc_port']}"
    yield target, info
    ray.get(actor.stop.remote())
    ray.kill(actor)


def good_prompts(count: int = 8) -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(2, VOCAB - 1) for _ in range(rng.randint(1, 40))]
            for _ in range(count)]


def make_cases(rng: random.Random, expected: list[list[int]]) -> list[Case]:
    prompts = good_prompts()

    def greedy(i: int, **fields) -> pb.GenerateRequest:
        fields = {"max_tokens": MAX_TOKENS, "ignore_eos": True, **fields}
        return pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompts[i]), **fields)

    def exact(kind: str, **fields) -> Case:
        i = rng.randrange(len(prompts))
        return Case(kind, greedy(i, **fields), {OK}, expected[i], stream=rng.random() < 0.5)

    def accepted(kind: str, **fields) -> Case:
        i = rng.randrange(len(prompts))
        return Case(kind, greedy(i, **fields), {OK}, stream=rng.random() < 0.5)

    def invalid(kind: str, request: pb.GenerateRequest | None = None, **fields) -> Case:
        request = request or greedy(rng.randrange(len(prompts)), **fields)
        return Case(kind, request, {INVALID}, stream=rng.random() < 0.5)

    def raw(kind: str, data: bytes, allowed=frozenset({INVALID}),
            methods=("Generate", "GenerateStream", "Tokenize")) -> Case:
        return Case(kind, data, set(allowed), raw_method=rng.choice(methods))

    valid_bytes = greedy(0).SerializeToString()
    makers = [
        lambda: exact("well-formed", temperature=0),
        lambda: Case(
            "well-formed text", pb.GenerateRequest(
                text=" ".join(f"w{t}" for t in prompts[1]), max_tokens=MAX_TOKENS,
                ignore_eos=True, temperature=0), {OK}, expected[1]),
        # Extreme but accepted: tiny temperatures and nuclei are greedy, so the tokens are fixed.
        lambda: exact("tiny temperature", temperature=rng.choice([F32_TINY, 1e-30, 1e-20, 9e-6])),
        lambda: exact("tiny top_p", temperature=1.0, top_p=rng.choice([F32_TINY, 1e-30, 1e-9])),
        lambda: exact("top_k 1", temperature=rng.choice([0.5, 50.0, F32_MAX]), top_k=1),
        lambda: accepted("huge temperature", temperature=rng.choice([1e30, F32_MAX, 1e6])),
        lambda: accepted("extreme seed", temperature=1.0, seed=rng.choice([I64_MIN, I64_MAX, 0])),
        lambda: accepted("huge top_k", temperature=1.0, top_k=I32_MAX),
        lambda: accepted("max logprobs", temperature=0.7, logprobs=20),
        lambda: accepted("odd stop strings", temperature=0.9,
                         stop=["\u0000", "\U0001F600" * 8, "w"[:1] * 32][:rng.randint(1, 3)]),
        lambda: accepted("edge stop ids", temperature=0.9, stop_token_ids=[0, VOCAB - 1]),
        lambda: exact("speculation off or limited", temperature=0,
                      speculative_tokens=rng.choice([0, 1, 3])),
        # Invalid values in every field.
        lambda: invalid("bad temperature", temperature=rng.choice(
            [float("nan"), float("inf"), -float("inf"), -1e-30, -F32_MAX])),
        lambda: invalid("bad top_p", top_p=rng.choice([0.0, float("nan"), 1.0001, -1.0,
                                                       float("inf")])),
        lambda: invalid("bad top_k", top_k=rng.choice([-1, -2 ** 31])),
        lambda: invalid("bad max_tokens", max_tokens=rng.choice([0, -1, -2 ** 31, I32_MAX])),
        lambda: invalid("bad logprobs", logprobs=rng.choice([-1, 21, I32_MAX])),
        lambda: invalid("bad speculative_tokens",
                        speculative_tokens=rng.choice([-1, 4, I32_MAX, -2 ** 31])),
        lambda: invalid("empty stop string", stop=[""]),
        lambda: invalid("too many stop strings", stop=[f"s{i}" for i in range(5)]),
        lambda: invalid("long stop string", stop=["x" * 33]),
        lambda: invalid("bad stop ids", stop_token_ids=[rng.choice([-1, VOCAB, I32_MAX])]),
        lambda: invalid("too many stop ids", stop_token_ids=list(range(9))),
        lambda: invalid("bad prompt ids", pb.GenerateRequest(token_ids=pb.TokenIds(
            ids=[5, rng.choice([-1, VOCAB, 2 ** 31 - 1, -2 ** 31])]))),
        lambda: invalid("prompt past the context", pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=[5] * rng.choice([256, 5000])))),
        lambda: invalid("empty prompt", pb.GenerateRequest(text="")),
        lambda: invalid("no prompt", pb.GenerateRequest(max_tokens=3)),
        lambda: invalid("prompt past max_prompt_bytes", pb.GenerateRequest(text="w5 " * 1000)),
        lambda: invalid("empty chat", pb.GenerateRequest(chat=pb.Chat())),
        lambda: invalid("chat without role", pb.GenerateRequest(chat=pb.Chat(
            messages=[pb.ChatMessage(content="w5")]))),
        lambda: invalid("chat role the template refuses", pb.GenerateRequest(chat=pb.Chat(
            messages=[pb.ChatMessage(role="robot", content="w5")]))),
        lambda: invalid("too many chat messages", pb.GenerateRequest(chat=pb.Chat(
            messages=[pb.ChatMessage(role="user", content="w5")] * 9))),
        lambda: invalid("long request id", pb.GenerateRequest(
            request_id="r" * 65, text="w5")),
        # Bytes that are not a request, or a too large one.
        lambda: raw("garbage bytes", rng.randbytes(rng.randint(1, 200))),
        # Field 2 (text) of a GenerateRequest, field 1 (text) of a TokenizeRequest.
        lambda: raw("bad UTF-8 in a string", b"\x12\x04\xff\xfe\xfd\xfc",
                    methods=("Generate", "GenerateStream")),
        lambda: raw("bad UTF-8 in a string", b"\x0a\x04\xff\xfe\xfd\xfc", methods=("Tokenize",)),
        lambda: raw("truncated message", valid_bytes[:max(1, len(valid_bytes) // 2)]),
        lambda: raw("message past max_message_bytes",
                    pb.GenerateRequest(text="w5 " * 30000).SerializeToString()),
        lambda: raw("message past twice the limit", b"\x12" + bytes([0x80, 0x80, 0x10])
                    + b"w" * (2 ** 18), {INVALID, grpc.StatusCode.RESOURCE_EXHAUSTED}),
        # Clients that go away.
        lambda: Case("cancelled stream", greedy(rng.randrange(len(prompts)), max_tokens=200,
                                                temperature=0), {grpc.StatusCode.CANCELLED},
                     stream=True, cancel_after=rng.randint(0, 5)),
        lambda: Case("short deadline", greedy(rng.randrange(len(prompts)), max_tokens=100,
                                              temperature=0.8),
                     {OK, grpc.StatusCode.DEADLINE_EXCEEDED}, timeout=rng.uniform(0.01, 0.3),
                     stream=rng.random() < 0.5),
    ]
    weights = [30, 4, 5, 5, 4, 3, 2, 2, 2, 2, 2, 3] + [2] * 21 + [2, 1, 1, 2, 1, 1] + [3, 3]
    assert len(weights) == len(makers)
    return [rng.choices(makers, weights)[0]() for _ in range(NUM_REQUESTS)]


def run_case(channel: grpc.Channel, case: Case) -> tuple[grpc.StatusCode, list[int]]:
    tokens: list[int] = []
    try:
        if isinstance(case.request, bytes):
            method = f"/shardserve.v1.Generation/{case.raw_method}"
            if case.raw_method == "GenerateStream":
                list(channel.unary_stream(method)(case.request, timeout=case.timeout))
            else:
                channel.unary_unary(method)(case.request, timeout=case.timeout)
        elif case.stream:
            call = channel.unary_stream("/shardserve.v1.Generation/GenerateStream",
                                        request_serializer=pb.GenerateRequest.SerializeToString,
                                        response_deserializer=pb.GenerateStreamResponse.FromString)
            stream = call(case.request, timeout=case.timeout)
            for i, message in enumerate(stream):
                tokens += message.token_ids
                if case.cancel_after is not None and i >= case.cancel_after:
                    stream.cancel()
        else:
            call = channel.unary_unary("/shardserve.v1.Generation/Generate",
                                       request_serializer=pb.GenerateRequest.SerializeToString,
                                       response_deserializer=pb.GenerateResponse.FromString)
            tokens = list(call(case.request, timeout=case.timeout).token_ids)
    except grpc.RpcError as e:
        case.seen.append(e.details())
        return e.code(), tokens
    return OK, tokens


def test_fuzzed_requests_fail_alone(fuzz_server, tiny_model):
    target, info = fuzz_server
    expected = hf_greedy(tiny_model("llama-gqa"), good_prompts(), [MAX_TOKENS] * 8,
                         ignore_eos=True)
    rng = random.Random(20261201)
    cases = make_cases(rng, expected)
    client = Client(target, timeout=10)
    restarts_before = [r.restarts for r in client.model_info().replica_states]
    serving_throughout = []
    stop = threading.Event()

    def watch_health():
        while not stop.is_set():
            serving_throughout.append(client.health())
            time.sleep(0.2)

    watcher = threading.Thread(target=watch_health)
    watcher.start()
    channel = grpc.insecure_channel(target)
    start = time.time()
    try:
        with ThreadPoolExecutor(max_workers=24) as pool:
            results = list(pool.map(lambda c: run_case(channel, c), cases))
    finally:
        stop.set()
        watcher.join()
    elapsed = time.time() - start

    statuses = Counter(code.name for code, _ in results)
    print(f"\nfuzz: {len(cases)} requests in {elapsed:.1f}s, statuses {dict(statuses)}")
    by_kind = Counter((c.kind, code.name) for c, (code, _) in zip(cases, results))
    for (kind, code), n in sorted(by_kind.items()):
        print(f"  {kind:32s} {code:20s} {n}")
    assert "UNKNOWN" not in statuses and "INTERNAL" not in statuses, statuses
    for case, (code, tokens) in zip(cases, results):
        assert code in case.allowed, (case.kind, code, case.seen, case.request
                                      if not isinstance(case.request, bytes) else "bytes")
        if code == INVALID:
            assert case.seen and case.seen[-1], case.kind  # a message a person can act on
        if case.expected is not None:
            assert tokens == case.expected, case.kind
    assert sum(1 for c in cases if c.expected is not None) >= 100
    assert set(serving_throughout) == {"SERVING"}
    wait_for(lambda: blocks_in_use(info) == 0, timeout=30)
    model = client.model_info()
    assert [r.restarts for r in model.replica_states] == restarts_before == [0]
    assert all(r.state == "serving" for r in model.replica_states)
    assert client.health() == "SERVING"
    assert not any(k.startswith("shardserve_shard_restarts_total") and v
                   for k, v in metrics(info).items())
    assert metrics(info)["shardserve_speculative_verified_total"] > 0  # drafts were verified
    # and some came from the head (the rest from n-gram lookup)
    assert metrics(info)["shardserve_speculative_proposed_tokens_total"] > \
        metrics(info)["shardserve_speculative_ngram_proposed_tokens_total"]
    # And the server still answers a plain request exactly.
    again = client.generate(good_prompts()[0], max_tokens=MAX_TOKENS, temperature=0,
                            ignore_eos=True)
    assert list(again.token_ids) == expected[0]
    client.close()


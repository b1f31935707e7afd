"""A reader that falls behind holds one merged output per request, not one per step."""

from __future__ import annotations

import asyncio
import threading

from shardserve.cluster.outputs import RequestOutput, TokenLogprob
from shardserve.cluster.router import OutputStream


def step_output(i: int, finished: bool = False) -> RequestOutput:
    return RequestOutput(request_id="r", prompt_token_ids=[1], delta_token_ids=[i],
                         delta_text=f" w{i}", finished=finished,
                         finish_reason="length" if finished else None,
                         logprobs=[TokenLogprob(i, -0.5)], arrival_time=1.0,
                         first_token_time=2.0 + i,
                         token_ids=list(range(100)) if finished else None)


def test_outputs_a_slow_reader_has_not_taken_are_merged():
    async def scenario():
        stream = OutputStream()
        producer = threading.Thread(target=lambda: [stream.push(step_output(i, i == 99))
                                                    for i in range(100)])
        producer.start()
        producer.join()
        await asyncio.sleep(0.05)  # the engine thread ran 100 steps; the reader was away
        merged = await stream.get()
        assert stream._pending is None  # nothing more is held for this request
        return merged

    merged = asyncio.run(scenario())
    assert merged.delta_token_ids == list(range(100))
    assert merged.delta_text == "".join(f" w{i}" for i in range(100))
    assert [lp.token_id for lp in merged.logprobs] == list(range(100))
    assert merged.finished and merged.finish_reason == "length"
    assert merged.first_token_time == 2.0  # the first step's, not the last
    assert merged.token_ids == list(range(100))

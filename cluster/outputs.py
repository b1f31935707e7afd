"""What the engine hands back for a request, after every step and at the end."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # every generated token so far
    text: str  # generated text so far (a stop string is cut off, never included)
    delta_token_ids: list[int]  # generated in this step
    delta_text: str  # text released in this step
    finished: bool = False
    # "stop" (EOS, stop token or stop string), "length" (max_tokens or the context limit),
    # "abort" (cancelled), "error" (the engine failed; see `error`)
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None  # for delta_token_ids, when asked for
    error: str | None = None
    # With an error: invalid_argument, unavailable (shards down) or internal; the gRPC status.
    error_code: str | None = None
    arrival_time: float = 0.0
    first_token_time: float | None = None
    num_preemptions: int = 0

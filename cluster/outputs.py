"""What the engine hands back for a request, after every step and at the end."""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """One step's news for a request: only what is new, so a reader that falls behind holds the
    deltas once, never a copy of the whole output per step. The last output (finished=True)
    also carries the whole generated text and tokens."""

    request_id: str
    prompt_token_ids: list[int]  # the request's own list, not a copy
    delta_token_ids: list[int]  # generated in this step
    delta_text: str  # text released in this step
    finished: bool = False
    # "stop" (EOS, stop token or stop string), "length" (max_tokens or the context limit),
    # "abort" (cancelled), "error" (the request failed; see `error`)
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None  # for delta_token_ids, when asked for
    error: str | None = None
    # With an error: invalid_argument, unavailable (shards down) or internal; the gRPC status.
    error_code: str | None = None
    arrival_time: float = 0.0
    first_token_time: float | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # speculative decoding so far: draft tokens proposed for this request, and kept
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_verify_steps: int = 0  # steps that verified its drafts: mean accepted length is
    # (num_accepted_tokens + num_verify_steps) / num_verify_steps
    draft_seconds: float = 0.0  # wall time of its draft rounds and verifying steps
    verify_seconds: float = 0.0
    # Set when finished: every generated token, and the text (a stop string is cut off).
    token_ids: list[int] | None = None
    text: str | None = None

    def merge(self, later: "RequestOutput") -> "RequestOutput":
        """This output followed by a later one of the same request, as one."""
        logprobs = None
        if self.logprobs is not None or later.logprobs is not None:
            logprobs = (self.logprobs or []) + (later.logprobs or [])
        # the later output's counts and state, with both outputs' deltas and the earlier times
        return replace(later, delta_token_ids=self.delta_token_ids + later.delta_token_ids,
                       delta_text=self.delta_text + later.delta_text, logprobs=logprobs,
                       arrival_time=self.arrival_time,
                       first_token_time=self.first_token_time or later.first_token_time)

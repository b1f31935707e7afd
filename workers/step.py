"""What crosses the router/shard boundary: a step plan goes in, sampled tokens come out.

Plain dataclasses with no torch in them, so the scheduler side never imports torch and Ray
can pickle them cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# A temperature below this samples greedily (as vLLM does): dividing logits by it would overflow
# towards inf, and the distribution it asks for is the argmax anyway.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled and when it stops. Validated by `validate()`."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0 keeps the whole vocabulary
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # None: no logprobs; 0: the chosen token's logprob; N: also the N most likely tokens.
    logprobs: int | None = None
    # Speculative decoding: None takes the server's num_tokens (when it speculates), 0 turns
    # it off for this request, k (<= the server's) proposes at most k tokens per step.
    speculative_tokens: int | None = None

    def __post_init__(self) -> None:
        # Accept lists from callers; keep the dataclass hashable and immutable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ValueError naming the field and what to change."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not (
                0 <= self.temperature < float("inf")):  # NaN fails this too
            raise ValueError(
                f"temperature must be a number >= 0 (0 means greedy), got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if self.logprobs is not None and not (isinstance(self.logprobs, int)
                                              and 0 <= self.logprobs <= 20):
            raise ValueError(f"logprobs must be between 0 and 20, got {self.logprobs}")
        if self.speculative_tokens is not None and not (
                isinstance(self.speculative_tokens, int) and self.speculative_tokens >= 0):
            raise ValueError(f"speculative_tokens must be an integer >= 0 (0 turns speculation "
                             f"off), got {self.speculative_tokens!r}")
        if vocab_size is not None:
            bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"stop_token_ids {bad[:5]} are not in the vocabulary "
                                 f"(ids 0..{vocab_size - 1})")


@dataclass
class SequenceStep:
    """One sequence's share of a step: compute KV for `token_ids`, maybe sample the next token."""

    seq_id: int
    token_ids: list[int]
    start_position: int  # position of token_ids[0] in the sequence
    block_table: list[int]  # every block the sequence owns, in order
    sample: bool  # True when this chunk reaches the end of the known tokens
    params: SamplingParams
    seed: int  # the request's seed (given or drawn at admission)
    num_generated: int  # tokens generated so far: with the seed, fixes this draw's randomness
    # Speculative decoding: the last num_draft of token_ids are proposals to verify; the
    # result then holds the kept ones and one token of the target's (layers/verify.py).
    num_draft: int = 0
    # Attend as decode rows, one per token, though there are several: a short run after a
    # cached context (a draft model catching up on the tokens verification just accepted).
    decode_rows: bool = False

    @property
    def context_length(self) -> int:
        return self.start_position + len(self.token_ids)

    @property
    def is_decode(self) -> bool:
        """Every token a decode: the sequence's next token, and any drafts after it. Each
        then attends as a decode row of its own (a verify step costs about a decode step)."""
        return self.decode_rows or len(self.token_ids) == self.num_draft + 1


@dataclass
class StepPlan:
    step_id: int
    seqs: list[SequenceStep]
    # Return, for each sequence sampled, the final hidden state (after the final norm) of the
    # position its last emitted token came from: what a draft head steps on from
    # (workers/draft_head.py).
    return_hidden: bool = False

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)


@dataclass
class SampledToken:
    seq_id: int
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    # Set when this sequence could not be sampled; only this sequence fails, the step goes on.
    error: str | None = None


@dataclass
class StepResult:
    step_id: int
    # In plan order; a sequence that verified drafts has one entry per emitted token.
    tokens: list[SampledToken] = field(default_factory=list)
    # seq_id -> a float32 numpy vector, when the plan asked for them (return_hidden)
    hidden_states: dict = field(default_factory=dict)

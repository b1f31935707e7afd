"""One request's state in the engine: its tokens, how many are computed, its status, and what
has been released to its caller. This object is the one owner of that state; it moves whole
between replicas when one fails."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from shardserve.workers.step import SamplingParams

from .detokenizer import IncrementalDetokenizer

# Unique across every engine in the process, so a sequence keeps its id when it moves to
# another replica.
_SEQ_IDS = itertools.count()


def next_seq_id() -> int:
    return next(_SEQ_IDS)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    arrival_time: float
    detokenizer: IncrementalDetokenizer | None = None  # None only where text is not needed
    output_token_ids: list[int] = field(default_factory=list)
    # Tokens whose KV is in the cache. A preempted sequence drops to 0 and is recomputed from
    # its prompt plus what it already generated, so nothing it produced is lost.
    num_computed_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    first_token_time: float | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # of its prompt, found in the prefix cache when last admitted
    num_failures: int = 0  # shard failures this request was caught in
    lane: int = 0  # which in-flight batch it runs in (pipeline parallelism), see scheduler
    # Speculative decoding: draft tokens the scheduler makes room for this step (set by the
    # engine before it schedules), tokens the draft model's KV holds, and the counts reported
    # in the request's usage.
    lookahead: int = 0
    num_draft_computed: int = 0
    # the model's final hidden state where its latest token came from (a numpy vector; only
    # with speculative.method draft_head, which steps on from it)
    last_hidden: object = None
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_verify_steps: int = 0  # steps that verified drafts of this request
    # wall time of the draft rounds and of the verifying steps it took part in (shared with
    # its batch mates: the latency speculation added, not a share of the compute)
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def token_ids(self, start: int, end: int) -> list[int]:
        prompt_len = len(self.prompt_token_ids)
        if end <= prompt_len:
            return self.prompt_token_ids[start:end]
        if start >= prompt_len:
            return self.output_token_ids[start - prompt_len:end - prompt_len]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - prompt_len]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

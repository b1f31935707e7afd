"""Which sequences run each step, and how many of their tokens.

One rule covers prefill and decode (as in vLLM v1): each step a sequence computes the tokens it
has not computed yet, within a token budget. A new prompt is a long run of uncomputed tokens
(split across steps when it exceeds the budget: chunked prefill); a decoding sequence has one.

Continuous batching: every step, running sequences go first (oldest first), then waiting ones
are admitted while the budget, the sequence cap and free KV blocks allow. When a running
sequence needs a block and none is free, the newest running sequence is preempted: its blocks
are freed and it waits at the head of the queue to be recomputed.

Static batching (the baseline): a batch is admitted only when the previous one has finished
entirely, so early finishers leave their slots idle until the longest member ends.

Prefix caching: a sequence admitted with nothing computed starts with the cached blocks of its
longest cached prefix (kv_manager.py), so only the rest counts against the token budget.

Lanes: with pipeline parallelism several batches are in flight at once, one per lane, so that
every stage has work. Each running sequence belongs to one lane; a lane is scheduled only
when its previous batch has come back, and preempts only its own sequences (the others may be
in flight).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .kv_manager import KVCacheManager
from .sequence import Sequence, SequenceStatus

POLICIES = ("continuous", "static")


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_tokens: int  # tokens to compute this step, starting at seq.num_computed_tokens
    # speculative decoding: room made for this many draft tokens past the sequence's end
    # (the engine fills in the drafts it got, and num_tokens follows)
    num_lookahead: int = 0
    draft: list[int] | None = None

    @property
    def samples(self) -> bool:
        return self.seq.num_computed_tokens + self.num_tokens >= self.seq.num_tokens


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 policy: str = "continuous", num_lanes: int = 1):
        if policy not in POLICIES:
            raise ValueError(f"scheduler policy must be one of {POLICIES}, got {policy!r}")
        self.kv = kv
        self.max_seqs_per_lane = -(-max_num_seqs // num_lanes)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.policy = policy
        self.num_lanes = num_lanes
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order, every lane
        # Admitting only while a few blocks stay free keeps new prompts from immediately
        # forcing running sequences out (thrashing).
        self.watermark = max(1, kv.num_blocks // 100)
        self.num_preemptions = 0
        # prefix caching: tokens of admitted sequences looked up, and found, in the cache
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0

    def add(self, seq: Sequence, front: bool = False) -> None:
        if front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence (stopped, cancelled or failed) and free its blocks at once."""
        if seq.is_finished:
            return
        self._unlink(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def remove(self, seq: Sequence) -> None:
        """Let go of an unfinished sequence (another engine takes it over): its blocks are
        freed and it will be computed again from its tokens."""
        self._unlink(seq)
        seq.num_computed_tokens = seq.num_draft_computed = 0
        seq.status = SequenceStatus.WAITING

    def _unlink(self, seq: Sequence) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.kv.free(seq.seq_id)

    def schedule(self, lane: int = 0) -> list[ScheduledSequence]:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        running = [s for s in self.running if s.lane == lane]
        preempted = False

        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            n = min(seq.num_uncomputed_tokens + seq.lookahead, budget)
            while not self.kv.allocate(seq.seq_id, seq.num_computed_tokens + n):
                victim = running.pop()
                self.preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                scheduled.append(ScheduledSequence(seq, n,
                                                   max(0, n - seq.num_uncomputed_tokens)))
                budget -= n
                i += 1

        if preempted or (self.policy == "static" and running):
            # Short of memory: let the running sequences drain before admitting more. A static
            # batch admits nothing until it has finished.
            return scheduled
        while self.waiting and budget > 0 and len(running) < self.max_seqs_per_lane:
            seq = self.waiting[0]
            cached = self.kv.share_cached_prefix(seq.seq_id, seq.token_ids(0, seq.num_tokens))
            seq.num_computed_tokens = cached
            n = min(seq.num_uncomputed_tokens, budget)
            if self.policy == "static":
                n = 0  # a static batch is admitted whole; its prompts are computed next step
            elif not self.kv.allocate(seq.seq_id, seq.num_computed_tokens + n,
                                      reserve=self.watermark if self.running else 0):
                self.kv.free(seq.seq_id)  # the cached blocks it was lent, if any
                seq.num_computed_tokens = 0
                break
            self.waiting.popleft()
            seq.num_cached_tokens = cached
            self.prefix_queried_tokens += seq.num_tokens
            self.prefix_hit_tokens += cached
            seq.status = SequenceStatus.RUNNING
            seq.lane = lane
            self.running.append(seq)
            running.append(seq)
            if n:
                scheduled.append(ScheduledSequence(seq, n))
                budget -= n
        if self.policy == "static" and not scheduled and running:
            return self.schedule(lane)
        return scheduled

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks; it waits at the head of the queue to be
        recomputed from its prompt and the tokens it has generated."""
        self.running.remove(seq)
        self.kv.free(seq.seq_id)
        seq.num_computed_tokens = seq.num_draft_computed = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

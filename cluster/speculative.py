"""Speculative decoding's proposers: cheap guesses of a decoding sequence's next k tokens,
which the target model then verifies in one step (workers/layers/verify.py).

- `ngram` (prompt lookup): the tokens that followed the latest earlier occurrence of the
  sequence's last n tokens, for the longest n from ngram_max down to ngram_min that occurs.
  No model; it pays where the output repeats its context (quoting, summarising, code edits).
- `draft`: a small model with the target's tokenizer (e.g. one `shardserve distill` made)
  proposes its greedy continuation. It runs in the engine's process on one shard and keeps
  its own KV cache under the target's block tables: the engine's one allocation decision
  covers it too (its pool has as many blocks, each smaller). Three things keep it cheap,
  none of which can change an output (verification decides): its LM head scores only the
  vocabulary its directory lists in draft_vocab.json (distill writes the tokens that make up
  nearly all of the teacher's text; a small model's head is most of its cost), its weights
  may be int8, and it stops proposing for a sequence after a token it is unsure of.
- `draft_head`: a small MLP that steps on from the target's own final hidden state, which
  every step returns for the sequences it sampled (workers/draft_head.py; `shardserve
  distill --head` makes one). No layers, no KV cache, no catching up: a few matrix-vector
  products per proposed token, in the engine's process, on the target's embedding and LM head.

Proposals are deterministic (a point mass on each draft token), which verification's
acceptance rule accounts for, so sampled outputs keep the target's distribution.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shardserve.workers.step import SamplingParams, SequenceStep, StepPlan

from .sequence import Sequence

_GREEDY = SamplingParams(max_tokens=1, temperature=0)
_GREEDY_WITH_PROBABILITY = SamplingParams(max_tokens=1, temperature=0, logprobs=0)
_DECODE_ROWS = 16  # longer catch-ups (a prompt) attend as a prefill
DRAFT_VOCABULARY = "draft_vocab.json"  # {"token_ids": [...]} in a draft model's directory


def draft_vocabulary(model_dir, vocab_size: int) -> tuple[int, ...] | None:
    """The token ids a draft's head is restricted to, or None for its whole vocabulary."""
    path = Path(model_dir) / DRAFT_VOCABULARY
    if not path.is_file():
        return None
    ids = tuple(int(t) for t in json.loads(path.read_text())["token_ids"])
    if not ids:
        raise ValueError(f"{path} lists no tokens; remove it to use the whole vocabulary")
    if not all(0 <= t < vocab_size for t in ids):
        raise ValueError(f"{path} lists token ids outside the draft's vocabulary of "
                         f"{vocab_size} tokens")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path} lists a token twice")
    return ids


@dataclass
class SpeculationStats:
    """What speculation did in one engine (the metrics and bench read it)."""
    verified: int = 0  # sequence-steps that verified drafts
    proposed_tokens: int = 0
    ngram_proposed_tokens: int = 0  # of proposed_tokens, those from n-gram lookup
    accepted_tokens: int = 0
    disabled_steps: int = 0  # steps where the batch was too large to speculate
    propose_seconds: float = 0.0
    verify_seconds: float = 0.0  # wall time of the steps that verified drafts

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.proposed_tokens if self.proposed_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verifying sequence-step: the kept drafts plus the target's."""
        return (self.accepted_tokens + self.verified) / self.verified if self.verified else 0.0


def ngram_proposal(tokens: list[int], k: int, ngram_max: int = 4,
                   ngram_min: int = 1) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the last n tokens."""
    if k <= 0 or len(tokens) < 2:
        return []
    seq = np.asarray(tokens)
    for n in range(min(ngram_max, len(seq) - 1), ngram_min - 1, -1):
        suffix = seq[-n:]
        # every window of n tokens that starts early enough to have a follower
        windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return seq[start:start + k].tolist()
    return []


class DraftModel:
    """A draft model on one in-process shard, sharing the target's block tables."""

    def __init__(self, spec, num_blocks: int, block_size: int, vocab_size: int,
                 min_probability: float = 0.0):
        from .executor import LocalExecutor

        self.min_probability = min_probability
        self.params = _GREEDY_WITH_PROBABILITY if min_probability > 0 else _GREEDY

        self.executor = LocalExecutor(spec)
        shape = self.executor.shard.shape
        if shape.vocab_size != vocab_size:
            raise ValueError(f"the draft model {spec.model} has a vocabulary of "
                             f"{shape.vocab_size} tokens, the target {vocab_size}: a draft "
                             "must share the target's tokenizer")
        self.executor.allocate_kv(num_blocks, block_size)
        self.max_context_len = shape.max_context_len
        self.seconds = 0.0  # time spent proposing
        self._step_ids = 0

    def propose(self, items: list[tuple[Sequence, int, list[int]]]) -> list[list[int]]:
        """items: (sequence, k, its block table) for each sequence to draft for; returns up
        to k greedy tokens each. Each sequence's draft KV first catches up on the tokens it
        has not seen (its prompt, the tokens accepted since), then k - 1 more steps run one
        token each. A sequence stops after a token with probability under min_probability:
        its verification costs little beside the step, the next proposal would cost a draft
        step and likely be rejected."""
        start = time.perf_counter()
        drafts: list[list[int]] = [[] for _ in items]
        for round_ in range(max((k for _, k, _ in items), default=0)):
            steps, owners = [], []
            for index, (seq, k, table) in enumerate(items):
                if round_ >= k:
                    continue
                if round_ == 0:
                    begin = seq.num_draft_computed
                    token_ids = seq.token_ids(begin, seq.num_tokens)
                else:
                    begin = seq.num_tokens + round_ - 1
                    token_ids = [drafts[index][-1]]
                # a catch-up of a few tokens after the cached context runs as decode rows
                short = 0 < begin and len(token_ids) <= _DECODE_ROWS
                steps.append(SequenceStep(seq.seq_id, token_ids, begin, table, True,
                                          self.params, 0, 0, decode_rows=short))
                owners.append(index)
            self._step_ids += 1
            result = self.executor.submit(StepPlan(self._step_ids, steps))
            by_seq = {t.seq_id: t for t in result.tokens}
            for index in owners:
                token = by_seq[items[index][0].seq_id]
                if token.error:  # a broken draft proposes nothing more; the target decides
                    items[index] = (items[index][0], round_, items[index][2])
                    continue
                drafts[index].append(token.token_id)
                if token.logprob is not None and math.exp(token.logprob) < self.min_probability:
                    items[index] = (items[index][0], round_ + 1, items[index][2])
        for (seq, _, _), draft in zip(items, drafts):
            # the draft's KV now holds the sequence and every draft but the last
            seq.num_draft_computed = seq.num_tokens + max(len(draft) - 1, 0)
        self.seconds += time.perf_counter() - start
        return drafts

    def shutdown(self) -> None:
        self.executor.shutdown()


class DraftHeadProposer:
    """A draft head (workers/draft_head.py) on the target's embedding and LM head."""

    def __init__(self, head_dir, target_dir, vocab_size: int, tie_word_embeddings: bool,
                 min_probability: float = 0.0):
        import torch

        from shardserve.workers.draft_head import is_draft_head, load_draft_head
        from shardserve.workers.loader import CheckpointReader

        if not is_draft_head(head_dir):
            raise ValueError(f"{head_dir} holds no draft head (draft_head.json): make one with "
                             "shardserve distill --head, or serve a draft model with "
                             "speculative.method draft")
        head_ids = draft_vocabulary(head_dir, vocab_size)
        reader = CheckpointReader(target_dir)
        embed = reader.get("model.embed_tokens.weight")[:].float()
        lm_head = embed if tie_word_embeddings else reader.get("lm_head.weight")[:].float()
        if head_ids is not None:
            lm_head = lm_head[torch.tensor(head_ids)]
        self.head = load_draft_head(head_dir, embed, lm_head.contiguous(),
                                    list(head_ids) if head_ids is not None else None)
        self.head.serve_int8()  # it runs on this process's CPU
        self.min_probability = min_probability
        self.seconds = 0.0

    def propose(self, items: list[tuple[Sequence, int]]) -> list[list[int]]:
        """items: (sequence, k); up to k tokens each, none for a sequence whose hidden state
        the last step did not return (it failed, or it has not sampled since preemption)."""
        import torch

        start = time.perf_counter()
        drafts: list[list[int]] = [[] for _ in items]
        ready = [i for i, (seq, k) in enumerate(items) if seq.last_hidden is not None and k]
        if ready:
            states = torch.from_numpy(np.stack([items[i][0].last_hidden for i in ready]))
            last = torch.tensor([items[i][0].output_token_ids[-1] for i in ready])
            k = max(items[i][1] for i in ready)
            for i, draft in zip(ready, self.head.propose(states, last, k,
                                                         self.min_probability)):
                drafts[i] = draft[:items[i][1]]
        self.seconds += time.perf_counter() - start
        return drafts

    def shutdown(self) -> None:
        pass

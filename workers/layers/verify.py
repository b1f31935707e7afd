"""Speculative decoding's verification: the target model scored a sequence's last token and
the k draft tokens after it in one step; keep the drafts it agrees with and add one token of
its own.

Row i of the logits is the target's distribution for the token after draft i (row 0: after
the sequence's last real token). Walking the rows in order, the target picks its token at each
row exactly as decoding one token at a time would (greedy: the argmax; sampling: a draw from
its temperature / top-k / top-p distribution with the generator seeded by the request seed
and the tokens generated before it). The draft is kept while it equals that pick; the first
pick that differs is emitted instead and the walk stops; when every draft is kept, the last
row's pick is emitted too.

So the output is token for token what decoding without speculation gives, greedy or seeded,
whatever the batch or whether speculation switched off. For sampling this is the rejection
rule of speculative sampling (Leviathan et al. / Chen et al. 2023) with a coupled draw: the
drafts here are deterministic proposals (n-gram lookup, the draft model's argmax), a point
mass q on the draft d, for which the rule keeps d with probability min(1, p(d) / q(d)) = p(d)
and otherwise draws from the residual max(0, p - q), i.e. p without d; drawing x ~ p and
keeping d exactly when x = d does both at once, so each emitted token has the target's
distribution p.
"""

from __future__ import annotations

import torch

from ..step import SampledToken, SequenceStep
from .sampler import apply_top_k_top_p, draw_seed, sample

def verify(logits: torch.Tensor, s: SequenceStep) -> list[SampledToken]:
    """logits [s.num_draft + 1, V] (float32) at the positions of s's last real token and its
    drafts. Returns the kept drafts and the target's own token, in order (an error token ends
    the list when a row cannot be sampled)."""
    p = s.params
    drafts = s.token_ids[len(s.token_ids) - s.num_draft:] if s.num_draft else []
    largest, greedy = logits.max(dim=-1)
    finite = torch.isfinite(largest).tolist()
    greedy = greedy.tolist()
    logprobs = torch.log_softmax(logits, dim=-1) if p.logprobs is not None else None
    out: list[SampledToken] = []
    for i in range(len(drafts) + 1):
        if not finite[i]:
            out.append(SampledToken(s.seq_id, -1, error="the model produced non-finite logits "
                                    "for this request"))
            break
        token = greedy[i]
        if not p.greedy:  # what sampler.sample draws at this step
            probs = apply_top_k_top_p(logits[i] / p.temperature, p.top_k, p.top_p).softmax(-1)
            gen = torch.Generator(device=logits.device)
            gen.manual_seed(draw_seed(s.seed, s.num_generated + i))
            token = int(torch.multinomial(probs, 1, generator=gen))
        out.append(_with_logprobs(SampledToken(s.seq_id, token), logprobs, i, p.logprobs))
        if i == len(drafts) or token != drafts[i]:
            break
    return out


def sample_and_verify(logits: torch.Tensor, seqs: list[SequenceStep]) -> list[SampledToken]:
    """logits: num_draft + 1 rows per sequence, in order. Sequences without drafts are sampled
    together as usual; each with drafts is verified."""
    if not any(s.num_draft for s in seqs):
        return sample(logits, seqs)
    plain_rows, plain, verified, row = [], [], {}, 0
    for s in seqs:
        if s.num_draft:
            verified[s.seq_id] = verify(logits[row:row + s.num_draft + 1].float(), s)
        else:
            plain_rows.append(row)
            plain.append(s)
        row += s.num_draft + 1
    sampled = dict(zip((s.seq_id for s in plain),
                       ([t] for t in sample(logits[plain_rows], plain)))) if plain else {}
    return [t for s in seqs for t in (verified.get(s.seq_id) or sampled[s.seq_id])]


def _with_logprobs(token: SampledToken, logprobs: torch.Tensor | None, row: int,
                   top: int | None) -> SampledToken:
    if logprobs is not None:
        token.logprob = float(logprobs[row, token.token_id])
        if top:
            values, ids = torch.topk(logprobs[row], min(top, logprobs.shape[-1]))
            token.top_logprobs = list(zip(ids.tolist(), values.tolist()))
    return token

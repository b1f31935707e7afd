"""Turn logits into next tokens: greedy, temperature, top-k, top-p, with a per-request seed.

Each random draw uses a generator seeded from (request seed, tokens generated so far), so a
request's output depends only on its own seed: not on batch mates, scheduling or preemption.

Sampling is per row and in fp32, and a row that cannot be sampled (its logits are NaN or
infinite, or its draw fails) comes back as an error for that sequence alone: one request's
numbers never fail its batch mates or the shard.
"""

from __future__ import annotations

import torch

from ..step import SampledToken, SequenceStep

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads consecutive steps across seeds


def draw_seed(seed: int, step: int) -> int:
    return (seed * _MIX + step) % (2 ** 63)


def apply_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k / nucleus to -inf. logits: [V] (already temperature-scaled)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p; the top token always stays.
        drop = (probs.cumsum(-1) - probs) >= top_p
        drop[0] = False
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    return logits


def sample(logits: torch.Tensor, seqs: list[SequenceStep]) -> list[SampledToken]:
    """logits: [S, V], one row per sequence in `seqs` (each with sample=True)."""
    logits = logits.float()
    # One pass gives the greedy tokens and the check: max propagates NaN, so a row with a NaN
    # anywhere, or whose largest logit is infinite, has a non-finite max and no distribution.
    largest, greedy = logits.max(dim=-1)
    broken = (~torch.isfinite(largest)).tolist()
    greedy = greedy.tolist()
    wants_logprobs = any(s.params.logprobs is not None for s in seqs)
    logprobs = torch.log_softmax(logits, dim=-1) if wants_logprobs else None
    out = []
    for row, s in enumerate(seqs):
        if broken[row]:
            out.append(SampledToken(s.seq_id, -1, error="the model produced non-finite logits "
                                    "for this request"))
            continue
        try:
            out.append(_sample_row(logits[row], greedy[row], logprobs, row, s))
        except (RuntimeError, ValueError) as e:  # torch reports bad distributions this way
            out.append(SampledToken(s.seq_id, -1, error=f"sampling failed: {e}"))
    return out


def _sample_row(logits: torch.Tensor, greedy_token: int, logprobs: torch.Tensor | None,
                row: int, s: SequenceStep) -> SampledToken:
    p = s.params
    token = greedy_token
    if not p.greedy:
        scaled = apply_top_k_top_p(logits / p.temperature, p.top_k, p.top_p)
        gen = torch.Generator(device=logits.device)
        gen.manual_seed(draw_seed(s.seed, s.num_generated))
        token = int(torch.multinomial(scaled.softmax(-1), 1, generator=gen))
    result = SampledToken(s.seq_id, token)
    if p.logprobs is not None:
        result.logprob = float(logprobs[row, token])
        if p.logprobs > 0:
            values, ids = torch.topk(logprobs[row], min(p.logprobs, logprobs.shape[-1]))
            result.top_logprobs = list(zip(ids.tolist(), values.tolist()))
    return result

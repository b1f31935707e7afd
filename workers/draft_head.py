"""A draft head: a proposer for speculative decoding that reads the target's own state.

A separate draft model (cluster/distill.py's K-layer student) must rebuild from the tokens
what the target already knows; six of SmolLM2's thirty layers agree with it on 0.3 of its
tokens. A draft head starts instead from the target's final hidden state h_t (after the final
norm, what its LM head reads) at the position that produced the latest token x_{t+1}, and
steps forward on its own:

    s_0 = h_t,   s_i = s_{i-1} + MLP([norm(s_{i-1}); norm(embed(x_{t+i}))])

each s_i going through the target's frozen LM head (restricted to the draft vocabulary) to
propose x_{t+i+1}, whose embedding feeds the next step. It has no layers of attention and no
KV cache: a step is one small MLP and the head, and nothing ever catches up. This is the
recurrent-head family of Medusa, Hydra, EAGLE and IBM's MLPSpeculator, in its smallest form.

It is distilled from the target: on the target's hidden states over training text, s_i is
trained to give the target's temperature-softened distribution at t+i (the KL loss of
workers/distillation.py, over the draft vocabulary), plus a smooth-L1 pull of s_i toward the
target's own h_{t+i} (EAGLE's feature loss; it keeps later steps in the space the head reads).
Steps are unrolled during training as they run when serving: each from the head's own state.

Its directory holds only the head's weights (draft_head.safetensors), draft_head.json and
draft_vocab.json; the embedding and LM head are the served target's, loaded from it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .layers.cpu_gemm import PackableLinear
from .layers.quantize import int8_per_row

HEAD_CONFIG = "draft_head.json"
HEAD_WEIGHTS = "draft_head.safetensors"


@dataclass(frozen=True)
class DraftHeadConfig:
    hidden_size: int  # the target's
    inner_size: int  # the MLP's width
    vocab_size: int  # the target's, which the draft vocabulary indexes into
    teacher: str = ""  # the model it was distilled from (for people; the server checks sizes)


class DraftHead(nn.Module):
    def __init__(self, config: DraftHeadConfig, embed: torch.Tensor, head: torch.Tensor,
                 head_token_ids: list[int] | None = None):
        """embed: the target's token embedding [vocab, hidden]; head: its LM head rows for
        head_token_ids ([len(ids), hidden]), or all of it when head_token_ids is None."""
        super().__init__()
        h = config.hidden_size
        if embed.shape[1] != h or head.shape[1] != h:
            raise ValueError(f"the draft head has hidden size {h}, the target's embedding and "
                             f"LM head {embed.shape[1]}: it was distilled from another model")
        self.config = config
        self.state_norm = nn.RMSNorm(h, eps=1e-6)
        self.token_norm = nn.RMSNorm(h, eps=1e-6)
        self.up = nn.Linear(2 * h, config.inner_size)
        self.down = nn.Linear(config.inner_size, h)
        nn.init.zeros_(self.down.weight)  # starts as "the state does not move"
        nn.init.zeros_(self.down.bias)
        # frozen, and not saved with the head: they are the target's
        self.register_buffer("embed", embed.detach(), persistent=False)
        self.register_buffer("head", head.detach(), persistent=False)
        ids = head_token_ids if head_token_ids is not None else range(head.shape[0])
        self.int8_head: nn.Module | None = None  # serve_int8() sets it
        self.register_buffer("head_token_ids", torch.tensor(list(ids), dtype=torch.long),
                             persistent=False)

    def advance(self, state: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """The state after the tokens token_ids ([..., hidden], [...])."""
        x = torch.cat([self.state_norm(state), self.token_norm(self.embed[token_ids])], -1)
        return state + self.down(F.silu(self.up(x)))

    def logits(self, state: torch.Tensor) -> torch.Tensor:
        """Over the draft vocabulary: column j is token head_token_ids[j]."""
        if self.int8_head is not None:
            return self.int8_head(state)
        return F.linear(state, self.head)

    def serve_int8(self) -> None:
        """Serve the MLP and the head from int8 weights through gemm.c (cpu_gemm.py): a step
        is three matrix-vector products bound by memory, 0.36 ms so against 1.09 in bfloat16
        on a 2-core AVX-512 EPYC. Its numbers cannot change an output: verification decides."""
        self.up = _Int8Linear(self.up.weight, self.up.bias)
        self.down = _Int8Linear(self.down.weight, self.down.bias)
        self.int8_head = _Int8Linear(self.head)

    @torch.inference_mode()
    def propose(self, states: torch.Tensor, last_tokens: torch.Tensor, k: int,
                min_probability: float = 0.0) -> list[list[int]]:
        """Up to k greedy tokens for each row: states [B, hidden] (the target's h_t), last
        tokens [B] (x_{t+1}). A row stops after a token it gives less than min_probability."""
        state, token = states.to(self.embed.dtype), last_tokens
        drafts: list[list[int]] = [[] for _ in range(len(states))]
        live = list(range(len(states)))
        for _ in range(k):
            state = self.advance(state, token)
            logits = self.logits(state)
            column = logits.argmax(-1)
            token = self.head_token_ids[column]
            confident = None
            if min_probability > 0:
                top = logits.float().softmax(-1).gather(-1, column[:, None])[:, 0]
                confident = (top >= min_probability).tolist()
            keep = []
            for row, (index, t) in enumerate(zip(live, token.tolist())):
                drafts[index].append(t)
                if confident is None or confident[row]:
                    keep.append(row)
            if len(keep) < len(live):
                live = [live[r] for r in keep]
                state, token = state[keep], token[keep]
            if not live:
                break
        return drafts

    def save(self, out: Path) -> None:
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        save_file({n: p.detach().contiguous() for n, p in self.state_dict().items()},
                  str(out / HEAD_WEIGHTS))
        (out / HEAD_CONFIG).write_text(json.dumps(asdict(self.config), indent=2))


class _Int8Linear(PackableLinear):
    """A trained float weight, held as int8 with a scale per row and packed for gemm.c."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(),
                                                           requires_grad=False)
        self.set_int8_weight(*int8_per_row(self.weight.detach()))
        self.pack_for_cpu("panels")  # stays unpacked (dequantized per call) without gemm.c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


def is_draft_head(directory) -> bool:
    return (Path(directory) / HEAD_CONFIG).is_file()


def load_draft_head(directory, embed: torch.Tensor, head: torch.Tensor,
                    head_token_ids: list[int] | None) -> DraftHead:
    """The head in `directory` on the target's embedding and LM head (rows head_token_ids)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config = DraftHeadConfig(**json.loads((directory / HEAD_CONFIG).read_text()))
    if config.vocab_size != embed.shape[0]:
        raise ValueError(f"the draft head in {directory} was distilled from a model with a "
                         f"vocabulary of {config.vocab_size} tokens, the target has "
                         f"{embed.shape[0]}")
    model = DraftHead(config, embed, head, head_token_ids)
    model.load_state_dict(load_file(str(directory / HEAD_WEIGHTS)))
    return model.eval()


# --- distillation ---------------------------------------------------------------------------

@dataclass
class HeadTrainConfig:
    seconds: float = 600.0
    max_steps: int | None = None
    depth: int = 3  # steps unrolled: the most draft tokens it is trained to propose
    batch_size: int = 8  # windows per step
    learning_rate: float = 1e-3
    temperature: float = 1.0
    feature_weight: float = 0.1  # the smooth-L1 pull toward the target's hidden states
    seed: int = 0


@dataclass
class HeadTrainReport:
    steps: int
    tokens: int
    seconds: float
    first_loss: float
    last_loss: float  # the mean of the last ten steps


def teacher_states(teacher, windows: list[list[int]], batch_size: int = 4,
                   progress: bool = True) -> torch.Tensor:
    """The teacher's final hidden states (after its final norm) over each window:
    [windows, window, hidden], float32. The windows must be of one length."""
    from tqdm import tqdm

    out = []
    with torch.inference_mode():
        for i in tqdm(range(0, len(windows), batch_size), desc="teacher states",
                      unit="batch", disable=not progress):
            ids = torch.tensor(windows[i:i + batch_size])
            out.append(teacher.model(ids).last_hidden_state.float())
    return torch.cat(out)


def unrolled_loss(head: DraftHead, states: torch.Tensor, tokens: torch.Tensor,
                  config: HeadTrainConfig) -> torch.Tensor:
    """states [B, W, H] the teacher's, tokens [B, W]. Step i from position t reads token t+i
    and is scored against the teacher at t+i."""
    width = states.shape[1]
    temperature = config.temperature
    with torch.no_grad():  # the teacher's distribution at every position, once for all steps
        teacher = F.log_softmax(head.logits(states).float() / temperature, -1)
    state, total, steps = states, 0.0, 0
    for i in range(1, min(config.depth, width - 1) + 1):
        state = head.advance(state[:, :width - i], tokens[:, i:])
        student = F.log_softmax(head.logits(state).float() / temperature, -1)
        kl = F.kl_div(student.reshape(-1, student.shape[-1]),
                      teacher[:, i:].reshape(-1, teacher.shape[-1]), log_target=True,
                      reduction="batchmean") * temperature ** 2
        total = total + kl + config.feature_weight * F.smooth_l1_loss(state.float(),
                                                                      states[:, i:])
        steps += 1
    return total / steps


@torch.inference_mode()
def head_agreement(head: DraftHead, states: torch.Tensor, tokens: torch.Tensor,
                   depth: int) -> list[float]:
    """For each step i (1..depth), the share of positions where the head's greedy token
    from the teacher's state at t (given the true tokens after it) equals the teacher's
    greedy token at t+i, over the draft vocabulary."""
    width = states.shape[1]
    state, out = states, []
    for i in range(1, depth + 1):
        state = head.advance(state[:, :width - i], tokens[:, i:])
        same = head.logits(state).argmax(-1) == head.logits(states[:, i:]).argmax(-1)
        out.append(float(same.float().mean()))
    return out


def train_draft_head(head: DraftHead, states: torch.Tensor, tokens: torch.Tensor,
                     config: HeadTrainConfig, progress: bool = True,
                     checkpoint: Path | None = None,
                     checkpoint_every: int = 100) -> HeadTrainReport:
    """Train the head on the teacher's states over windows (in a seeded random order) until
    the time or step budget runs out (workers/distillation.py's budgeted_training, which
    checkpoints and resumes)."""
    from .distillation import budgeted_training
    from .shard import cpu_has_fast_bf16

    torch.manual_seed(config.seed)
    named = dict(head.named_parameters())
    optimizer = torch.optim.AdamW(list(named.values()), lr=config.learning_rate,
                                  weight_decay=0.0)
    order = torch.randperm(len(states), generator=torch.Generator().manual_seed(config.seed))
    fast_bf16 = cpu_has_fast_bf16() and states.device.type == "cpu"

    def step_loss(step: int) -> tuple[torch.Tensor, int]:
        picked = torch.stack([order[(step * config.batch_size + i) % len(states)]
                              for i in range(config.batch_size)])
        # bfloat16 matrix products where the CPU has them: twice the steps in the budget
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast_bf16):
            loss = unrolled_loss(head, states[picked], tokens[picked], config)
        return loss, int(tokens[picked].numel())

    head.train()
    run = budgeted_training(named, optimizer, step_loss, config.seconds, config.max_steps,
                            "distilling the head", progress, checkpoint, checkpoint_every)
    head.eval()
    return HeadTrainReport(run.steps, run.tokens, run.seconds, run.first_loss, run.last_loss)

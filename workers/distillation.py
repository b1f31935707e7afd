"""Knowledge distillation: a student trained to match a teacher's next-token distributions.

The loss is the seed's recipe: the KL divergence from the teacher's temperature-softened
distribution to the student's, times T^2 (so its gradients keep their scale as T changes), plus
an optional cross-entropy term on the text itself. Both models are transformers models on this
machine's CPU or GPU; the teacher only runs forward.

Training text is what every Debian machine ships, read at run time (never copied into this
repository): its common licence texts and the packages' plain-text documentation, minus the
evaluation text (cluster/quality.py scores Debian's GPL-3) and anything that contains it.
Used here to recover a 2:4-pruned model from its dense self (workers/sparsity.py).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

LICENCES = Path("/usr/share/common-licenses")
DOCS = Path("/usr/share/doc")
# cluster/quality.py's evaluation text, and licences that quote most of it
HELD_OUT = ("GPL-3", "GPL", "LGPL-3", "LGPL", "AGPL-3")
_GPL3_OPENING = "GNU GENERAL PUBLIC LICENSE\n                       Version 3, 29 June 2007"


@dataclass
class DistillConfig:
    seconds: float = 600.0  # stop after this much training time...
    max_steps: int | None = None  # ...or this many steps, whichever comes first
    window: int = 256  # tokens per training sequence
    batch_size: int = 2  # sequences per step
    learning_rate: float = 1e-4
    temperature: float = 1.0
    ce_weight: float = 0.0  # weight of the cross-entropy on the text, beside the KL term
    max_text_tokens: int = 1_000_000
    seed: int = 0


@dataclass
class DistillReport:
    steps: int
    tokens: int
    seconds: float
    first_loss: float
    last_loss: float  # the mean of the last ten steps
    texts: int  # how many files the training text came from

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def training_texts() -> list[Path]:
    """Debian's licence texts and plain-text package documentation, in a fixed order, minus
    the evaluation text and whatever quotes it."""
    licences = [p for p in sorted(LICENCES.iterdir()) if p.name not in HELD_OUT
                and p.is_file() and not p.is_symlink()] if LICENCES.is_dir() else []
    docs = sorted(p for pattern in ("*/README*", "*/*.txt", "*/*.md")
                  for p in DOCS.glob(pattern) if p.is_file() and p.suffix != ".gz")
    texts = []
    for path in licences + docs:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        if _GPL3_OPENING not in text:
            texts.append(path)
    return texts


def training_windows(tokenizer, config: DistillConfig) -> tuple[list[list[int]], int]:
    """Consecutive windows of config.window tokens over the training texts, and how many
    files they came from."""
    paths = training_texts()
    if not paths:
        raise FileNotFoundError(f"no training text under {LICENCES} or {DOCS}: distillation "
                                "trains on Debian's licence texts and package documentation")
    ids: list[int] = []
    used = 0
    for path in paths:
        if len(ids) >= config.max_text_tokens:
            break
        ids += tokenizer(path.read_text(), add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        used += 1
    ids = ids[:config.max_text_tokens]
    w = config.window
    return [ids[i:i + w] for i in range(0, len(ids) - w + 1, w)], used


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 1.0, labels: torch.Tensor | None = None,
                      ce_weight: float = 0.0) -> torch.Tensor:
    """KL(teacher_T || student_T) * T^2 per token, plus ce_weight x cross-entropy on labels
    (the next tokens)."""
    vocab = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    loss = F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2
    if ce_weight and labels is not None:
        loss = loss + ce_weight * F.cross_entropy(student_logits.float().reshape(-1, vocab),
                                                  labels.reshape(-1), ignore_index=-100)
    return loss


def _full_logits(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits at every position but the last, and the labels (the next tokens)."""
    return model(ids).logits[:, :-1], ids[:, 1:]


def _restricted_logits(teacher, student, head_token_ids: list[int], device):
    """Like _full_logits, over head_token_ids only; a label outside them is ignored."""
    index = torch.tensor(head_token_ids, dtype=torch.long, device=device)
    heads = {id(m): m.get_output_embeddings().weight.detach()[index] for m in (teacher, student)}
    column = torch.full((teacher.config.vocab_size,), -100, dtype=torch.long, device=device)
    column[index] = torch.arange(len(index), device=device)

    def logits_of(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = model.model(ids).last_hidden_state[:, :-1]  # after the final norm
        return F.linear(hidden, heads[id(model)]), column[ids[:, 1:]]
    return logits_of


@dataclass
class TrainingRun:
    """Where a budgeted training loop stopped (across resumed runs)."""
    steps: int
    tokens: int
    seconds: float
    losses: list[float]

    @property
    def first_loss(self) -> float:
        return self.losses[0] if self.losses else 0.0

    @property
    def last_loss(self) -> float:
        """The mean of the last ten steps."""
        tail = self.losses[-10:]
        return sum(tail) / len(tail) if tail else 0.0


def budgeted_training(named: dict[str, torch.nn.Parameter], optimizer,
                      step_loss: Callable[[int], tuple[torch.Tensor, int]], seconds: float,
                      max_steps: int | None, what: str, progress: bool = True,
                      checkpoint: Path | None = None, checkpoint_every: int = 50,
                      after_step: Callable[[], None] | None = None) -> TrainingRun:
    """Optimizer steps until the time or step budget runs out. step_loss(step) returns that
    step's loss and how many tokens it trained on. after_step runs after each optimizer step
    (e.g. to keep pruned weights at zero). With `checkpoint`, the named parameters, the
    optimizer and the progress are saved there every checkpoint_every steps and at the end,
    and a run that finds one resumes from it (the budget counts both)."""
    from tqdm import tqdm

    losses: list[float] = []
    tokens, step, spent = 0, 0, 0.0
    if checkpoint is not None and checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=True)
        with torch.no_grad():
            for name, value in saved["parameters"].items():
                named[name].copy_(value)
        optimizer.load_state_dict(saved["optimizer"])
        step, tokens, spent = saved["step"], saved["tokens"], saved["seconds"]
        losses = list(saved["losses"])
        log.info("resuming from %s at step %d", checkpoint, step)

    def save() -> None:
        tmp = checkpoint.with_suffix(".tmp")
        torch.save({"parameters": {n: p.detach() for n, p in named.items()},
                    "optimizer": optimizer.state_dict(), "step": step, "tokens": tokens,
                    "seconds": spent + time.perf_counter() - start, "losses": losses}, tmp)
        tmp.rename(checkpoint)

    start = time.perf_counter()
    bar = tqdm(total=max_steps, initial=step, unit="step", desc=what, disable=not progress)
    while (max_steps is None or step < max_steps) and \
            spent + time.perf_counter() - start < seconds:
        loss, step_tokens = step_loss(step)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"the loss became {loss.item()} at step {step} of "
                                     f"{what}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        step += 1
        tokens += step_tokens
        losses.append(loss.item())
        elapsed = spent + time.perf_counter() - start
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{tokens / elapsed:.0f}")
        if checkpoint is not None and step % checkpoint_every == 0:
            save()
    bar.close()
    if checkpoint is not None:
        save()
    return TrainingRun(step, tokens, spent + time.perf_counter() - start, losses)


def distill(teacher, student, windows: list[list[int]], config: DistillConfig,
            trainable: Callable[[str], bool], after_step: Callable[[], None] | None = None,
            progress: bool = True, texts: int = 0, checkpoint: Path | None = None,
            checkpoint_every: int = 50,
            head_token_ids: list[int] | None = None) -> DistillReport:
    """Train the student's parameters whose names `trainable` accepts, on the windows in a
    seeded random order, within budgeted_training's budget and checkpoints.

    head_token_ids: both models' distributions over just these tokens (renormalized), for a
    draft whose head will score only them (cluster/speculative.py). Its frozen head is then
    a fraction of the student's compute: about twice the tokens per second for SmolLM2's
    4-layer student with 8192 tokens."""
    if not windows:
        raise ValueError("no training windows: the text is shorter than one window")
    torch.manual_seed(config.seed)
    teacher.eval()
    student.train()
    named = {}
    for name, p in student.named_parameters():
        p.requires_grad_(trainable(name))
        if p.requires_grad:
            named[name] = p
    optimizer = torch.optim.AdamW(list(named.values()), lr=config.learning_rate,
                                  weight_decay=0.0)
    device = next(student.parameters()).device
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(config.seed))
    logits_of = _full_logits
    if head_token_ids is not None:
        logits_of = _restricted_logits(teacher, student, head_token_ids, device)

    def step_loss(step: int) -> tuple[torch.Tensor, int]:
        picked = [order[(step * config.batch_size + i) % len(windows)].item()
                  for i in range(config.batch_size)]
        ids = torch.tensor([windows[i] for i in picked], device=device)
        with torch.no_grad():
            teacher_logits, labels = logits_of(teacher, ids)
        student_logits, _ = logits_of(student, ids)
        return distillation_loss(student_logits, teacher_logits, config.temperature, labels,
                                 config.ce_weight), ids.numel()

    run = budgeted_training(named, optimizer, step_loss, config.seconds, config.max_steps,
                            "distilling", progress, checkpoint, checkpoint_every, after_step)
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    return DistillReport(run.steps, run.tokens, run.seconds, run.first_loss, run.last_loss,
                         texts)

"""`shardserve distill`: train a small draft model from the model being served, or with
`--head` a draft head (workers/draft_head.py; `run_head` below) on the same data.

The student has the teacher's architecture and tokenizer with K of its layers: layers evenly
spaced over the teacher's depth, the first and the last included (the first reads the
embeddings, the last writes what the LM head reads; the ones between keep the range of
depths the teacher computes at), plus the teacher's embedding, final norm and LM head, which
stay frozen (the draft must speak the teacher's vocabulary, and they are most of a small
model's bytes). The layers train on Debian's texts (workers/distillation.py) and on the
teacher's own greedy continuations of chat requests made from those texts, which is what a
draft is asked to predict when it serves, with the KL loss to the teacher's
temperature-softened distribution (plus optional cross-entropy).

Beside it goes draft_vocab.json: the `vocabulary` most frequent tokens of that training text
(the tokenizer's special tokens always among them). Served as a draft, the student's LM head
scores only those (cluster/speculative.py): a small model's head is most of its cost (SmolLM2's
49152 x 576 is 28M of a 4-layer student's 42M parameters), and a draft only ever needs to guess
the tokens the target is likely to pick; a rarer one is simply not proposed.

The result is a Hugging Face directory (transformers and shardserve load it); training
checkpoints to DIR/checkpoint.pt and resumes from it. At the end it prints the student's size,
its perplexity beside the teacher's on the held-out GPL-3, and its top-1 agreement with the
teacher there.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from .speculative import DRAFT_VOCABULARY


def student_layers(num_teacher_layers: int, k: int) -> list[int]:
    """k teacher layers evenly spaced, the first and the last included."""
    if not 1 <= k <= num_teacher_layers:
        raise ValueError(f"--layers must be between 1 and the teacher's {num_teacher_layers}")
    if k == 1:
        return [num_teacher_layers - 1]
    return [round(i * (num_teacher_layers - 1) / (k - 1)) for i in range(k)]


def make_student(teacher, layers: list[int]):
    """A copy of the teacher keeping only `layers` (in order)."""
    import copy

    import torch

    student = copy.deepcopy(teacher)
    student.model.layers = torch.nn.ModuleList(student.model.layers[i] for i in layers)
    for index, layer in enumerate(student.model.layers):
        layer.self_attn.layer_idx = index
    student.config.num_hidden_layers = len(layers)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in layers]
    return student


def teacher_generations(teacher_dir: Path, tokenizer, windows: list[list[int]], count: int,
                        window: int, seed: int) -> list[list[int]]:
    """`count` sequences of `window` tokens: a chat request made of a piece of the training
    text, then the teacher's greedy answer (served by shardserve itself, batched)."""
    import random

    from shardserve import LLM, SamplingParams

    rng = random.Random(seed)
    picks = (rng.sample(range(len(windows)), count) if count <= len(windows)
             else [rng.randrange(len(windows)) for _ in range(count)])
    asks = ("Explain this in plain words:", "Summarise this:", "What does this mean?",
            "Continue this text:")
    prompts = []
    for i, index in enumerate(picks):
        # pieces of several lengths, as requests come (the answer gets the rest of the window)
        piece = tokenizer.decode(windows[index][:rng.randint(32, 96)], skip_special_tokens=True)
        text = f"{asks[i % len(asks)]}\n\n{piece}"
        if tokenizer.chat_template:
            chat = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                 add_generation_prompt=True, tokenize=False)
            ids = tokenizer(chat, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(text)["input_ids"]
        prompts.append(ids[:window // 2])
    llm = LLM(str(teacher_dir), dtype="float32")
    try:
        results = llm.generate(prompts, [SamplingParams(max_tokens=window - len(p),
                                                        temperature=0, ignore_eos=True)
                                         for p in prompts])
    finally:
        llm.shutdown()
    return [p + r.token_ids for p, r in zip(prompts, results)]


def teacher_answers(out: Path, teacher_dir, tokenizer, windows: list[list[int]],
                    generations: int, config, progress: bool) -> list[list[int]]:
    """teacher_generations, written once to out/teacher_generations.json and read from
    there by a run that resumes."""
    path = out / "teacher_generations.json"
    if generations and not path.exists():
        start = time.perf_counter()
        generated = teacher_generations(teacher_dir, tokenizer, windows, generations,
                                        config.window, config.seed)
        path.write_text(json.dumps(generated))
        if progress:
            print(f"the teacher wrote {len(generated)} answers in "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
    return json.loads(path.read_text()) if path.exists() else []


def frequent_tokens(windows: list[list[int]], count: int, always: list[int],
                    vocab_size: int) -> list[int]:
    """The `count` most frequent token ids in the windows, plus `always`, in id order."""
    import numpy as np

    counts = np.bincount(np.concatenate([np.asarray(w) for w in windows]),
                         minlength=vocab_size)[:vocab_size]
    counts[[t for t in always if 0 <= t < vocab_size]] = counts.max() + 1
    return sorted(np.argsort(-counts, kind="stable")[:count].tolist())


def coverage(token_ids: list[int], windows: list[list[int]]) -> float:
    """The share of the windows' tokens that are among token_ids."""
    import numpy as np

    tokens = np.concatenate([np.asarray(w) for w in windows])
    return float(np.isin(tokens, token_ids).mean()) if len(tokens) else 0.0


@dataclass
class StudentReport:
    layers: list[int]
    parameters: int
    bytes: int
    teacher_perplexity: float
    student_perplexity: float
    top1_agreement: float  # the share of held-out positions where both predict the same token
    vocabulary: int  # tokens in the draft's head (draft_vocab.json), 0: all of them
    vocabulary_coverage: float  # the share of the held-out text's tokens among them
    steps: int
    tokens: int
    seconds: float


def top1_agreement(teacher, student, windows: list[list[int]]) -> float:
    import torch

    same = total = 0
    with torch.inference_mode():
        for w in windows:
            ids = torch.tensor([w])
            a = teacher(ids).logits[0].argmax(-1)
            b = student(ids).logits[0].argmax(-1)
            same += int((a == b).sum())
            total += len(w)
    return same / max(total, 1)


def run(teacher: str, k: int, out: Path, config, generations: int = 384,
        progress: bool = True, vocabulary: int = 8192) -> StudentReport:
    """config: a DistillConfig (budget, learning rate, temperature, ...)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shardserve.workers.calibration import copy_side_files
    from shardserve.workers.distillation import distill, training_windows
    from shardserve.workers.loader import resolve_model

    from .quality import EVALUATION_TEXT, Compression, measure, text_windows

    teacher_dir = resolve_model(teacher)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    layers = student_layers(teacher_model.config.num_hidden_layers, k)
    student = make_student(teacher_model, layers)
    out.mkdir(parents=True, exist_ok=True)
    windows, texts = training_windows(tokenizer, config)
    windows = windows + teacher_answers(out, teacher_dir, tokenizer, windows, generations,
                                        config, progress)
    vocab_size = teacher_model.config.vocab_size
    head_ids = (frequent_tokens(windows, vocabulary, tokenizer.all_special_ids, vocab_size)
                if 0 < vocabulary < vocab_size else [])
    report = distill(teacher_model, student, windows, config,
                     trainable=lambda name: name.startswith("model.layers."),
                     progress=progress, texts=texts, checkpoint=out / "checkpoint.pt",
                     head_token_ids=head_ids or None)
    copy_side_files(teacher_dir, out)
    if head_ids:
        (out / DRAFT_VOCABULARY).write_text(json.dumps({"token_ids": head_ids}))
    student.config.shardserve_distilled = {
        "teacher": str(teacher_dir), "teacher_layers": layers, "steps": report.steps,
        "tokens": report.tokens, "seconds": round(report.seconds, 1),
        "first_loss": round(report.first_loss, 4), "last_loss": round(report.last_loss, 4),
        "temperature": config.temperature,
        "ce_weight": config.ce_weight, "seed": config.seed}
    student.save_pretrained(out)

    held_out = text_windows(tokenizer, EVALUATION_TEXT.read_text(errors="replace"),
                            config.window) if EVALUATION_TEXT.is_file() else []
    ppl_teacher = measure(str(teacher_dir), Compression(), held_out, "float32",
                          progress).perplexity if held_out else float("nan")
    ppl_student = measure(str(out), Compression(), held_out, "float32",
                          progress).perplexity if held_out else float("nan")
    params = sum(p.numel() for p in student.parameters())
    size = sum((out / f).stat().st_size for f in ("model.safetensors",) if (out / f).exists())
    return StudentReport(layers, params, size, ppl_teacher, ppl_student,
                         top1_agreement(teacher_model, student, held_out[:16]),
                         len(head_ids), coverage(head_ids, held_out) if head_ids else 1.0,
                         report.steps, report.tokens, report.seconds)


def describe(r: StudentReport, out: Path) -> str:
    return (f"wrote {out}: {len(r.layers)} layers (the teacher's {r.layers}), "
            f"{r.parameters / 1e6:.1f}M parameters, {r.bytes / 2 ** 20:.0f} MiB\n"
            f"trained {r.steps} steps, {r.tokens} tokens in {r.seconds / 60:.1f} min\n"
            f"held-out perplexity (Debian's GPL-3): teacher {r.teacher_perplexity:.3f}, "
            f"student {r.student_perplexity:.3f}; top-1 agreement with the teacher "
            f"{r.top1_agreement:.3f}\n"
            + (f"draft head: the {r.vocabulary} most frequent tokens ({DRAFT_VOCABULARY}), "
               f"{100 * r.vocabulary_coverage:.1f}% of the held-out text's tokens\n"
               if r.vocabulary else "") +
            f"serve it as a draft: speculative: {{method: draft, draft_model: {out}}}")


# --- a draft head (workers/draft_head.py) ----------------------------------------------------

@dataclass
class HeadReport:
    parameters: int
    bytes: int
    agreement_text: list[float]  # per draft step, on the held-out GPL-3
    agreement_answers: list[float]  # per draft step, on held-out answers of the teacher
    vocabulary: int
    steps: int
    tokens: int
    seconds: float
    first_loss: float
    last_loss: float


def run_head(teacher: str, out: Path, config, head_config, generations: int = 384,
             progress: bool = True, vocabulary: int = 8192, inner_size: int = 1536,
             held_out_answers: int = 32) -> HeadReport:
    """Distill a draft head from the teacher: its hidden states over Debian's text and over
    its own answers to chat requests (the last held_out_answers of them kept for the
    evaluation). config: a DistillConfig (text, window, seed); head_config: a HeadTrainConfig
    (budget, depth, learning rate, ...)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shardserve.workers.distillation import training_windows
    from shardserve.workers.draft_head import (HEAD_WEIGHTS, DraftHead, DraftHeadConfig,
                                               head_agreement, teacher_states,
                                               train_draft_head)
    from shardserve.workers.loader import resolve_model

    from .quality import EVALUATION_TEXT, text_windows

    teacher_dir = resolve_model(teacher)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    out.mkdir(parents=True, exist_ok=True)
    windows, _ = training_windows(tokenizer, config)
    answers = teacher_answers(out, teacher_dir, tokenizer, windows, generations, config,
                              progress)
    held = answers[len(answers) - min(held_out_answers, len(answers) // 4):]
    windows = windows + answers[:len(answers) - len(held)]
    vocab_size = model.config.vocab_size
    head_ids = (frequent_tokens(windows, vocabulary, tokenizer.all_special_ids, vocab_size)
                if 0 < vocabulary < vocab_size else list(range(vocab_size)))
    embed = model.get_input_embeddings().weight.detach()
    lm_head = model.get_output_embeddings().weight.detach()[torch.tensor(head_ids)]
    head = DraftHead(DraftHeadConfig(model.config.hidden_size, inner_size, vocab_size,
                                     str(teacher)), embed, lm_head, head_ids)

    states_path = out / "teacher_states.pt"  # minutes of the teacher's CPU: kept to resume
    if states_path.exists():
        states = torch.load(states_path, weights_only=True)
    else:
        states = teacher_states(model, windows, progress=progress)
        torch.save(states, states_path)
    tokens = torch.tensor(windows)
    report = train_draft_head(head, states, tokens, head_config, progress,
                              checkpoint=out / "checkpoint.pt")
    del states
    head.save(out)
    if 0 < vocabulary < vocab_size:
        (out / DRAFT_VOCABULARY).write_text(json.dumps({"token_ids": head_ids}))

    def agreement(held_windows: list[list[int]]) -> list[float]:
        held_windows = [w for w in held_windows if len(w) == config.window]
        if not held_windows:
            return []
        return head_agreement(head, teacher_states(model, held_windows, progress=False),
                              torch.tensor(held_windows), head_config.depth)

    text = (text_windows(tokenizer, EVALUATION_TEXT.read_text(errors="replace"),
                         config.window)[:16] if EVALUATION_TEXT.is_file() else [])
    return HeadReport(sum(p.numel() for p in head.parameters()),
                      (out / HEAD_WEIGHTS).stat().st_size, agreement(text), agreement(held),
                      len(head_ids) if 0 < vocabulary < vocab_size else 0, report.steps,
                      report.tokens, report.seconds, report.first_loss, report.last_loss)


def describe_head(r: HeadReport, out: Path) -> str:
    def steps(values: list[float]) -> str:
        return ", ".join(f"{v:.3f}" for v in values) or "no held-out text"

    return (f"wrote {out}: a draft head of {r.parameters / 1e6:.2f}M parameters, "
            f"{r.bytes / 2 ** 20:.1f} MiB (it reads the target's embedding and LM head)\n"
            f"trained {r.steps} steps, {r.tokens} tokens in {r.seconds / 60:.1f} min, loss "
            f"{r.first_loss:.3f} -> {r.last_loss:.3f}\n"
            f"top-1 agreement with the teacher at draft steps 1, 2, ...: held-out answers "
            f"{steps(r.agreement_answers)}; Debian's GPL-3 {steps(r.agreement_text)}\n"
            + (f"draft head vocabulary: the {r.vocabulary} most frequent tokens "
               f"({DRAFT_VOCABULARY})\n" if r.vocabulary else "") +
            f"serve it: speculative: {{method: draft_head, draft_model: {out}}}")

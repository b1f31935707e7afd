"""`shardserve quality`: what a quantization or 2:4 sparsity costs in perplexity, beside the
unmodified model.

Perplexity is measured on a fixed real English text that every Debian machine has, read at
run time (never copied into this repository): by default Debian's copy of the GPL-3. The text
is tokenized once and cut into consecutive windows of `window` tokens; each window is one
prefill on a single in-process shard, and every token but a window's first is scored given
the ones before it in its window. Calibration (for schemes that need it) uses other texts.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

EVALUATION_TEXT = Path("/usr/share/common-licenses/GPL-3")


@dataclass(frozen=True)
class Compression:
    """One way of serving the weights, as the engine config names it."""
    quantization: str = "none"
    sparsity: str = "none"

    @property
    def label(self) -> str:
        parts = [p for p in (self.sparsity, self.quantization) if p != "none"]
        return "+".join(parts) or "none"


@dataclass
class Quality:
    compression: Compression
    perplexity: float
    tokens_scored: int
    weight_bytes: int
    seconds: float


def text_windows(tokenizer, text: str, window: int) -> list[list[int]]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = [ids[i:i + window] for i in range(0, len(ids), window)]
    return [w for w in windows if len(w) >= 2]


def measure(model: str, compression: Compression, windows: list[list[int]], dtype: str,
            progress: bool = True, sparsity_score: str = "activation") -> Quality:
    """Perplexity of `model` served as `compression` over the windows, on one in-process
    shard."""
    from tqdm import tqdm

    from shardserve.workers.shard import Shard, ShardSpec

    start = time.perf_counter()
    shard = Shard(ShardSpec(model=model, dtype=dtype, quantization=compression.quantization,
                            sparsity=compression.sparsity, sparsity_score=sparsity_score))
    total, count = 0.0, 0
    bar = tqdm(windows, desc=f"{compression.label:>16}", unit="window", disable=not progress)
    for w in bar:
        logprobs = shard.score(w)
        total -= sum(logprobs)
        count += len(logprobs)
        bar.set_postfix(perplexity=f"{math.exp(total / count):.3f}")
    quality = Quality(compression, math.exp(total / count), count, shard.weights_bytes(),
                      time.perf_counter() - start)
    shard.shutdown()
    return quality


def run(model: str, compressions: list[Compression], text: Path = EVALUATION_TEXT,
        window: int = 512, dtype: str = "float32", progress: bool = True,
        sparsity_score: str = "activation") -> list[Quality]:
    """The unmodified model's quality, then each compression's, in one run."""
    from transformers import AutoTokenizer

    from shardserve.workers.loader import resolve_model

    if not text.is_file():
        raise FileNotFoundError(f"{text} is not here: pass --text with a plain-text file "
                                "(Debian ships /usr/share/common-licenses/*)")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    windows = text_windows(tokenizer, text.read_text(errors="replace"), window)
    return [measure(model, c, windows, dtype, progress, sparsity_score)
            for c in [Compression()] + [c for c in compressions if c != Compression()]]


def report(results: list[Quality], text: Path) -> str:
    base = results[0]
    lines = [f"perplexity on {text} ({base.tokens_scored} tokens scored)",
             f"{'weights':>24} {'perplexity':>11} {'delta':>9} {'weights MiB':>12} "
             f"{'seconds':>8}"]
    for q in results:
        delta = q.perplexity - base.perplexity
        lines.append(f"{q.compression.label:>24} {q.perplexity:>11.4f} {delta:>+9.4f} "
                     f"{q.weight_bytes / 2 ** 20:>12.1f} {q.seconds:>8.1f}")
    return "\n".join(lines)

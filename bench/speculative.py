"""Speculative decoding side by side, one run: SmolLM2 as the target, with no speculation,
n-gram lookup, a distilled draft model (`shardserve distill --layers K`), a distilled draft
head (`shardserve distill --head`), and each of those behind n-gram lookup
(speculative.ngram_first: the draft proposes where the lookup finds nothing), at batch 1 and
batch 16.

    python bench/speculative.py --draft DIR --head HEAD_DIR
    python bench/speculative.py --num-tokens 4 --out bench/results/speculative.json

Workloads (greedy, EOS ignored so every request runs to its length):
- repeat: chat requests that ask the model to repeat or quote a piece of Debian's package
  documentation, so the answer repeats its prompt (where n-gram lookup pays);
- chat: chat requests asking to explain a piece of that text (the distilled draft's case);
- random: bench/workload.py's random-token prompts (neither proposer's case).
Batch 1 runs the requests one at a time and reports ms per generated token; batch 16 runs 16
at once and reports generated tokens/s. The machine is shared and drifts by 10-20% over
minutes, so at batch 1 the proposers take turns request by request (each request runs under
every proposer before the next), at batch 16 they take turns batch by batch, three rounds,
and each server answers one short request before any timing. Each row also gives the acceptance rate, the mean
accepted length (tokens per verifying step) and whether every output equals the output
without speculation. Speculation switches itself off above speculative.disable_above_batch
running or waiting sequences (8 by default), so batch 16 shows what that switch costs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = ("/usr/share/doc/dpkg/README.api", "/usr/share/doc/procps/bugs.md",
        "/usr/share/doc/file/README.Debian", "/usr/share/doc/libmpfr6/README")


def pieces(tokenizer, count: int, tokens: int) -> list[str]:
    """Pieces of plain text of about `tokens` tokens from Debian's documentation."""
    sys.path.insert(0, str(REPO))
    from shardserve.workers.distillation import training_texts

    texts = [Path(p) for p in DOCS if Path(p).is_file()] + training_texts()[20:]
    out = []
    for path in texts:
        ids = tokenizer(path.read_text(errors="replace"), add_special_tokens=False)["input_ids"]
        for i in range(0, len(ids) - tokens, tokens):
            out.append(tokenizer.decode(ids[i:i + tokens]))
            if len(out) == count:
                return out
    return out


def workloads(tokenizer, count: int) -> dict[str, list[list[int]]]:
    def chat(text: str) -> list[int]:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                 add_generation_prompt=True, tokenize=False)
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]

    from bench.workload import make_workload

    texts = pieces(tokenizer, 2 * count, 96)
    return {
        "repeat": [chat(f"Repeat the following text exactly, word for word:\n\n{t}")
                   for t in texts[:count]],
        "chat": [chat(f"Explain in simple words what this says:\n\n{t}")
                 for t in texts[count:2 * count]],
        "random": [r.prompt_token_ids for r in make_workload(count, (64, 256), (1, 1))],
    }


def run(llm, prompts: list[list[int]], batch: int, max_tokens: int) -> tuple[float, list]:
    from shardserve import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    outputs = []
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        outputs += llm.generate(prompts[i:i + batch], params)
    return time.perf_counter() - start, [r.token_ids for r in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", help="a draft model directory (shardserve distill)")
    parser.add_argument("--head", help="a draft head directory (shardserve distill --head)")
    parser.add_argument("--num-tokens", type=int, default=4)
    parser.add_argument("--head-num-tokens", type=int, default=None,
                        help="num_tokens for the draft head (default: --num-tokens)")
    parser.add_argument("--head-min-probability", type=float, default=None,
                        help="draft_min_probability for the draft head")
    parser.add_argument("--draft-min-probability", type=float, default=None,
                        help="speculative.draft_min_probability (default: the server's)")
    parser.add_argument("--draft-quantization", default=None,
                        help="speculative.draft_quantization (default: the server's)")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--batch1-requests", type=int, default=6)
    parser.add_argument("--batch16-rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "speculative.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from shardserve import LLM

    methods = {"none": {}, "ngram": {"method": "ngram", "num_tokens": args.num_tokens}}
    if args.draft:
        methods["draft"] = {"method": "draft", "draft_model": args.draft,
                            "num_tokens": args.num_tokens}
        for key in ("draft_min_probability", "draft_quantization"):
            if getattr(args, key) is not None:
                methods["draft"][key] = getattr(args, key)
        methods["draft+ngram"] = {**methods["draft"], "ngram_first": True}
    if args.head:
        methods["head"] = {"method": "draft_head", "draft_model": args.head,
                           "num_tokens": args.head_num_tokens or args.num_tokens}
        if args.head_min_probability is not None:
            methods["head"]["draft_min_probability"] = args.head_min_probability
        methods["head+ngram"] = {**methods["head"], "ngram_first": True}
    llms = {name: LLM("smollm2", dtype="float32", kv_cache_memory="1GiB",
                      **({"speculative": sp} if sp else {}))
            for name, sp in methods.items()}
    loads = workloads(llms["none"].tokenizer, args.requests)
    for llm in llms.values():  # warm up: the first step of a process pays for page faults
        run(llm, loads["chat"][:1], 1, 8)
    rows = []
    for load, prompts in loads.items():
        for batch, subset in ((1, prompts[:args.batch1_requests]), (16, prompts)):
            before = {name: json.loads(json.dumps(llm.engine.speculation.__dict__))
                      for name, llm in llms.items()}
            seconds = dict.fromkeys(llms, 0.0)
            tokens: dict[str, list] = {name: [] for name in llms}
            # batch 1: request by request, every proposer in turn; batch 16: the whole batch,
            # every proposer in turn, batch16_rounds times
            groups = ([subset[i:i + 1] for i in range(len(subset))] if batch == 1
                      else [subset] * args.batch16_rounds)
            for group in groups:
                for name, llm in llms.items():
                    spent, out = run(llm, group, batch, args.max_tokens)
                    seconds[name] += spent
                    tokens[name] += out
            for name, llm in llms.items():
                stats, was = llm.engine.speculation, before[name]
                proposed = stats.proposed_tokens - was["proposed_tokens"]
                accepted = stats.accepted_tokens - was["accepted_tokens"]
                verified = stats.verified - was["verified"]
                propose_s = stats.propose_seconds - was["propose_seconds"]
                verify_s = stats.verify_seconds - was["verify_seconds"]
                generated = sum(len(t) for t in tokens[name])
                rows.append({
                    "workload": load, "batch": batch, "method": name,
                    "ms_per_token": 1000 * seconds[name] / generated if batch == 1 else None,
                    "tokens_per_s": generated / seconds[name],
                    "speedup": seconds["none"] / seconds[name],
                    "acceptance_rate": accepted / proposed if proposed else None,
                    "mean_accepted_length": (accepted + verified) / verified if verified else None,
                    "propose_seconds": propose_s, "verify_seconds": verify_s,
                    "identical": sum(a == b for a, b in zip(tokens[name], tokens["none"])),
                    "requests": len(tokens[name])})
                r = rows[-1]
                print(f"{load:6} batch {batch:2} {name:11}: {r['tokens_per_s']:6.1f} tok/s "
                      f"{r['speedup']:.2f}x, acceptance {r['acceptance_rate'] or 0:.2f}, "
                      f"proposing {propose_s:.1f} s, verifying {verify_s:.1f} s of "
                      f"{seconds[name]:.1f}, {r['identical']}/{r['requests']} identical",
                      flush=True)
    for llm in llms.values():
        llm.shutdown()
    print("\n| workload | batch | proposer | ms/token | tok/s | vs none | acceptance | mean "
          "accepted length | outputs = none |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ms = f"{r['ms_per_token']:.1f}" if r["ms_per_token"] else "-"
        acc = f"{r['acceptance_rate']:.2f}" if r["acceptance_rate"] is not None else "-"
        mal = f"{r['mean_accepted_length']:.2f}" if r["mean_accepted_length"] else "-"
        print(f"| {r['workload']} | {r['batch']} | {r['method']} | {ms} | "
              f"{r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | {acc} | {mal} | "
              f"{r['identical']}/{r['requests']} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

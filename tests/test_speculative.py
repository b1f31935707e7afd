"""Speculative decoding (n-gram lookup, a draft model, a draft head) and `shardserve distill`.

Greedy outputs with speculation must be the outputs without it, token for token, in every
batch mix and layout; sampled outputs must keep the target's distribution; a stop inside an
accepted run ends where decoding one token at a time ends; every KV block comes back."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from test_cli import SHARDSERVE
from test_distributed import serve
from tiny import EOS, make_tiny_model, mixed_prompts

from shardserve import LLM, SamplingParams
from shardserve.cluster.speculative import ngram_proposal
from shardserve.workers.layers.verify import verify
from shardserve.workers.step import SequenceStep


def repeating_prompts() -> tuple[list[list[int]], list[int]]:
    """Prompts whose tails occur earlier in them (n-gram lookup proposes), and others."""
    g = torch.Generator().manual_seed(3)
    base = [torch.randint(2, 900, (n,), generator=g).tolist() for n in (6, 11, 3, 20)]
    prompts = [base[0] * 4, base[1] * 3 + base[1][:5], base[2] * 7, base[3] + base[3][:9],
               *mixed_prompts(4)[0]]
    return prompts, [24, 30, 17, 40, 12, 30, 5, 20]


def answer_prompts(head_dir) -> list[list[int]]:
    """The starts of the teacher's held-out answers (what its head was trained to follow)."""
    answers = json.loads((head_dir / "teacher_generations.json").read_text())
    return [a[:12] for a in answers[-4:]]


def greedy_tokens(llm, prompts, max_tokens) -> list[list[int]]:
    results = llm.generate(prompts, [SamplingParams(max_tokens=n, temperature=0)
                                     for n in max_tokens])
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks
    return [r.token_ids for r in results]


# --- proposers and verification ----------------------------------------------------------

def test_ngram_proposal_takes_the_latest_longest_match():
    assert ngram_proposal([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3], 2) == [7, 5]  # latest of 1 2 3
    assert ngram_proposal([4, 5, 6, 4, 5, 8, 6], 3, ngram_max=2) == [4, 5, 8]  # only "6" recurs
    assert ngram_proposal([1, 2, 3], 3) == []
    assert ngram_proposal([7, 7, 7, 7], 5) == [7]  # what follows it, up to the end
    assert ngram_proposal([1, 2, 1], 2, ngram_min=2) == []


def step_for(drafts, params, seed=0):
    return SequenceStep(0, [5] + drafts, 10, [0], True, params, seed, 3, num_draft=len(drafts))


def test_greedy_verification_keeps_the_agreeing_drafts_and_adds_the_target_token():
    logits = torch.full((4, 8), -5.0)
    for row, best in enumerate([2, 3, 1, 6]):
        logits[row, best] = 5.0
    greedy = SamplingParams(temperature=0, logprobs=0)
    assert [t.token_id for t in verify(logits, step_for([2, 3, 1], greedy))] == [2, 3, 1, 6]
    assert [t.token_id for t in verify(logits, step_for([2, 4, 1], greedy))] == [2, 3]
    assert [t.token_id for t in verify(logits, step_for([0, 3, 1], greedy))] == [2]
    kept = verify(logits, step_for([2], greedy))
    assert kept[0].logprob == pytest.approx(float(torch.log_softmax(logits[0], -1)[2]))
    logits[1, 0] = float("nan")
    broken = verify(logits, step_for([2, 3, 1], greedy))
    assert [t.token_id for t in broken] == [2, -1] and broken[-1].error


@pytest.mark.parametrize("draft", [1, 4])
@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0),
                                    SamplingParams(temperature=0.7, top_k=4)])
def test_sampled_verification_keeps_the_target_distribution(draft, params):
    """Over many seeds, the first emitted token (a kept draft or the target's own draw) is
    distributed as the target's sampling distribution, and the draft is kept as often as
    the rejection rule keeps it: with probability p(draft)."""
    from shardserve.workers.layers.sampler import apply_top_k_top_p

    torch.manual_seed(0)
    logits = torch.randn(3, 6) * 1.5
    target = apply_top_k_top_p(logits[0] / params.temperature, params.top_k,
                               params.top_p).softmax(-1)
    n = 6000
    counts, kept = torch.zeros(6), 0
    for seed in range(n):
        out = verify(logits, step_for([draft, 2], params, seed))
        counts[out[0].token_id] += 1
        kept += len(out) > 1
    assert (counts / n - target).abs().sum() / 2 < 0.025, (counts / n, target)
    assert abs(kept / n - float(target[draft])) < 0.02


# --- the engine ----------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3, 5])
def test_ngram_speculation_gives_the_tokens_of_decoding_one_at_a_time(tiny_model, k):
    model_dir = tiny_model("llama-gqa")
    prompts, max_tokens = repeating_prompts()
    expected = greedy_tokens(LLM(str(model_dir), dtype="float32"), prompts, max_tokens)
    llm = LLM(str(model_dir), dtype="float32",
              speculative={"method": "ngram", "num_tokens": k})
    assert greedy_tokens(llm, prompts, max_tokens) == expected
    stats = llm.engine.speculation
    # a random model's continuations rarely repeat its context, so most drafts are rejected
    # (rolled back); the draft-model tests below keep whole runs
    assert stats.proposed_tokens > 0 and stats.accepted_tokens <= stats.proposed_tokens


@pytest.mark.parametrize("draft_variant", ["same", "llama-gqa-other"])
@pytest.mark.parametrize("k", [1, 3])
def test_draft_model_speculation_gives_the_same_tokens(tiny_model, tmp_path, draft_variant, k):
    model_dir = tiny_model("llama-gqa")
    draft = model_dir if draft_variant == "same" else make_tiny_model(
        tmp_path / "draft", "llama-gqa", seed=7, num_layers=1)
    prompts, max_tokens = mixed_prompts(8)
    expected = greedy_tokens(LLM(str(model_dir), dtype="float32"), prompts, max_tokens)
    llm = LLM(str(model_dir), dtype="float32",
              speculative={"method": "draft", "draft_model": str(draft), "num_tokens": k,
                           # the target as its own draft agrees with itself in full precision
                           "draft_quantization": "none" if draft_variant == "same" else "auto"})
    assert greedy_tokens(llm, prompts, max_tokens) == expected
    stats = llm.engine.speculation
    if draft_variant == "same":  # the target as its own draft agrees with itself
        assert stats.accepted_tokens == stats.proposed_tokens > 0
    else:
        assert stats.accepted_tokens < stats.proposed_tokens


@pytest.mark.parametrize("method", ["ngram", "draft", "draft_head"])
def test_speculation_with_preemption_and_chunked_prefill(tiny_model, tiny_head, method):
    model_dir = tiny_model("llama-gqa")
    prompts, max_tokens = repeating_prompts()
    draft = model_dir
    if method == "draft_head":
        draft = tiny_head("llama-gqa")
        prompts, max_tokens = prompts + answer_prompts(draft), max_tokens + [20, 24, 16, 20]
    options = dict(dtype="float32", num_kv_blocks=14, block_size=8, max_num_batched_tokens=16)
    expected = greedy_tokens(LLM(str(model_dir), **options), prompts, max_tokens)
    llm = LLM(str(model_dir), speculative={"method": method, "num_tokens": 4,
                                           "draft_model": str(draft),
                                           "draft_quantization": "none"}, **options)
    assert greedy_tokens(llm, prompts, max_tokens) == expected
    assert llm.engine.scheduler.num_preemptions > 0
    if method != "ngram":
        assert llm.engine.speculation.accepted_tokens > 0


@pytest.mark.parametrize("k", [1, 3, 5])
def test_draft_head_speculation_gives_the_same_tokens(tiny_model, tiny_head, k):
    """A head distilled from the target, in a mixed batch: random prompts (where it guesses
    wrong) beside the starts of the teacher's held-out answers (where it guesses right);
    greedy and seeded sampled outputs are those of decoding one token at a time."""
    model_dir = tiny_model("llama-gqa")
    head = tiny_head("llama-gqa")
    prompts, max_tokens = mixed_prompts(6)
    prompts, max_tokens = prompts + answer_prompts(head), max_tokens + [20, 24, 16, 20]
    plain = LLM(str(model_dir), dtype="float32")
    expected = greedy_tokens(plain, prompts, max_tokens)
    llm = LLM(str(model_dir), dtype="float32",
              speculative={"method": "draft_head", "draft_model": str(head), "num_tokens": k})
    assert greedy_tokens(llm, prompts, max_tokens) == expected
    stats = llm.engine.speculation
    assert 0 < stats.accepted_tokens < stats.proposed_tokens
    sampled = [SamplingParams(max_tokens=n, temperature=0.8, top_p=0.9, seed=i)
               for i, n in enumerate(max_tokens)]
    assert [r.token_ids for r in llm.generate(prompts, sampled)] == \
        [r.token_ids for r in plain.generate(prompts, sampled)]
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_ngram_first_takes_the_lookup_where_it_matches_and_the_draft_elsewhere(
        tiny_model, tmp_path):
    """A draft that disagrees with the target (another random model) behind n-gram lookup,
    in a mixed batch with preemption and chunked prefill: the draft catches up on the
    tokens the lookup's runs added, the outputs stay the target's."""
    model_dir = tiny_model("llama-gqa")
    draft = make_tiny_model(tmp_path / "draft", "llama-gqa", seed=7, num_layers=1)
    prompts, max_tokens = repeating_prompts()
    options = dict(dtype="float32", num_kv_blocks=14, block_size=8, max_num_batched_tokens=16)
    expected = greedy_tokens(LLM(str(model_dir), **options), prompts, max_tokens)
    llm = LLM(str(model_dir), speculative={"method": "draft", "draft_model": str(draft),
                                           "num_tokens": 3, "ngram_first": True}, **options)
    assert greedy_tokens(llm, prompts, max_tokens) == expected
    stats = llm.engine.speculation
    assert 0 < stats.ngram_proposed_tokens < stats.proposed_tokens  # both proposed
    assert llm.engine.scheduler.num_preemptions > 0


def test_a_stop_inside_an_accepted_run_ends_where_plain_decoding_ends(tiny_model, tmp_path):
    """The draft is the target itself, so whole runs are accepted; the stop token and the
    stop string fall inside them."""
    model_dir = tiny_model("llama-gqa")
    prompt = repeating_prompts()[0][0]
    plain = LLM(str(model_dir), dtype="float32")
    free_run = plain.generate([prompt], SamplingParams(max_tokens=20, temperature=0))[0]
    stop_token = free_run.token_ids[6]
    stop_word = f"w{free_run.token_ids[9]}"
    params = [SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop_token]),
              SamplingParams(max_tokens=20, temperature=0, stop=[stop_word])]
    expected = plain.generate([prompt, prompt], params)
    spec = LLM(str(model_dir), dtype="float32",
               speculative={"method": "draft", "draft_model": str(model_dir), "num_tokens": 5,
                            "draft_quantization": "none"})
    got = spec.generate([prompt, prompt], params)
    assert [(r.token_ids, r.text, r.finish_reason) for r in got] == \
        [(r.token_ids, r.text, r.finish_reason) for r in expected]
    assert len(got[0].token_ids) < 20


def test_speculation_switches_off_above_the_batch_threshold(tiny_model):
    model_dir = tiny_model("llama-gqa")
    prompts, max_tokens = repeating_prompts()
    llm = LLM(str(model_dir), dtype="float32",
              speculative={"method": "draft", "draft_model": str(model_dir), "num_tokens": 3,
                           "draft_quantization": "none",
                           "disable_above_batch": 2})
    # one long request: alone at the end with more left than it decoded without its draft,
    # it speculates again (a short tail would finish without)
    max_tokens[3] = 100
    expected = greedy_tokens(LLM(str(model_dir), dtype="float32"), prompts, max_tokens)
    assert greedy_tokens(llm, prompts, max_tokens) == expected
    stats = llm.engine.speculation
    assert stats.disabled_steps > 0 and stats.proposed_tokens > 0  # the tail ran alone


def test_a_filling_batch_and_its_short_tail_do_not_start_the_draft(tiny_model):
    """Six requests, prefilled a few tokens per step, then decoding together: more run or
    wait than disable_above_batch from the start, so the first to decode do not speculate
    (and make the draft catch up on prompts) either; the last few left, which decoded
    without the draft for longer than they have left, finish without it."""
    model_dir = tiny_model("llama-gqa")
    prompts = mixed_prompts(6)[0]
    max_tokens = [16] * len(prompts)
    options = dict(dtype="float32", max_num_batched_tokens=16)
    expected = greedy_tokens(LLM(str(model_dir), **options), prompts, max_tokens)
    llm = LLM(str(model_dir), speculative={"method": "draft", "draft_model": str(model_dir),
                                           "num_tokens": 3, "disable_above_batch": 2},
              **options)
    assert greedy_tokens(llm, prompts, max_tokens) == expected
    stats = llm.engine.speculation
    assert stats.disabled_steps > 0 and stats.proposed_tokens == 0
    assert llm.engine.draft.seconds == 0  # not even a catch-up ran


def test_a_draft_vocabulary_outside_the_vocabulary_is_refused(tiny_model, tmp_path):
    import shutil

    model_dir = tiny_model("llama-gqa")
    draft = tmp_path / "draft"
    shutil.copytree(model_dir, draft)
    for ids, message in (([5, 7, 1000], "outside the draft's vocabulary of 1000"),
                         ([], "lists no tokens"), ([3, 3], "twice")):
        (draft / "draft_vocab.json").write_text(json.dumps({"token_ids": ids}))
        with pytest.raises(ValueError, match=message):
            LLM(str(model_dir), speculative={"method": "draft", "draft_model": str(draft)})


def test_a_request_can_turn_speculation_off(tiny_model):
    model_dir = tiny_model("llama-gqa")
    prompts, max_tokens = repeating_prompts()
    llm = LLM(str(model_dir), dtype="float32", speculative={"method": "ngram", "num_tokens": 3})
    llm.generate(prompts, [SamplingParams(max_tokens=n, temperature=0, speculative_tokens=0)
                           for n in max_tokens])
    assert llm.engine.speculation.proposed_tokens == 0
    with pytest.raises(ValueError, match="speculative_tokens"):
        llm.generate(prompts[:1], SamplingParams(max_tokens=4, speculative_tokens=9))


def test_sampled_outputs_keep_the_target_distribution_end_to_end(tmp_path):
    """A tiny vocabulary, many seeded requests: the first token (always verified against a
    draft) is distributed as transformers' softmax of the target's logits."""
    from transformers import AutoModelForCausalLM

    model_dir = make_tiny_model(tmp_path / "target", "llama-gqa", vocab_size=8,
                                eos_token_id=7, pad_token_id=0, bos_token_id=1)
    draft_dir = make_tiny_model(tmp_path / "draft", "llama-gqa", seed=5, vocab_size=8,
                                eos_token_id=7, pad_token_id=0, bos_token_id=1)
    prompt = [2, 3, 4, 5, 2, 3]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.inference_mode():
        target = hf(torch.tensor([prompt])).logits[0, -1].softmax(-1)
    llm = LLM(str(model_dir), dtype="float32",
              speculative={"method": "draft", "draft_model": str(draft_dir), "num_tokens": 2,
                           "disable_above_batch": 0})
    n = 3000
    results = llm.generate([prompt] * n, [SamplingParams(max_tokens=3, temperature=1.0, seed=s,
                                                         ignore_eos=True) for s in range(n)])
    counts = torch.bincount(torch.tensor([r.token_ids[0] for r in results]), minlength=8)
    assert (counts / n - target).abs().sum() / 2 < 0.04, (counts / n, target)
    assert llm.engine.speculation.proposed_tokens > 0
    # seeded requests give what they give without speculation, alone or in any batch
    params = [SamplingParams(max_tokens=6, temperature=1.0, seed=s, ignore_eos=True)
              for s in range(5)]
    plain = LLM(str(model_dir), dtype="float32").generate([prompt] * 5, params)
    alone = llm.generate([prompt] * 5, params)
    assert [r.token_ids for r in alone] == [r.token_ids for r in plain]


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_speculation_in_tensor_and_pipeline_parallel_layouts(ray_cluster, tiny_model, tiny_head,
                                                             tp, pp):
    model_dir = tiny_model("llama-gqa-untied")
    head = tiny_head("llama-gqa-untied")  # its hidden states come back from the last stage
    prompts, max_tokens = repeating_prompts()
    prompts, max_tokens = prompts + answer_prompts(head), max_tokens + [20, 24, 16, 20]
    expected = greedy_tokens(LLM(str(model_dir), dtype="float32"), prompts, max_tokens)
    for speculative in ({"method": "ngram", "num_tokens": 3},
                        {"method": "draft", "draft_model": str(model_dir), "num_tokens": 2},
                        {"method": "draft_head", "draft_model": str(head), "num_tokens": 3}):
        llm = serve(model_dir, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                    speculative=speculative)
        try:
            assert greedy_tokens(llm, prompts, max_tokens) == expected
            assert llm.engine.speculation.accepted_tokens > 0
        finally:
            llm.shutdown()


def test_a_cheap_draft_restricted_head_int8_weights_early_stop_gives_the_same_tokens(
        tiny_model, tmp_path):
    """The draft's head scores only the tokens of draft_vocab.json (sampled columns map back
    to their ids), its weights are int8, and it stops after an unsure token: its proposals
    change, the outputs do not. The target as its own draft, its head cut to the tokens the
    target picks plus others, still has every proposal accepted."""
    import shutil

    model_dir = tiny_model("llama-gqa")
    prompts, max_tokens = mixed_prompts(8)
    expected = greedy_tokens(LLM(str(model_dir), dtype="float32"), prompts, max_tokens)
    picked = sorted({t for out in expected for t in out})
    draft = tmp_path / "draft"
    shutil.copytree(model_dir, draft)
    others = [t for t in range(0, 1000, 7) if t not in picked]
    (draft / "draft_vocab.json").write_text(json.dumps({"token_ids": sorted(picked + others)}))
    for options, all_accepted in (({"draft_quantization": "none"}, True),
                                  ({"draft_quantization": "int8-weight",
                                    "draft_min_probability": 0.5}, False)):
        llm = LLM(str(model_dir), dtype="float32", speculative={
            "method": "draft", "draft_model": str(draft), "num_tokens": 3, **options})
        shard = llm.engine.draft.executor.shard
        logits = shard.model.compute_logits(torch.zeros(1, shard.shape.hidden_size))
        assert logits.shape[-1] == len(picked) + len(others)
        assert shard.quantization == options["draft_quantization"]
        assert greedy_tokens(llm, prompts, max_tokens) == expected
        stats = llm.engine.speculation
        assert stats.proposed_tokens > 0
        if all_accepted:
            assert stats.accepted_tokens == stats.proposed_tokens
    # the int8 draft stopped early: fewer proposals than num_tokens per verifying step
    assert stats.proposed_tokens < 3 * stats.verified
    # a draft head without the tokens the target picks: nothing of its is accepted wrongly
    (draft / "draft_vocab.json").write_text(json.dumps({"token_ids": others}))
    llm = LLM(str(model_dir), dtype="float32", speculative={
        "method": "draft", "draft_model": str(draft), "num_tokens": 2})
    assert greedy_tokens(llm, prompts, max_tokens) == expected
    assert llm.engine.speculation.accepted_tokens == 0 < llm.engine.speculation.proposed_tokens


def test_bad_speculative_options_are_refused(tiny_model, tiny_head, tmp_path):
    model_dir = str(tiny_model("llama-gqa"))
    with pytest.raises(ValueError, match="speculative.method must be"):
        LLM(model_dir, speculative={"method": "magic"})
    with pytest.raises(ValueError, match="draft_model"):
        LLM(model_dir, speculative={"method": "draft"})
    with pytest.raises(ValueError, match="draft_quantization"):
        LLM(model_dir, speculative={"method": "draft", "draft_model": model_dir,
                                    "draft_quantization": "int4"})
    with pytest.raises(ValueError, match="draft_min_probability"):
        LLM(model_dir, speculative={"method": "draft", "draft_model": model_dir,
                                    "draft_min_probability": 1.5})
    other = make_tiny_model(tmp_path / "other-vocab", "llama-gqa", vocab_size=500,
                            eos_token_id=499)
    with pytest.raises(ValueError, match="share the target's tokenizer"):
        LLM(model_dir, speculative={"method": "draft", "draft_model": str(other)})
    with pytest.raises(ValueError, match="draft_head needs speculative.draft_model"):
        LLM(model_dir, speculative={"method": "draft_head"})
    with pytest.raises(ValueError, match="holds no draft head"):
        LLM(model_dir, speculative={"method": "draft_head", "draft_model": model_dir})
    with pytest.raises(ValueError, match="vocabulary"):  # distilled from another model
        LLM(str(other), speculative={"method": "draft_head",
                                     "draft_model": str(tiny_head("llama-gqa"))})


# --- distillation --------------------------------------------------------------------------

def test_distill_trains_a_student_that_transformers_and_shardserve_load(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    teacher = tiny_model("llama-gqa")
    out = tmp_path / "student"
    cmd = [*SHARDSERVE, "distill", "--teacher", str(teacher), "--layers", "1", "--out",
           str(out), "--draft-vocab", "300", "--text-tokens", "64", "--steps", "40",
           "--window", "32",
           "--generations", "24", "--learning-rate", "3e-3"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "1 layers (the teacher's [1])" in done.stdout and "top-1 agreement" in done.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 1
    record = config["shardserve_distilled"]
    assert record["steps"] == 40 and record["last_loss"] < record["first_loss"]
    AutoModelForCausalLM.from_pretrained(out)
    llm = LLM(str(out), dtype="float32")
    assert len(llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4))[0].token_ids) == 4
    # the draft head: the 300 most frequent tokens, the special ones among them
    head = json.loads((out / "draft_vocab.json").read_text())["token_ids"]
    assert len(head) == 300 and EOS in head and head == sorted(set(head))
    assert "draft head: the 300 most frequent tokens" in done.stdout
    # more steps resume from the checkpoint instead of starting over (the tiny word
    # tokenizer reads Debian's text as unknown words: the teacher's answers carry the signal)
    more = subprocess.run([*cmd[:-8], "--steps", "45", "--window", "32", "--generations", "24",
                           "--learning-rate", "3e-3"], capture_output=True, text=True,
                          timeout=600)
    assert more.returncode == 0, more.stderr
    assert json.loads((out / "config.json").read_text())["shardserve_distilled"]["steps"] == 45


def test_distill_head_trains_a_draft_head_and_resumes(tiny_model, tmp_path):
    import re

    teacher = tiny_model("llama-gqa")
    out = tmp_path / "head"
    cmd = [*SHARDSERVE, "distill", "--teacher", str(teacher), "--head", "--out", str(out),
           "--draft-vocab", "300", "--text-tokens", "64", "--window", "32",
           "--generations", "24", "--steps", "40"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    loss = re.search(r"trained 40 steps, \d+ tokens in .* min, loss ([\d.]+) -> ([\d.]+)",
                     done.stdout)
    assert loss and float(loss[2]) < float(loss[1]) / 2, done.stdout
    # the teacher's held-out answers: the head guesses most of their next tokens
    agreement = re.search(r"held-out answers ([\d.]+)", done.stdout)
    assert agreement and float(agreement[1]) > 0.3, done.stdout
    assert {"draft_head.json", "draft_head.safetensors", "draft_vocab.json"} <= \
        {p.name for p in out.iterdir()}
    assert "method: draft_head" in done.stdout
    more = subprocess.run([*cmd[:-1], "45"], capture_output=True, text=True, timeout=600)
    assert more.returncode == 0, more.stderr
    assert "trained 45 steps" in more.stdout
    neither = subprocess.run([*SHARDSERVE, "distill", "--out", str(tmp_path / "x")],
                             capture_output=True, text=True, timeout=600)
    assert neither.returncode == 2 and "either --layers K" in neither.stderr


def test_student_layers_are_evenly_spaced_with_both_ends():
    from shardserve.cluster.distill import student_layers

    assert student_layers(30, 4) == [0, 10, 19, 29]
    assert student_layers(30, 1) == [29]
    assert student_layers(2, 2) == [0, 1]
    with pytest.raises(ValueError):
        student_layers(30, 31)


def test_grpc_requests_choose_speculation_and_report_it(ray_cluster, tiny_model):
    """A real server: the request's speculative_tokens, the usage it reports, the metrics."""
    import grpc
    from test_server import metrics, start

    model_dir = tiny_model("llama-gqa")
    prompts, max_tokens = repeating_prompts()
    expected = greedy_tokens(LLM(str(model_dir), dtype="float32"), prompts[:2], max_tokens[:2])
    client, info, stop = start(model_dir, speculative={
        "method": "draft", "draft_model": str(model_dir), "num_tokens": 3,
        "draft_quantization": "none"})
    try:
        before = metrics(info)
        unary = client.generate(prompts[0], max_tokens=max_tokens[0], temperature=0)
        assert list(unary.token_ids) == expected[0]
        assert unary.usage.accepted_draft_tokens == unary.usage.draft_tokens > 0
        # every step verified 3 drafts (the last ones fewer, near max_tokens)
        assert 0 < unary.usage.speculative_steps * 3 >= unary.usage.draft_tokens
        assert unary.usage.draft_seconds > 0 and unary.usage.verify_seconds > 0
        stream = list(client.generate_stream(prompts[1], max_tokens=max_tokens[1],
                                             temperature=0, speculative_tokens=1))
        assert [t for m in stream for t in m.token_ids] == expected[1]
        assert 0 < stream[-1].usage.draft_tokens <= max_tokens[1]  # one draft per step at most
        assert stream[-1].usage.speculative_steps == stream[-1].usage.draft_tokens
        off = client.generate(prompts[1], max_tokens=max_tokens[1], temperature=0,
                              speculative_tokens=0)
        assert list(off.token_ids) == expected[1] and off.usage.draft_tokens == 0
        with pytest.raises(grpc.RpcError) as err:
            client.generate(prompts[0], max_tokens=4, speculative_tokens=4)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "exceeds the server's speculative.num_tokens (3)" in err.value.details()
        after = metrics(info)
        proposed = "shardserve_speculative_proposed_tokens_total"
        accepted = "shardserve_speculative_accepted_tokens_total"
        assert after[proposed] - before.get(proposed, 0) == (
            unary.usage.draft_tokens + stream[-1].usage.draft_tokens)
        assert after[accepted] > before.get(accepted, 0)
        # a draft model without ngram_first: no proposal came from n-gram lookup
        assert after["shardserve_speculative_ngram_proposed_tokens_total"] == 0
        assert client.model_info().sparsity == "none"
    finally:
        stop()

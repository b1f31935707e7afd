"""Sampling (seeded, top-k, top-p), logprobs and every stop condition."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from tiny import EOS, VOCAB, hf_greedy, mixed_prompts, set_eos

from shardserve import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(str(tiny_model("llama-gqa")), dtype="float32")


def test_same_seed_same_output_whatever_the_batch(llm):
    prompts, _ = mixed_prompts(4)
    params = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=1234)
    alone = llm.generate([prompts[0]], params)[0].token_ids
    batched = llm.generate(prompts, [params] + [SamplingParams(max_tokens=20, temperature=0.8,
                                                               seed=i) for i in range(3)])
    assert batched[0].token_ids == alone
    again = llm.generate([prompts[0]], params)[0].token_ids
    assert again == alone
    other = llm.generate([prompts[0]], SamplingParams(max_tokens=20, temperature=1.0,
                                                      top_p=0.9, seed=4321))[0].token_ids
    assert other != alone


def test_seeded_sampling_survives_preemption(tiny_model):
    model_dir = tiny_model("llama-gqa")
    prompts, _ = mixed_prompts(8)
    params = [SamplingParams(max_tokens=30, temperature=1.0, seed=i) for i in range(8)]
    roomy = LLM(str(model_dir), dtype="float32").generate(prompts, params)
    tight_llm = LLM(str(model_dir), dtype="float32", num_kv_blocks=16, block_size=8)
    tight = tight_llm.generate(prompts, params)
    assert tight_llm.engine.scheduler.num_preemptions > 0
    assert [r.token_ids for r in tight] == [r.token_ids for r in roomy]


def test_top_k_1_and_tiny_top_p_are_greedy(llm):
    prompts, _ = mixed_prompts(3)
    greedy = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0))
    top_k = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=1.5, top_k=1, seed=3))
    top_p = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=1.5, top_p=1e-6,
                                                 seed=3))
    assert [r.token_ids for r in top_k] == [r.token_ids for r in greedy]
    assert [r.token_ids for r in top_p] == [r.token_ids for r in greedy]


def test_top_k_limits_the_choice(llm):
    """Every sampled token is among the k most likely at its step (checked with logprobs)."""
    prompt = mixed_prompts(1)[0][0]
    result = llm.generate([prompt], SamplingParams(max_tokens=15, temperature=2.0, top_k=3,
                                                   seed=7, logprobs=3))[0]
    for entry in result.logprobs:
        assert entry.token_id in [token for token, _ in entry.top_logprobs]


def test_logprobs_match_transformers(tiny_model, llm):
    model_dir = tiny_model("llama-gqa")
    prompt = mixed_prompts(2)[0][1]
    result = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0, logprobs=2))[0]
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = hf(torch.tensor([prompt + result.token_ids])).logits[0].float()
    expected = torch.log_softmax(logits, -1)[len(prompt) - 1:-1]
    for step, entry in enumerate(result.logprobs):
        assert entry.token_id == result.token_ids[step]
        assert math.isclose(entry.logprob, expected[step, entry.token_id].item(), abs_tol=1e-4)
        top = torch.topk(expected[step], 2)
        assert [t for t, _ in entry.top_logprobs] == top.indices.tolist()


def test_max_tokens_stops_with_length(llm):
    result = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=7, temperature=0,
                                                      ignore_eos=True))[0]
    assert len(result.token_ids) == 7 and result.finish_reason == "length"


def test_eos_stops_and_ignore_eos_runs_on(tiny_model, tmp_path):
    source = tiny_model("llama-gqa")
    prompt = mixed_prompts(1)[0][0]
    free_run = hf_greedy(source, [prompt], [20], ignore_eos=True)[0]
    eos = free_run[4]
    first = free_run.index(eos)
    model_dir = tmp_path / "with-eos"
    shutil.copytree(source, model_dir)
    set_eos(model_dir, eos)
    llm = LLM(str(model_dir), dtype="float32")
    stopped = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free_run[:first + 1]  # EOS is the last token, as in transformers
    assert stopped.token_ids == hf_greedy(model_dir, [prompt], [20])[0]
    running = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0,
                                                    ignore_eos=True))[0]
    assert running.token_ids == free_run and running.finish_reason == "length"


def test_stop_token_ids(llm):
    prompt = mixed_prompts(1)[0][0]
    free_run = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0))[0].token_ids
    stop = free_run[5]
    result = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0,
                                                   stop_token_ids=[stop]))[0]
    assert result.finish_reason == "stop"
    assert result.token_ids == free_run[:free_run.index(stop) + 1]


def test_stop_string_is_cut_from_the_text(llm):
    prompt = mixed_prompts(1)[0][0]
    free_run = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0))[0]
    words = free_run.text.split()
    stop = f"{words[3]} {words[4]}"  # spans two tokens
    result = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, stop=[stop]))[0]
    assert result.finish_reason == "stop"
    assert result.text == free_run.text[:free_run.text.find(stop)]
    assert stop not in result.text
    assert result.token_ids == free_run.token_ids[:len(result.token_ids)]


def test_the_tiny_vocabulary_behaves_as_the_tests_assume(llm):
    """What the stop-string and EOS tests above rely on: token i is the word w{i} both ways,
    EOS is the last id, and the engine accepts exactly the ids 0..VOCAB-1."""
    engine = llm.engine
    assert engine.tokenize("w5 w998 w0") == [5, 998, 0]
    assert engine.tokenizer.decode([5, 998, 0]) == "w5 w998 w0"
    assert engine.eos_token_ids == {EOS} == {VOCAB - 1}
    engine.validate([0, VOCAB - 1], SamplingParams())
    with pytest.raises(ValueError, match=f"outside the vocabulary \\(0..{VOCAB - 1}\\)"):
        engine.validate([VOCAB], SamplingParams())
    # Generation stops at EOS unless told not to.
    free = llm.generate([[5, 6]], SamplingParams(max_tokens=50, temperature=0))[0]
    assert EOS not in free.token_ids[:-1]

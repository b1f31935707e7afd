"""The real SmolLM2-135M-Instruct: greedy continuations equal transformers'."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shardserve import LLM, SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]


def test_greedy_continuations_match_transformers(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
        add_generation_prompt=True)
    prompts = PROMPTS + [chat]
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    expected = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20,
                              do_sample=False)
        expected.append(out[0, ids.shape[1]:].tolist())

    llm = LLM("smollm2", dtype="float32", kv_cache_memory="512MiB")
    greedy = SamplingParams(max_tokens=20, temperature=0)
    results = llm.generate(prompts, greedy)
    assert [r.token_ids for r in results] == expected
    assert "Paris" in results[3].text and results[3].finish_reason == "stop"
    # The chat API builds the same prompt from the messages.
    answer = llm.chat([{"role": "user", "content": "What is the capital of France?"}], greedy)[0]
    assert answer.token_ids == expected[3] and answer.text == results[3].text
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks

"""`shardserve plan`: the seed's KV figures from a model config alone."""

from __future__ import annotations

import subprocess
import sys

from transformers import LlamaConfig


def plan(model_dir, *args) -> str:
    out = subprocess.run([sys.executable, "-m", "shardserve.cluster.cli", "plan", "--model",
                          str(model_dir), *args], capture_output=True, text=True, check=True)
    return out.stdout


def test_llama2_7b_fp16(tmp_path):
    LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                max_position_embeddings=4096,
                architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    text = plan(tmp_path, "--dtype", "float16", "--memory", "24GiB", "--seq-len", "4096")
    assert "6.74 B" in text  # parameters
    assert "KV per token     512.00 KiB (524,288 bytes)" in text  # ~0.5 MB
    assert "KV per sequence  2.00 GiB for 4096 tokens" in text
    # 24 GiB - 12.55 GiB of weights leaves room for 5 such sequences.
    assert "= 5 sequences of 4096 tokens" in text


def test_llama2_70b_gqa_saving(tmp_path):
    LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8, vocab_size=32000,
                max_position_embeddings=4096,
                architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    text = plan(tmp_path, "--dtype", "float16", "--memory", "80GiB", "--tp", "8")
    assert "KV per token     320.00 KiB (327,680 bytes)" in text
    assert "GQA saves 8x against MHA (2.50 MiB per token)" in text
    assert "TP=8 x PP=1: weights 16.06 GiB, KV per token 40.00 KiB" in text

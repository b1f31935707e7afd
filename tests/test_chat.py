"""Chat messages become the prompt through the model's own chat template."""

from __future__ import annotations

import json

import pytest
from tiny import make_tiny_model

from shardserve import LLM, SamplingParams

CHAT = [{"role": "system", "content": "w10 w11"}, {"role": "user", "content": "w12 w13 w14"}]
# w3 system, w4 user, w5 the opening of the assistant's turn (tests/tiny.py).
CHAT_IDS = [3, 10, 11, 4, 12, 13, 14, 5]


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(str(tiny_model("llama-gqa")), dtype="float32", num_kv_blocks=64)


def test_chat_is_generate_on_the_templated_prompt(llm):
    assert llm.engine.tokenize_chat(CHAT) == CHAT_IDS
    params = SamplingParams(max_tokens=8, temperature=0)
    chat = llm.chat(CHAT, params)[0]
    assert chat.prompt_token_ids == CHAT_IDS
    assert chat.token_ids == llm.generate([CHAT_IDS], params)[0].token_ids
    both = llm.chat([CHAT, CHAT[1:]], params)
    assert [r.prompt_token_ids for r in both] == [CHAT_IDS, CHAT_IDS[3:]]


@pytest.mark.parametrize("messages, message", [
    ([], "chat has no messages"),
    ([{"role": "user"}], "chat message 0 needs a non-empty role and a content string"),
    ([{"role": "", "content": "w1"}], "needs a non-empty role"),
    ([{"role": "robot", "content": "w1"}], "chat template refused the messages: unknown role"),
])
def test_bad_chat_is_a_value_error(llm, messages, message):
    with pytest.raises(ValueError, match=message):
        llm.chat([messages])
    assert not llm.engine.has_unfinished()


def test_a_model_without_a_chat_template_says_so(tmp_path):
    model_dir = make_tiny_model(tmp_path, "llama-mqa")
    config = model_dir / "tokenizer_config.json"
    data = json.loads(config.read_text())
    data.pop("chat_template", None)
    config.write_text(json.dumps(data))
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    llm = LLM(str(model_dir), dtype="float32", num_kv_blocks=16)
    with pytest.raises(ValueError, match="no chat template: send the prompt as text"):
        llm.chat(CHAT)

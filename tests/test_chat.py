"""Chat: multi-turn conversations reuse the KV cache and give the same replies as a fresh run on the full prompt."""
from __future__ import annotations

import shutil

import pytest

from hf_models import make_hf_checkpoint
from vocab_cache import llama3_dir

from llamac.chat import chat_loop
from llamac.export.exporter import export
from llamac.runtime import load
from llamac.runtime.chat_template import apply_chat_template


@pytest.fixture(scope="module")
def llama3_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    make_hf_checkpoint(d / "hf", vocab_size=128256, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                       num_key_value_heads=1, bos_token_id=128000, eos_token_id=[128001, 128009],
                       max_position_embeddings=512)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (llama3_dir() / f).is_file():
            shutil.copy(llama3_dir() / f, d / "hf" / f)
    return load(export(d / "hf", d / "onnx", progress=False))


def test_two_turns_match_fresh_generation(llama3_model):
    m = llama3_model
    turns = iter(["Hello there", "And what next?", None])
    out: list[str] = []
    messages = chat_loop(m, "Be brief.", None, 12, read=lambda: next(turns), write=out.append)
    assert [x["role"] for x in messages] == ["system", "user", "assistant", "user", "assistant"]
    # The second reply, computed through the reused cache, equals a fresh greedy run on the rendered conversation.
    ids = apply_chat_template(messages[:4], m.tokenizer, "llama3")
    assert ids[0] == 128000 and m.tokenizer.token_to_id("<|start_header_id|>") in ids
    fresh = m.generate(ids, 12)
    assert fresh.text.strip() == messages[4]["content"]


def test_a_long_chat_drops_its_oldest_turns_and_goes_on(llama3_model):
    m = llama3_model
    long_turn = " ".join(["and the river ran on through the valley"] * 12)      # ~100 tokens
    too_long = " ".join(["word"] * 2 * m.max_seq_len)
    said = [f"Turn {i}: {long_turn}" for i in range(8)]
    turns = iter([said[0], said[1], too_long, *said[2:], None])
    out: list[str] = []
    notes: list[str] = []
    messages = chat_loop(m, "Be brief.", None, 12, read=lambda: next(turns), write=out.append, notify=notes.append)
    assert any("dropped" in n for n in notes) and any("not sent" in n for n in notes)
    assert messages[0]["role"] == "system" and messages[-2]["content"] == said[-1]
    assert too_long not in [x["content"] for x in messages] and said[0] not in [x["content"] for x in messages]
    ids = apply_chat_template(messages[:-1], m.tokenizer, "llama3")
    assert len(ids) + 12 <= m.max_seq_len
    assert m.generate(ids, 12).text.strip() == messages[-1]["content"]     # the reply to what was kept

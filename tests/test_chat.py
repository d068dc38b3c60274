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

"""The bundled model: a real trained Llama; llamac's perplexity equals transformers' on the same held-out text."""
from __future__ import annotations

import math

import numpy as np
import pytest

from llamac import bundled
from llamac.export.exporter import export
from llamac.perplexity import perplexity

N_TOKENS = 1200


def hf_perplexity(ckpt, ids: list[int], window: int) -> float:
    """Same protocol as llamac: chunks of window-1 tokens, each after a BOS, every token scored once."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    nll, count = 0.0, 0
    for start in range(0, len(ids), window - 1):
        chunk = [model.config.bos_token_id] + ids[start:start + window - 1]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([chunk])).logits[0].double(), -1)
        nll -= float(logp[torch.arange(len(chunk) - 1), torch.tensor(chunk[1:])].sum())
        count += len(chunk) - 1
    return math.exp(nll / count)


@pytest.fixture(scope="module")
def bundled_export(tmp_path_factory):
    return export(bundled.checkpoint(), tmp_path_factory.mktemp("bundled") / "onnx", progress=False)


def test_perplexity_matches_transformers(bundled_export):
    from llamac.runtime import load

    text = bundled.checkpoint() / "held_out.txt"
    ours = perplexity(bundled_export, text, max_tokens=N_TOKENS, progress=False)
    ids = load(bundled_export).tokenizer.encode(text.read_text())[:N_TOKENS]
    ref = hf_perplexity(bundled.checkpoint(), ids, ours["window"])
    assert ours["tokens"] == N_TOKENS
    assert abs(ours["perplexity"] - ref) / ref < 1e-3
    assert ref < 120, "a trained model: far below the unigram perplexity (~500)"


def test_generates_scripture_like_text(bundled_export):
    from llamac.runtime import load

    g = load(bundled_export).generate("And God said", max_new_tokens=24)
    words = g.text.split()
    assert len(words) >= 10
    vocab = set(bundled.checkpoint().joinpath("held_out.txt").read_text().split())
    assert np.mean([w in vocab for w in words]) > 0.6, g.text


def test_stop_strings_cut_the_text_and_never_stream_part_of_themselves(bundled_export):
    """Streamed pieces join to the returned text, which ends where the earliest stop string begins, even when a
    stop string spans tokens (the pieces that might begin one are held back until the next token decides)."""
    from llamac.errors import InputError
    from llamac.runtime import load

    m = load(bundled_export)
    free = m.generate("And God said", max_new_tokens=40).text
    starts = [i for i in range(8, len(free) - 6) if free[i - 1] != " " and free[i] != " "]     # mid-word
    for a in starts[:3] + starts[-2:]:
        stop = free[a:a + 5]
        for stops in ([stop], ["never in it", stop], [stop, free[a + 1:a + 9]]):
            it = m.generate("And God said", max_new_tokens=40, stop=stops, stream=True)
            pieces = list(it)
            assert "".join(pieces) == it.result.text == free[:free.index(stop)], (stops, pieces)
            assert it.result.stop_reason == "stop"
    with pytest.raises(InputError, match="stop string"):
        m.generate("And God said", max_new_tokens=4, stop=[""])


@pytest.fixture(scope="module")
def bundled_artifacts(tmp_path_factory):
    from llamac.compiler import compile_model

    d = tmp_path_factory.mktemp("bundled-art")
    # x86_64 kernels dequantize to f32; x86_64-avx2 ones run int8 dot products on quantized activations
    return {(q, t): compile_model(bundled.checkpoint(), t, quant=q, out=d / f"{q}-{t}", progress=False)
            for q, t in (("f32", "x86_64"), ("q8", "x86_64"), ("q4", "x86_64"),
                         ("q8", "x86_64-avx2"), ("q4", "x86_64-avx2"))}


def test_quantized_perplexity_close_to_f32(bundled_artifacts, bundled_export):
    """Quantization is sound on a real model: q8 within 1 % and q4 within 8 % of f32 perplexity, with either kind of
    kernel (f32 dequantization, or int8 dot products on quantized activations)."""
    text = bundled.checkpoint() / "held_out.txt"
    ppl = {q: perplexity(a, text, max_tokens=N_TOKENS, progress=False)["perplexity"]
           for q, a in bundled_artifacts.items()}
    onnx_f32 = perplexity(bundled_export, text, max_tokens=N_TOKENS, progress=False)["perplexity"]
    f32 = ppl["f32", "x86_64"]
    assert abs(f32 - onnx_f32) / onnx_f32 < 1e-4
    for target in ("x86_64", "x86_64-avx2"):
        assert ppl["q8", target] / f32 - 1 < 0.01
        assert ppl["q4", target] / f32 - 1 < 0.08


def test_cli_run_bundled_without_model_argument(tmp_path):
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, LLAMAC_CACHE=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "llamac", "run", "-p", "And God said", "-n", "16", "--json"],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert len(out["tokens"]) == 16 and len(out["text"].split()) >= 6


def test_a_session_continues_after_the_whole_reply(bundled_export):
    """generate(session=s) leaves the prompt, the reply and its end-of-sequence token in the cache: the next turn
    sees what one call on the whole text would (the last sampled token used to be left out)."""
    from llamac.runtime import load

    m = load(bundled_export)
    s = m.session()
    g1 = m.generate("In the beginning", max_new_tokens=5, session=s)
    assert g1.stop_reason == "length" and s.n_past == len(g1.prompt_tokens) + len(g1.tokens)
    more = m.tokenizer.encode(" And God said")
    g2 = m.generate(more, max_new_tokens=8, session=s)
    assert g2.tokens == m.generate(g1.prompt_tokens + g1.tokens + more, max_new_tokens=8).tokens

    s = m.session()
    free = m.generate("In the beginning", max_new_tokens=12)
    end = next(i for i in range(1, 12) if free.tokens[i] not in free.tokens[:i])
    m.__dict__["eos_ids"] = {free.tokens[end]}        # a greedy token that ends the reply where it first comes
    g = m.generate("In the beginning", max_new_tokens=12, session=s)
    assert g.stop_reason == "eos" and g.tokens == free.tokens[:end] and g.end_token == free.tokens[end]
    assert s.n_past == len(g.prompt_tokens) + len(g.tokens) + 1
    logits = s.prefill(more)
    ref = m.session().prefill(g.prompt_tokens + free.tokens[:end + 1] + more)
    assert np.abs(np.asarray(logits) - np.asarray(ref)).max() < 1e-4


def test_text_after_a_prompt_keeps_the_space_before_its_first_word(bundled_export):
    """prompt + text must read as the whole sequence decoded: "And" + "he said" lost a word break (sentencepiece
    drops the dummy-prefix space only at the start of a text), and a stop string starting with a space never hit."""
    from llamac.runtime import load

    m = load(bundled_export)
    tok = m.tokenizer
    for prompt in ("And", "In the beginning God", "And he said unto them,"):
        g = m.generate(prompt, 12)
        ids = g.prompt_tokens + g.tokens
        assert prompt + g.text == tok.decode(ids[1:]), (prompt, g.text)
        streamed = "".join(m.generate(prompt, 12, stream=True))
        assert streamed == g.text
    first = m.generate("And", 1).text
    assert first.startswith(" ") and m.generate("And", 8, stop=first).stop_reason == "stop"
    assert not m.generate([tok.bos_id], 4).text.startswith(" ")     # a text's start still drops it


def test_a_stop_string_given_alone_is_one_string(bundled_export):
    from llamac.runtime import load

    m = load(bundled_export)
    free = m.generate("And God said", max_new_tokens=30).text
    stop = free[10:16]
    assert m.generate("And God said", max_new_tokens=30, stop=stop).text == free[:free.index(stop)]


def test_ids_past_the_tokenizer_are_never_sampled(bundled_export):
    """A model whose vocabulary is padded past its tokenizer's: generation samples only ids the tokenizer can write
    (it used to stop with a ValueError when the model picked a padding row). Here the tokenizer is cut below the
    largest id the free reply uses."""
    from llamac.runtime import load

    m = load(bundled_export)
    free = m.generate("And God said", max_new_tokens=16)
    m.tokenizer.vocab_size = max(free.tokens)
    g = m.generate("And God said", max_new_tokens=16)
    assert g.tokens and max(g.tokens) < m.tokenizer.vocab_size
    assert g.tokens[:free.tokens.index(max(free.tokens))] == free.tokens[:free.tokens.index(max(free.tokens))]


def test_a_damaged_cached_bundled_artifact_is_compiled_again(tmp_path, monkeypatch):
    """`llamac run` without ART uses the bundled model's cached artifact; a damaged copy is compiled again instead of
    being refused on every run."""
    from llamac.runtime import load

    monkeypatch.setenv("LLAMAC_CACHE", str(tmp_path))
    art = bundled.artifact()
    weights = art / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert bundled.artifact() == art
    assert len(load(art).generate("And God said", max_new_tokens=4).tokens) == 4

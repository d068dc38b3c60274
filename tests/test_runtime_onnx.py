"""Runtime on export directories (onnxruntime backend): generation equals transformers, sessions reuse the cache."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from hf_models import CONFIGS, make_hf_checkpoint

from llamac.errors import InputError
from llamac.export.exporter import export
from llamac.runtime import load

PROMPT = [1, 17, 93, 204, 55, 8, 140, 77]


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, attention_mask=None,
                             pad_token_id=0)[0, len(ids):].tolist()
    eos = model.config.eos_token_id
    return out[:out.index(eos)] if eos in out else out  # llamac stops at eos and does not return it


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_equals_transformers(name, tmp_path):
    model = make_hf_checkpoint(tmp_path / "hf", **CONFIGS[name])
    art = export(tmp_path / "hf", tmp_path / "onnx", progress=False)
    g = load(art).generate(PROMPT, max_new_tokens=32)
    assert g.tokens == hf_greedy(model, PROMPT, 32)
    assert g.prompt_tokens == PROMPT


def test_generation_config_eos_ids_end_generation_as_in_transformers(tmp_path):
    """Llama 3 Instruct lists <|eot_id|> as an eos id only in generation_config.json: generation stops there too."""
    import torch
    from transformers import GenerationConfig

    model = make_hf_checkpoint(tmp_path / "hf", **CONFIGS["llama3_gqa_tied"])
    free = hf_greedy(model, PROMPT, 16)
    stop_id = next(t for i, t in enumerate(free) if i >= 3 and t not in free[:i])
    eos = [model.config.eos_token_id, stop_id]
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    with torch.no_grad():
        ref = model.generate(torch.tensor([PROMPT]), max_new_tokens=16, do_sample=False, pad_token_id=0,
                             generation_config=GenerationConfig.from_pretrained(tmp_path / "hf", do_sample=False)
                             )[0, len(PROMPT):].tolist()
    assert ref[-1] == stop_id
    g = load(export(tmp_path / "hf", tmp_path / "onnx", progress=False)).generate(PROMPT, max_new_tokens=16)
    assert g.tokens == ref[:-1] and g.stop_reason == "eos"


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("rt")
    make_hf_checkpoint(d / "hf", **CONFIGS["llama3_gqa_tied"])
    return export(d / "hf", d / "onnx", progress=False)


def test_session_reuses_cache(export_dir):
    m = load(export_dir)
    whole = m.session().prefill(PROMPT + [5, 6, 7])
    s = m.session()
    s.prefill(PROMPT)
    s.decode(5)
    assert s.n_past == len(PROMPT) + 1
    np.testing.assert_allclose(s.prefill([6, 7]), whole, rtol=0, atol=1e-5 * np.abs(whole).max())


def test_sampling_reproducible_and_different(export_dir):
    m = load(export_dir)
    a = m.generate(PROMPT, 24, temperature=1.0, top_k=50, seed=3).tokens
    b = m.generate(PROMPT, 24, temperature=1.0, top_k=50, seed=3).tokens
    c = m.generate(PROMPT, 24, temperature=1.0, top_k=50, seed=4).tokens
    assert a == b and a != c


def test_context_overflow_is_clear(export_dir):
    m = load(export_dir)
    with pytest.raises(InputError, match="does not fit the context"):
        m.generate(list(range(3, 300)), 4)
    long = [1] + list(range(3, 300))
    g = m.generate(long, 4, truncate=True)       # BOS and the end of the prompt, leaving room for the reply
    assert g.prompt_tokens == [1] + long[-(m.max_seq_len - 4 - 1):]
    assert g.stop_reason == "length" and g.tokens == m.generate(g.prompt_tokens, 4).tokens
    g = m.generate(long, 10 * m.max_seq_len, truncate=True)    # a long reply gets at most half the context
    assert len(g.prompt_tokens) == m.max_seq_len - m.max_seq_len // 2 and g.prompt_tokens[0] == 1


@pytest.mark.parametrize("prompt,kw,match", [
    ([1, 1.7], {}, "token ids must be integers, got 1.7"),          # was run as [1, 1]
    (np.array([1.9, 2.2]), {}, "must be integers"), ([1, None], {}, "must be integers"),
    (None, {}, "a prompt is text or a sequence"), (12, {}, "a prompt is text or a sequence"),
    (PROMPT, dict(temperature="0.5"), "temperature must be a number"),
    (PROMPT, dict(top_k=float("nan")), "top_k must be a whole number"),   # was taken as "off"
    (PROMPT, dict(top_k=2.5), "top_k must be a whole number"), (PROMPT, dict(seed=-1), "seed must be >= 0"),
    (PROMPT, dict(seed="x"), "seed must be a whole number"), (PROMPT, dict(stop=[1]), "stop must be a string"),
    (PROMPT, dict(max_new_tokens=-1), "max_new_tokens must be"),        # returned nothing without a word
    (PROMPT, dict(max_new_tokens=1.5), "max_new_tokens must be"),
])
def test_generate_refuses_arguments_of_the_wrong_kind(export_dir, prompt, kw, match):
    """What the API got wrong was a TypeError from deep inside, a silent truncation, or nothing at all."""
    m = load(export_dir)
    with pytest.raises(InputError, match=match):
        m.generate(prompt, **{"max_new_tokens": 2, **kw})


def test_generate_takes_stop_none_and_arrays_of_ids(export_dir):
    m = load(export_dir)
    want = m.generate(PROMPT, 4).tokens
    assert m.generate(np.array(PROMPT), 4, stop=None).tokens == want
    with pytest.raises(InputError, match="threads must be a whole number"):
        load(export_dir, threads=-2)


def test_cli_run_json(export_dir):
    r = subprocess.run([sys.executable, "-m", "llamac", "run", str(export_dir), "--ids", "1,17,93,204", "-n", "8",
                        "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["prompt_tokens"] == [1, 17, 93, 204]
    assert out["tokens"] == load(export_dir).generate([1, 17, 93, 204], 8).tokens
    r = subprocess.run([sys.executable, "-m", "llamac", "run", str(export_dir), "--ids", "1,x"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "--ids" in r.stderr

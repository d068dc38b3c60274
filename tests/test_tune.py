"""`llamac tune`: each candidate compiled and measured on this machine, the fastest kept in a tuning file per target,
which `llamac compile` then applies (and `--no-tuning` ignores)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from compile_helpers import CONTEXT, artifact_steps, exported, hf_steps, rel_err

from llamac import artifact, tune
from llamac.compiler import compile_model
from llamac.targets import host_target, load_target


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tune")


def cli(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llamac", *map(str, args)], capture_output=True, text=True,
                          timeout=900, env=env)


def test_tune_keeps_the_fastest_and_compile_applies_it(root, tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    monkeypatch.setenv("LLAMAC_TUNING_DIR", str(tmp_path / "tuning"))
    target = host_target()
    tgt = load_target(target)
    quant = "q8" if tgt.dot else "f16"       # int8 dot products tune dot_tiles, float weights float_panels
    (name, values), = tune.SPACE[tune.kernel_kind(tgt, quant)].items()
    default = getattr(tgt, name)
    other = next(v for v in values if v != default)
    _, export_dir = exported(root, "llama2_mha")
    lines: list[str] = []
    entry, path = tune.tune(export_dir, target, quant, prompt_tokens=16, gen_tokens=8, repetitions=2,
                            space={name: (default, other)}, log=lines.append)

    assert path == tmp_path / "tuning" / f"{target}.json"
    data = json.loads(path.read_text())
    assert data["target"] == target and data["schemes"][quant] == entry
    measured = entry["measured"]
    assert [m["params"] for m in measured] == [{name: default}, {name: other}]
    assert all(m["decode_tok_s"] > 0 and m["prefill_tok_s"] > 0 for m in measured)
    best = max(measured, key=lambda m: (m["decode_tok_s"], m["prefill_tok_s"]))
    assert entry["params"] == best["params"]
    assert sum(line.startswith("tune: compiling") for line in lines) == 2

    # compile finds the file; what it builds still computes the model (transformers on its dequantized weights)
    chosen = entry["params"][name]
    assert tune.tuned_params(tgt, quant) == ({name: chosen}, path)
    art = compile_model(export_dir, target, quant=quant, max_seq_len=CONTEXT, out=tmp_path / "art", progress=False)
    assert json.loads((art / "manifest.json").read_text())["target"][name] == chosen
    model = LlamaForCausalLM.from_pretrained(artifact.dequantize(art, tmp_path / "deq")).eval()
    for n, (g, r) in enumerate(zip(artifact_steps(art), hf_steps(model))):
        assert rel_err(g, r) < (5e-2 if quant == "q8" else 2e-2), f"step {n}"

    # a tuned value other than the file's own shows in the artifact, and --no-tuning ignores the tuning file
    (path.parent / f"{target}.json").write_text(json.dumps(
        {"target": target, "schemes": {quant: {"params": {name: other}}}}))
    art2 = compile_model(export_dir, target, quant=quant, max_seq_len=CONTEXT, out=tmp_path / "art2", progress=False)
    assert json.loads((art2 / "manifest.json").read_text())["target"][name] == other
    art3 = compile_model(export_dir, target, quant=quant, max_seq_len=CONTEXT, out=tmp_path / "art3", progress=False,
                         tuning=False)
    assert json.loads((art3 / "manifest.json").read_text())["target"][name] == default


def test_candidates_that_do_not_fit_in_memory_together_are_measured_one_after_another(root, tmp_path, monkeypatch):
    from llamac.runtime import tvm_backend

    monkeypatch.setattr(tvm_backend, "_mem_available", lambda: 0)
    target = host_target()
    tgt = load_target(target)
    quant = "q8" if tgt.dot else "f16"
    (name, values), = tune.SPACE[tune.kernel_kind(tgt, quant)].items()
    _, export_dir = exported(root, "llama2_mha")
    lines: list[str] = []
    entry, path = tune.tune(export_dir, target, quant, out=tmp_path / "t.json", prompt_tokens=16, gen_tokens=8,
                            repetitions=1, space={name: values[:2]}, log=lines.append)
    assert "tune: the candidates do not fit in memory together: measured one after another" in lines
    assert [m["params"][name] for m in entry["measured"]] == list(values[:2])
    assert all(m["decode_tok_s"] > 0 for m in entry["measured"])
    assert json.loads(path.read_text())["schemes"][quant]["params"] == entry["params"]


@pytest.mark.parametrize("case", ["other arch", "nothing to tune", "webgpu"])
def test_tune_refuses_what_it_cannot_measure_here(case, tmp_path):
    import os

    target, quant, says = {"other arch": ("rpi5", "q4", "llamac tune measures on this machine (x86_64); rpi5 is for "
                                          "aarch64"),
                           "nothing to tune": ("x86_64", "q4", "nothing to tune for q4 on x86_64"),
                           "webgpu": ("webgpu", "q4", "llamac tune measures CPU kernels; webgpu is a webgpu target")}[case]
    env = dict(os.environ, LLAMAC_TUNING_DIR=str(tmp_path / "tuning"))
    r = cli("tune", "-t", target, "-q", quant, env=env)
    assert r.returncode == 2 and r.stderr.startswith(f"error: {says}") and len(r.stderr.strip().splitlines()) == 1, \
        r.stderr
    assert not (tmp_path / "tuning").exists()


@pytest.mark.parametrize("content,says", [
    ("{not json", "unreadable tuning file"),
    ('{"target": "x86_64-avx2", "schemes": {}}', "not a tuning file for target x86_64-avx512"),
    ('{"target": "x86_64-avx512", "schemes": {"q8": {"params": {"dot_tiles": 3}}}}', "dot_tiles = 3 is not a tunable"),
    ('{"target": "x86_64-avx512", "schemes": {"q8": {"params": {"lanes": 4}}}}', "lanes = 4 is not a tunable"),
])
def test_a_bad_tuning_file_is_one_line_and_exit_2(content, says, root, tmp_path):
    import os

    _, export_dir = exported(root, "llama2_mha")
    (tmp_path / "tuning").mkdir()
    (tmp_path / "tuning" / "x86_64-avx512.json").write_text(content)
    env = dict(os.environ, LLAMAC_TUNING_DIR=str(tmp_path / "tuning"))
    r = cli("compile", export_dir, "-t", "x86_64-avx512", "-q", "q8", "-o", tmp_path / "art", env=env)
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "art").exists()

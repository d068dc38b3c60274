"""Export: the ONNX graph, run by onnxruntime, computes what transformers computes, for every checkpoint format."""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from hf_models import CONFIGS, make_hf_checkpoint
from reference_files import gguf_roundtrip, write_gguf, write_llama2c
from references import hf_logits, ort_steps, rel_err

from llamac import bundled
from llamac.errors import InputError
from llamac.export.exporter import export

TOL = 1e-4
RNG = np.random.default_rng(0)
PROMPT = RNG.integers(3, 300, size=(1, 9))
STEPS = RNG.integers(3, 300, size=(1, 4))


def check_against_hf(model, export_dir: Path, prompt=PROMPT, steps=STEPS, tol=TOL) -> None:
    """Prefill + decode steps through the KV cache I/O match transformers on the whole sequence."""
    mask = np.ones_like(prompt)
    got = ort_steps(export_dir, prompt, mask, steps)
    full = np.concatenate([prompt, steps], axis=1)
    ref = hf_logits(model, full, np.ones_like(full))
    S = prompt.shape[1]
    assert rel_err(got[0], ref[:, :S]) < tol
    for n, step_logits in enumerate(got[1:]):
        assert rel_err(step_logits, ref[:, S + n]) < tol, f"decode step {n}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_transformers(name, tmp_path):
    model = make_hf_checkpoint(tmp_path / "hf", **CONFIGS[name])
    out = export(tmp_path / "hf", tmp_path / "onnx", progress=False)
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    check_against_hf(model, out)


def test_sharded_bf16_really_is_sharded_bf16(tmp_path):
    make_hf_checkpoint(tmp_path / "hf", **CONFIGS["bf16_sharded"])
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    shard = next((tmp_path / "hf").glob("*.safetensors"))
    header = json.loads(shard.read_bytes()[8:8 + struct.unpack("<Q", shard.read_bytes()[:8])[0]])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}


def test_io_names_and_dynamic_axes(tmp_path):
    make_hf_checkpoint(tmp_path / "hf", **CONFIGS["llama3_gqa_tied"])
    m = onnx.load(str(export(tmp_path / "hf", tmp_path / "onnx", progress=False) / "model.onnx"),
                  load_external_data=False)
    ins = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
    outs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in m.graph.output}
    assert ins["input_ids"] == ["batch", "seq"] and ins["attention_mask"] == ["batch", "total_seq"]
    assert ins["past_key_values.1.value"] == ["batch", 2, "past_seq", 16]
    assert outs["logits"] == ["batch", "seq", 320] and outs["present.0.key"] == ["batch", 2, "total_seq", 16]
    assert {n.domain for n in m.graph.node} <= {""}, "standard ONNX ops only"
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer if len(t.dims) >= 1
               and np.prod(t.dims) > 64)


def test_left_padded_batch(tmp_path):
    model = make_hf_checkpoint(tmp_path / "hf", **CONFIGS["llama3_gqa_tied"])
    out = export(tmp_path / "hf", tmp_path / "onnx", progress=False)
    prompt = RNG.integers(3, 300, size=(2, 8))
    mask = np.ones_like(prompt)
    mask[1, :3] = 0  # second row: 5 real tokens, left-padded
    prompt[1, :3] = 0
    steps = RNG.integers(3, 300, size=(2, 4))
    got = ort_steps(out, prompt, mask, steps)
    full = np.concatenate([prompt, steps], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(steps)], axis=1)
    ref = hf_logits(model, full, full_mask)
    real = mask.astype(bool)
    assert rel_err(got[0][real], ref[:, :8][real]) < TOL
    for n, step_logits in enumerate(got[1:]):
        assert rel_err(step_logits, ref[:, 8 + n]) < TOL
    # and the padded row equals the same prompt run alone, unpadded
    alone = ort_steps(out, prompt[1:, 3:], mask[1:, 3:], steps[1:])
    assert rel_err(got[-1][1], alone[-1][0]) < TOL


def test_f16_export_close_to_f32(tmp_path):
    model = make_hf_checkpoint(tmp_path / "hf", **CONFIGS["llama3_gqa_tied"])
    out = export(tmp_path / "hf", tmp_path / "onnx16", dtype="f16", progress=False)
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert m.graph.input[3].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    check_against_hf(model, out, tol=2e-2)


@pytest.mark.parametrize("name", ["llama3_gqa_tied", "explicit_head_dim"])
def test_gguf_same_logits_as_hf(name, tmp_path):
    model = make_hf_checkpoint(tmp_path / "hf", **CONFIGS[name])
    write_gguf(model, tmp_path / "m.gguf")
    from_hf = ort_steps(export(tmp_path / "hf", tmp_path / "a", progress=False), PROMPT, np.ones_like(PROMPT), STEPS)
    from_gguf = ort_steps(export(tmp_path / "m.gguf", tmp_path / "b", progress=False), PROMPT, np.ones_like(PROMPT),
                          STEPS)
    for a, b in zip(from_hf, from_gguf):
        assert rel_err(b, a) < TOL
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["rope_scaling"] == json.loads((tmp_path / "a" / "config.json").read_text())["rope_scaling"]


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0"])
def test_gguf_quantized_tensors(qtype, tmp_path):
    model = make_hf_checkpoint(tmp_path / "hf", **CONFIGS["llama2_mha"])
    write_gguf(model, tmp_path / "m.gguf", qtype=qtype)
    gguf_roundtrip(model, qtype)  # the reference: transformers on what the file holds, dequantized by gguf-py
    check_against_hf(model, export(tmp_path / "m.gguf", tmp_path / "onnx", progress=False))


def _gpt2_vocab(w, pre):
    w.add_tokenizer_model("gpt2")
    w.add_token_list([chr(0x100 + i) if i < 32 else chr(i) for i in range(320)])
    if pre is not None:
        w.add_tokenizer_pre(pre)


@pytest.mark.parametrize("extra,match", [
    (lambda w: w.add_tensor("blk.0.attn_q.bias", np.ones(64, np.float32)), r"blk\.0\.attn_q\.bias.*would drop"),
    (lambda w: w.add_tensor("blk.1.ffn_gate_exps.weight", np.ones((2, 8, 8), np.float32)), "ffn_gate_exps"),
    (lambda w: w.add_tensor("rope_freqs.weight", np.ones(5, np.float32)), "holds 5 factors.*needs 8"),
    (lambda w: w.add_rope_scaling_type(__import__("gguf").RopeScalingType.LINEAR), "rope.scaling.factor"),
    (lambda w: w.add_tokenizer_model("gpt2"), "no tokenizer.ggml.tokens"),
    (lambda w: _gpt2_vocab(w, "deepseek-llm"), "pre-tokenizer 'deepseek-llm'"),
])
def test_gguf_with_what_llamac_would_misread_is_refused(extra, match, tmp_path):
    """Tensors the graph has no place for (llama.cpp's llama loads optional biases), malformed rope metadata and
    vocabularies split by another model's regex: one clear error, not wrong numbers or a bare Python exception."""
    model = make_hf_checkpoint(tmp_path / "hf", **CONFIGS["llama2_mha"])
    write_gguf(model, tmp_path / "m.gguf", extra=extra)
    with pytest.raises(InputError, match=match):
        export(tmp_path / "m.gguf", tmp_path / "onnx", progress=False)
    assert not (tmp_path / "onnx").exists()


def test_tensors_the_config_has_no_place_for_are_refused(tmp_path):
    """A config with fewer layers than the weights exported the first layers only; a bias the config says the model
    lacks was dropped. The rotary buffer older transformers saved is not a weight, and is skipped."""
    from safetensors.numpy import load_file, save_file

    make_hf_checkpoint(tmp_path / "hf", **CONFIGS["llama2_mha"])
    cfg_file, weights = tmp_path / "hf" / "config.json", tmp_path / "hf" / "model.safetensors"
    cfg, tensors = json.loads(cfg_file.read_text()), load_file(weights)
    cfg_file.write_text(json.dumps(dict(cfg, num_hidden_layers=1)))
    with pytest.raises(InputError, match=r"no place for \(model\.layers\.1\..*num_hidden_layers"):
        export(tmp_path / "hf", tmp_path / "a", progress=False)
    cfg_file.write_text(json.dumps(cfg))
    save_file(dict(tensors, **{"model.layers.0.self_attn.q_proj.bias": np.ones(64, np.float32)}), weights)
    with pytest.raises(InputError, match=r"q_proj\.bias"):
        export(tmp_path / "hf", tmp_path / "b", progress=False)
    save_file(dict(tensors, **{"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}), weights)
    assert (export(tmp_path / "hf", tmp_path / "c", progress=False) / "model.onnx").is_file()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("pre", [None, "llama-bpe"])
def test_gguf_byte_level_vocab_with_llama3_split_is_kept(pre, tmp_path):
    model = make_hf_checkpoint(tmp_path / "hf", **CONFIGS["llama2_mha"])
    write_gguf(model, tmp_path / "m.gguf", extra=lambda w: _gpt2_vocab(w, pre))
    out = export(tmp_path / "m.gguf", tmp_path / "onnx", progress=False)
    assert (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("tied", [False, True])
def test_llama2c_same_logits_as_hf(tied, tmp_path):
    model = make_hf_checkpoint(tmp_path / "hf", **dict(CONFIGS["llama2_mha"], rms_norm_eps=1e-5, num_key_value_heads=2,
                                                       tie_word_embeddings=tied))
    write_llama2c(model, tmp_path / "model.bin")
    vocab = tmp_path / "my-vocab.model"       # any name: it is exported as tokenizer.model, where the runtime looks
    shutil.copyfile(bundled.checkpoint() / "tokenizer.model", vocab)
    out = export(tmp_path / "model.bin", tmp_path / "onnx", tokenizer=vocab, progress=False)
    assert (out / "tokenizer.model").read_bytes() == vocab.read_bytes() and not (out / vocab.name).exists()
    check_against_hf(model, out)


@pytest.mark.parametrize("content, suffix", [(b"just some text", ".txt"), (b"placeholder", ".model"),
                                             (b'{"not": "a tokenizer"}', ".json")])
def test_a_tokenizer_that_is_not_one_is_refused(content, suffix, tmp_path):
    make_hf_checkpoint(tmp_path / "hf", **CONFIGS["llama2_mha"])
    (tmp_path / f"tok{suffix}").write_bytes(content)
    with pytest.raises(InputError, match="tokenizer"):
        export(tmp_path / "hf", tmp_path / "onnx", tokenizer=tmp_path / f"tok{suffix}", progress=False)
    assert not (tmp_path / "onnx").exists()


# ---- bad input: one clear line, exit code 2, no OUT left behind ----

def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llamac", *map(str, args)], capture_output=True, text=True)


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def _drop_tensor(d: Path, name: str, reshape: bool = False) -> None:
    from safetensors.numpy import load_file, save_file

    f = d / "model.safetensors"
    tensors = load_file(f)
    if reshape:
        tensors[name] = tensors[name][:-1]
    else:
        del tensors[name]
    save_file(tensors, f)


def _rewrite_header(d: Path, edit) -> None:
    """Replace the safetensors header of d/model.safetensors by edit(header) (data left as it is)."""
    import struct
    f = d / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    head = json.dumps(edit(json.loads(raw[8:8 + n]))).encode()
    f.write_bytes(struct.pack("<Q", len(head)) + head + raw[8 + n:])


def _shard_index(d: Path, text: str) -> None:
    (d / "model.safetensors.index.json").write_text(text)


def _broken_tokenizer(d: Path) -> None:
    """A byte-level BPE tokenizer.json whose vocabulary cannot spell most text (no byte tokens)."""
    (d / "tokenizer.model").unlink(missing_ok=True)
    (d / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
                                                  "pre_tokenizer": {"type": "ByteLevel"}}))


BAD_INPUTS = {
    "missing config.json": (lambda d: (d / "config.json").unlink(), "no config.json"),
    "missing tensor": (lambda d: _drop_tensor(d, "model.layers.1.mlp.up_proj.weight"),
                       "missing tensor model.layers.1.mlp.up_proj.weight"),
    "misshaped tensor": (lambda d: _drop_tensor(d, "model.layers.0.self_attn.k_proj.weight", reshape=True),
                         "model.layers.0.self_attn.k_proj.weight has shape"),
    "truncated safetensors": (lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:-100]), "truncated"),
    "header not an object": (lambda d: _rewrite_header(d, lambda h: list(h)), "not a JSON object"),
    "header entry without offsets": (lambda d: _rewrite_header(d, lambda h: {
        k: ({x: y for x, y in v.items() if x != "data_offsets"} if k != "__metadata__" else v) for k, v in h.items()}),
        "needs dtype, shape and data_offsets"),
    "index not JSON": (lambda d: _shard_index(d, "{weight_map: "), "unreadable index"),
    "unusable tokenizer": (_broken_tokenizer, "its tokenizer cannot be used"),
    "index without weight_map": (lambda d: _shard_index(d, '{"metadata": {}}'), "no weight_map"),
    "unsupported rope": (lambda d: _edit_config(d, rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                                    "rope_theta": 1e4}), "unsupported rope"),
    "unsupported architecture": (lambda d: _edit_config(d, architectures=["MistralForCausalLM"], model_type="mistral"),
                                 "unsupported architecture"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(case, tmp_path):
    make_hf_checkpoint(tmp_path / "hf", **CONFIGS["llama2_mha"])
    damage, message = BAD_INPUTS[case]
    damage(tmp_path / "hf")
    r = run_cli("export", tmp_path / "hf", "-o", tmp_path / "out")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != "hf"] == [], "no temp dirs left behind"


def test_cli_export_and_inspect(tmp_path):
    make_hf_checkpoint(tmp_path / "hf", **CONFIGS["llama3_gqa_tied"])
    r = run_cli("export", tmp_path / "hf", "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    r = run_cli("inspect", tmp_path / "out")
    assert r.returncode == 0
    assert "past_key_values.0.key" in r.stdout and "num_kv_heads: 2" in r.stdout and "total" in r.stdout
    r = run_cli("export", tmp_path / "hf", "-o", tmp_path / "out")
    assert r.returncode == 2 and "already exists (pass --force" in r.stderr
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    r = run_cli("export", tmp_path / "hf", "-o", tmp_path / "mine")     # --force would refuse it too: not offered
    assert r.returncode == 2 and "already exists" in r.stderr and "--force" not in r.stderr, r.stderr
    r = run_cli("inspect", tmp_path / "nowhere")
    assert r.returncode == 2 and "no such file or directory" in r.stderr, r.stderr


def test_force_replaces_only_what_llamac_wrote(tmp_path):
    """--force replaces a previous export (or artifact, or an empty directory), never another directory or a file:
    nothing of the user's is lost, and each refusal is one line with exit 2."""
    make_hf_checkpoint(tmp_path / "hf", **CONFIGS["llama2_mha"])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    (tmp_path / "file").write_text("keep")
    for out, message in ((tmp_path / "mine", "not a llamac export or artifact"),
                         (tmp_path / "file", "not a directory"), (tmp_path / "file" / "sub", "cannot write")):
        r = run_cli("export", tmp_path / "hf", "-o", out, "--force")
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep" and (tmp_path / "file").read_text() == "keep"
    assert run_cli("export", tmp_path / "hf", "-o", tmp_path / "out").returncode == 0
    r = run_cli("export", tmp_path / "hf", "-o", tmp_path / "out", "--force")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("change,message", [
    (dict(max_position_embeddings=0), "context"), (dict(rms_norm_eps=-1.0), "rms_norm_eps"),
    (dict(rms_norm_eps=float("nan")), "rms_norm_eps"), (dict(rope_theta=0.0), "rope_theta"),
    (dict(num_attention_heads=0), "num_heads"), (dict(num_attention_heads=0, head_dim=None), "num_heads"),
    # sizes that int() would have bent into another model (2.5 -> 2, true -> 1) or refused without naming the key
    (dict(num_hidden_layers=2.5), "num_hidden_layers must be an integer, got 2.5"),
    (dict(hidden_size=True), "hidden_size must be an integer, got True"),
    (dict(intermediate_size="160"), "intermediate_size must be an integer"),
    (dict(max_position_embeddings=None), "max_position_embeddings must be an integer, got None"),
])
def test_config_values_a_model_cannot_run_with_are_refused(change, message):
    """Whatever the source format (HF, GGUF, llama2.c all build a ModelConfig): a context of 0 made every prompt too
    long, a negative epsilon gave NaN logits, no heads a ZeroDivisionError."""
    from llamac.export.config import ModelConfig

    d = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-5)
    with pytest.raises(InputError, match=message):
        ModelConfig.from_hf_dict({**d, **change})

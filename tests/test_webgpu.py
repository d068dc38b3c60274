"""WebGPU target: artifacts run in headless Chromium and generate what onnxruntime generates on the export.

Fast tests (no browser): the graph rewrites keep the model's numbers, q4 packing is the shared q4 scheme, the
JavaScript tokenizer matches llama.cpp's test vectors, the fp16 header converts exactly.
Browser tests need Debian's emscripten and chromium plus node (skipped with the reason otherwise). The first one
builds TVM's wasm runtime into the cache (minutes, once per TVM/emscripten version); each artifact then takes ~10 s.
"""
from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from hf_models import CONFIGS, make_hf_checkpoint

from llamac.export.exporter import export
from llamac.runtime import load

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_JS = ROOT / "llamac" / "web" / "page" / "tokenizer.js"
BUNDLED_SPM = ROOT / "llamac" / "bundled" / "tokenizer.model"
TWO_CONFIGS = ["llama2_mha", "llama3_gqa_tied"]  # MHA untied / GQA + tied + llama3 rope scaling
MAX_SEQ = 96

@pytest.fixture
def node_tool():
    if shutil.which("node") is None:
        pytest.fail("node is not installed (make sysdeps installs it)")


@pytest.fixture
def browser_tools():
    if shutil.which("emcc") is None or not Path("/usr/bin/chromium").exists() or shutil.which("node") is None:
        pytest.fail("needs emscripten, chromium and node (make sysdeps: apt-get install emscripten chromium)")


# Missing tools fail these tests (make test installs them): a skip would hide a broken target.
needs_node = pytest.mark.usefixtures("node_tool")
needs_browser_tools = pytest.mark.usefixtures("browser_tools")


def _prompt(n: int, vocab: int, seed: int = 1) -> list[int]:
    """BOS plus n-1 random ids: over 16 tokens, so prefill crosses the sizes where GPU scan kernels split."""
    rng = random.Random(seed)
    return [1] + [rng.randrange(3, vocab) for _ in range(n - 1)]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Export dirs: the two configurations, and one with the bundled sentencepiece tokenizer's vocabulary."""
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("webgpu_exports")
    out = {}
    for name in TWO_CONFIGS:
        make_hf_checkpoint(root / f"hf_{name}", **CONFIGS[name])
        out[name] = export(root / f"hf_{name}", root / f"ex_{name}", progress=False)
    vocab = spm.SentencePieceProcessor(model_file=str(BUNDLED_SPM)).get_piece_size()
    make_hf_checkpoint(root / "hf_spm", **dict(CONFIGS["llama3_gqa_tied"], vocab_size=vocab))
    shutil.copy(BUNDLED_SPM, root / "hf_spm" / "tokenizer.model")
    out["spm"] = export(root / "hf_spm", root / "ex_spm", progress=False)
    return out


# ---------------------------------------------------------------- fast: graph rewrites, q4, tokenizer, headers

def test_webgpu_graph_rewrites_keep_the_numbers(exports, tmp_path):
    """int32 integers, bools carried as float, last-position logits: onnxruntime gives the same logits."""
    import onnx
    import onnxruntime as ort

    from llamac.web.bools import bools_through_float
    from llamac.web.int32 import narrow_int64
    from llamac.web.relax_import import last_position_logits

    ex = exports["llama3_gqa_tied"]
    cfg = json.loads((ex / "config.json").read_text())
    original = onnx.load(str(ex / "model.onnx"))
    rewritten = last_position_logits(bools_through_float(narrow_int64(original)))
    assert not any(i.type.tensor_type.elem_type == onnx.TensorProto.INT64 for i in rewritten.graph.input)
    ids = _prompt(20, cfg["vocab_size"])
    kv, d = cfg["num_key_value_heads"], cfg["head_dim"]

    def feed(int_type):
        f = {"input_ids": np.array([ids], int_type), "attention_mask": np.ones((1, len(ids)), int_type),
             "position_ids": np.arange(len(ids), dtype=int_type)[None]}
        for i in range(cfg["num_hidden_layers"]):
            for n in ("key", "value"):
                f[f"past_key_values.{i}.{n}"] = np.zeros((1, kv, 0, d), np.float32)
        return f

    ref = ort.InferenceSession(original.SerializeToString()).run(["logits"], feed(np.int64))[0]
    got = ort.InferenceSession(rewritten.SerializeToString()).run(["logits"], feed(np.int32))[0]
    assert got.shape == (1, 1, cfg["vocab_size"])
    np.testing.assert_allclose(got[0, 0], ref[0, -1], atol=1e-5)


def test_q4_uses_the_shared_q4_scheme():
    from llamac.quantize import dequantize, get_scheme, quantize
    from llamac.web.q4 import dequantize_weight, quantize_weight

    w = np.random.default_rng(0).normal(0, 0.1, (96, 40)).astype(np.float32)
    packed, scale = quantize_weight(w)
    assert packed.dtype == np.uint32 and packed.shape == (12, 40) and scale.shape == (3, 40)
    np.testing.assert_array_equal(dequantize_weight(packed, scale), dequantize(quantize(w, get_scheme("q4"))))


def _node_tokenize(spec: dict, texts: list[str], tmp_path: Path) -> list[list]:
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    script = tmp_path / "tok.js"
    script.write_text(
        f"const T = require({json.dumps(str(TOKENIZER_JS))}); const fs = require('fs');\n"
        "const tok = new T(JSON.parse(fs.readFileSync(process.argv[2])));\n"
        "const texts = JSON.parse(fs.readFileSync(process.argv[3]));\n"
        "console.log(JSON.stringify(texts.map((t) => { const ids = tok.encode(t); return [ids, tok.decode(ids)]; })));\n")
    out = subprocess.run(["node", str(script), str(tmp_path / "spec.json"), str(tmp_path / "texts.json")],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@needs_node
def test_js_tokenizer_matches_the_bundled_sentencepiece(tmp_path):
    from llamac.runtime import load_tokenizer
    from llamac.web.tokenizer_web import tokenizer_spec

    texts = ["In the beginning God created the heaven and the earth.", "hello  world 123 ü", "  leading",
             "日本語 – dash\nnew line\ttab", "Ünïcödé 😀", "a"]
    tok = load_tokenizer(BUNDLED_SPM)
    for text, (ids, decoded) in zip(texts, _node_tokenize(tokenizer_spec(BUNDLED_SPM), texts, tmp_path)):
        assert ids == tok.encode(text), text
        assert decoded == tok.decode(ids), text


@needs_node
@pytest.mark.parametrize("kind", ["spm", "bpe"])
def test_js_tokenizer_matches_llama_cpp_vectors(kind, tmp_path):
    """Llama 2 sentencepiece and Llama 3 byte-level BPE, on llama.cpp's 46 test cases each."""
    from vocab_cache import llama2_spm_model, llama3_dir, or_skip, read_vectors

    from llamac.web.tokenizer_web import tokenizer_spec

    src = or_skip(llama2_spm_model if kind == "spm" else llama3_dir)
    vectors = read_vectors(kind)
    got = _node_tokenize(tokenizer_spec(src), [t for t, _ in vectors], tmp_path)
    assert [g[0] for g in got] == [ids for _, ids in vectors]


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_fp16_header_converts_exactly(tmp_path):
    """Our builtin_fp16.h (written for the wasm runtime build) against the compiler's _Float16."""
    src = tmp_path / "t.cc"
    src.write_text(r"""
#include "builtin_fp16.h"
#include <cmath>
#include <cstdio>
int main() {
  int bad = 0;
  for (uint32_t h = 0; h < 65536; ++h) {
    float f = __extendXfYf2__<uint16_t, uint16_t, 10, float, uint32_t, 23>((uint16_t)h);
    _Float16 r; uint16_t hh = h; memcpy(&r, &hh, 2); float fr = (float)r;
    if (memcmp(&f, &fr, 4) != 0 && !(std::isnan(f) && std::isnan(fr))) bad++;
  }
  for (uint64_t i = 0; i < (1ull << 32); i += 65537) {
    uint32_t u = i; float f; memcpy(&f, &u, 4);
    uint16_t a = __truncXfYf2__<float, uint32_t, 23, uint16_t, uint16_t, 10>(f);
    _Float16 r = (_Float16)f; uint16_t b; memcpy(&b, &r, 2);
    if (a != b && !std::isnan(f)) bad++;
  }
  printf("%d\n", bad);
  return bad != 0;
}
""")
    inc = ROOT / "llamac" / "web" / "cxx" / "3rdparty" / "compiler-rt"
    subprocess.run(["g++", "-O1", "-std=c++17", f"-I{inc}", str(src), "-o", str(tmp_path / "t")], check=True)
    assert subprocess.run([str(tmp_path / "t")]).returncode == 0


# ---------------------------------------------------------------- browser: build artifacts, run in Chromium

def fake_quant_export(export_dir: Path, art: Path, out: Path) -> Path:
    """The export with every weight the artifact stores as q4 replaced by the f32 values its kernels use."""
    import onnx
    from onnx import numpy_helper

    from llamac.web.q4 import dequantize_weight, quantize_weight

    names = set(json.loads((art / "manifest.json").read_text())["web"]["quantized_weights"])
    assert names, "nothing was quantized"
    m = onnx.load(str(export_dir / "model.onnx"))
    for init in m.graph.initializer:
        if init.name in names:
            init.CopyFrom(numpy_helper.from_array(dequantize_weight(*quantize_weight(numpy_helper.to_array(init))),
                                                  init.name))
    out.mkdir(parents=True)
    for f in export_dir.iterdir():
        if f.name not in ("model.onnx", "model.onnx.data"):
            shutil.copy(f, out / f.name)
    onnx.save(m, str(out / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    return out


@pytest.fixture(scope="module")
def artifacts(exports, tmp_path_factory):
    from llamac.web.build import compile_webgpu

    root = tmp_path_factory.mktemp("webgpu_artifacts")
    cache: dict[tuple[str, str], Path] = {}

    def get(name: str, quant: str) -> Path:
        if (name, quant) not in cache:
            compile_webgpu(exports[name], quant, MAX_SEQ, root / f"{name}_{quant}", progress=False)
            cache[(name, quant)] = root / f"{name}_{quant}"
        return cache[(name, quant)]

    return get


@pytest.mark.slow
@needs_browser_tools
@pytest.mark.parametrize("quant", ["f32", "q4"])
@pytest.mark.parametrize("name", TWO_CONFIGS)
def test_browser_greedy_equals_onnxruntime(name, quant, exports, artifacts, tmp_path):
    from llamac.runtime.browser import run_in_browser

    art = artifacts(name, quant)
    ref_dir = exports[name] if quant == "f32" else fake_quant_export(exports[name], art, tmp_path / "fq")
    vocab = json.loads((exports[name] / "config.json").read_text())["vocab_size"]
    ids = _prompt(24, vocab)
    want = load(ref_dir).generate(ids, max_new_tokens=24).tokens
    got = run_in_browser(art, ids, 24)
    assert got["tokens"] == want
    # and the x86 artifact of the same model and weights (embeddings kept f32, as the WebGPU build keeps them)
    from llamac.compiler import compile_model

    x86 = compile_model(exports[name], "x86_64", quant=quant, max_seq_len=MAX_SEQ, out=tmp_path / "x86",
                        progress=False, quantize_embeddings=False)
    assert load(x86).generate(ids, max_new_tokens=24).tokens == got["tokens"]
    assert got["prompt_tokens"] == ids and got["decode_tok_s"] > 0


@pytest.mark.slow
@needs_browser_tools
def test_page_form_generates_from_text(exports, artifacts):
    """Text through the page's own JS tokenizer, typed into #prompt and run with #generate; streamed #output."""
    from llamac.runtime.browser import open_page

    art = artifacts("spm", "f32")
    text = "In the beginning God created"
    want = load(exports["spm"]).generate(text, max_new_tokens=12)
    out = open_page(art, None, ui={"prompt": text, "max_tokens": 12})
    assert out["error"] is None
    res = out["result"]
    assert res["prompt_tokens"] == want.prompt_tokens and res["tokens"] == want.tokens
    assert res["text"] == want.text == out["output"]
    manifest = json.loads((art / "manifest.json").read_text())
    for rel, digest in manifest["files"].items():  # the manifest lists every file with its sha256
        import hashlib
        assert hashlib.sha256((art / rel).read_bytes()).hexdigest() == digest


@pytest.mark.slow
@needs_browser_tools
def test_no_webgpu_adapter_message(artifacts):
    from llamac.runtime.browser import open_page

    out = open_page(artifacts("llama2_mha", "f32"), None, webgpu=False, timeout_s=120)
    assert out["error"].startswith("No WebGPU adapter is available")


@pytest.mark.slow
@needs_browser_tools
def test_shader_f16_and_buffer_limit_messages(artifacts, tmp_path):
    """Manifests asking for shader-f16 (SwiftShader has none) or for a buffer over the GPU's limit."""
    from llamac.runtime.browser import open_page

    src = artifacts("llama2_mha", "f32")
    for case, edit, expect in (
        ("f16", lambda m: m["target"].update(requires_features=["shader-f16"]), "needs the WebGPU feature 'shader-f16'"),
        ("big", lambda m: m["web"]["params"].update(largest_tensor_bytes=1 << 40), "per storage buffer"),
    ):
        art = tmp_path / case
        shutil.copytree(src, art)
        manifest = json.loads((art / "manifest.json").read_text())
        edit(manifest)
        (art / "manifest.json").write_text(json.dumps(manifest))
        out = open_page(art, None, timeout_s=120)
        assert out["error"] and expect in out["error"], out["error"]


@pytest.mark.slow
@needs_browser_tools
def test_bundled_model_in_browser(tmp_path):
    from llamac import bundled
    from llamac.runtime.browser import run_in_browser
    from llamac.web.build import compile_webgpu

    ex = export(bundled.checkpoint(), tmp_path / "ex", progress=False)
    compile_webgpu(ex, "f32", 128, tmp_path / "art", progress=False)
    model = load(ex)
    ids = model.encode_prompt("And God said")
    want = model.generate(ids, max_new_tokens=16)
    got = run_in_browser(tmp_path / "art", ids, 16)
    assert got["tokens"] == want.tokens and got["text"] == want.text


def test_the_page_stops_on_generation_config_eos_ids(exports, tmp_path):
    """Llama 3 Instruct lists <|eot_id|> only in generation_config.json: the page's end ids include those, as the
    native runtime's do (they were the config's only)."""
    from llamac.web.build import compile_webgpu

    src = tmp_path / "export"
    shutil.copytree(exports["llama2_mha"], src)
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    compile_webgpu(src, "q4", MAX_SEQ, tmp_path / "art", progress=False)
    m = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert {2, 7} <= set(m["web"]["eos_token_ids"]) and "generation_config.json" in m["files"]


def test_a_damaged_webgpu_artifact_is_refused_before_the_browser_starts(artifacts, tmp_path):
    """run --browser and serve check every file against the manifest's sha256, as the native runtime does (a
    flipped weight byte ran, a missing wasm came back as the server's 404 page)."""
    from llamac.errors import InputError
    from llamac.runtime.browser import run_in_browser
    from llamac.web.serve import serve

    art = tmp_path / "art"
    shutil.copytree(artifacts("llama2_mha", "q4"), art)
    shard = next((art / "params").glob("*.bin"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    for call in (lambda: run_in_browser(art, [1, 2], 2), lambda: serve(art, port=0)):
        with pytest.raises(InputError, match="checksum"):
            call()
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    (art / "model.wasm").unlink()
    with pytest.raises(InputError, match="model.wasm is missing"):
        run_in_browser(art, [1, 2], 2)


def test_bad_quant_is_an_input_error(exports, tmp_path):
    from llamac.errors import InputError
    from llamac.web.build import compile_webgpu

    with pytest.raises(InputError, match="supports --quant"):
        compile_webgpu(exports["llama2_mha"], "q8", 64, tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_cli_describes_a_webgpu_artifact_and_sends_run_to_the_browser(artifacts):
    import subprocess
    import sys

    art = artifacts("llama2_mha", "f32")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "llamac", *map(str, args)], capture_output=True, text=True,
                              timeout=300)

    r = cli("inspect", art)
    assert r.returncode == 0 and "WebGPU artifact" in r.stdout and "layers" in r.stdout, r.stderr
    for args in (["run", art, "-p", "hi"], ["bench", art, "-p", "4", "-n", "2"]):
        r = cli(*args)
        assert r.returncode == 2 and "is a WebGPU artifact: run it with `llamac run --browser`" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_the_page_server_listens_on_ipv4_and_ipv6_hosts(tmp_path, host):
    """`llamac serve --host ::1` failed: the standard library's server is IPv4 unless told the address family."""
    import socket
    import urllib.request

    from llamac.runtime.browser import ArtifactServer

    if ":" in host:
        try:
            with socket.socket(socket.AF_INET6) as s:
                s.bind((host, 0))
        except OSError:
            pytest.skip("this machine has no IPv6 loopback")
    (tmp_path / "index.html").write_text("<p>hi</p>")
    with ArtifactServer(tmp_path, host=host) as url:
        assert urllib.request.urlopen(url + "index.html", timeout=10).read() == b"<p>hi</p>"


def test_dequantize_says_it_reads_cpu_artifacts_only(artifacts, tmp_path):
    from llamac.artifact import dequantize
    from llamac.errors import InputError

    with pytest.raises(InputError, match="WebGPU artifact: --dequantize reads CPU artifacts only"):
        dequantize(artifacts("llama2_mha", "q4"), tmp_path / "out")
    assert not (tmp_path / "out").exists()

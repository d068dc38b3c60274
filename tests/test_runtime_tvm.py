"""Runtime on compiled artifacts: greedy generation equals transformers, memory stays flat, tampering is refused."""
from __future__ import annotations

import json

import numpy as np
import pytest

from hf_models import CONFIGS, make_hf_checkpoint
from test_runtime_onnx import PROMPT, hf_greedy

from llamac.compiler import compile_model
from llamac.errors import InputError
from llamac.export.exporter import export
from llamac.runtime import load, tvm_backend
from llamac.runtime.tvm_backend import HUGE_PAGE, _huge_pages_offered, map_weights


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_32_tokens_equal_transformers_and_onnx_backend(name, tmp_path):
    model = make_hf_checkpoint(tmp_path / "hf", **CONFIGS[name])
    exp = export(tmp_path / "hf", tmp_path / "onnx", progress=False)
    art = compile_model(exp, "x86_64", quant="f32", out=tmp_path / "art", progress=False)
    tokens = load(art).generate(PROMPT, max_new_tokens=32).tokens
    assert tokens == hf_greedy(model, PROMPT, 32)
    assert tokens == load(exp).generate(PROMPT, max_new_tokens=32).tokens


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_thousand_decode_steps_keep_memory_flat_and_logits_intact(tmp_path):
    make_hf_checkpoint(tmp_path / "hf", **dict(CONFIGS["llama3_gqa_tied"], max_position_embeddings=2048))
    art = compile_model(tmp_path / "hf", "x86_64", quant="q4", max_seq_len=1100, out=tmp_path / "art",
                        progress=False)
    sess = load(art).session()
    logits = sess.prefill([1, 2, 3])
    rss = []
    for step in range(1000):
        logits = sess.decode(int(np.argmax(logits)))
        if step == 0:
            held, held_copy = logits, logits.copy()     # the runtime returns views of the VM's outputs
        if step in (99, 999):
            rss.append(_rss_bytes())
    assert sess.n_past == 1003
    assert np.array_equal(held, held_copy), "logits returned by a step were overwritten by later steps"
    assert rss[1] - rss[0] < 2 * 2**20, f"RSS grew by {(rss[1] - rss[0]) / 2**20:.1f} MiB over 900 decode steps"


def test_one_models_threads_leave_the_next_ones_alone(tmp_path):
    """load(threads=1) sizes TVM's pool (one per process) for that model only: a later load() still defaults to
    every usable core, and the pool follows whichever model runs (TVM binds the calling thread to as many cores as
    its pool has, which a later default once counted as 1; and it never grows a pool past its first size)."""
    import tvm

    make_hf_checkpoint(tmp_path / "hf", **CONFIGS["llama2_mha"])
    art = compile_model(tmp_path / "hf", "x86_64", quant="q8", max_seq_len=16, out=tmp_path / "art", progress=False)
    one = load(art, threads=1)
    default = load(art)
    assert default.backend.threads == int(tvm_backend._USER_THREADS or tvm_backend._CORES)
    pool = tvm.get_global_func("runtime.NumThreads")
    a = one.generate([1, 2, 3], max_new_tokens=4)
    assert pool() == 1
    b = default.generate([1, 2, 3], max_new_tokens=4)
    assert pool() == default.backend.threads and a.tokens == b.tokens


def test_decode_checks_its_token_and_the_context_like_a_prompt(tmp_path):
    make_hf_checkpoint(tmp_path / "hf", **CONFIGS["llama2_mha"])
    art = compile_model(tmp_path / "hf", "x86_64", quant="q8", max_seq_len=6, out=tmp_path / "art", progress=False)
    model = load(art)
    vocab = model.config.vocab_size
    fast, plain = model.session(), model.session()
    fast.prefill([1, 2, 3])
    plain.prefill([1, 2, 3])
    for bad in (-1, vocab, np.int64(vocab)):
        with pytest.raises(InputError, match="outside the vocabulary"):
            fast.decode(bad)
    assert fast.n_past == 3
    for bad in (1.5, np.float32(2), "3"):
        with pytest.raises(InputError, match="token ids must be integers"):
            fast.decode(bad)
    with pytest.raises(InputError, match="token ids must be integers"):
        model.session().prefill([1, 2.5])
    with pytest.raises(InputError, match="outside any vocabulary"):
        model.session().prefill([1, 2 ** 70])
    for token in (np.int32(5), 7, True):
        assert np.array_equal(fast.decode(token), plain.prefill([int(token)]))
    assert fast.n_past == plain.n_past == 6
    with pytest.raises(InputError, match="exceed the context of 6"):
        fast.decode(1)
    assert fast.n_past == 6


X86_NO_AVX512 = "processor\t: 0\nflags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c\n"
ARM64_NO_DOT = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"


@pytest.mark.parametrize("cpuinfo, arch, mattr, missing", [
    (X86_NO_AVX512, "x86_64", ["+avx2", "+fma", "+f16c"], []),
    (X86_NO_AVX512, "x86_64", ["+avx2", "+avx512f", "+avx512bw", "+fma"], ["avx512f", "avx512bw"]),
    (ARM64_NO_DOT, "aarch64", ["+neon", "+crc"], []),
    (ARM64_NO_DOT, "aarch64", ["+neon", "+dotprod", "+fullfp16"], ["dotprod", "fullfp16"]),
    (X86_NO_AVX512, "aarch64", ["+neon", "+dotprod"], []),     # qemu-user shows the x86 host's cpuinfo: no verdict
    ("", "x86_64", ["+avx512f"], []),                          # no cpuinfo (another OS): no verdict
])
def test_missing_cpu_features_reads_linux_flags(cpuinfo, arch, mattr, missing, monkeypatch):
    monkeypatch.setattr(tvm_backend, "_cpuinfo", lambda: cpuinfo)
    assert tvm_backend.missing_cpu_features(mattr, arch) == missing


def test_artifact_for_a_richer_cpu_is_refused_before_its_code_runs(tmp_path, monkeypatch):
    """An AVX-512 artifact on an AVX2 CPU: one clear error instead of the process dying of SIGILL."""
    make_hf_checkpoint(tmp_path / "hf", **CONFIGS["llama2_mha"])
    art = compile_model(tmp_path / "hf", "x86_64-avx512", quant="q8", max_seq_len=16, out=tmp_path / "art",
                        progress=False)
    monkeypatch.setattr(tvm_backend, "_cpuinfo", lambda: X86_NO_AVX512)
    with pytest.raises(InputError, match="x86_64-avx512, which needs CPU features this machine lacks"):
        load(art)


def test_tampered_or_newer_artifact_is_refused(tmp_path):
    make_hf_checkpoint(tmp_path / "hf", **CONFIGS["llama2_mha"])
    art = compile_model(tmp_path / "hf", "x86_64", quant="q8", out=tmp_path / "art", progress=False)
    weights = art / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(InputError, match="checksum"):
        load(art)
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    load(art)  # restored: loads again
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["format_version"] = manifest.get("format_version", 1) + 1
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="version|newer|format"):
        load(art)


def test_a_manifest_edited_by_hand_is_refused(tmp_path):
    """The manifest is not checksummed: fields of the wrong type, a context past the KV cache's capacity (the step
    wrote past its buffers: a segfault) or a library outside the listed files are one InputError each."""
    make_hf_checkpoint(tmp_path / "hf", **CONFIGS["llama2_mha"])
    art = compile_model(tmp_path / "hf", "x86_64", quant="q8", max_seq_len=16, out=tmp_path / "art", progress=False)
    good = json.loads((art / "manifest.json").read_text())
    edits = [{"max_seq_len": 64}, {"max_seq_len": "x"}, {"weights": {}}, {"kv_cache": {}}, {"entry": {}},
             {"model": "x"}, {"files": []}, {"library": "../other/model.so"}]
    files = {k: v for k, v in good["files"].items() if k != "weights.bin"}     # its checksum off
    tensors = [dict(t) for t in good["weights"]["tensors"]]
    tensors[-1]["offset"] = good["files"]["weights.bin"]["size"]                # past the end of the file
    kv_count = {**good["kv_cache"], "count": good["kv_cache"]["count"] + 2}
    edits += [{"files": files}, {"weights": {**good["weights"], "tensors": tensors}}, {"kv_cache": kv_count},
              {"entry": {**good["entry"], "function": "nope"}}]
    for edit in edits:
        (art / "manifest.json").write_text(json.dumps({**good, **edit}))
        with pytest.raises(InputError, match="malformed manifest"):
            load(art)
    # the model config must be config.json's: a larger vocab_size let ids past the embedding table through
    (art / "manifest.json").write_text(json.dumps({**good, "model": {**good["model"], "vocab_size": 5000}}))
    with pytest.raises(InputError, match="differs from config.json"):
        load(art)
    # the cache capacity is the library's: a larger one in the manifest fails TVM's check of the step's arguments
    kv = {**good["kv_cache"], "shape": good["kv_cache"]["shape"][:2] + [32] + good["kv_cache"]["shape"][3:]}
    (art / "manifest.json").write_text(json.dumps({**good, "kv_cache": kv}))
    with pytest.raises(InputError, match="does not accept the KV cache or weights the manifest describes"):
        load(art).generate([1, 2, 3], max_new_tokens=3)
    (art / "manifest.json").write_text(json.dumps(good))
    assert len(load(art).generate([1, 2, 3], max_new_tokens=3).tokens) == 3


def _anon_huge_kib(address: int) -> int:
    """AnonHugePages of the mapping of this process that holds `address` (from /proc/self/smaps)."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    raise AssertionError("no mapping holds the weights")


def test_weights_sit_in_huge_pages_where_linux_offers_them(tmp_path, monkeypatch):
    data = np.random.default_rng(0).integers(0, 256, (6 << 20) + 123, dtype=np.uint8)
    f = tmp_path / "weights.bin"
    data.tofile(f)
    blob = map_weights(f)
    assert np.array_equal(blob, data) and blob.flags.writeable
    if _huge_pages_offered():
        assert not isinstance(blob, np.memmap) and blob.ctypes.data % HUGE_PAGE == 0
        assert _anon_huge_kib(blob.ctypes.data) >= 4096     # 2 of the 3 whole 2 MiB pages, at least
    else:
        assert isinstance(blob, np.memmap)
    monkeypatch.setattr(tvm_backend, "_mem_available", lambda: 6 << 20)     # the copy would not fit: map the file
    assert isinstance(map_weights(f), np.memmap)
    monkeypatch.undo()
    monkeypatch.setenv("LLAMAC_WEIGHTS", "mmap")
    mapped = map_weights(f)
    assert isinstance(mapped, np.memmap) and np.array_equal(mapped, data)
    monkeypatch.setenv("LLAMAC_WEIGHTS", "map")         # a typo quietly kept the default
    with pytest.raises(InputError, match="LLAMAC_WEIGHTS must be 'mmap' or unset"):
        map_weights(f)

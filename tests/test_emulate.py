"""`llamac run --emulate`: arm64 code runs on this x86-64 machine under qemu-user, and gives the x86 answers.

Needs Debian's qemu-user-static and g++-aarch64-linux-gnu (`make test` installs both). Missing tools fail the tests
with a line saying what to install, rather than skipping them: a skipped check would pass CI without checking.
The first run prepares the emulation cache (arm64 Debian packages and wheels: about a minute, 240 MB).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hf_models import make_hf_checkpoint

from llamac.errors import InputError
from llamac.runtime import emulate

ARM64 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}

# Runs in the emulated Python: load the module, compare with numpy, and report what the process mapped and imported.
GUEST_CHECK = """
import json, platform, sys
import numpy as np
import tvm
import llamac.runtime, llamac.export.config, llamac.errors
lib = tvm.runtime.load_module(sys.argv[1])
rng = np.random.default_rng(0)
a = rng.standard_normal((64, 128)).astype("float32")
x = rng.standard_normal(128).astype("float32")
z = tvm.runtime.tensor(np.zeros(64, "float32"))
lib["gemv_act"](tvm.runtime.tensor(a), tvm.runtime.tensor(x), z)
y = a.astype(np.float64) @ x
ref = np.exp(0.1 * y) + np.tanh(y)
maps = open("/proc/self/maps").read()
print(json.dumps({"machine": platform.machine(), "err": float(np.abs(z.numpy() - ref).max() / np.abs(ref).max()),
                  "runtime_path": llamac.runtime.__path__[0], "compiler_lib": "libtvm_compiler" in maps,
                  "runtime_lib": "libtvm_runtime" in maps}))
"""


def _require_tools() -> None:
    missing = [t for t in ("qemu-aarch64-static", "aarch64-linux-gnu-g++") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: apt-get install qemu-user-static g++-aarch64-linux-gnu "
                    f"(or run `make sysdeps`)")


def _compile_arm64_kernel(path: Path) -> None:
    """gemv followed by exp and tanh (calls into the arm64 math library), built by the host for aarch64."""
    import tvm
    from tvm import te

    a = te.placeholder((64, 128), "float32", name="a")
    x = te.placeholder((128,), "float32", name="x")
    k = te.reduce_axis((0, 128), "k")
    y = te.compute((64,), lambda i: te.sum(a[i, k] * x[k], axis=k), name="y")
    z = te.compute((64,), lambda i: te.exp(y[i] * 0.1) + te.tanh(y[i]), name="z")
    func = te.create_prim_func([a, x, z]).with_attr("global_symbol", "gemv_act")
    lib = tvm.compile(tvm.IRModule({"gemv_act": func}), target=tvm.target.Target(ARM64))
    lib.export_library(str(path), cc="aarch64-linux-gnu-g++")


def test_arm64_tvm_module_matches_numpy_under_qemu(tmp_path):
    _require_tools()
    so = tmp_path / "kernel.so"
    _compile_arm64_kernel(so)
    assert so.read_bytes()[18] == 183  # ELF e_machine: EM_AARCH64, so the host could not run it natively

    p = emulate.emulated_python(["-c", GUEST_CHECK, str(so)], timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["machine"] == "aarch64"
    assert out["err"] < 1e-5
    # The guest imports this checkout's llamac, and TVM through its runtime library only.
    import llamac.runtime

    assert os.path.realpath(out["runtime_path"]) == os.path.realpath(llamac.runtime.__path__[0])
    assert out["runtime_lib"] is True and out["compiler_lib"] is False


def test_prepare_is_cached_and_keyed():
    _require_tools()
    e1 = emulate.prepare(progress=False)
    e2 = emulate.prepare(progress=False)
    assert e1 == e2
    assert (e1.root / ".complete").is_file() and (e1.site / ".complete").is_file()
    assert e1.python.is_file() and (e1.site / "tvm").is_dir()
    assert "apache-tvm==0.27.0.post1" in emulate._wheel_specs()


def test_artifact_arch_is_read_from_the_manifest(tmp_path):
    def arch(manifest):
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))
        return emulate.artifact_arch(tmp_path)

    assert arch({"target": {"name": "arm64", "mtriple": "aarch64-linux-gnu"}}) == "aarch64"
    assert arch({"target": {"name": "arm64", "arch": "aarch64", "llvm": {"mtriple": "aarch64-linux-gnu"}}}) == "aarch64"
    assert arch({"target": {"name": "x86_64", "tvm": {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}}}) == "x86_64"
    assert arch({"target": {"name": "rpi5", "arch": "aarch64"}}) == "aarch64"
    assert arch({"target": {"kind": "webgpu", "host": {"mtriple": "wasm32-unknown-unknown-wasm"}}}) == "wasm32"
    assert arch({"format_version": 1}) is None
    (tmp_path / "manifest.json").unlink()
    assert emulate.artifact_arch(tmp_path) is None


def test_emulating_an_x86_artifact_is_a_clear_input_error(tmp_path):
    art = tmp_path / "x86"
    art.mkdir()
    (art / "manifest.json").write_text(json.dumps({"target": {"name": "x86_64", "mtriple": "x86_64-linux-gnu"}}))
    with pytest.raises(InputError, match="built for x86_64"):
        emulate.run_emulated(art, [str(art), "--ids", "1,2", "--json"])
    p = subprocess.run([sys.executable, "-m", "llamac", "run", str(art), "--ids", "1,2", "--emulate"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "built for x86_64" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_emulating_an_export_directory_is_a_clear_input_error(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"")     # an export dir: no manifest.json
    with pytest.raises(InputError, match="not a compiled artifact"):
        emulate.run_emulated(tmp_path, ["--ids", "1"])


def test_emulating_an_android_artifact_is_a_clear_input_error(tmp_path):
    # Android builds link against bionic, which the glibc guest cannot load.
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"target": {"name": "android-arm64", "arch": "aarch64", "mtriple": "aarch64-linux-android",
                    "runtime_os": "android"}}))
    with pytest.raises(InputError, match="built for android"):
        emulate.run_emulated(tmp_path, ["--ids", "1"])


@pytest.mark.slow
def test_arm64_artifact_under_emulation_gives_the_x86_tokens(tmp_path):
    """The issue's check: one model compiled for arm64 and x86_64; --emulate on arm64 == native x86 (greedy)."""
    _require_tools()
    if importlib.util.find_spec("llamac.compiler") is None:
        pytest.fail("llamac.compiler is missing: this test needs compile_model")
    from llamac.compiler import compile_model

    src = tmp_path / "hf"
    make_hf_checkpoint(src, seed=3, num_key_value_heads=2)
    arts = {t: compile_model(src, t, quant="q4", max_seq_len=64, out=tmp_path / t, force=True)
            for t in ("arm64", "x86_64")}
    assert emulate.artifact_arch(Path(arts["arm64"])) in ("aarch64", None)

    def run(art, *extra):
        p = subprocess.run([sys.executable, "-m", "llamac", "run", str(art), "--ids", "1,5,9,42,7", "-n", "16",
                            "--json", *extra], capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stderr[-2000:]
        return json.loads(p.stdout.strip().splitlines()[-1])

    native = run(arts["x86_64"])
    emulated = run(arts["arm64"], "--emulate")
    assert len(native["tokens"]) == 16
    assert emulated["prompt_tokens"] == native["prompt_tokens"] == [1, 5, 9, 42, 7]
    assert emulated["tokens"] == native["tokens"]

"""Targets are data files: every built-in one is complete, user files load, malformed ones fail clearly."""
from __future__ import annotations

import pytest

from llamac.errors import InputError
from llamac.targets import list_targets, load_target

BUILTIN = {"x86_64", "x86_64-avx2", "x86_64-avx512", "x86_64-avx512-vnni", "arm64", "rpi4", "rpi5", "android-arm64",
           "webgpu"}


def test_builtin_targets_are_complete():
    targets = {t.name: t for t in list_targets()}
    assert BUILTIN <= set(targets)
    for t in targets.values():
        assert t.mtriple and t.summary and t.runtime_needs and t.cc and t.lanes >= 1
        assert t.tvm_target()["mtriple"] == t.mtriple
    assert targets["rpi4"].mcpu == "cortex-a72" and "+dotprod" not in targets["rpi4"].mattr
    assert targets["rpi5"].mcpu == "cortex-a76" and "+dotprod" in targets["rpi5"].mattr
    assert targets["arm64"].cc == "aarch64-linux-gnu-g++" and targets["arm64"].arch == "aarch64"
    assert targets["x86_64-avx512"].arch == "x86_64" and "+avx512f" in targets["x86_64-avx512"].mattr
    assert targets["x86_64-avx512-vnni"].dot == "vnni" and "+avx512vnni" in targets["x86_64-avx512-vnni"].mattr
    # 16 tiles of sums fit AVX-512's 32 vector registers, not AVX2's 16
    assert (targets["x86_64-avx2"].dot_tiles, targets["x86_64-avx512"].dot_tiles) == (4, 16)
    assert (targets["x86_64-avx2"].float_panels, targets["x86_64-avx512-vnni"].float_panels) == (1, 4)
    assert targets["webgpu"].kind == "webgpu" and targets["webgpu"].arch == "wasm32"


def test_tvm_accepts_every_cpu_target():
    import tvm

    for t in list_targets():
        if t.kind == "llvm":
            assert str(tvm.target.Target(t.tvm_target()).kind) == "llvm"


def test_user_target_file(tmp_path):
    f = tmp_path / "myboard.toml"
    f.write_text('name = "myboard"\nsummary = "a board"\n[llvm]\nmtriple = "aarch64-linux-gnu"\nmcpu = "cortex-a55"\n'
                 'mattr = ["+neon", "+dotprod"]\n[build]\ncc = "aarch64-linux-gnu-g++"\nlanes = 4\n'
                 '[runtime]\nneeds = "Linux"\n')
    t = load_target(f)
    assert (t.name, t.arch, t.mcpu, t.lanes) == ("myboard", "aarch64", "cortex-a55", 4)
    assert t.tvm_target() == {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a55",
                              "mattr": ["+neon", "+dotprod"]}
    assert load_target(str(f)).name == "myboard"


@pytest.mark.parametrize("text,match", [
    ('name = "x"\n[llvm\n', "malformed"),
    ('name = "x"\n', "mtriple"),
    ('[llvm]\nmtriple = "aarch64-linux-gnu"\n', "name"),
    ('name = "x"\n[llvm]\nmtriple = "riscv64-linux-gnu"\n', "arch"),
    ('name = "x"\narch = "x86_64"\n[llvm]\nmtriple = "aarch64-linux-gnu"\n', "contradicts"),
    ('name = "x"\n[llvm]\nmtriple = "aarch64-linux-gnu"\nmattr = "+neon"\n', "mattr"),
    ('name = "x"\n[llvm]\nmtriple = "aarch64-linux-gnu"\nmattr = ["neon"]\n', "mattr"),
    ('name = "x"\n[llvm]\nmtriple = "aarch64-linux-gnu"\n[build]\nlanes = 3\n', "lanes"),
    ('name = "x"\n[llvm]\nmtriple = "aarch64-linux-gnu"\n[build]\ndot = "vpdp"\n', "build.dot must be one of"),
    ('name = "x"\n[llvm]\nmtriple = "x86_64-linux-gnu"\nmattr = ["+avx2"]\n[build]\ndot = "vnni"\n', "avx512vnni"),
    ('name = "x"\n[llvm]\nmtriple = "x86_64-linux-gnu"\n[build]\ndot_tiles = 3\n', "dot_tiles must be"),
    ('name = "x"\n[llvm]\nmtriple = "x86_64-linux-gnu"\n[build]\ndot_tiles = 32\n', "dot_tiles must be"),
    ('name = "x"\n[llvm]\nmtriple = "x86_64-linux-gnu"\n[build]\nfloat_panels = 3\n', "float_panels must be"),
    # 8 panels of 8 or 16 lanes are wider than the float kernels take (at most 4 panels)
    ('name = "x"\n[llvm]\nmtriple = "x86_64-linux-gnu"\n[build]\nfloat_panels = 8\n', "float_panels must be"),
    ('name = "x"\n[llvm]\nmtriple = "aarch64-linux-gnu"\nmattr = ["+neon"]\n[build]\ndot = "sdot"\n', "dotprod"),
])
def test_malformed_target_files(tmp_path, text, match):
    f = tmp_path / "t.toml"
    f.write_text(text)
    with pytest.raises(InputError, match=match):
        load_target(f)


@pytest.mark.parametrize("llvm,match", [
    ('mcpu = "cortex-a67"\nmattr = ["+neon"]', "does not know the CPU 'cortex-a67'"),
    ('mcpu = "cortex-a76"\nmattr = ["+neon", "+dotprd"]', r"does not know the feature\(s\) \+dotprd"),
])
def test_names_llvm_does_not_know_are_refused(tmp_path, llvm, match):
    # LLVM only warns about these and builds for a generic CPU: a typo would cost speed without a word
    f = tmp_path / "t.toml"
    f.write_text(f'name = "t"\n[llvm]\nmtriple = "aarch64-linux-gnu"\n{llvm}\n[build]\ncc = "g++"\n')
    with pytest.raises(InputError, match=match):
        load_target(f).check_buildable()
    for t in list_targets():        # every built-in name is one LLVM knows
        if t.kind == "llvm":
            t.check_llvm_names()


def test_unknown_and_missing():
    with pytest.raises(InputError, match="unknown target 'vax'.*x86_64"):
        load_target("vax")
    with pytest.raises(InputError, match="does not exist"):
        load_target("/nonexistent/board.toml")


def test_missing_cross_compiler_names_the_package(tmp_path):
    f = tmp_path / "t.toml"
    f.write_text('name = "t"\n[llvm]\nmtriple = "aarch64-linux-gnu"\n[build]\ncc = "nope-g++"\ncc_package = "pkg-x"\n')
    with pytest.raises(InputError, match="nope-g++.*pkg-x"):
        load_target(f).check_buildable()


def test_android_without_ndk(monkeypatch):
    for var in ("ANDROID_NDK_HOME", "ANDROID_NDK_ROOT", "ANDROID_NDK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    with pytest.raises(InputError, match="aarch64-linux-android28-clang.*NDK"):
        load_target("android-arm64").check_buildable()


def test_android_with_ndk(tmp_path, monkeypatch):
    bindir = tmp_path / "toolchains/llvm/prebuilt/linux-x86_64/bin"
    bindir.mkdir(parents=True)
    cc = bindir / "aarch64-linux-android28-clang++"
    cc.write_text("#!/bin/sh\n")
    cc.chmod(0o755)
    monkeypatch.setenv("ANDROID_NDK_HOME", str(tmp_path))
    assert load_target("android-arm64").check_buildable() == str(cc)


def test_planned_target_is_refused(tmp_path):
    f = tmp_path / "future.toml"
    f.write_text('name = "future"\nstatus = "planned"\n[llvm]\nmtriple = "aarch64-linux-gnu"\n[build]\ncc = "g++"\n')
    with pytest.raises(InputError, match="not built yet"):
        load_target(f).check_buildable()


@pytest.mark.parametrize("machine,cpuinfo,expected", [
    ("x86_64", "flags\t\t: fpu sse4_2 avx avx2 fma f16c\n", "x86_64-avx2"),
    ("x86_64", "flags\t\t: fpu sse4_2 avx2 fma f16c avx512f avx512bw avx512vl\n", "x86_64-avx512"),
    ("x86_64", "flags\t\t: fpu sse4_2 avx2 fma f16c avx512f avx512bw avx512vl avx512_vnni\n", "x86_64-avx512-vnni"),
    ("x86_64", "flags\t\t: fpu sse4_2\n", "x86_64"),
    ("aarch64", "Features\t: fp asimd evtstrm crc32 fphp asimdhp asimddp\n", "rpi5"),     # Cortex-A76 (Pi 5)
    ("aarch64", "Features\t: fp asimd evtstrm crc32 cpuid\n", "arm64"),                    # Cortex-A72 (Pi 4)
])
def test_host_target_from_cpu_flags(monkeypatch, tmp_path, machine, cpuinfo, expected):
    import platform

    import llamac.targets as targets

    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\n" + cpuinfo)
    monkeypatch.setattr(targets, "CPUINFO", f)
    monkeypatch.setattr(platform, "machine", lambda: machine)
    assert targets.host_target() == expected
    assert load_target(expected).name == expected

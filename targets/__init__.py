"""Compile targets as data: one TOML file per target in this directory, or a user's own file.

A target file names the LLVM triple, CPU and features the kernels are generated for, the compiler that links the
shared library (a cross compiler for ARM), the kernel tile width (`lanes`) and what a device needs to run the result:

    name = "myboard"                  # required
    summary = "one line for `llamac targets`"
    arch = "aarch64"                  # x86_64 | aarch64 | wasm32
    [llvm]
    mtriple = "aarch64-linux-gnu"     # required
    mcpu = "cortex-a55"
    mattr = ["+neon"]
    [build]
    cc = "aarch64-linux-gnu-g++"      # linker driver for the library; searched on PATH (and in cc_search dirs)
    cc_package = "g++-aarch64-linux-gnu"
    lanes = 8                         # output channels per SIMD tile in the linear kernels
    dot = "sdot"                      # byte dot products for q4/q8 (int8 kernels): "avx2" | "vnni" | "sdot"; omit
    dot_tiles = 4                     # 8-channel tiles of those kernels stored side by side (1-16, default 4)
    float_panels = 4                  # f32/f16 weights: `lanes`-wide panels side by side (1, 2 or 4; default 1)
    [runtime]
    needs = "what the device must have"

Standard library only (tomllib; tomli on Python 3.10), so `llamac targets` stays instant.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: the same parser as a package
    import tomli as tomllib

from llamac.errors import InputError

HERE = Path(__file__).parent
ARCHES = ("x86_64", "aarch64", "wasm32")
DOT_ISAS = {"avx2": "+avx2", "vnni": "+avx512vnni", "sdot": "+dotprod"}   # dot-product flavour -> LLVM feature
# listing order of the built-in files (others follow alphabetically)
ORDER = ("x86_64", "x86_64-avx2", "x86_64-avx512", "x86_64-avx512-vnni", "arm64", "rpi4", "rpi5", "android-arm64",
         "webgpu")


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    summary: str
    arch: str
    mtriple: str
    mcpu: str = ""
    mattr: tuple[str, ...] = ()
    kind: str = "llvm"
    status: str = "ready"              # "planned": listed, but compile refuses it
    cc: str | None = None
    cc_search: tuple[str, ...] = ()
    cc_package: str = ""
    lanes: int = 8
    dot: str = ""                      # "avx2" | "vnni" | "sdot": q4/q8 layers run as int8 dot products (tvm_dot)
    dot_tiles: int = 4                 # tiles of 8 channels side by side in those kernels' weights (one read stream)
    float_panels: int = 1              # lanes-wide panels side by side in f32/f16 weights (one read stream per task)
    runtime_os: str = "linux"
    runtime_needs: str = ""
    source: str = ""                   # file it was read from

    def tvm_target(self) -> dict:
        """TVM 0.27 target dict (the JSON form; CLI strings are no longer accepted)."""
        d: dict = {"kind": self.kind, "mtriple": self.mtriple}
        if self.mcpu:
            d["mcpu"] = self.mcpu
        if self.mattr:
            d["mattr"] = list(self.mattr)
        return d

    def find_cc(self) -> str:
        """Path of the compiler that links the library; InputError saying what to install when it is missing."""
        if not self.cc:
            raise InputError(f"target {self.name} names no compiler (build.cc) to link the library")
        for d in self.cc_search:
            expanded = os.path.expandvars(d)
            if "$" in expanded:           # variable not set
                continue
            cand = Path(expanded) / self.cc
            if cand.is_file() and os.access(cand, os.X_OK):
                return str(cand)
        found = shutil.which(self.cc)
        if found:
            return found
        where = f" (looked on PATH and in {', '.join(self.cc_search)})" if self.cc_search else " (not on PATH)"
        hint = f"; install {self.cc_package}" if self.cc_package else ""
        raise InputError(f"target {self.name} needs the compiler {self.cc}{where}{hint}")

    def check_buildable(self) -> str:
        """Raise InputError if this target cannot be compiled here; return the linker to use."""
        if self.status != "ready" or self.kind not in ("llvm", "webgpu"):
            raise InputError(f"target {self.name} is not built yet ({self.summary}); "
                             f"choose another from `llamac targets`")
        if self.kind == "llvm":
            self.check_llvm_names()
        return self.find_cc()

    def check_llvm_names(self) -> None:
        """Raise InputError for an llvm.mcpu or llvm.mattr entry that LLVM does not know for the triple: LLVM itself
        only warns, and builds for a generic CPU or without the feature (a typo would cost speed silently)."""
        import tvm
        from tvm.target import codegen

        where = self.source or f"target {self.name}"
        if self.mcpu and not codegen.llvm_is_valid_cpu(self.mcpu, self.mtriple):
            raise InputError(f"{where}: LLVM does not know the CPU {self.mcpu!r} (llvm.mcpu) for {self.mtriple}")
        with _quiet_stderr():     # LLVM prints its own warning for each unknown feature
            enabled = set(codegen.llvm_get_cpu_features(tvm.target.Target(self.tvm_target())))
        unknown = [a for a in self.mattr if a.startswith("+") and a[1:] not in enabled]
        if unknown:
            raise InputError(f"{where}: LLVM does not know the feature(s) {', '.join(unknown)} (llvm.mattr) "
                             f"for {self.mtriple}")

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        del d["source"]                   # a path on the build machine: not part of what the artifact is
        d["mattr"] = list(self.mattr)
        d["cc_search"] = list(self.cc_search)
        d["llvm"] = self.tvm_target()
        return d


class _quiet_stderr:
    """Send file descriptor 2 to /dev/null for a block (messages that C++ libraries print themselves)."""

    def __enter__(self):
        self._saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)

    def __exit__(self, *exc):
        os.dup2(self._saved, 2)
        os.close(self._saved)


def _arch(name):
    return "aarch64" if name == "arm64" else name


def _parse(path: Path) -> Target:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read target file ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path}: malformed target file: {e}") from None
    llvm, build, runtime = data.get("llvm", {}), data.get("build", {}), data.get("runtime", {})
    if not all(isinstance(x, dict) for x in (llvm, build, runtime)):
        raise InputError(f"{path}: [llvm], [build] and [runtime] must be tables")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise InputError(f"{path}: target file needs a name")
    if not isinstance(llvm.get("mtriple"), str) or not llvm["mtriple"]:
        raise InputError(f"{path}: target file needs llvm.mtriple (e.g. \"aarch64-linux-gnu\")")
    triple_arch = _arch(llvm["mtriple"].split("-")[0])
    arch = _arch(data.get("arch") or triple_arch)
    if arch not in ARCHES:
        raise InputError(f"{path}: unsupported arch {arch!r} (supported: {', '.join(ARCHES)})")
    if triple_arch in ARCHES and arch != triple_arch:     # the library would be built for the triple's CPU
        raise InputError(f"{path}: arch {arch!r} contradicts llvm.mtriple {llvm['mtriple']!r}")
    mattr = llvm.get("mattr", [])
    cc_search = build.get("cc_search", [])
    lanes = build.get("lanes", 8)
    if not (isinstance(mattr, list) and all(isinstance(a, str) and a[:1] in "+-" and a[1:] for a in mattr)):
        raise InputError(f"{path}: llvm.mattr must be a list of strings like \"+neon\" or \"-sve\"")
    if not (isinstance(cc_search, list) and all(isinstance(a, str) for a in cc_search)):
        raise InputError(f"{path}: build.cc_search must be a list of directories")
    if not isinstance(lanes, int) or lanes < 1 or lanes & (lanes - 1) or lanes > 64:
        raise InputError(f"{path}: build.lanes must be a power of two between 1 and 64")
    dot = build.get("dot", "")
    if dot and dot not in DOT_ISAS:
        raise InputError(f"{path}: build.dot must be one of {', '.join(DOT_ISAS)} (or omitted), got {dot!r}")
    if dot and DOT_ISAS[dot] not in mattr:
        raise InputError(f"{path}: build.dot = {dot!r} needs {DOT_ISAS[dot]!r} in llvm.mattr")
    dot_tiles = build.get("dot_tiles", 4)
    if type(dot_tiles) is not int or dot_tiles not in (1, 2, 4, 8, 16):
        raise InputError(f"{path}: build.dot_tiles must be 1, 2, 4, 8 or 16, got {dot_tiles!r}")
    float_panels = build.get("float_panels", 1)
    if type(float_panels) is not int or float_panels not in (1, 2, 4):    # the kernels take at most 4
        raise InputError(f"{path}: build.float_panels must be 1, 2 or 4, got {float_panels!r}")
    for key, val in (("llvm.mcpu", llvm.get("mcpu", "")), ("build.cc", build.get("cc", "")),
                     ("summary", data.get("summary", "")), ("runtime.needs", runtime.get("needs", ""))):
        if not isinstance(val, str):
            raise InputError(f"{path}: {key} must be a string")
    return Target(name=name, summary=data.get("summary", ""), arch=arch, mtriple=llvm["mtriple"],
                  mcpu=llvm.get("mcpu", ""), mattr=tuple(mattr), kind=data.get("kind", "llvm"),
                  status=data.get("status", "ready"), cc=build.get("cc") or None, cc_search=tuple(cc_search),
                  cc_package=build.get("cc_package", ""), lanes=lanes, dot=dot, dot_tiles=dot_tiles,
                  float_panels=float_panels,
                  runtime_os=runtime.get("os", "linux"),
                  runtime_needs=runtime.get("needs", ""), source=str(path))


def list_targets() -> list[Target]:
    """The built-in targets: generic x86-64 first, then by family."""
    rank = {name: i for i, name in enumerate(ORDER)}
    files = sorted(HERE.glob("*.toml"), key=lambda p: (rank.get(p.stem, len(ORDER)), p.stem))
    return [_parse(p) for p in files]


def load_target(name_or_path: str | Path) -> Target:
    """A built-in target by name, or a user's target file (anything ending in .toml or naming an existing file)."""
    text = str(name_or_path)
    path = Path(text)
    if text.endswith(".toml") or path.is_file():
        if not path.is_file():
            raise InputError(f"target file {path} does not exist")
        return _parse(path)
    builtin = HERE / f"{text}.toml"
    if builtin.is_file() and "/" not in text:
        return _parse(builtin)
    names = ", ".join(t.name for t in list_targets())
    raise InputError(f"unknown target {text!r} (built-in: {names}; or pass a .toml file)")


CPUINFO = Path("/proc/cpuinfo")


def _cpu_flags(key: str) -> set[str]:
    """The CPU feature words of /proc/cpuinfo's first `key` line ("flags" on x86, "Features" on ARM)."""
    try:
        return next((set(line.split(":", 1)[1].split()) for line in CPUINFO.read_text().splitlines()
                     if line.split(":", 1)[0].strip() == key), set())
    except OSError:
        return set()


def host_target() -> str:
    """The best built-in target for the machine we run on (reads the CPU flags on Linux)."""
    import platform

    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        # dotprod + fp16 (ARMv8.2-A, e.g. Cortex-A76/A78, Neoverse N1): rpi5's code (sdot kernels) runs there
        return "rpi5" if {"asimddp", "asimdhp"} <= _cpu_flags("Features") else "arm64"
    flags = _cpu_flags("flags")
    if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags:
        return "x86_64-avx512-vnni"
    if {"avx512f", "avx512bw", "avx512vl"} <= flags:
        return "x86_64-avx512"
    if {"avx2", "fma", "f16c"} <= flags:
        return "x86_64-avx2"
    return "x86_64"

"""Builds TVM's WebAssembly runtime from the sources shipped in the installed wheels.

The apache-tvm wheel carries the web runtime's C++ (tvm/web/emcc, tvm/src/runtime) and the apache-tvm-ffi wheel the
FFI sources, but nine small headers are missing; llamac/web/cxx holds our own versions of them. We lay the sources
out the way tvm/web/Makefile expects, compile the three runtime units to wasm object files once per TVM/emscripten
version, and cache them. Wasm objects (not LLVM bitcode) because Debian's emscripten links with wasm-ld-14, which
cannot read bitcode from newer LLVMs, and because linking objects skips a slow whole-program LTO at every model link.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from llamac.web.toolchain import emcc, emcc_env, run_logged, runtime_cache_dir

UNITS = ("wasm_runtime", "tvmjs_support", "webgpu_runtime")
OVERLAY = Path(__file__).parent / "cxx"  # our replacements for the headers the wheel lacks

# No -s ASYNCIFY: the page never asks C++ to wait on the GPU (it syncs from JS), and asyncify makes the link
# several times slower and the wasm twice as large. The tvmjs runtime detects that it is off.
CFLAGS = ["-O3", "-std=c++17", "-Wno-ignored-attributes"]
# The objects are already optimized (-O3 here, LLVM -O3 in TVM); binaryen's -O3 pass over the linked module only
# trims a little size but takes minutes on a small machine (5.4 min vs 3 s with -O1 for a 2-layer model).
LINK_OPT = "-O1"
LDFLAGS = [
    "--no-entry",
    "-s", "WASM_BIGINT=1",
    "-s", "ALLOW_MEMORY_GROWTH=1",
    "-s", "STANDALONE_WASM=1",
    "-s", "ERROR_ON_UNDEFINED_SYMBOLS=0",
]


def _site_dir(module: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"{module} is not installed")
    return Path(spec.origin).parent


def web_source_dir() -> Path:
    """tvm/web inside the installed wheel: the emcc glue helpers and the TypeScript runtime."""
    return _site_dir("tvm") / "web"


def prepare_tree(root: Path) -> Path:
    """Lays out a TVM source tree at root/tvm (as tvm/web/Makefile sees it) and returns it."""
    tvm_dir, ffi_dir = _site_dir("tvm"), _site_dir("tvm_ffi")
    top = root / "tvm"
    if top.exists():
        shutil.rmtree(top)
    shutil.copytree(tvm_dir / "src", top / "src")
    shutil.copytree(tvm_dir / "include", top / "include")
    shutil.copytree(tvm_dir / "web" / "emcc", top / "web" / "emcc", ignore=shutil.ignore_patterns("__pycache__"))
    ffi = top / "3rdparty" / "tvm-ffi"
    shutil.copytree(ffi_dir / "include", ffi / "include")
    shutil.copytree(ffi_dir / "src", ffi / "src")
    shutil.copytree(ffi_dir / "3rdparty" / "dlpack", ffi / "3rdparty" / "dlpack")
    shutil.copytree(OVERLAY, top, dirs_exist_ok=True)
    return top


def include_flags(top: Path) -> list[str]:
    return [
        f"-I{top}",
        f"-I{top / 'include'}",
        f"-I{top / '3rdparty/tvm-ffi/include'}",
        f"-I{top / '3rdparty/tvm-ffi/3rdparty/dlpack/include'}",
        f"-I{top / '3rdparty/compiler-rt'}",
    ]


def runtime_objects(progress: bool = True) -> list[Path]:
    """The runtime's wasm object files, built on first use (a few minutes) and cached afterwards."""
    cache = runtime_cache_dir()
    objs = [cache / "obj" / f"{u}.o" for u in UNITS]
    if all(o.exists() for o in objs):
        return objs
    cache.mkdir(parents=True, exist_ok=True)
    # Build in a private temp dir and move the results in, so concurrent builds never see half-written files.
    with tempfile.TemporaryDirectory(dir=cache, prefix="build-") as tmp:
        work = Path(tmp)
        top = prepare_tree(work)
        out = work / "obj"
        out.mkdir()
        log = cache / "build.log"
        for unit in UNITS:
            t0 = time.time()
            if progress:
                print(f"[llamac web] compiling TVM wasm runtime: {unit}.cc (once per TVM/emscripten version)", flush=True)
            cmd = [emcc(), *CFLAGS, *include_flags(top), "-c", "-o", str(out / f"{unit}.o"),
                   str(top / "web" / "emcc" / f"{unit}.cc")]
            run_logged(cmd, log, env=emcc_env())
            if progress:
                print(f"[llamac web]   {unit}.o in {time.time() - t0:.0f} s", flush=True)
        final = cache / "obj"
        final.mkdir(exist_ok=True)
        for unit in UNITS:
            os.replace(out / f"{unit}.o", final / f"{unit}.o")
    return objs


def link_wasm(objects: list[Path], out_wasm: Path, log: Path) -> Path:
    """Links the runtime with a model's objects; returns the emscripten JS glue written beside out_wasm."""
    glue = out_wasm.with_suffix(".js")
    preload = web_source_dir() / "emcc" / "preload.js"  # defines the wasmLibraryProvider tvmjs expects
    cmd = [emcc(), LINK_OPT, "-o", str(glue), *map(str, runtime_objects(progress=False)), *map(str, objects), *LDFLAGS,
           "--pre-js", str(preload)]
    run_logged(cmd, log, env=emcc_env())
    return glue


if __name__ == "__main__":  # python -m llamac.web.wasm_runtime: build the cache now
    for o in runtime_objects():
        print(o, o.stat().st_size)

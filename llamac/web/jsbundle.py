"""The JavaScript side: node tools (esbuild, playwright-core) in the cache, and the tvmjs bundle per artifact.

tvmjs is TVM's TypeScript runtime (tvm/web/src in the wheel). It imports the emscripten glue of the wasm it will
load, so each artifact gets a bundle built from the glue of its own link; esbuild turns the TypeScript into one
browser script in well under a second. Node packages go into the cache directory, never into the repository.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from llamac.web.toolchain import cache_root, run_logged
from llamac.web.wasm_runtime import web_source_dir

NODE_PACKAGES = {"esbuild": "0.28.2", "playwright-core": "1.65.1"}


def node_dir() -> Path:
    return cache_root() / "node"


def ensure_node_packages() -> Path:
    """Installs the pinned node tools into the cache (once) and returns their node_modules directory."""
    d = node_dir()
    mods = d / "node_modules"
    if all((mods / name / "package.json").exists() for name in NODE_PACKAGES) and (mods / ".bin" / "esbuild").exists():
        return mods
    if shutil.which("npm") is None:
        raise RuntimeError("the webgpu target needs node and npm (apt-get install -y nodejs npm)")
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "package.json").exists():
        (d / "package.json").write_text('{"name": "llamac-web-tools", "private": true}\n')
    specs = [f"{k}@{v}" for k, v in NODE_PACKAGES.items()]
    run_logged(["npm", "install", "--no-audit", "--no-fund", *specs], d / "npm.log", cwd=d)
    return mods


def bundle_tvmjs(glue_js: Path, out_js: Path, log: Path) -> None:
    """Builds tvmjs (global `tvmjs`) around the given emscripten glue into one browser script."""
    mods = ensure_node_packages()
    with tempfile.TemporaryDirectory(prefix="llamac-tvmjs-") as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(web_source_dir() / "src", src)
        # the wheel's own script wraps emscripten's glue as the EmccWASI class tvmjs imports (ES module form)
        run_logged([sys.executable, str(web_source_dir() / "emcc" / "decorate_as_wasi.py"), str(glue_js),
                    str(src / "tvmjs_runtime_wasi.js"), "es"], log)
        cmd = [str(mods / ".bin" / "esbuild"), str(src / "index.ts"), "--bundle", "--format=iife",
               "--global-name=tvmjs", "--platform=browser", "--target=es2020", "--minify",
               "--external:ws", "--external:perf_hooks", "--external:fs", "--external:path", "--external:crypto",
               "--log-level=warning", f"--outfile={out_js}"]
        run_logged(cmd, log, env=dict(os.environ))

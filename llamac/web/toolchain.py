"""Where the web build's tools and caches live: emscripten, node, the per-version cache directory."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

from llamac.errors import InputError

NODE_PATH = "/usr/share/nodejs"  # Debian's emscripten needs its node modules from here


def emcc_env() -> dict[str, str]:
    env = dict(os.environ)
    env["NODE_PATH"] = NODE_PATH + (":" + env["NODE_PATH"] if env.get("NODE_PATH") else "")
    return env


def emcc() -> str:
    path = shutil.which("emcc")
    if path is None:
        raise InputError("the webgpu target needs emscripten: apt-get install -y emscripten")
    return path


@functools.lru_cache(maxsize=1)
def emcc_version() -> str:
    out = subprocess.run([emcc(), "--version"], capture_output=True, text=True, env=emcc_env())
    m = re.search(r"(\d+\.\d+\.\d+)", out.stdout)
    if out.returncode != 0 or not m:
        raise RuntimeError(f"cannot read the emscripten version: {out.stdout}{out.stderr}")
    return m.group(1)


def tvm_version() -> str:
    from importlib.metadata import version

    return version("apache-tvm")


def cache_root() -> Path:
    base = os.environ.get("LLAMAC_CACHE")
    root = Path(base) / "web" if base else Path.home() / ".cache" / "llamac" / "web"
    return root


def runtime_cache_dir() -> Path:
    """Built once per TVM and emscripten version."""
    return cache_root() / f"tvm-{tvm_version()}-emcc-{emcc_version()}"


def run_logged(cmd: list[str], log: Path, cwd: Path | None = None, env: dict | None = None) -> None:
    """Runs cmd with its output in log; raises with the log's tail on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        f.write(("$ " + " ".join(cmd) + "\n").encode())
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, env=env)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd[:3])} ...\n{tail}")

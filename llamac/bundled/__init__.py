"""The small Llama that ships inside llamac (trained by scripts/train_bundled.py on the King James Bible).

`llamac compile` and `llamac run` use it when no model is named; its compiled artifact is cached per machine.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from llamac.errors import InputError

HERE = Path(__file__).parent


def checkpoint() -> Path:
    """The bundled HF checkpoint directory."""
    if not (HERE / "config.json").is_file():
        raise InputError(f"the bundled model is missing from {HERE} (train it with scripts/train_bundled.py)")
    return HERE


def cache_dir() -> Path:
    return Path(os.environ.get("LLAMAC_CACHE", Path.home() / ".cache" / "llamac"))


def artifact(quant: str = "q8") -> Path:
    """The bundled model compiled for this machine, compiled on first use and cached."""
    from llamac import __version__
    from llamac.targets import host_target

    target = host_target()
    out = cache_dir() / f"bundled-{__version__}-{target}-{quant}"
    if not _intact(out):
        from llamac.compiler import compile_model

        again = "again (the cached copy was damaged)" if out.exists() else "once"
        print(f"compiling the bundled model for {target} ({quant}) {again}; cached in {out}", file=sys.stderr,
              flush=True)
        compile_model(checkpoint(), target, quant=quant, out=out, force=True)
    return out


def _intact(art: Path) -> bool:
    """The cached artifact is whole (a damaged cache is compiled again rather than refused on every run)."""
    from llamac.runtime.tvm_backend import read_manifest, verify_files

    try:
        verify_files(art, read_manifest(art))
    except InputError:
        return False
    return True

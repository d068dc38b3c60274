"""Shared pieces of the compile tests: cached tiny exports, compiling them, and stepping an artifact."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from hf_models import CONFIGS, make_hf_checkpoint

from llamac.compiler import compile_model

CONTEXT = 64          # tiny KV cache: the tests never need more
RNG = np.random.default_rng(1)
PROMPT = RNG.integers(3, 300, size=9).tolist()
STEPS = RNG.integers(3, 300, size=4).tolist()

_cache: dict[str, tuple] = {}
_artifacts: dict[tuple, Path] = {}


def exported(root: Path, name: str):
    """(transformers model, export dir) for one of the five configurations, made once per test session."""
    if name not in _cache:
        from llamac.export.exporter import export

        d = root / name
        model = make_hf_checkpoint(d / "hf", **CONFIGS[name])
        _cache[name] = (model, export(d / "hf", d / "onnx", progress=False))
    return _cache[name]


def compile_tiny(src: Path, out: Path, target: str = "x86_64", quant: str = "f32", **kw) -> Path:
    return compile_model(src, target, quant=quant, max_seq_len=CONTEXT, out=out, progress=False, **kw)


def compiled(root: Path, name: str, quant: str = "f32", target: str = "x86_64") -> Path:
    """The artifact of one configuration, compiled once per test session (tests must not modify it)."""
    key = (name, quant, target)
    if key not in _artifacts:
        _, export_dir = exported(root, name)
        _artifacts[key] = compile_tiny(export_dir, root / "artifacts" / f"{name}-{quant}-{target}", target, quant)
    return _artifacts[key]


def artifact_steps(art: Path, prompt=PROMPT, steps=STEPS) -> list[np.ndarray]:
    """Last-position logits after the prompt, then after each decode step."""
    from llamac.runtime.tvm_backend import TVMModel

    sess = TVMModel(art).session()
    out = [sess.prefill(prompt)]
    out += [sess.decode(t) for t in steps]
    return out


def ort_steps(export_dir: Path, prompt=PROMPT, steps=STEPS) -> list[np.ndarray]:
    from references import ort_steps as run

    got = run(export_dir, np.array([prompt]), np.ones((1, len(prompt)), np.int64), np.array([steps]))
    return [got[0][0, -1]] + [g[0] for g in got[1:]]


def hf_steps(model, prompt=PROMPT, steps=STEPS) -> list[np.ndarray]:
    from references import hf_logits

    full = np.array([prompt + steps])
    logits = hf_logits(model, full, np.ones_like(full))[0]
    return [logits[len(prompt) - 1 + i] for i in range(len(steps) + 1)]


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())

"""llamac.runtime: load an artifact or export directory and generate text.

Small on purpose: it imports nothing from the compiler, never onnx or torch, and TVM only through its runtime library.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["load", "load_tokenizer", "Model", "Generation"]

if TYPE_CHECKING:
    from .model import Generation, Model, load
    from .tokenizer import load_tokenizer


def __getattr__(name: str):  # lazy, so `import llamac.runtime` costs nothing until used
    if name in ("load", "Model", "Generation"):
        from . import model

        return getattr(model, name)
    if name == "load_tokenizer":
        from .tokenizer import load_tokenizer

        return load_tokenizer
    raise AttributeError(name)

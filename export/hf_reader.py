"""Hugging Face checkpoints: config.json + *.safetensors (one file or sharded with model.safetensors.index.json).

Tensors are memory-mapped, so reading one never loads the others. The safetensors header is parsed here because the
safetensors numpy loader has no bfloat16 (ml_dtypes supplies it).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from llamac.errors import InputError

from .config import ModelConfig

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def _index_safetensors(path: Path) -> dict[str, tuple[Path, str, list[int], int]]:
    """name -> (file, dtype, shape, byte offset), after checking that every tensor lies inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError(f"{path.name}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise InputError(f"{path.name}: truncated safetensors file (header runs past the end)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError(f"{path.name}: corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise InputError(f"{path.name}: corrupt safetensors header (not a JSON object)")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not _well_formed(info):
            raise InputError(f"{path.name}: corrupt safetensors header (tensor {name}: needs dtype, shape and "
                             f"data_offsets)")
        start, end = info["data_offsets"]
        if 8 + n + end > size:
            raise InputError(f"{path.name}: truncated safetensors file (tensor {name} runs past the end)")
        if info["dtype"] not in _DTYPES:
            raise InputError(f"{path.name}: tensor {name} has unsupported dtype {info['dtype']}")
        count = int(np.prod(info["shape"], dtype=np.int64))
        if count * np.dtype(_DTYPES[info["dtype"]]).itemsize != end - start:
            raise InputError(f"{path.name}: tensor {name} has a size that does not match its shape")
        out[name] = (path, info["dtype"], list(info["shape"]), 8 + n + start)
    return out


def _well_formed(info) -> bool:
    """A safetensors header entry: {"dtype": str, "shape": [ints >= 0], "data_offsets": [start <= end]}."""
    if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
        return False
    shape, offsets = info.get("shape"), info.get("data_offsets")
    ints = (lambda v: isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                   for x in v))
    return ints(shape) and ints(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]


def _weight_map(index_file: Path) -> dict[str, str]:
    """The tensor -> shard file map of a sharded checkpoint's index."""
    try:
        weight_map = json.loads(index_file.read_text()).get("weight_map")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise InputError(f"{index_file}: unreadable index ({type(e).__name__})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InputError(f"{index_file}: no weight_map object naming a shard file per tensor")
    return weight_map


class HFCheckpoint:
    """A Hugging Face Llama directory. `tensor(name)` returns one tensor as float32/float16, HF layout."""

    def __init__(self, src: Path):
        self.src = Path(src)
        self.config = ModelConfig.load(self.src / "config.json")
        index_file = self.src / "model.safetensors.index.json"
        if index_file.is_file():
            files = sorted({self.src / f for f in _weight_map(index_file).values()})
        else:
            files = sorted(self.src.glob("*.safetensors"))
        if not files:
            raise InputError(f"{self.src}: no *.safetensors files (pickled .bin checkpoints are not read: unsafe)")
        self._index: dict[str, tuple[Path, str, list[int], int]] = {}
        for f in files:
            if not f.is_file():
                raise InputError(f"{self.src}: shard {f.name} named in the index is missing")
            self._index.update(_index_safetensors(f))
        self.tokenizer_files = [self.src / n for n in TOKENIZER_FILES if (self.src / n).is_file()]

    def names(self) -> list[str]:
        return list(self._index)

    def shape(self, name: str) -> list[int] | None:
        return self._index[name][2] if name in self._index else None

    def tensor(self, name: str) -> np.ndarray:
        path, dtype, shape, offset = self._index[name]
        arr = np.memmap(path, dtype=_DTYPES[dtype], mode="r", offset=offset, shape=tuple(shape))
        if dtype == "F16":
            return np.asarray(arr)
        return np.asarray(arr, dtype=np.float32)

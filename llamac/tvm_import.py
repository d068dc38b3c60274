"""Read an export directory and import its ONNX graph into TVM Relax.

The weights never go through the importer: every initializer that is a model weight (an HF name, optionally with the
`.T` suffix of a transposed linear) becomes a plain graph input, so `from_onnx` builds a function that takes the
weights as parameters and no f32 copy of them is made while importing. The compiler reads the weights itself, one
tensor at a time, from a memory map of `model.onnx.data` (`WeightStore`), quantizes them and writes them into the
artifact. Other initializers (shape constants, RoPE tables) stay constants and fold.

Symbolic sizes are shared between inputs (`shape_dict`): `seq` for input_ids / position_ids, `total` = past + seq for
attention_mask, and the past K/V get `total - seq` rows. Batch is 1 (an edge runtime runs one sequence per session).
"""
from __future__ import annotations

import dataclasses
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from llamac.errors import InputError
from llamac.export.config import ModelConfig



def _import_tvm_without_torch():
    """tvm_ffi imports torch whenever it is installed (~5 s); the compiler never hands torch tensors to TVM."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError meanwhile
    try:
        import tvm
        from tvm import relax  # noqa: F401
    finally:
        if hide:
            del sys.modules["torch"]
    return tvm


_import_tvm_without_torch()

_ONNX_FLOATS = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
                onnx.TensorProto.DOUBLE: np.float64}


@dataclasses.dataclass
class WeightInfo:
    name: str                  # ONNX initializer name, e.g. "model.layers.0.mlp.up_proj.weight.T"
    shape: tuple[int, ...]
    dtype: np.dtype
    location: str | None       # external data file, None when stored inside model.onnx
    offset: int = 0
    length: int = 0
    inline: onnx.TensorProto | None = None


class WeightStore:
    """Model weights of an export dir, read lazily (memory-mapped) by name."""

    def __init__(self, root: Path, infos: dict[str, WeightInfo]):
        self.root = root
        self.infos = infos

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def names(self) -> list[str]:
        return list(self.infos)

    def get(self, name: str) -> np.ndarray:
        info = self.infos[name]
        if info.location is None:
            return numpy_helper.to_array(info.inline)
        path = self.root / info.location
        count = int(np.prod(info.shape)) if info.shape else 1
        return np.memmap(path, dtype=info.dtype, mode="r", offset=info.offset, shape=(count,)).reshape(info.shape)


def is_weight_name(name: str) -> bool:
    return name.startswith(("model.", "lm_head."))


def load_export(export_dir: Path) -> tuple[onnx.ModelProto, ModelConfig, WeightStore]:
    """Graph (weights detached into inputs), config and weight store of an export dir; InputError if it is broken."""
    export_dir = Path(export_dir)
    onnx_path = export_dir / "model.onnx"
    if not onnx_path.is_file():
        raise InputError(f"{export_dir}: not an export directory (no model.onnx)")
    cfg = ModelConfig.load(export_dir)
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:  # protobuf raises its own DecodeError types
        raise InputError(f"{onnx_path}: not a readable ONNX model ({type(e).__name__})") from None
    graph = model.graph
    names = {i.name for i in graph.input}
    for need in ("input_ids", "attention_mask", "position_ids"):
        if need not in names:
            raise InputError(f"{onnx_path}: graph has no input {need!r}; re-export it with `llamac export`")
    for layer in range(cfg.num_layers):
        for kind in ("key", "value"):
            if f"past_key_values.{layer}.{kind}" not in names:
                raise InputError(f"{onnx_path}: graph has no input past_key_values.{layer}.{kind} "
                                 f"(config says {cfg.num_layers} layers)")
    past = next(i for i in graph.input if i.name == "past_key_values.0.key")
    if past.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        # the compiler chooses the weights' format itself (--quant); TVM's fusion fails on an f16 graph's casts
        kind = onnx.helper.tensor_dtype_to_np_dtype(past.type.tensor_type.elem_type).name
        raise InputError(f"{export_dir}: a {kind} export; compile reads f32 ones: compile the checkpoint itself or "
                         f"an export made without --dtype (the weights' format is --quant's, e.g. --quant f16)")
    infos = _detach_weights(model, export_dir)
    return model, cfg, WeightStore(export_dir, infos)


def _detach_weights(model: onnx.ModelProto, root: Path) -> dict[str, WeightInfo]:
    graph = model.graph
    keep, infos = [], {}
    for init in graph.initializer:
        if not (is_weight_name(init.name) and init.data_type in _ONNX_FLOATS):
            keep.append(init)
            continue
        shape = tuple(int(d) for d in init.dims)
        dtype = np.dtype(_ONNX_FLOATS[init.data_type])
        if init.data_location == onnx.TensorProto.EXTERNAL:
            ext = {e.key: e.value for e in init.external_data}
            location = ext.get("location", "")
            path = (root / location).resolve()
            if not location or root.resolve() not in path.parents:
                raise InputError(f"weight {init.name}: external data location {location!r} is outside the export dir")
            offset = int(ext.get("offset", 0))
            length = int(ext.get("length", int(np.prod(shape)) * dtype.itemsize))
            if length != int(np.prod(shape)) * dtype.itemsize:
                raise InputError(f"weight {init.name}: {length} bytes of data for shape {list(shape)}")
            if not path.is_file() or path.stat().st_size < offset + length:
                raise InputError(f"weight {init.name}: {location} is missing or truncated")
            infos[init.name] = WeightInfo(init.name, shape, dtype, location, offset, length)
        else:
            infos[init.name] = WeightInfo(init.name, shape, dtype, None, inline=init)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    for info in infos.values():
        graph.input.append(helper.make_tensor_value_info(
            info.name, helper.np_dtype_to_tensor_dtype(info.dtype), list(info.shape)))
    return infos


@dataclasses.dataclass
class Imported:
    mod: object               # tvm.IRModule with one Relax function "main"
    seq: object               # tirx.Var: tokens in this call
    total: object             # tirx.Var: past + seq
    param_names: list[str]    # ONNX name of each main() parameter, in order


def import_onnx(model: onnx.ModelProto, cfg: ModelConfig, seq_len: int | None = None) -> Imported:
    """from_onnx with batch 1 and shared symbolic lengths (seq fixed when seq_len is given: the decode step)."""
    from tvm import tirx
    from tvm.relax.frontend.onnx import from_onnx

    seq = tirx.Var("seq", "int64") if seq_len is None else seq_len
    total = tirx.Var("total", "int64")
    shapes: dict[str, list] = {"input_ids": [1, seq], "attention_mask": [1, total], "position_ids": [1, seq]}
    for layer in range(cfg.num_layers):
        for kind in ("key", "value"):
            shapes[f"past_key_values.{layer}.{kind}"] = [1, cfg.num_kv_heads, total - seq, cfg.head_dim]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the importer warns about every renamed input
            mod = from_onnx(model, shape_dict=shapes, keep_params_in_input=False)
    except InputError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"the ONNX graph does not import into TVM: {first}") from None
    return Imported(mod, seq, total, [i.name for i in model.graph.input])

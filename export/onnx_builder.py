"""A tiny ONNX graph builder: nodes with generated names, small constants inline, weights streamed to one external
data file as they are added (so a model of any size exports with one tensor in memory at a time).
"""
from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from llamac.errors import InputError

OPSET = 17
_ALIGN = 64  # weights start on cache-line boundaries so a compiler can mmap them directly


class Graph:
    def __init__(self, data_file: BinaryIO, data_location: str, float_type: int):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.float_type = float_type  # TensorProto.FLOAT or FLOAT16: the dtype of weights and activations
        self._data, self._location = data_file, data_location
        self._count = 0
        self._consts: dict[tuple, str] = {}

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def op(self, op_type: str, *inputs: str, outputs: int = 1, name: str | None = None, **attrs) -> str | list[str]:
        outs = [self._name(name or op_type) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self._name("n_" + op_type), **attrs))
        return outs[0] if outputs == 1 else outs

    def const(self, value, dtype=np.int64) -> str:
        """A small constant (shape, axis, scalar) as an inline initializer, deduplicated."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = self._name("const")
            self.initializers.append(numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def float_const(self, value) -> str:
        return self.const(value, np.float16 if self.float_type == TensorProto.FLOAT16 else np.float32)

    def weight(self, name: str, array: np.ndarray) -> str:
        """Append `array` to the external data file and reference it by offset."""
        with np.errstate(over="ignore"):
            arr = np.ascontiguousarray(array, dtype=np.float16 if self.float_type == TensorProto.FLOAT16 else np.float32)
        if not np.isfinite(arr).all():     # finite on the way in (the exporter checks): a float16 overflow
            raise InputError(f"weight {name}: values up to {np.abs(array).max():.3g} exceed the float16 range; "
                             f"export with --dtype f32")
        pad = -self._data.tell() % _ALIGN
        self._data.write(b"\0" * pad)
        offset = self._data.tell()
        self._data.write(arr.tobytes())
        t = onnx.TensorProto(name=name, data_type=self.float_type, dims=arr.shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self._location), ("offset", str(offset)), ("length", str(arr.nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = k, v
        self.initializers.append(t)
        return name

    def model(self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
              producer: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "llama", inputs, outputs, initializer=self.initializers)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name=producer)
        m.ir_version = 8  # readable by onnxruntime releases from 1.14 on (and TVM's importer)
        return m


def save(model: onnx.ModelProto, path: Path) -> None:
    with open(path, "wb") as f:
        f.write(model.SerializeToString())

"""Rewrites an ONNX graph's int64 tensor data to int32, because WGSL has no 64-bit integers.

The export's integer inputs (input_ids, attention_mask, position_ids) and the small integer arithmetic on them
(mask cumsums, comparisons) would otherwise become GPU kernels over int64 buffers, which TVM's WebGPU codegen
rejects. Shape-like operands (Reshape shapes, axes, split sizes) stay int64 as ONNX requires; the importer reads
them as constants on the host anyway.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

# (op_type, input position) pairs that ONNX defines as int64 shape/axis operands.
SHAPE_LIKE = {
    ("Reshape", 1), ("Unsqueeze", 1), ("Squeeze", 1), ("Split", 1), ("CumSum", 1), ("Expand", 1), ("Tile", 1),
    ("ConstantOfShape", 0), ("Slice", 1), ("Slice", 2), ("Slice", 3), ("Slice", 4), ("Pad", 1), ("TopK", 1),
    ("ReduceMean", 1), ("ReduceSum", 1), ("ReduceMax", 1), ("ReduceMin", 1), ("ReduceProd", 1),
    ("ReduceL2", 1), ("Resize", 3), ("Range", 0), ("Range", 1), ("Range", 2),
}


def narrow_int64(model: onnx.ModelProto) -> onnx.ModelProto:
    """Returns a copy of model whose int64 data tensors are int32 (in place on the copy)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for vi in list(g.input) + list(g.value_info):
        if vi.type.tensor_type.elem_type == TensorProto.INT64:
            vi.type.tensor_type.elem_type = TensorProto.INT32

    int64_consts: dict[str, np.ndarray] = {}
    for init in g.initializer:
        if init.data_type == TensorProto.INT64:
            int64_consts[init.name] = numpy_helper.to_array(init)
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type == TensorProto.INT64:
                    int64_consts[node.output[0]] = numpy_helper.to_array(a.t)

    narrowed: dict[str, str] = {}  # int64 constant name -> its int32 twin

    def int32_twin(name: str) -> str:
        if name not in narrowed:
            value = int64_consts[name]
            if value.size and (value.max() > np.iinfo(np.int32).max or value.min() < np.iinfo(np.int32).min):
                raise ValueError(f"constant {name} does not fit in int32")
            twin = name + "__i32"
            g.initializer.append(numpy_helper.from_array(value.astype(np.int32), twin))
            narrowed[name] = twin
        return narrowed[name]

    for node in g.node:
        for i, name in enumerate(node.input):
            if name in int64_consts and (node.op_type, i) not in SHAPE_LIKE:
                node.input[i] = int32_twin(name)
        if node.op_type == "Cast":
            for a in node.attribute:
                if a.name == "to" and a.i == TensorProto.INT64:
                    a.i = TensorProto.INT32
    # Outputs declared int64 would now be int32.
    for vi in g.output:
        if vi.type.tensor_type.elem_type == TensorProto.INT64:
            vi.type.tensor_type.elem_type = TensorProto.INT32
    return m

"""Keeps boolean tensors out of GPU memory: WGSL storage buffers cannot hold `bool`.

Every boolean result in the ONNX graph (comparisons, And/Or/Not, Cast to bool) is stored as float32 and turned back
into a boolean where it is used. After fusion the casts sit inside the producing and consuming kernels, so booleans
only live in registers and no kernel reads or writes a bool buffer.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

BOOL_OPS = {"Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "And", "Or", "Not", "Xor", "IsNaN", "IsInf"}


def _is_bool_producer(node: onnx.NodeProto) -> bool:
    if node.op_type in BOOL_OPS:
        return True
    return node.op_type == "Cast" and any(a.name == "to" and a.i == TensorProto.BOOL for a in node.attribute)


# Ops that only move or reshape data (input 0): they can carry the float32 stand-in as well as the bool.
MOVE_OPS = {"Unsqueeze", "Squeeze", "Reshape", "Expand", "Transpose", "Identity", "Slice", "Tile", "Flatten"}


def bools_through_float(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrites model in place (and returns it)."""
    g = model.graph
    graph_outputs = {o.name for o in g.output}
    new_nodes: list[onnx.NodeProto] = []
    carrier: dict[str, str] = {}  # bool tensor -> the float32 tensor that stands in for it

    def as_bool(name: str) -> str:
        back = f"{name}__bool{len(new_nodes)}"
        new_nodes.append(helper.make_node("Cast", [carrier[name]], [back], to=TensorProto.BOOL, name=back + "_cast"))
        return back

    for node in g.node:
        if node.op_type in MOVE_OPS and node.input and node.input[0] in carrier:
            # move the float stand-in instead; the output is a (float-carried) bool too
            node.input[0] = carrier[node.input[0]]
            out = node.output[0]
            if out not in graph_outputs:
                node.output[0] = out + "__f32"
                carrier[out] = node.output[0]
            new_nodes.append(node)
            continue
        for i, name in enumerate(node.input):
            if name in carrier:
                node.input[i] = as_bool(name)  # cast back right before the op that needs a bool
        new_nodes.append(node)
        if _is_bool_producer(node):
            for out in node.output:
                if out and out not in graph_outputs:
                    f = out + "__f32"
                    new_nodes.append(helper.make_node("Cast", [out], [f], to=TensorProto.FLOAT, name=f + "_cast"))
                    carrier[out] = f
    del g.node[:]
    g.node.extend(new_nodes)
    return model

"""The export's ONNX graph as a Relax module for the browser: int32 integers, last-position logits, weights as params.

The ONNX graph keeps the KV cache as inputs/outputs (past -> present, concatenated), which the page feeds back step
by step. Three edits make it fit WebGPU: integer tensors become int32 (int32.py), booleans travel between kernels as
float32 (bools.py), and only the last position's logits are returned, so a prefill reads back one vocabulary row
instead of one per prompt token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from llamac.errors import InputError
from llamac.export.config import ModelConfig
from llamac.web.bools import bools_through_float
from llamac.web.int32 import narrow_int64

INPUTS = ("input_ids", "attention_mask", "position_ids")


@dataclass
class ImportedModel:
    mod: object                    # tvm.IRModule: "main" and "decode" (seq = 1), both (inputs..., kv..., weights...)
    weight_names: list[str]        # Relax parameter names of the weights, in call order
    weights: dict[str, np.ndarray]
    num_inputs: int                # inputs + KV tensors before the weights
    onnx_names: dict[str, str]     # Relax parameter name -> ONNX initializer name


def last_position_logits(model: onnx.ModelProto) -> onnx.ModelProto:
    """Reroutes the `logits` output through Slice(seq: -1..end)."""
    g = model.graph
    for node in g.node:
        for i, name in enumerate(node.output):
            if name == "logits":
                node.output[i] = "logits__all"
    g.initializer.extend([
        numpy_helper.from_array(np.array([-1], np.int64), "logits__start"),
        numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), "logits__end"),
        numpy_helper.from_array(np.array([1], np.int64), "logits__axis"),
    ])
    g.node.append(helper.make_node("Slice", ["logits__all", "logits__start", "logits__end", "logits__axis"],
                                   ["logits"], name="llamac_last_logits"))
    for vi in g.output:
        if vi.name == "logits":
            dims = vi.type.tensor_type.shape.dim
            dims[1].ClearField("dim_param")
            dims[1].dim_value = 1
    return model


def import_export(export_dir: Path, cfg: ModelConfig) -> ImportedModel:
    import tvm
    from tvm import relax
    from tvm import tirx as tir
    from tvm.relax.frontend.onnx import from_onnx
    from tvm.relax.utils import copy_with_new_vars

    model = onnx.load(str(Path(export_dir) / "model.onnx"))
    kv_type = next(i for i in model.graph.input if i.name.startswith("past_key_values")).type.tensor_type.elem_type
    if kv_type != TensorProto.FLOAT:
        # f16 graphs would need shader-f16, which many browsers/GPUs (and headless SwiftShader) lack
        raise InputError("the webgpu target compiles f32 exports (f32 compute; use --quant q4 for small weights); "
                         "re-export with --dtype f32")
    model = last_position_logits(bools_through_float(narrow_int64(model)))

    seq, past = tir.Var("seq", "int64"), tir.Var("past", "int64")
    shapes = {"input_ids": [1, seq], "attention_mask": [1, past + seq], "position_ids": [1, seq]}
    for i in range(cfg.num_layers):
        for kv in ("key", "value"):
            shapes[f"past_key_values.{i}.{kv}"] = [1, cfg.num_kv_heads, past, cfg.head_dim]
    mod = from_onnx(model, shape_dict=shapes, keep_params_in_input=True)
    mod, params = relax.frontend.detach_params(mod)

    func = mod["main"]
    num_inputs = int(func.attrs["num_input"])
    names = [p.name for p in func.params[num_inputs:]]
    arrays = {n: a.numpy() for n, a in zip(names, params["main"])}
    # Small graph constants (rope frequencies, reshape targets, scalars) go back into the module, where constant
    # folding removes most of them; real weights stay parameters, fetched as shards by the page.
    weight_like = {n for n in names if not n.startswith("const_")}
    consts = {n: tvm.runtime.tensor(arrays[n]) for n in names if n not in weight_like}
    if consts:
        mod = relax.transform.BindParams("main", consts)(mod)
    # "decode": main with seq = 1. Static shapes let dlight pick its GEMV schedules for one-token steps; with a
    # symbolic seq every matmul is tiled for many rows and a decode step does ~64x the work.
    decode = copy_with_new_vars(mod["main"]).bind_symbolic_vars({"seq": 1})  # fresh vars: no shared defs
    mod["decode"] = decode.with_attr("global_symbol", "decode")  # public: the page calls it by name
    weight_names = [p.name for p in mod["main"].params[num_inputs:]]
    sanitized = {re.sub(r"[^0-9A-Za-z_]", "_", i.name): i.name for i in model.graph.initializer}
    onnx_names = {n: sanitized[n] for n in weight_names if n in sanitized}
    return ImportedModel(mod, weight_names, {n: arrays[n] for n in weight_names}, num_inputs, onnx_names)

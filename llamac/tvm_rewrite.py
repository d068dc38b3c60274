"""Rewrite the imported Relax function into the step function an artifact runs.

What changes (everything else in the graph stays as the importer built it):
- KV cache: each `concat(past_kv, new)` becomes an in-place write of the new rows into a fixed-capacity cache
  parameter [1, kv_heads, capacity, head_dim] (`call_tir_inplace`, rows total-seq .. total); the two attention
  matmuls that read the concatenation become kernels that read the cache's valid prefix [0, total) directly. No
  per-step copy of the cache exists, and the present.* outputs disappear (the caller owns the cache buffers).
- Linear layers: `matmul(x, W)` with W a weight parameter becomes a call of the dequantizing kernel of the scheme, on
  packed parameters (codes + scales); `take(W, ids)` on an embedding becomes the matching gather kernel.
- RMSNorm: x / sqrt(mean(x * x) + eps) * weight becomes one kernel, with the residual add that makes x (its sum is
  the kernel's second output): one kernel where the generic path runs three.
  In front of dot-layout q, k, v or gate, up, the add and the norm are part of their kernel.
- SwiGLU: gate * sigmoid(gate) * up becomes one kernel; in front of a down projection in the dot layout, part of
  that projection's kernel (computed where its input is quantized).
- Linear layers that share an input (q, k, v; gate, up) run as one kernel.
- Logits: the lm_head runs on the last position only ([1, 1, vocab]): a session only needs those.

New signature (of "main", any seq, and "decode", seq = 1): f(input_ids [1, seq], attention_mask [1, total],
position_ids [1, seq], cache_k_0, cache_v_0, ..., <packed weights>) -> logits [1, 1, vocab], the first 3 + 2 * layers
parameters being the run-time inputs.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tvm
from tvm import relax

from llamac import tvm_dot, tvm_kernels
from llamac.errors import InputError
from llamac.export.config import ModelConfig
from llamac.quantize import Scheme, SCHEMES, dot_lanes, packed_shapes, pick_lanes
from llamac.tvm_import import Imported

_OP = {n: tvm.ir.Op.get(f"relax.{n}") for n in
       ("concat", "matmul", "permute_dims", "expand_dims", "reshape", "take", "astype", "shape_of", "where",
        "nn.softmax", "multiply", "sigmoid", "add", "divide", "sqrt", "mean")}
FILL_LOW = -1e38      # where(mask, scores, fill) with a fill at least this low is masking (the exporter uses f32 min)


@dataclasses.dataclass
class PackedWeight:
    """How one ONNX weight is stored in the artifact: logical [K, N] (transposed from the ONNX tensor if `transpose`)."""
    name: str
    k: int
    n: int
    lanes: int
    scheme: Scheme
    transpose: bool           # ONNX tensor is [N, K] (an untied embedding [vocab, hidden])
    arrays: dict[str, tuple[tuple[int, ...], str]]   # array key -> (shape, dtype) in kernel layout
    layout: str = "lanes"     # "lanes" (tvm_kernels, dequantize to f32) or "dot" (tvm_dot, int8 dot products)

    def param_name(self, key: str) -> str:
        return f"{self.name}::{key}"


@dataclasses.dataclass
class StepPlan:
    """The rewritten module plus what the artifact must store, in parameter order."""
    mod: tvm.IRModule
    num_inputs: int
    packed: dict[str, PackedWeight]            # quantized weights by ONNX name
    plain: list[str]                           # weights stored as they are (norms), ONNX names
    params: list[tuple[str, str | None]]       # (ONNX weight name, array key or None for plain), in order
    logits_last_only: bool


def _call_op(expr, name: str) -> bool:
    return isinstance(expr, relax.Call) and expr.op.same_as(_OP[name])


def plan_weights(imported: Imported, scheme: Scheme, embed_scheme: Scheme, lanes: int,
                 dot: str = "", dot_tiles: int = 4, float_panels: int = 1) -> tuple[dict, list]:
    """Decide per weight parameter: packed linear/embedding weight (in the dot layout where the target has byte dot
    products and the shape allows, up to `dot_tiles` tiles side by side; float weights up to `float_panels` x
    `lanes` channels side by side), or stored as is."""
    func = imported.mod["main"]
    by_var = {p: n for n, p in zip(imported.param_names, func.params)}
    uses: dict[str, set] = {}
    for binding in _bindings(func):
        value = binding.value
        if _call_op(value, "matmul"):
            w = value.args[1]
            if w in by_var and _is_weight(by_var[w]):
                uses.setdefault(by_var[w], set()).add("linear")
                continue
        if _call_op(value, "shape_of"):
            continue            # only reads the static shape; rewritten to a constant
        if _call_op(value, "take") and value.args[0] in by_var and _is_weight(by_var[value.args[0]]):
            axis = int(value.attrs.axis)
            uses.setdefault(by_var[value.args[0]], set()).add(f"embed{axis}")
            continue
        for arg in _var_args(value):
            if arg in by_var and _is_weight(by_var[arg]):
                uses.setdefault(by_var[arg], set()).add("plain")
    packed, plain = {}, []
    for var in func.params:
        name = by_var[var]
        if not _is_weight(name):
            continue
        kinds = uses.get(name, set())
        shape = [int(d) for d in var.ty.shape.values]
        if not kinds or kinds == {"plain"}:
            plain.append(name)
            continue
        if "plain" in kinds or len(shape) != 2 or ("embed0" in kinds and "linear" in kinds):
            raise InputError(f"weight {name} is used in a way the compiler does not support ({sorted(kinds)})")
        is_embed = any(k.startswith("embed") for k in kinds)
        transpose = "embed0" in kinds                       # [vocab, hidden] gathered by rows
        k, n = (shape[1], shape[0]) if transpose else (shape[0], shape[1])
        sch = embed_scheme if is_embed else scheme
        if dot and tvm_dot.supports(sch, k, n):
            ln = dot_lanes(n, dot_tiles)
            packed[name] = PackedWeight(name, k, n, ln, sch, transpose, packed_shapes(sch, k, n, ln, "dot"), "dot")
            continue
        ln = pick_lanes(n, lanes * float_panels if sch.kind == "float" else lanes)
        packed[name] = PackedWeight(name, k, n, ln, sch, transpose, packed_shapes(sch, k, n, ln))
    return packed, plain


def _is_weight(onnx_name: str) -> bool:
    return onnx_name.startswith(("model.", "lm_head."))


def _bindings(func: relax.Function):
    for block in func.body.blocks:
        yield from block.bindings


def _var_args(value) -> list:
    out = []
    if isinstance(value, relax.Call):
        for a in value.args:
            if isinstance(a, relax.Tuple):
                out.extend(a.fields)
            else:
                out.append(a)
    elif isinstance(value, relax.Tuple):
        out.extend(value.fields)
    return out


def rewrite(imports: dict[str, Imported], cfg: ModelConfig, capacity: int, scheme: Scheme, lanes: int,
            quantize_embeddings: bool = True, dot: str = "", dot_tiles: int = 4, float_panels: int = 1) -> StepPlan:
    """One step function per import, e.g. {"main": any seq length, "decode": seq fixed to 1}; they share kernels,
    weights (same parameter order) and caches. A static seq makes the decode step's VM program much shorter."""
    embed_scheme = scheme if quantize_embeddings else SCHEMES["f32"]
    first = next(iter(imports.values()))
    packed, plain = plan_weights(first, scheme, embed_scheme, lanes, dot, dot_tiles, float_panels)
    isa = dot
    mod, kernels, params, sliced = None, {}, [], True
    for fname, imported in imports.items():
        new_params, caches, weight_vars, params = _signature(imported, cfg, capacity, packed, plain)
        mutator = _StepRewriter(imported, cfg, capacity, packed, weight_vars, caches, mod, kernels, isa, lanes)
        body = mutator.rewrite_body(imported.mod["main"])
        mutator.check_complete()
        sliced = sliced and mutator.sliced_logits
        num_inputs = 3 + len(caches)
        func = relax.Function(new_params, body).with_attrs({"num_input": num_inputs, "global_symbol": fname})
        mod = mutator.builder_.get()
        mod[fname] = func
    mod = relax.transform.DeadCodeElimination()(mod)
    return StepPlan(mod, num_inputs, packed, plain, params, sliced)


def _signature(imported: Imported, cfg: ModelConfig, capacity: int, packed: dict, plain: list):
    """New parameters: the 3 inputs, one cache per layer and kind, then the weights (packed ones as their arrays)."""
    func = imported.mod["main"]
    by_name = dict(zip(imported.param_names, func.params))
    kv_type = relax.TensorType([1, cfg.num_kv_heads, capacity, cfg.head_dim], "float32")
    inputs = [by_name["input_ids"], by_name["attention_mask"], by_name["position_ids"]]
    caches: dict = {}   # past var -> cache var
    for layer in range(cfg.num_layers):
        for kind in ("key", "value"):
            caches[by_name[f"past_key_values.{layer}.{kind}"]] = relax.Var(f"cache_{kind[0]}_{layer}", kv_type)
    params: list[tuple[str, str | None]] = []
    weight_vars: dict[str, dict[str, relax.Var]] = {}
    new_params = inputs + list(caches.values())
    for name in imported.param_names:
        if name in packed:
            pw = packed[name]
            weight_vars[name] = {}
            for key, (shape, dtype) in pw.arrays.items():
                v = relax.Var(pw.param_name(key).replace(".", "_").replace("::", "__"),
                              relax.TensorType(list(shape), dtype))
                weight_vars[name][key] = v
                new_params.append(v)
                params.append((name, key))
        elif name in plain:
            new_params.append(by_name[name])
            params.append((name, None))
    return new_params, caches, weight_vars, params


@relax.expr_functor.mutator
class _StepRewriter(relax.PyExprMutator):
    def __init__(self, imported: Imported, cfg: ModelConfig, capacity: int, packed: dict, weight_vars: dict,
                 caches: dict, base: tvm.IRModule | None, kernels: dict, isa: str = "", lanes: int = 8):
        super().__init__(base if base is not None else imported.mod)
        self.isa = isa                 # byte dot-product instructions of the target, for "dot" layout weights
        self.lanes = lanes             # the target's vector tile width (float prefill tiles)
        self.cfg, self.capacity = cfg, capacity
        self.seq, self.total = imported.seq, imported.total
        self.packed, self.weight_vars, self.caches = packed, weight_vars, caches
        func = imported.mod["main"]
        self.var2val = relax.analysis.get_var2val(func)
        self.by_var = {p: n for n, p in zip(imported.param_names, func.params)}
        self.kernels = kernels         # shared by all step functions of the module
        # PrimFuncs the importer made (flip, ...) must move into the shared module when it is not the import's own
        self.imported_prims = {} if base is None else {
            gv: f for gv, f in imported.mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
        self.gv_map: dict = {}
        self.written: set = set()      # past K/V vars whose concat became an in-place write
        self.rewritten_attn = 0
        self.sliced_logits = False
        out = func.body.body
        self.out_tuple = self.var2val.get(out) if isinstance(out, relax.Var) else out
        if isinstance(self.out_tuple, relax.Tuple):
            self.logits_call = self._producer(self.out_tuple.fields[0], ("reshape", "astype"))
        else:
            self.logits_call = self._producer(out, ("reshape", "astype"))
        self.ids = dict(zip(imported.param_names, func.params))["input_ids"]
        self.masks: list = []          # (mask expr, its [1, seq, total] view, key extents): shared by all layers
        self.score_masks = self._score_masks(func)
        self.siblings = self._sibling_linears(func)     # call -> the calls that share its input and kernel
        self.sibling_out: dict = {}    # call -> its output, once its group is emitted
        self.norms = self._rms_norms(func)              # final multiply of an RMSNorm -> (x, weight, eps, add)
        self.norm_of_add = {v[3]: k for k, v in self.norms.items() if v[3] is not None}
        self.norm_out: dict = {}       # final multiply -> the fused kernel's normalized output
        self.normed_groups = self._normed_groups()      # final multiply -> the dot linears it feeds (their kernel)

    # ---- driving
    def rewrite_body(self, func: relax.Function) -> relax.Expr:
        for old, new in self.caches.items():
            self.set_var_remap(old, new)
        return self.visit_with_new_scope(func.body)

    def check_complete(self) -> None:
        if len(self.written) != 2 * self.cfg.num_layers:
            raise InputError(f"the graph does not have the expected KV cache concat per layer "
                             f"({len(self.written)} of {2 * self.cfg.num_layers} found)")
        if self.rewritten_attn != 2 * self.cfg.num_layers:
            raise InputError("the graph's attention does not read the KV cache through matmuls the compiler "
                             f"recognises ({self.rewritten_attn} of {2 * self.cfg.num_layers})")

    # ---- helpers
    def _producer(self, expr, through: tuple[str, ...]):
        """The call that produces expr, looking through the given shape-only ops."""
        while isinstance(expr, relax.Var) and expr in self.var2val:
            value = self.var2val[expr]
            if any(_call_op(value, n) for n in through):
                expr = value.args[0]
                continue
            return value
        return None

    def _trace_cache(self, expr):
        """(past var, transposed?, concat var) if expr is the concatenated K/V, possibly transposed (K^T) or given
        unit dims (the GQA broadcast); None otherwise."""
        permuted = False
        while isinstance(expr, relax.Var) and expr in self.var2val:
            value = self.var2val[expr]
            if _call_op(value, "concat"):
                fields = value.args[0].fields if isinstance(value.args[0], relax.Tuple) else []
                if len(fields) == 2 and fields[0] in self.caches:
                    return fields[0], permuted, expr
                return None
            if _call_op(value, "permute_dims"):
                axes = [int(a) for a in value.attrs.axes]
                n = len(axes)
                if permuted or axes != list(range(n - 2)) + [n - 1, n - 2]:
                    return None
                permuted = True
            elif not (_call_op(value, "expand_dims") or _call_op(value, "reshape")):
                return None
            expr = value.args[0]
        return None

    def _mask_of(self, where) -> relax.Expr | None:
        """cond of where(cond [1, .., 1, S, T], scores [1, .., S, T], fill <= FILL_LOW): a mask the attention
        kernels can read (None for any other where)."""
        if where is None or not _call_op(where, "where"):
            return None
        cond, _, fill = where.args
        shape = list(where.ty.shape.values) if where.ty.shape is not None else []
        cshape = list(cond.ty.shape.values) if cond.ty.shape is not None else []
        fill_value = fill.value.numpy() if isinstance(fill, tvm.ir.expr.Constant) else None
        if (fill_value is None or fill_value.size != 1 or float(fill_value.reshape(())) > FILL_LOW
                or len(shape) < 3 or not _equal(shape[0], 1) or cond.ty.dtype != "bool" or len(cshape) < 2
                or not all(_equal(d, 1) for d in cshape[:-2])
                or any(not _same_dim(a, b) for a, b in zip(cshape[-2:], shape[-2:]))):
            return None
        return cond

    def _score_masks(self, func) -> list:
        """(scores matmul, mask) for each scores matmul used once, by a masking where: its masked scores need not
        be computed."""
        uses: dict = {}
        for binding in _bindings(func):
            for arg in _var_args(binding.value):
                uses[arg] = uses.get(arg, 0) + 1
        out = []
        for binding in _bindings(func):
            cond = self._mask_of(binding.value)
            scores = binding.value.args[1] if cond is not None else None
            while cond is not None and uses.get(scores, 0) == 1 and scores in self.var2val:
                value = self.var2val[scores]
                if _call_op(value, "matmul"):
                    out.append((value, cond))
                    break
                if not _call_op(value, "astype"):
                    break
                scores = value.args[0]
        return out

    def _mask(self, cond) -> tuple:
        """(mask as [1, seq, total] or None, key extents [seq] int64), emitted once per mask. The extents come from
        `tvm_kernels.visible_extent`, or cover every key when the mask is unknown (cond None)."""
        for known, c3, ext in self.masks:
            if known is cond or (cond is not None and known is not None and known.same_as(cond)):
                return c3, ext
        if cond is None:
            gv = self._kernel(("all_keys",), tvm_kernels.all_keys)
            seq = list(self.ids.ty.shape.values)[1]
            c3 = None
            ext = self._emit(relax.call_tir(gv, [self.ids, relax.prim_value(self.total)],
                                            relax.TensorType([seq], "int64")))
        else:
            seq, total = list(cond.ty.shape.values)[-2:]
            gv = self._kernel(("visible_extent",), tvm_kernels.visible_extent)
            c3 = self._emit(relax.op.reshape(self.visit_expr(cond), [1, seq, total]))
            ext = self._emit(relax.call_tir(gv, [c3], relax.TensorType([seq], "int64")))
        self.masks.append((cond, c3, ext))
        return c3, ext

    def _sibling_linears(self, func) -> dict:
        """Linear layers on the same [1, seq, K] input with the same scheme and layout (q, k, v; gate, up), up to three
        per group: each group becomes one kernel (`tvm_dot.linear_group`, `tvm_kernels.linear_group`), one
        thread-pool launch instead of one per weight (q4 in the "lanes" layout stays one per weight). The lm_head
        stays alone (its input is sliced to the last position)."""
        groups: dict = {}
        for b in _bindings(func):
            call = b.value
            if not _call_op(call, "matmul") or call.same_as(self.logits_call):
                continue
            w, x = call.args[1], call.args[0]
            pw = self.packed.get(self.by_var.get(w))
            shape = list(x.ty.shape.values) if isinstance(x, relax.Var) and x.ty.shape is not None else []
            if pw is None or len(shape) != 3 or not _equal(shape[0], 1) or (
                    pw.layout == "lanes" and pw.scheme.kind != "float" and pw.scheme.bits != 8):
                continue
            groups.setdefault((x, pw.scheme.name, pw.k, pw.layout), []).append(call)
        siblings = {}
        for calls in groups.values():
            for i in range(0, len(calls), 3):
                group = calls[i:i + 3]
                if len(group) > 1:
                    siblings.update({c: group for c in group})
        return siblings

    def _normed_groups(self) -> dict:
        """Residual-add RMSNorms whose output is the input of a group of dot-layout linears (q, k, v after the input
        norm; gate, up after the post-attention one): that group's kernel computes the add and the norm where it
        quantizes its input, and the norm kernel goes (it still writes both, for any other reader)."""
        groups = {}
        for group in {id(g): g for g in self.siblings.values()}.values():
            x = group[0].args[0]
            final = self.var2val.get(x) if isinstance(x, relax.Var) else None
            pw = self.packed[self.by_var[group[0].args[1]]]
            if final is not None and final in self.norms and self.norms[final][3] is not None and pw.layout == "dot" \
                    and self.norms[final][0].ty.dtype == "float32":
                groups[final] = group
        return groups

    def _rms_norms(self, func) -> dict:
        """The exporter's RMSNorm in f32, x / sqrt(mean(x * x, -1) + eps) * weight: its last multiply -> (x, weight,
        eps, the residual add(a, b) that makes x, or None). Each becomes one `tvm_kernels.rms_norm` kernel, the
        residual add included (a graph of another shape, or an f16 one, keeps its generic kernels)."""
        norms, adds_taken = {}, set()
        for b in _bindings(func):
            call = b.value
            if not _call_op(call, "multiply"):
                continue
            for y, w in ((call.args[0], call.args[1]), (call.args[1], call.args[0])):
                found = self._rms_norm_parts(y, w)
                if found is None:
                    continue
                x, eps = found
                add = self._producer(x, ())
                residual = add if _call_op(add, "add") and add not in adds_taken and all(
                    _is_row_tensor(e, x.ty.shape) for e in add.args) else None
                if residual is not None:
                    adds_taken.add(residual)
                norms[call] = (x, w, eps, residual)
                break
        return norms

    def _rms_norm_parts(self, y, w):
        """(x, eps) if y = x / sqrt(mean(x * x, -1, keepdims) + eps) in f32 and w is a plain weight of x's width."""
        if not (w in self.by_var and self.by_var[w] not in self.packed and isinstance(y, relax.Var)
                and y.ty.dtype == "float32"):
            return None
        div = self._producer(y, ())
        if not _call_op(div, "divide"):
            return None
        x = div.args[0]
        sqrt = self._producer(div.args[1], ())
        add = self._producer(sqrt.args[0], ()) if _call_op(sqrt, "sqrt") else None
        if not _call_op(add, "add") or not isinstance(add.args[1], tvm.ir.expr.Constant) or \
                add.args[1].value.numpy().size != 1:
            return None
        mean = self._producer(add.args[0], ())
        if not _call_op(mean, "mean") or not mean.attrs.keepdims or [int(a) % 3 for a in mean.attrs.axis] != [2]:
            return None
        sq = self._producer(mean.args[0], ())
        if not (_call_op(sq, "multiply") and sq.args[0].same_as(x) and sq.args[1].same_as(x)):
            return None
        if not _is_row_tensor(x, x.ty.shape) or w.ty.dtype != "float32" or w.ty.shape is None or \
                len(w.ty.shape.values) != 1 or not _same_dim(w.ty.shape.values[0], x.ty.shape.values[-1]):
            return None
        return x, float(add.args[1].value.numpy())

    def _rms_norm(self, call):
        if call in self.norm_out:           # made with its residual add
            return self.norm_out[call]
        x, w, eps, _ = self.norms[call]
        width = int(x.ty.shape.values[-1])
        gv = self._kernel(("rms_norm", width, eps), lambda: tvm_kernels.rms_norm(width, eps, False))
        return relax.call_tir(gv, [self.visit_expr(x), self.visit_expr(w)], x.ty)

    def _add_rms_norm(self, add):
        """The residual add in front of a norm, as the fused kernel's first output (its second: the norm)."""
        final = self.norm_of_add[add]
        if final in self.normed_groups:
            return self._normed_linear_group(add, final, self.normed_groups[final])
        x, w, eps, _ = self.norms[final]
        width = int(x.ty.shape.values[-1])
        gv = self._kernel(("add_rms_norm", width, eps), lambda: tvm_kernels.rms_norm(width, eps, True))
        out = self._emit(relax.call_tir(gv, [self.visit_expr(add.args[0]), self.visit_expr(add.args[1]),
                                             self.visit_expr(w)], [x.ty, x.ty]))
        self.norm_out[final] = self._emit(relax.TupleGetItem(out, 1))
        return relax.TupleGetItem(out, 0)

    def _kernel(self, key, make):
        if key not in self.kernels:
            self.kernels[key] = self.builder_.add_func(make(), f"{key[0]}_{len(self.kernels)}")
        return self.kernels[key]

    def _emit(self, expr):
        return self.builder_.emit(expr)

    def _f32(self, expr):
        """Kernels compute in f32; an f16 export's activations are cast on the way in (and back on the way out)."""
        return expr if expr.ty.dtype == "float32" else self._emit(relax.op.astype(expr, "float32"))

    def _like(self, expr, call):
        dtype = call.ty.dtype
        return expr if dtype == "float32" else relax.op.astype(self._emit(expr), dtype)

    # ---- the rewrite
    def visit_global_var_(self, gv: tvm.ir.GlobalVar) -> relax.Expr:
        if gv in self.imported_prims:
            if gv not in self.gv_map:
                self.gv_map[gv] = self.builder_.add_func(self.imported_prims[gv], gv.name_hint)
            return self.gv_map[gv]
        return gv

    def visit_tuple_(self, op: relax.Tuple) -> relax.Expr:
        if self.out_tuple is not None and op.same_as(self.out_tuple):
            return self.visit_expr(op.fields[0])       # logits only: the caches are updated in place
        return super().visit_tuple_(op)

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        if _call_op(call, "concat"):
            fields = call.args[0].fields if isinstance(call.args[0], relax.Tuple) else []
            if len(fields) == 2 and fields[0] in self.caches:
                return self._kv_write(call, fields[0], fields[1])
        if _call_op(call, "matmul"):
            traced = self._trace_cache(call.args[1])
            if traced is not None:
                return self._attention(call, *traced)
            w = call.args[1]
            if w in self.by_var and self.by_var[w] in self.packed:
                return self._linear(call, self.packed[self.by_var[w]])
        if _call_op(call, "nn.softmax"):
            fused = self._masked_softmax(call)
            if fused is not None:
                return fused
        if call in self.norm_of_add:
            return self._add_rms_norm(call)
        if call in self.norms:
            return self._rms_norm(call)
        if _call_op(call, "multiply"):
            fused = self._silu_mul(call)
            if fused is not None:
                return fused
        if _call_op(call, "take") and call.args[0] in self.by_var and self.by_var[call.args[0]] in self.packed:
            return self._embedding(call, self.packed[self.by_var[call.args[0]]])
        if _call_op(call, "shape_of") and call.args[0] in self.by_var and self.by_var[call.args[0]] in self.packed:
            return relax.ShapeExpr(list(call.args[0].ty.shape.values))
        return super().visit_call_(call)

    def _kv_write(self, call, past, new):
        cfg = self.cfg
        gv = self._kernel(("kv_write",), lambda: tvm_kernels.kv_write(cfg.num_kv_heads, self.capacity, cfg.head_dim))
        self.written.add(past)
        cache = self.caches[past]
        new = self._f32(self.visit_expr(new))
        return relax.call_tir_inplace(gv, [cache, new, relax.prim_value(self.total)], [0], cache.ty)

    def _attention(self, call, past, permuted, concat_var):
        cfg = self.cfg
        kvh, d, total = cfg.num_kv_heads, cfg.head_dim, self.total
        cache = self.get_var_remap(concat_var)   # the written cache (binding var of the in-place write)
        x = self._f32(self.visit_expr(call.args[0]))
        xshape = list(x.ty.shape.values)
        out_shape = list(call.ty.shape.values)
        if len(xshape) < 3 or not _equal(xshape[0], 1) or not _equal(xshape[1], kvh):
            raise InputError(f"attention operand of shape {xshape} is not [1, kv_heads={kvh}, ...]")
        rows = _prod(xshape[2:-1])      # (groups, seq) flattened: query row r is position r % seq
        if permuted:        # scores = q . K^T: q [1, kv, rows, d]
            _, ext = self._mask(next((c for mm, c in self.score_masks if mm.same_as(call)), None))
            gv = self._kernel(("attn_scores",), lambda: tvm_kernels.attn_scores(kvh, self.capacity, d))
            q = self._emit(relax.op.reshape(x, [1, kvh, rows, d]))
            out = self._emit(relax.call_tir(gv, [q, cache, ext],
                                            relax.TensorType([1, kvh, rows, total], "float32")))
            out_shape[-1] = total
        else:               # out = P . V: p [1, kv, rows, total]
            softmax = self._producer(call.args[0], ("reshape", "astype"))
            last_axis = softmax is not None and _call_op(softmax, "nn.softmax") and int(softmax.attrs.axis) in (
                -1, len(softmax.ty.shape.values) - 1)
            where = self._producer(softmax.args[0], ()) if last_axis else None
            cond = self._mask_of(where)
            c3, ext = self._mask(cond)
            scores = self._producer(where.args[1], ("astype",)) if cond is not None else None
            k_trace = self._trace_cache(scores.args[1]) if scores is not None else None
            if (k_trace is not None and k_trace[1] and any(mm.same_as(scores) for mm, _ in self.score_masks)
                    and _same_rows(scores.args[0], call.args[0])):
                # the whole chain: one pass, no score matrix (the scores and softmax calls emitted before are dead)
                q = self._emit(relax.op.reshape(self._f32(self.visit_expr(scores.args[0])), [1, kvh, rows, d]))
                gv = self._kernel(("attention",), lambda: tvm_kernels.attention(kvh, self.capacity, d))
                out = self._emit(relax.call_tir(gv, [q, self.get_var_remap(k_trace[2]), cache, c3, ext],
                                                relax.TensorType([1, kvh, rows, d], "float32")))
            else:
                gv = self._kernel(("attn_values",), lambda: tvm_kernels.attn_values(kvh, self.capacity, d))
                p = self._emit(relax.op.reshape(x, [1, kvh, rows, total]))
                out = self._emit(relax.call_tir(gv, [p, cache, ext], relax.TensorType([1, kvh, rows, d], "float32")))
        self.rewritten_attn += 1
        return self._like(relax.op.reshape(out, out_shape), call)

    def _linear(self, call, pw: PackedWeight):
        if call in self.siblings:
            if call not in self.sibling_out:
                self._linear_group(self.siblings[call])
            return self.sibling_out[call]
        x = self._f32(self.visit_expr(call.args[0]))
        xshape = list(x.ty.shape.values)
        if call.same_as(self.logits_call) and isinstance(self.seq, int) and self.seq == 1:
            self.sliced_logits = True
        elif call.same_as(self.logits_call) and len(xshape) == 3:
            # only the last position's logits are needed: slice before the lm_head (norms are per position)
            x = self._emit(relax.op.strided_slice(x, axes=[1], begin=[self.seq - 1], end=[self.seq]))
            xshape = [xshape[0], 1, xshape[2]]
            self.sliced_logits = True
        if pw.layout == "dot":
            gated = self._gated_linear(call, pw)
            if gated is not None:
                return gated
            gv = self._kernel(("linear-dot", pw.scheme.name, pw.k, pw.n, pw.lanes),
                              lambda: tvm_dot.linear(pw.scheme, pw.k, pw.n, self.isa, pw.lanes))
        else:
            gv = self._kernel(("linear", pw.scheme.name, pw.k, pw.n, pw.lanes, self.lanes),
                              lambda: tvm_kernels.linear(pw.scheme, pw.k, pw.n, pw.lanes, self.lanes))
        x3 = x if len(xshape) == 3 and _equal(xshape[0], 1) else self._emit(
            relax.op.reshape(x, [1, _prod(xshape[:-1]), pw.k]))
        rows = list(x3.ty.shape.values)[1]
        wv = self.weight_vars[pw.name]
        args = [x3, wv.get("w", wv.get("q")), wv.get("scale", self._zero_scale(pw))]
        y = relax.call_tir(gv, args, relax.TensorType([1, rows, pw.n], "float32"))
        if x3 is not x:
            y = relax.op.reshape(self._emit(y), xshape[:-1] + [pw.n])
        return self._like(y, call)

    def _normed_linear_group(self, add, final, calls: list):
        """The residual add, the RMSNorm after it and the dot linears it feeds as one kernel (`tvm_dot.linear_group`
        with norm_eps): its outputs are the add's (returned), the norm's and the linears'."""
        x, w, eps, _ = self.norms[final]
        pws = [self.packed[self.by_var[c.args[1]]] for c in calls]
        ns, lanes = tuple(pw.n for pw in pws), tuple(pw.lanes for pw in pws)
        rows = list(x.ty.shape.values)[1]
        gv = self._kernel(("linear-dot-norm", pws[0].scheme.name, pws[0].k, eps) + ns + lanes,
                          lambda: tvm_dot.linear_group(pws[0].scheme, pws[0].k, ns, self.isa, lanes, norm_eps=eps))
        args = [self.visit_expr(add.args[0]), self.visit_expr(add.args[1]), self.visit_expr(w)]
        args += [a for pw in pws for a in (self.weight_vars[pw.name]["q"], self.weight_vars[pw.name]["scale"])]
        out = self._emit(relax.call_tir(gv, args, [x.ty, x.ty] + [
            relax.TensorType([1, rows, n], "float32") for n in ns]))
        self.norm_out[final] = self._emit(relax.TupleGetItem(out, 1))
        for i, c in enumerate(calls):
            self.sibling_out[c] = self._like(self._emit(relax.TupleGetItem(out, 2 + i)), c)
        return relax.TupleGetItem(out, 0)

    def _gated_linear(self, call, pw: PackedWeight):
        """SwiGLU's down projection, matmul(gate * sigmoid(gate) * up, W): one dot kernel that computes its input
        where it quantizes it (the silu_mul kernel emitted for the product is then dead and dropped), or None."""
        parts = self._silu_mul_parts(self._producer(call.args[0], ()))
        if parts is None or call.same_as(self.logits_call) or not _equal(parts[2][2], pw.k):
            return None
        gate, up, shape = parts
        g, u = self._f32(self.visit_expr(gate)), self._f32(self.visit_expr(up))
        gv = self._kernel(("linear-dot-gated", pw.scheme.name, pw.k, pw.n, pw.lanes),
                          lambda: tvm_dot.linear(pw.scheme, pw.k, pw.n, self.isa, pw.lanes, gated=True))
        wv = self.weight_vars[pw.name]
        y = relax.call_tir(gv, [g, u, wv["q"], wv["scale"]], relax.TensorType([1, shape[1], pw.n], "float32"))
        return self._like(y, call)

    def _linear_group(self, calls: list) -> None:
        pws = [self.packed[self.by_var[c.args[1]]] for c in calls]
        ns, lanes = tuple(pw.n for pw in pws), tuple(pw.lanes for pw in pws)
        x = self._f32(self.visit_expr(calls[0].args[0]))
        rows = list(x.ty.shape.values)[1]
        if pws[0].layout == "dot":
            gv = self._kernel(("linear-dot", pws[0].scheme.name, pws[0].k) + ns + lanes,
                              lambda: tvm_dot.linear_group(pws[0].scheme, pws[0].k, ns, self.isa, lanes))
        else:
            gv = self._kernel(("linear", pws[0].scheme.name, pws[0].k) + ns + lanes + (self.lanes,),
                              lambda: tvm_kernels.linear_group(pws[0].scheme, pws[0].k, ns, lanes, self.lanes))
        wvs = [self.weight_vars[pw.name] for pw in pws]
        args = [x] + [a for pw, wv in zip(pws, wvs)
                      for a in (wv.get("w", wv.get("q")), wv.get("scale", self._zero_scale(pw)))]
        out = self._emit(relax.call_tir(gv, args, [relax.TensorType([1, rows, n], "float32") for n in ns]))
        for i, c in enumerate(calls):
            self.sibling_out[c] = self._like(self._emit(relax.TupleGetItem(out, i)), c)

    def _masked_softmax(self, call):
        """softmax(where(visible, scores, very low), axis=-1) -> one kernel (the graph's version materializes the
        masked scores and calls libm's exp per element: half of a 512-token prefill went there)."""
        w = self._producer(call.args[0], ())
        cond = self._mask_of(w)
        shape = list(call.ty.shape.values)
        if cond is None or int(call.attrs.axis) not in (-1, len(shape) - 1):
            return None
        rows = _prod(shape[1:-2])
        if not isinstance(rows, (int, tvm.tirx.IntImm)):
            return None
        rows = int(rows)
        x = self._f32(self.visit_expr(w.args[1]))
        c3, ext = self._mask(cond)
        gv = self._kernel(("masked_softmax", rows), lambda: tvm_kernels.masked_softmax(rows))
        x4 = self._emit(relax.op.reshape(x, [1, rows, shape[-2], shape[-1]]))
        out = self._emit(relax.call_tir(gv, [x4, c3, ext], relax.TensorType([1, rows, shape[-2], shape[-1]],
                                                                           "float32")))
        return self._like(relax.op.reshape(out, shape), call)

    def _silu_mul(self, call):
        """(gate * sigmoid(gate)) * up -> one kernel (the generic one calls libm's exp per element)."""
        parts = self._silu_mul_parts(call)
        if parts is None:
            return None
        gate, up, shape = parts
        width = int(shape[2])
        g, u = self._f32(self.visit_expr(gate)), self._f32(self.visit_expr(up))
        gv = self._kernel(("silu_mul", width), lambda: tvm_kernels.silu_mul(width))
        return self._like(relax.call_tir(gv, [g, u], relax.TensorType(shape, "float32")), call)

    def _silu_mul_parts(self, call):
        """(gate, up, shape) where call is (gate * sigmoid(gate)) * up on [1, seq, width] tensors, else None."""
        if not _call_op(call, "multiply"):
            return None
        shape = list(call.ty.shape.values) if call.ty.shape is not None else []
        if len(shape) != 3 or not _equal(shape[0], 1) or not isinstance(shape[2], (int, tvm.tirx.IntImm)):
            return None
        for prod, up in ((call.args[0], call.args[1]), (call.args[1], call.args[0])):
            inner = self._producer(prod, ())
            if inner is None or not _call_op(inner, "multiply"):
                continue
            for gate, sig in ((inner.args[0], inner.args[1]), (inner.args[1], inner.args[0])):
                sv = self._producer(sig, ())
                if sv is None or not _call_op(sv, "sigmoid") or not sv.args[0].same_as(gate):
                    continue
                shapes = [list(e.ty.shape.values) if e.ty.shape is not None else [] for e in (gate, up)]
                if not all(len(sh) == 3 and all(_same_dim(a, b) for a, b in zip(sh, shape)) for sh in shapes):
                    return None
                return gate, up, shape
        return None

    @staticmethod
    def _zero_scale(pw: PackedWeight):
        # float kernels take an unused [1, 1, 1] scale so that all weight kernels share one signature
        return relax.const(np.zeros((1, 1, 1), np.float32))

    def _embedding(self, call, pw: PackedWeight):
        ids = self.visit_expr(call.args[1])
        axis = int(call.attrs.axis)
        ishape = list(ids.ty.shape.values)
        if len(ishape) != 2 or not _equal(ishape[0], 1):
            raise InputError(f"embedding lookup with ids of shape {ishape} (expected [1, seq])")
        if pw.layout == "dot":
            gv = self._kernel(("embedding-dot", pw.scheme.name, pw.k, pw.n, pw.lanes),
                              lambda: tvm_dot.embedding(pw.scheme, pw.k, pw.n, pw.lanes))
        else:
            gv = self._kernel(("embedding", pw.scheme.name, pw.k, pw.n, pw.lanes),
                              lambda: tvm_kernels.embedding(pw.scheme, pw.k, pw.n, pw.lanes))
        wv = self.weight_vars[pw.name]
        ids = self._emit(relax.op.astype(ids, "int64"))
        args = [ids, wv.get("w", wv.get("q")), wv.get("scale", self._zero_scale(pw))]
        out = relax.call_tir(gv, args, relax.TensorType([1, ishape[1], pw.k], "float32"))
        if axis == 1:                                                # take(W[H, V], ids, axis=1) -> [H, 1, seq]
            out = relax.op.permute_dims(self._emit(out), [2, 0, 1])
        return self._like(out, call)


def _is_row_tensor(expr, shape) -> bool:
    """expr is an f32 [1, seq, width] tensor of the given shape, width static (a norm's input, a residual term)."""
    if not (isinstance(expr, relax.Var) and expr.ty.dtype == "float32" and isinstance(expr.ty.shape, relax.ShapeExpr)
            and isinstance(shape, relax.ShapeExpr)):
        return False
    dims, want = list(expr.ty.shape.values), list(shape.values)
    return (len(dims) == 3 and len(want) == 3 and _equal(dims[0], 1) and isinstance(dims[2], (int, tvm.tirx.IntImm))
            and all(_same_dim(a, b) for a, b in zip(dims, want)))


def _same_rows(q, p) -> bool:
    """q [.., rows.., d] and p [.., rows.., total] have the same leading dims: query row r of one is row r of the
    other."""
    qs, ps = (list(e.ty.shape.values) if e.ty.shape is not None else [] for e in (q, p))
    return len(qs) == len(ps) >= 3 and all(_same_dim(a, b) for a, b in zip(qs[:-1], ps[:-1]))


def _same_dim(a, b) -> bool:
    """Two shape dims that are the same int or the same symbolic variable."""
    if isinstance(a, (int, tvm.tirx.IntImm)) and isinstance(b, (int, tvm.tirx.IntImm)):
        return int(a) == int(b)
    return a.same_as(b)


def _equal(a, b) -> bool:
    return isinstance(a, (int, tvm.tirx.IntImm)) and int(a) == b


def _prod(dims):
    out = 1
    for d in dims:
        out = out * d
    return out

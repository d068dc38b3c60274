"""q4 for the browser: 4-bit weights, f32 compute, dequantized inside the matmul kernel.

The numbers are llamac's shared "q4" scheme (llamac.quantize: groups of 32 inputs, codes in [-8, 7], error-minimising
scales rounded to f16), so a WebGPU q4 artifact computes with exactly the weights of the CPU q4 artifact. Only the
layout is the browser's: codes + 8 packed eight to a uint32 along the inputs, [K/8, N] (input k at bits 4*(k%8)),
scales as float32 [K/32, N] (SwiftShader and many GPUs have no shader-f16; the f16 values convert exactly).

Each `matmul(x, W)` becomes one TE function computing dequantize-then-matmul; dlight's GPU rules inline the
dequantize stage into the matmul's loads, so the f32 weight never exists in memory. Weights used by anything other
than a matmul (a tied embedding's lookup) stay f32.
"""

from __future__ import annotations

import numpy as np

PACK = 8  # 4-bit codes per uint32
SCHEME = "q4"


def _scheme():
    from llamac.quantize import get_scheme

    return get_scheme(SCHEME)


def quantizable(w: np.ndarray) -> bool:
    return w.ndim == 2 and w.dtype == np.float32 and w.shape[0] % PACK == 0


def quantize_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """W [K, N] float32 -> (packed uint32 [K/8, N], scales float32 [ceil(K/group), N])."""
    from llamac.quantize import quantize

    t = quantize(w, _scheme())                               # q [N, K] int8, scale [N, G]
    k, n = w.shape
    codes = (t.q.astype(np.int32) + 8).astype(np.uint32).T.reshape(k // PACK, PACK, n)
    packed = np.zeros((k // PACK, n), np.uint32)
    for j in range(PACK):
        packed |= codes[:, j, :] << np.uint32(4 * j)
    return packed, np.ascontiguousarray(t.scale.astype(np.float32).T)


def dequantize_weight(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The f32 weight [K, N] the kernels compute with (for tests and references)."""
    group = _scheme().group_size
    k8, n = packed.shape
    codes = np.stack([(packed >> np.uint32(4 * j)) & np.uint32(15) for j in range(PACK)], axis=1)  # [K/8, 8, N]
    codes = codes.reshape(k8 * PACK, n).astype(np.float32) - 8.0
    return codes * np.repeat(scale, group, axis=0)[: k8 * PACK]


def _q4_matmul_te(x, wq, scale):
    from tvm import te, tirx as tir

    k = wq.shape[0] * PACK
    n = wq.shape[1]
    group = _scheme().group_size

    def deq(kk, nn):
        code = (wq[kk // PACK, nn] >> ((kk % PACK) * 4).astype("uint32")) & tir.const(15, "uint32")
        return (code.astype("float32") - tir.const(8.0, "float32")) * scale[kk // group, nn]

    w = te.compute((k, n), deq, name="q4_decode")
    r = te.reduce_axis((0, k), name="k")
    lead = list(x.shape[:-1])
    return te.compute(lead + [n], lambda *i: te.sum(x[tuple(i[:-1]) + (r,)] * w[r, i[-1]], axis=r),
                      name="q4_matmul")


def quantize_q4(mod, weights: dict[str, np.ndarray], names: list[str], num_inputs: int):
    """Rewrites the matmuls on 2-D weights in every Relax function (main, decode) to q4 kernels.

    All functions share one parameter list. Returns (mod, weights, weight names in call order, names of the
    weights that were quantized)."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, PyExprVisitor, mutator, visitor

    matmul = tvm.ir.Op.get("relax.matmul")
    funcs = {gv.name_hint if hasattr(gv, "name_hint") else str(gv): f for gv, f in mod.functions.items()
             if isinstance(f, relax.Function)}

    # Which weights appear only as the right operand of a matmul (checked in every function)?
    only_matmul: dict[str, bool] = {}
    for func in funcs.values():
        weight_vars = {p: p.name for p in func.params[num_inputs:]}

        @visitor
        class _Uses(PyExprVisitor):
            def visit_call_(self, call):
                for i, a in enumerate(call.args):
                    if isinstance(a, relax.Var) and a in weight_vars:
                        name = weight_vars[a]
                        only_matmul[name] = only_matmul.get(name, True) and call.op.same_as(matmul) and i == 1
                    else:
                        self.visit_expr(a)

        _Uses().visit_expr(func.body)
    chosen = {n: quantize_weight(weights[n]) for n, ok in only_matmul.items() if ok and quantizable(weights[n])}

    out_names: list[str] = []
    out_weights: dict[str, np.ndarray] = {}
    for name in names:
        if name in chosen:
            packed, scale = chosen[name]
            out_names += [name + "_q4", name + "_q4scale"]
            out_weights[name + "_q4"], out_weights[name + "_q4scale"] = packed, scale
        else:
            out_names.append(name)
            out_weights[name] = weights[name]

    for fname, func in funcs.items():
        params = list(func.params)
        new_vars = {}
        for p in params[num_inputs:]:
            if p.name in chosen:
                packed, scale = chosen[p.name]
                new_vars[p] = (relax.Var(p.name + "_q4", relax.TensorType(list(packed.shape), "uint32")),
                               relax.Var(p.name + "_q4scale", relax.TensorType(list(scale.shape), "float32")))

        @mutator
        class _Rewrite(PyExprMutator):
            def visit_call_(self, call):
                call = self.visit_expr_post_order(call)
                if call.op.same_as(matmul) and isinstance(call.args[1], relax.Var) and call.args[1] in new_vars:
                    wq, sc = new_vars[call.args[1]]
                    return self.builder_.call_te(_q4_matmul_te, call.args[0], wq, sc, primfunc_name_hint="q4_matmul")
                return call

        rewriter = _Rewrite(mod)
        body = rewriter.visit_expr(func.body)
        new_params = params[:num_inputs]
        for p in params[num_inputs:]:
            new_params += list(new_vars[p]) if p in new_vars else [p]
        assert [p.name for p in new_params[num_inputs:]] == out_names
        mod = rewriter.builder_.get()
        mod[fname] = relax.Function(new_params, body, func.ret_ty, func.is_pure, func.attrs)
    return mod, out_weights, out_names, sorted(chosen)

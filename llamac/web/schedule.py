"""The Relax pipeline for WebGPU: TVM's generic GPU pipeline with two changes.

1. cumsum: TVM's GPU scan kernel (DispatchSortScan -> gpu_2d_continuous_cumsum) gave wrong sums on WebGPU for rows
   longer than 16 (checked on SwiftShader), which broke the attention mask for prompts over 16 tokens. Row-wise
   cumsums become a plain reduction (out[i, j] = sum of x[i, k] for k <= j): O(n^2) adds for n <= the context, tiny
   next to a matmul, and scheduled by dlight's ordinary reduction rules.
2. dlight's Matmul rule tiles and unrolls. On the attention matmuls (batched, 5-D here, with symbolic sequence lengths
whose index arithmetic is long floor-div/mod chains) that unrolling produced a 490 KB WGSL kernel that SwiftShader
did not finish compiling in minutes. So the Matmul rule is kept for linear layers (one operand is a 2-D weight) and
the attention matmuls fall through to the reduction/fallback rules, which emit small kernels.
"""

from __future__ import annotations


def _linear_only_matmul():
    from tvm import s_tir
    from tvm.s_tir import dlight as dl
    from tvm.s_tir.dlight.analysis import get_root_block

    def reads_2d_buffer(func) -> bool:
        sch = s_tir.Schedule(func)
        for block in sch.get_child_blocks(get_root_block(sch)):
            if any(len(r.region) == 2 for r in sch.get(block).reads):
                return True
        return False

    class LinearMatmul(dl.gpu.Matmul):
        def apply(self, func, target, tunable):  # noqa: D102 - same contract as dlight's rules
            if not reads_2d_buffer(func):
                return None
            return super().apply(func, target, tunable)

    return LinearMatmul()


def _cumsum_te(x, out_dtype):
    from tvm import te, tirx as tir

    n = x.shape[-1]
    k = te.reduce_axis((0, n), name="k")
    zero = tir.const(0, out_dtype)
    return te.compute(x.shape, lambda i, j: te.sum(tir.if_then_else(k <= j, x[i, k].astype(out_dtype), zero), axis=k),
                      name="cumsum_by_reduction")


def replace_cumsum(mod):
    """Rewrites 2-D, last-axis, inclusive R.cumsum calls in every Relax function to _cumsum_te."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    cumsum = tvm.ir.Op.get("relax.cumsum")

    @mutator
    class _Rewrite(PyExprMutator):
        def visit_call_(self, call):
            call = self.visit_expr_post_order(call)
            if not call.op.same_as(cumsum):
                return call
            x = call.args[0]
            ty = x.ty
            ndim = getattr(ty, "ndim", -1)
            axis = call.attrs.axis
            if ndim != 2 or axis is None or int(axis) not in (1, -1) or bool(call.attrs.exclusive):
                return call
            out_dtype = str(call.attrs.dtype) if call.attrs.dtype is not None else str(ty.dtype)
            return self.builder_.call_te(_cumsum_te, x, out_dtype, primfunc_name_hint="cumsum_by_reduction")

    rewriter = _Rewrite(mod)
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    return rewriter.builder_.get()


def webgpu_pipeline(target):
    """A module pass: library dispatch, legalize + fuse, dlight schedules, lowering (as gpu_generic does)."""
    import tvm
    from tvm import relax
    from tvm.relax.backend import gpu_generic
    from tvm.s_tir import dlight as dl

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod, _ctx):
        mod = replace_cumsum(mod)
        with target:
            seq = tvm.transform.Sequential(
                gpu_generic.library_dispatch_passes(target)
                + [
                    relax.transform.LegalizeOps(),
                    relax.transform.AnnotateTIROpPattern(),
                    relax.transform.FoldConstant(),
                    relax.transform.FuseOps(),
                    relax.transform.FuseTIR(),
                    dl.ApplyDefaultSchedule(
                        _linear_only_matmul(),
                        dl.gpu.GEMV(),
                        dl.gpu.Reduction(),
                        dl.gpu.GeneralReduction(),
                        dl.gpu.Fallback(),
                    ),
                ]
                + gpu_generic.dataflow_lower_passes(target)
                + gpu_generic.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline

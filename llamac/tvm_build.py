"""Lower the step module with a CPU pipeline of our own and write the shared library (cross-linking when asked).

TVM's default CPU build only legalizes; this pipeline also folds constants, fuses elementwise chains and schedules
every kernel (see `tvm_schedule`), then runs the usual VM lowering and finalization passes.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import tvm
from tvm import relax

from llamac.errors import InputError
from llamac.tvm_schedule import ScheduleCPU

KERNEL_HELPER = Path(__file__).with_name("next_task.c")


@relax.expr_functor.mutator
class _UnitAxisTransposes(relax.PyExprMutator):
    """A transpose that moves only size-1 axes leaves every element where it was: emit it as a reshape, and a
    reshape of a reshape as one, which RewriteDataflowReshape turns into a view (a chain of them would be fused
    into a copy kernel). At decode (seq = 1) the attention's head transposes are such: three copies per layer."""

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.builder_.normalize(super().visit_call_(call))
        if _is_op(call, "relax.permute_dims") and _moves_unit_axes_only(call):
            return self._reshape(call.args[0], call.ty.shape)
        if _is_op(call, "relax.reshape"):
            return self._reshape(call.args[0], call.ty.shape)
        return call

    def _reshape(self, x: relax.Expr, shape) -> relax.Expr:
        source = self.lookup_binding(x) if isinstance(x, relax.Var) else None
        if source is not None and _is_op(source, "relax.reshape"):
            x = source.args[0]
        return relax.op.reshape(x, shape)


def _is_op(expr, name: str) -> bool:
    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == name


def _moves_unit_axes_only(call: relax.Call) -> bool:
    shape = call.args[0].ty.shape
    if not isinstance(shape, relax.ShapeExpr):
        return False
    dims = list(shape.values)
    axes = [int(a) for a in call.attrs.axes] if call.attrs.axes is not None else list(range(len(dims)))[::-1]
    kept = [a for a in axes if not (isinstance(dims[a], tvm.tirx.IntImm) and dims[a].value == 1)]
    return kept == sorted(kept)


@tvm.transform.module_pass(opt_level=0, name="UnitAxisTransposesToReshapes")
def unit_axis_transposes_to_reshapes(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    mutator = _UnitAxisTransposes(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()


def pipeline(vector_lanes: int) -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="LlamacPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        passes = [
            relax.transform.BundleModelParams("params"),   # weights arrive as one tuple argument
            relax.backend.DispatchSampling(),
            relax.backend.DispatchSortScan(),              # cumsum (the attention mask) -> TIR scan
            unit_axis_transposes_to_reshapes,
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
            relax.transform.RewriteDataflowReshape(),      # reshapes become views (no kernel, no copy)
            relax.transform.DeadCodeElimination(),
            ScheduleCPU(vector_lanes),
            relax.transform.ToNonDataflow(),
            relax.transform.RemovePurityChecking(),
            relax.transform.CallTIRRewrite(),
            relax.transform.StaticPlanBlockMemory(),
            relax.transform.LowerAllocTensor(),
            relax.transform.KillAfterLastUse(),
            relax.transform.LowerRuntimeBuiltin(),
            relax.transform.ComputePrimValue(),
            relax.transform.VMShapeLower(),
            relax.transform.AttachGlobalSymbol(),
        ]
        return tvm.transform.Sequential(passes)(mod)

    return _pipeline


def build(mod: tvm.IRModule, target_dict: dict, vector_lanes: int, out_path: Path, cc: str | None) -> None:
    """Compile `mod` for the target and link it into out_path (a .so for the target's OS and CPU)."""
    target = tvm.target.Target(target_dict)
    with target, tvm.transform.PassContext(opt_level=3):
        ex = tvm.compile(mod, target=target, relax_pipeline=pipeline(vector_lanes))
    link(ex, out_path, cc)


def link(ex, out_path: Path, cc: str | None = None) -> None:
    """Write the compiled module as a shared library, with the kernels' C helper (`next_task.c`) linked in."""
    kwargs = {"cc": cc} if cc else {}
    try:
        ex.export_library(str(out_path), addons=[str(KERNEL_HELPER)], options=["-O2"], **kwargs)
    except RuntimeError as e:       # the linker's own messages, many lines: keep the one that says what failed
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower() and not line.startswith("Compilation error")]
        why = (errors or lines or [""])[0]
        raise InputError(f"linking the model library with {cc or 'the host compiler'} failed: {why[:240]} "
                         f"(a compiler for another CPU than the target's?)") from e


def load(ex) -> tvm.runtime.Module:
    """Link and load a compiled module in this process (kernels built outside an artifact: tests, benchmarks)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernels.so"
        link(ex, path)
        return tvm.runtime.load_module(str(path))

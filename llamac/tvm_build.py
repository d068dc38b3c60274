"""Lower the step module with a CPU pipeline of our own and write the shared library (cross-linking when asked).

TVM's default CPU build only legalizes; this pipeline also folds constants, fuses elementwise chains and schedules
every kernel (see `tvm_schedule`), then runs the usual VM lowering and finalization passes.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import tvm
from tvm import relax

from llamac.tvm_schedule import ScheduleCPU

KERNEL_HELPER = Path(__file__).with_name("next_task.c")


def pipeline(vector_lanes: int) -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="LlamacPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        passes = [
            relax.transform.BundleModelParams("params"),   # weights arrive as one tuple argument
            relax.backend.DispatchSampling(),
            relax.backend.DispatchSortScan(),              # cumsum (the attention mask) -> TIR scan
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
    ex.export_library(str(out_path), addons=[str(KERNEL_HELPER)], options=["-O2"], **kwargs)


def load(ex) -> tvm.runtime.Module:
    """Link and load a compiled module in this process (kernels built outside an artifact: tests, benchmarks)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernels.so"
        link(ex, path)
        return tvm.runtime.load_module(str(path))

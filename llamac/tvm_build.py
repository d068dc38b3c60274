"""Lower the step module with a CPU pipeline of our own and write the shared library (cross-linking when asked).

TVM's default CPU build only legalizes; this pipeline also folds constants, fuses elementwise chains and schedules
every kernel (see `tvm_schedule`), then runs the usual VM lowering and finalization passes.
"""
from __future__ import annotations

from pathlib import Path

import tvm
from tvm import relax

from llamac.tvm_schedule import ScheduleCPU


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
    kwargs = {"cc": cc} if cc else {}
    ex.export_library(str(out_path), **kwargs)

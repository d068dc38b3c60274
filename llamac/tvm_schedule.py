"""CPU schedules for the PrimFuncs that LegalizeOps + FuseOps leave (norms, RoPE, softmax, residual adds, reshapes).

The heavy kernels (linear layers, attention, cache writes) come from `tvm_kernels` already scheduled and carry the
`llamac.kernel` attribute; everything else is scheduled here:
- injective functions (after inlining their spatial producers): loops fused, vectorized, and split into parallel
  chunks when there is enough work;
- reductions with injective epilogues (RMSNorm, softmax): dlight's CPU Reduction rule (parallel rows, vectorized
  elementwise parts), where its assumptions hold (`RowReduction`);
- anything else stays serial (correct, just slower; after the rewrite no matmul is left to the generic rules).
"""
from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule, try_inline

CHUNK = 4096      # elements per parallel task: below this a thread launch costs more than it saves


class Injective(ScheduleRule):
    def __init__(self, vector_lanes: int):
        self.lanes = vector_lanes

    def apply(self, func, target, tunable):
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        blocks = normalize_prim_func(sch)
        if blocks is None or not all(b.is_injective() for b in blocks):
            return None
        blocks = try_inline(sch, list(blocks))
        if len(blocks) != 1:
            return None
        loops = sch.get_loops(blocks[0].block_rv)
        if not loops:
            return sch
        # vectorize the innermost loop when its extent is static (contiguous in the output), and run the rest as
        # one fused loop, parallel when it may be large (symbolic or many elements)
        inner_extent = sch.get(loops[-1]).extent
        if isinstance(inner_extent, tirx.IntImm) and int(inner_extent) % self.lanes == 0:
            outer_inner, vec = sch.split(loops[-1], [None, self.lanes])
            sch.vectorize(vec)
            loops = sch.get_loops(blocks[0].block_rv)[:-1]
        elif isinstance(inner_extent, tirx.IntImm) and int(inner_extent) <= 2 * self.lanes:
            sch.vectorize(loops[-1])
            loops = loops[:-1]
        if not loops:
            return sch
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        extent = sch.get(fused).extent
        if not isinstance(extent, tirx.IntImm) or int(extent) * self.lanes > CHUNK:
            sch.parallel(fused)
        return sch


class RowReduction(ScheduleRule):
    """dlight's CPU Reduction rule (parallel over rows, vectorized elementwise parts), applied only where its
    assumption holds: every block starts with the same spatial axes (the rows). When unit dimensions are squeezed
    differently per block (a static [1, 1, hidden] norm), that rule would parallelize the hidden axis and make every
    iteration recompute, and race on, the shared row sum; such functions stay serial here (they are tiny)."""

    def __init__(self):
        self.rule = dlight.cpu.Reduction()

    def apply(self, func, target, tunable):
        if not isinstance(func, tirx.PrimFunc):
            return None
        blocks = normalize_prim_func(s_tir.Schedule(func))
        if not blocks or len(blocks) < 2:
            return None
        leads = []
        for b in blocks:
            kinds = b.dom_kind()
            n = len(kinds) - len(kinds.lstrip("S"))
            leads.append([str(d) for d in b.dom()[:n]])
        n = min(len(lead) for lead in leads)
        if n == 0 or len({tuple(lead[:n]) for lead in leads}) != 1:
            return None
        return self.rule.apply(func, target, tunable)


def is_llamac_kernel(func) -> bool:
    return isinstance(func, tirx.PrimFunc) and func.attrs is not None and "llamac.kernel" in func.attrs


@tvm.transform.module_pass(opt_level=0, name="LlamacSchedule")
class ScheduleCPU:
    """Apply the rules above to every PrimFunc that is not one of ours and not scheduled yet."""

    def __init__(self, vector_lanes: int):
        self.rules = [Injective(vector_lanes), RowReduction()]

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        target = tvm.target.Target.current(allow_none=False)
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or is_llamac_kernel(func):
                continue
            if func.attrs is not None and func.attrs.get("tirx.is_scheduled", False):
                continue
            for rule in self.rules:
                try:
                    sch = rule.apply(func, target, False)
                except Exception:      # a rule that does not fit this function: try the next one
                    sch = None
                if sch is None:
                    continue
                if isinstance(sch, list):
                    sch = sch[0]
                updates[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
                break
        for gv, func in updates.items():
            mod[gv] = func
        return mod

"""FLOPs of the program XLA:CPU compiles from a propagated graph, as `Compiled.cost_analysis()` counts them.

XLA does not run the traced program as written, and at small sizes the difference is large (10%
of a tiny GPT step): its simplifier and CSE remove and merge work, lowering adds masks, the CPU
backend hands large reductions to a library, and its loop fusion copies cheap elementwise
producers into every consumer fusion rather than write them to memory once, each copy counted.
So an op's FLOPs here are those of the program XLA:CPU compiles: `Program` rebuilds that program
from the propagated graph, with each op's arithmetic from the per-primitive counting of
cost_model.compute, and `fusion_copies` replays the fusion pass on it (after
xla/service/instruction_fusion.cc with the ShouldFuse of cpu_instruction_fusion.cc). Like
HloCostAnalysis, `xla_flops` counts a loop body once; `cost_model.compute.op_costs` rows carry
trip counts.
"""

from __future__ import annotations

from cost_model.gc_pause import gc_paused
from cost_model.xla_fusion import fusion_copies
from cost_model.xla_program import Program
from ir.graph import Op
from ir.propagate import Propagation


def xla_flops(prop: Propagation, loop: Op | None = None) -> float:
    """Per-device FLOPs of the step as `Compiled.cost_analysis()` reports them.

    HloCostAnalysis counts a while loop's body once, whatever its trip count, and the costlier
    branch of a conditional; so does this. For the FLOPs a step executes, sum
    `cost_model.compute.op_costs(prop)` rows times their `count`.
    """
    total = sum(f for f, _ in compiled_op_flops(prop, loop).values())
    for op in prop.graph.ops:
        if op.rule is None and op.id in prop.graph.live_ops:
            scan = op if op.primitive == "scan" else None
            total += max((xla_flops(sub, scan) for sub in prop.bodies.get(op.id, ())), default=0.0)
    return total


def compiled_op_flops(prop: Propagation, loop: Op | None = None) -> dict[int, tuple[float, float]]:
    """Per op of this graph (not of its bodies): the (FLOPs, transcendentals) the compiled
    per-device program spends on it in one execution, counted as HloCostAnalysis counts.

    That is the op's arithmetic as XLA rewrites it, times the copies its fusion makes (0 when the
    simplifier or CSE removed the op), plus what lowering adds for the op: the masks of a
    FILL_OR_DROP gather, and one add per element when its partial sums are all-reduced.

    Args:
      prop: the propagated graph (or loop body).
      loop: the scan whose body `prop` is, if it is one (its xs and ys are sliced per iteration).
    """
    # Rebuilding the program makes no cycles; with an unrolled 8B-parameter Llama alive, the
    # collections its allocations triggered took a third of the time.
    with gc_paused():
        prog = Program(prop, loop)
        copies = fusion_copies(prog)
    out: dict[int, tuple[float, float]] = {}
    for k, n in copies.items():
        inst = prog.insts[k]
        if inst.op >= 0 and n and (inst.flops or inst.trans):
            f, t = out.get(inst.op, (0.0, 0.0))
            out[inst.op] = (f + n * inst.flops, t + n * inst.trans)
    return out

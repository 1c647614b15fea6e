"""Execute a plan with JAX's partitioner and set what XLA compiled beside what propagation predicted."""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from ir.comm import Collective, CollectiveKind, bytes_by_kind_axes
from ir.graph import Graph
from ir.propagate import Propagation
from ir.workload import Workload, WorkloadError
from runners.hlo import collectives_from_hlo
from runners.program import Mode, constrained_fn, make_mesh, named

# Numerical tolerance of a sharded step against the unsharded one, per dtype: the largest absolute
# difference allowed in any output, relative to the output's scale (max |reference|, at least 1).
# Sharded reductions sum in a different order; one AdamW step divides by sqrt(v) + eps, which turns
# a rounding difference in a near-zero gradient into up to one learning-rate-sized update (1e-3 in
# the built-in steps), so float32 params are allowed 2e-3 while the loss is held far tighter in tests.
TOLERANCE = {"float32": 2e-3, "bfloat16": 3e-2, "float16": 3e-2, "float64": 1e-9}


@dataclasses.dataclass(frozen=True, slots=True)
class CollectiveRow:
    """Predicted against compiled bytes for one (kind, axes)."""

    kind: CollectiveKind
    axes: tuple[str, ...]
    predicted: int
    compiled: int

    @property
    def agreement(self) -> float:
        """min / max of the two byte counts (1.0 when both are zero)."""
        hi = max(self.predicted, self.compiled)
        return 1.0 if hi == 0 else min(self.predicted, self.compiled) / hi


@dataclasses.dataclass(frozen=True, slots=True)
class Verification:
    """What running (or compiling) one plan showed.

    Attributes:
      mode: constrained or portable.
      executed: False for compile-only runs (no numerics, no time).
      max_error: largest output difference against the unsharded step, relative to scale (NaN
        when not executed).
      within_tolerance: max_error within TOLERANCE for the outputs' dtypes.
      predicted: the propagation's collectives.
      compiled: the collectives found in the compiled HLO.
      rows: per (kind, axes), predicted against compiled bytes.
      memory: XLA's memory_analysis() per device in bytes (argument, output, alias, temp).
      flops: XLA's cost_analysis() FLOPs per device.
      step_time_s: median measured step time (NaN when not executed).
      output_errors: per flattened output, its difference relative to scale (empty when not executed).
    """

    mode: Mode
    executed: bool
    max_error: float
    within_tolerance: bool
    predicted: tuple[Collective, ...]
    compiled: tuple[Collective, ...]
    rows: tuple[CollectiveRow, ...]
    memory: Mapping[str, int]
    flops: float
    step_time_s: float
    output_errors: tuple[float, ...] = ()

    @property
    def agreement(self) -> float:
        """Matched collective bytes over the larger of predicted and compiled totals."""
        pred = sum(r.predicted for r in self.rows)
        comp = sum(r.compiled for r in self.rows)
        hi = max(pred, comp)
        return 1.0 if hi == 0 else sum(min(r.predicted, r.compiled) for r in self.rows) / hi

    @property
    def min_row_agreement(self) -> float:
        return min((r.agreement for r in self.rows), default=1.0)


def compare(predicted, compiled) -> tuple[CollectiveRow, ...]:
    """Rows per (kind, axes) over both sides, in a stable order."""
    p, c = bytes_by_kind_axes(predicted), bytes_by_kind_axes(compiled)
    keys = sorted(set(p) | set(c), key=lambda k: (k[0].value, k[1]))
    return tuple(CollectiveRow(k[0], k[1], p.get(k, 0), c.get(k, 0)) for k in keys)


def flat_donation(workload: Workload) -> tuple[int, ...]:
    """Flattened input positions of the donated arguments."""
    out, pos = [], 0
    for i, arg in enumerate(workload.args):
        n = len(jax.tree.leaves(arg))
        if i in workload.donate_argnums:
            out.extend(range(pos, pos + n))
        pos += n
    return tuple(out)


def jit_plan(workload: Workload, prop: Propagation, mode: Mode, mesh: jax.sharding.Mesh | None = None):
    """The step compiled under the plan, as a function of the flattened arguments.

    Returns:
      (jitted function of the flat argument list returning the flat outputs, its jax Mesh).
    """
    g: Graph = prop.graph
    mesh = mesh or make_mesh(prop.mesh)
    in_sh = [named(mesh, prop.shardings[i]) for i in g.inputs]
    out_sh = [named(mesh, s) for s in prop.outputs]
    if mode is Mode.CONSTRAINED:
        fn = constrained_fn(prop, mesh)
    else:
        treedef = jax.tree.structure(workload.args)

        def fn(*flat):
            return jax.tree.leaves(workload.fn(*jax.tree.unflatten(treedef, flat)))

    jitted = jax.jit(fn, in_shardings=in_sh, out_shardings=out_sh, donate_argnums=flat_donation(workload))
    return jitted, mesh


def verify(
    workload: Workload,
    prop: Propagation,
    mode: Mode = Mode.CONSTRAINED,
    *,
    execute: bool = True,
    seed: int = 0,
    repeats: int = 3,
    reference: Sequence[np.ndarray] | None = None,
) -> Verification:
    """Compiles the plan's program; with `execute`, runs it and the unsharded step on real inputs.

    Args:
      workload: the step (its `init` makes real inputs when `execute`).
      prop: the propagated plan.
      mode: constrained (every value pinned) or portable (argument and result shardings only).
      execute: False compiles from ShapeDtypeStructs only, allocating nothing (any model size).
      seed: seed for `workload.init`.
      repeats: timed runs (the median is reported).
      reference: the unsharded step's flat outputs on `init(seed)` (computed when None).
    """
    jitted, mesh = jit_plan(workload, prop, mode)
    flat_abstract = jax.tree.leaves(workload.abstract_args)
    compiled = jitted.lower(*flat_abstract).compile()
    hlo_colls = collectives_from_hlo(compiled.as_text(), prop.mesh, [d.id for d in mesh.devices.flat])
    mem = compiled.memory_analysis()
    memory = {
        "argument": int(mem.argument_size_in_bytes),
        "output": int(mem.output_size_in_bytes),
        "alias": int(mem.alias_size_in_bytes),
        "temp": int(mem.temp_size_in_bytes),
    }
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    max_error, ok, step_time, errors = math.nan, True, math.nan, ()
    if execute:
        if workload.init is None:
            raise WorkloadError(
                f"workload {workload.source or workload.fn!r} has no init(seed) to make real inputs, so "
                "it can only be compiled; pass --compile-only (execute=False), or return a Workload "
                "with an init(seed)."
            )
        host = [np.asarray(x) for x in jax.tree.leaves(workload.init(seed))]
        ref = reference if reference is not None else reference_outputs(workload, seed)
        in_sh = [named(mesh, prop.shardings[i]) for i in prop.graph.inputs]
        times = []
        out = None
        for _ in range(max(1, repeats)):
            args = [jax.device_put(x, s) for x, s in zip(host, in_sh, strict=True)]
            jax.block_until_ready(args)
            t0 = time.perf_counter()
            out = jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - t0)
        step_time = statistics.median(times)
        errors, ok = _errors(out, ref)
        max_error = max(errors, default=0.0)
    return Verification(
        mode,
        execute,
        max_error,
        ok,
        prop.collectives,
        hlo_colls,
        compare(prop.collectives, hlo_colls),
        memory,
        flops,
        step_time,
        tuple(errors),
    )


def reference_outputs(workload: Workload, seed: int = 0) -> list[np.ndarray]:
    """The unsharded step's flattened outputs on `workload.init(seed)`, on one device."""
    host = [np.asarray(x) for x in jax.tree.leaves(workload.init(seed))]
    treedef = jax.tree.structure(workload.args)
    out = jax.jit(lambda *a: jax.tree.leaves(workload.fn(*jax.tree.unflatten(treedef, a))))(*host)
    return [np.asarray(x) for x in out]


def _errors(out, ref) -> tuple[list[float], bool]:
    """Per output, max |sharded - unsharded| / max(1, max |unsharded|); and whether all are in tolerance."""
    errors, ok = [], True
    for a, b in zip(out, ref, strict=True):
        b_arr = np.asarray(b)
        if b_arr.size == 0 or not np.issubdtype(b_arr.dtype, np.number):
            errors.append(0.0)
            continue
        b64 = b_arr.astype(np.float64)
        scale = max(1.0, float(np.max(np.abs(b64))))
        err = float(np.max(np.abs(np.asarray(a, dtype=np.float64) - b64))) / scale
        errors.append(err)
        if not err <= TOLERANCE.get(str(b_arr.dtype), 0.0 if b_arr.dtype.kind in "iub" else 2e-3):
            ok = False
    return errors, ok


def input_tree_shardings(workload: Workload, prop: Propagation, mesh: jax.sharding.Mesh) -> tuple[Any, ...]:
    """NamedShardings for each positional argument, as pytrees shaped like the arguments."""
    flat = [named(mesh, prop.shardings[i]) for i in prop.graph.inputs]
    return jax.tree.unflatten(jax.tree.structure(workload.args), flat)

"""Check plans against XLA: propagate each, compile it (and run it where it is small), tabulate."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Sequence

import jax

from ir.graph import Graph, Role
from ir.plan import Plan, Provenance, tool_version
from ir.propagate import propagate_plan
from ir.sharding import MeshShape, ShardingError
from ir.trace import trace
from ir.workload import Workload
from runners.execute import Verification, reference_outputs, verify
from runners.program import Mode
from search.baselines import STRATEGIES, baseline_plans


class MeshMismatchError(ValueError):
    """The mesh does not match the devices available."""


@dataclasses.dataclass(frozen=True, slots=True)
class PlanCheck:
    """One plan checked in one mode.

    Attributes:
      name: the strategy or plan name.
      plan: the plan.
      verification: what XLA compiled and, when executed, the numerics and time.
      fits: compiled per-device bytes (argument + output + temp - alias) within `memory_limit`.
      device_bytes: that compiled per-device total.
    """

    name: str
    plan: Plan
    verification: Verification
    fits: bool
    device_bytes: int


def check_mesh(mesh: MeshShape, devices: Sequence[jax.Device] | None = None) -> None:
    """Raises MeshMismatchError when the mesh size differs from the number of devices."""
    n = len(devices if devices is not None else jax.devices())
    if mesh.size != n:
        raise MeshMismatchError(
            f"mesh {mesh} needs {mesh.size} devices but {n} are available; use a mesh whose axis sizes "
            f"multiply to {n}, or on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={mesh.size} "
            "before JAX starts."
        )


def device_bytes(v: Verification) -> int:
    m = v.memory
    return m["argument"] + m["output"] + m["temp"] - m["alias"]


def provenance_for(workload: Workload, graph: Graph, **fields) -> Provenance:
    """Provenance naming the tool version, the model fingerprint and how to rebuild the workload."""
    return Provenance(
        tool_version=tool_version(),
        fingerprint=workload.fingerprint(),
        workload=workload.source,
        unruled_primitives=graph.unruled,
        **fields,
    )


def check_plans(
    workload: Workload,
    plans: Iterable[tuple[str, Plan]],
    *,
    modes: Sequence[Mode] = (Mode.CONSTRAINED, Mode.PORTABLE),
    execute: bool = True,
    memory_limit: int | None = None,
    graph: Graph | None = None,
    repeats: int = 3,
) -> list[PlanCheck]:
    """Verifies each named plan in each mode. `execute=False` compiles only (any model size)."""
    graph = graph or trace(workload)
    reference = reference_outputs(workload) if execute and workload.init is not None else None
    out = []
    for name, plan in plans:
        prop = propagate_plan(graph, plan)
        for mode in modes:
            v = verify(workload, prop, mode, execute=execute, repeats=repeats, reference=reference)
            total = device_bytes(v)
            fits = memory_limit is None or total <= memory_limit
            out.append(PlanCheck(name, plan, v, fits, total))
    return out


def check_baselines(
    workload: Workload,
    mesh: MeshShape,
    *,
    tp_rules: Sequence[tuple[str, int]] | None = None,
    strategies: Sequence[str] | None = None,
    **kwargs,
) -> list[PlanCheck]:
    """Checks every applicable expert strategy (or those named) for the workload on the mesh."""
    check_mesh(mesh)
    for name in strategies or ():
        if name not in STRATEGIES:
            close = difflib.get_close_matches(name, list(STRATEGIES), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ShardingError(
                f"unknown strategy {name!r}{hint}; the strategies are {', '.join(STRATEGIES)}."
            )
    graph = trace(workload)
    plans = baseline_plans(graph, mesh, tp_rules=tp_rules, provenance=provenance_for(workload, graph))
    if not plans:
        batch = sorted({v.shape[0] for v in graph.input_values() if v.role is Role.BATCH and v.rank})
        raise ShardingError(
            f"no strategy applies to {workload.source or 'this model'} on mesh {mesh}: each needs its mesh "
            f"axes to divide the dims it shards (batch dim 0 is {', '.join(map(str, batch)) or 'absent'}); "
            "use smaller mesh axes."
        )
    if strategies is not None:
        unknown = [name for name in strategies if name not in plans]
        if unknown:
            raise ShardingError(
                f"strategies {unknown} do not apply to this model and mesh; applicable: {sorted(plans)}."
            )
        plans = {k: v for k, v in plans.items() if k in strategies}
    return check_plans(workload, plans.items(), graph=graph, **kwargs)

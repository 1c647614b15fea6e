"""simulate(): the predicted step time, communication and per-device memory of a plan.

Step time = compute + exposed communication. Compute is the sum of per-op roofline times
(cost_model.compute). Each collective costs its alpha-beta time on the links of its mesh axes
(cost_model.collectives). Overlap is an explicit assumption, `Overlap`:
- collectives made in the backward pass (JAX name stack 'transpose(...)': gradient reductions and
  the re-gathering of sharded weights) and parameter all-gathers of the forward pass (FSDP
  prefetch) may hide behind the backward and forward compute respectively, up to that compute;
- every other collective (activation all-reduces of tensor parallelism, reshards on the critical
  path) is exposed.
`Overlap.NONE` exposes everything: a pessimistic bound.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping

from cost_model.collectives import collective_time
from cost_model.compute import OpCost, op_costs, roofline_time
from cost_model.hardware import Hardware, HardwareError
from cost_model.memory import MemoryReport, compiler_for, memory
from cost_model.meshes import MeshTopology, topology
from ir.comm import Collective, CollectiveKind
from ir.graph import Graph, Role
from ir.propagate import Propagation, propagate_plan


class Overlap(enum.Enum):
    """Which communication may hide behind compute."""

    NONE = "none"
    BACKWARD_AND_PREFETCH = "backward_and_prefetch"


@dataclasses.dataclass(frozen=True, slots=True)
class OpRow:
    """One op's predicted cost per step on one device."""

    name: str
    primitive: str
    flops: float
    bytes: float
    seconds: float


@dataclasses.dataclass(frozen=True, slots=True)
class CostReport:
    """What a plan costs.

    Attributes:
      step_time: predicted seconds per step (compute + exposed communication).
      compute_time: seconds of per-op roofline time.
      comm_time: seconds of all collectives, overlapped or not.
      exposed_comm_time: communication seconds not hidden behind compute.
      flops: per-device FLOPs per step.
      memory: per-device memory breakdown.
      capacity: device memory in bytes.
      fits: memory.peak <= capacity.
      collectives: (kind, axes) -> (bytes per step, seconds per step).
      ops: the costliest ops, most expensive first.
    """

    step_time: float
    compute_time: float
    comm_time: float
    exposed_comm_time: float
    flops: float
    memory: MemoryReport
    capacity: int
    fits: bool
    collectives: Mapping[tuple[CollectiveKind, tuple[str, ...]], tuple[int, float]]
    ops: tuple[OpRow, ...]


def simulate(
    graph: Graph,
    plan,
    hardware: Hardware,
    *,
    nodes: int | None = None,
    overlap: Overlap = Overlap.BACKWARD_AND_PREFETCH,
    top_ops: int = 10,
    prop: Propagation | None = None,
) -> CostReport:
    """Predicts the cost of `plan` for `graph` on `hardware` (the mesh is the plan's).

    Args:
      graph: the traced step.
      plan: a Plan (anything with `mesh`, `input_shardings`, `activation_sharding`).
      hardware: device and link specs.
      nodes: nodes the mesh spans (default: as few as hold it).
      overlap: which communication may hide behind compute.
      top_ops: how many of the costliest ops to report.
      prop: a propagation of `plan` already computed (skips propagating again).
    """
    prop = prop or propagate_plan(graph, plan)
    topo = topology(hardware, plan.mesh, nodes)
    return _report(prop, hardware, topo, overlap, top_ops)


_FLOAT_KEYS = frozenset(("float64", "float32", "bfloat16", "float16"))


def simulate_propagation(
    prop: Propagation,
    hardware: Hardware,
    topo: MeshTopology,
    *,
    overlap: Overlap = Overlap.BACKWARD_AND_PREFETCH,
    top_ops: int = 10,
) -> CostReport:
    """The CostReport of a propagation already made (searchers reuse one topology)."""
    return _report(prop, hardware, topo, overlap, top_ops)


def _dtype_key(graph: Graph, op_cost: OpCost, op) -> str:
    """The device rate an op runs at: its operand dtype; float32 matmuls at the default (TF32)
    precision of GPUs; integer and boolean arithmetic at the float32 vector rate."""
    dtype = graph.values[op.inputs[0]].dtype if op.inputs else "float32"
    if dtype not in _FLOAT_KEYS and not dtype.startswith("float8"):
        return "float32"
    return (
        "tf32"
        if dtype == "float32" and op_cost.primitive in ("dot_general", "conv_general_dilated")
        else dtype
    )


def _report(
    prop: Propagation, hw: Hardware, topo: MeshTopology, overlap: Overlap, top_ops: int
) -> CostReport:
    dev = hw.device
    rows: list[OpRow] = []
    fwd = bwd = other = 0.0
    flops = 0.0
    for graph, cost, op in _walk_costs(prop):
        peak = _peak_flops(dev, _dtype_key(graph, cost, op), cost.primitive) if cost.flops else 1.0
        t = roofline_time(cost.flops, cost.bytes, peak, dev.memory_bandwidth) * cost.count
        flops += cost.flops * cost.count
        name = graph.values[op.outputs[0]].name if op.outputs else op.primitive
        rows.append(OpRow(name, cost.primitive, cost.flops * cost.count, cost.bytes * cost.count, t))
        if "transpose(" in op.scope:
            bwd += t
        elif "jvp(" in op.scope:
            fwd += t
        else:
            other += t
    compute = fwd + bwd + other
    by_key: dict[tuple[CollectiveKind, tuple[str, ...]], tuple[int, float]] = {}
    hideable_fwd = hideable_bwd = exposed = 0.0
    names = _value_roles(prop)
    for c in prop.collectives:
        t = collective_time(c, topo)
        b, s = by_key.get((c.kind, c.axes), (0, 0.0))
        by_key[(c.kind, c.axes)] = (b + c.total_bytes, s + t)
        where = _phase(c, names)
        if overlap is Overlap.NONE or where == "exposed":
            exposed += t
        elif where == "backward":
            hideable_bwd += t
        else:
            hideable_fwd += t
    exposed += max(0.0, hideable_bwd - bwd) + max(0.0, hideable_fwd - fwd)
    comm = sum(s for _, s in by_key.values())
    mem = memory(prop, compiler=compiler_for(hw.name))
    rows.sort(key=lambda r: -r.seconds)
    return CostReport(
        step_time=compute + exposed,
        compute_time=compute,
        comm_time=comm,
        exposed_comm_time=exposed,
        flops=flops,
        memory=mem,
        capacity=dev.hbm_capacity,
        fits=mem.peak <= dev.hbm_capacity,
        collectives=by_key,
        ops=tuple(rows[:top_ops]),
    )


def _peak_flops(dev, key: str, primitive: str) -> float:
    """The device's rate for `key`; a rate the preset lacks (tf32 on a CPU) falls back to float32."""
    rate = dev.matmul_flops if primitive in ("dot_general", "conv_general_dilated") else dev.flops
    try:
        return rate(key)
    except HardwareError:
        return rate("float32")


def _walk_costs(prop: Propagation, mult: int = 1):
    """(graph, cost, op) for every ruled op, bodies included, counts multiplied by trip counts."""
    g = prop.graph
    costs = {c.op: c for c in op_costs(prop, mult, recurse=False)}
    for op in g.ops:
        if op.rule is None:
            for sub in prop.bodies.get(op.id, ()):
                yield from _walk_costs(sub, mult * (op.trip_count if op.primitive == "scan" else 1))
        elif op.id in costs:
            yield g, costs[op.id], op


def _value_roles(prop: Propagation) -> dict[str, Role]:
    roles: dict[str, Role] = {}
    stack = [prop]
    while stack:
        p = stack.pop()
        for v in p.graph.values:
            roles.setdefault(v.name, v.role)
        for subs in p.bodies.values():
            stack.extend(subs)
    return roles


def _phase(c: Collective, roles: Mapping[str, Role]) -> str:
    """'backward', 'forward' (parameter prefetch) or 'exposed' for one collective."""
    if "transpose(" in c.value:
        return "backward"
    if c.kind is CollectiveKind.ALL_GATHER and roles.get(c.value) in (Role.PARAM, Role.OPT_STATE):
        return "forward"
    return "exposed"

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
import functools
import operator
from collections.abc import Mapping

from cost_model.collectives import collective_time
from cost_model.compute import CostShapes, OpCost, fused_values, roofline_time
from cost_model.hardware import DeviceSpec, Hardware, HardwareError
from cost_model.memory import MemoryReport, TimelineCache, compiler_for, memory, memory_peak
from cost_model.meshes import MeshTopology, topology
from ir.comm import Collective, CollectiveKind
from ir.graph import Graph, Op, Role
from ir.propagate import Propagation, propagate_plan
from ir.spans import Part, span_bounds

_FIRST, _SECOND = operator.itemgetter(0), operator.itemgetter(1)


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
    return Simulator(hardware, topo, overlap).report(prop, top_ops)


_FLOAT_KEYS = frozenset(("float64", "float32", "bfloat16", "float16"))


def simulate_propagation(
    prop: Propagation,
    hardware: Hardware,
    topo: MeshTopology,
    *,
    overlap: Overlap = Overlap.BACKWARD_AND_PREFETCH,
    top_ops: int = 10,
) -> CostReport:
    """The CostReport of a propagation already made."""
    return Simulator(hardware, topo, overlap).report(prop, top_ops)


def _dtype_key(graph: Graph, primitive: str, op) -> str:
    """The device rate an op runs at: its operand dtype; float32 matmuls at the default (TF32)
    precision of GPUs; integer and boolean arithmetic at the float32 vector rate."""
    dtype = graph.values[op.inputs[0]].dtype if op.inputs else "float32"
    if dtype not in _FLOAT_KEYS and not dtype.startswith("float8"):
        return "float32"
    return "tf32" if dtype == "float32" and primitive in ("dot_general", "conv_general_dilated") else dtype


@dataclasses.dataclass(frozen=True, slots=True)
class _Compute:
    """Roofline seconds of one graph execution (bodies included) by phase, and its FLOPs."""

    forward: float
    backward: float
    other: float
    flops: float


class Simulator:
    """`simulate_propagation` for many propagations of one graph: per-op costs are cached by the
    op's factor assignment, collective times by collective, and a loop body's compute and memory
    peak by the body propagation (a `PropagationCache` returns a body it has seen as the same
    object). A searcher keeps one Simulator per problem; `simulate` makes a fresh one.

    Args:
      hardware: device and link specs.
      topo: the mesh on the hardware's links.
      overlap: which communication may hide behind compute.
    """

    def __init__(
        self, hardware: Hardware, topo: MeshTopology, overlap: Overlap = Overlap.BACKWARD_AND_PREFETCH
    ):
        self.hw = hardware
        self.topo = topo
        self.overlap = overlap
        self.compiler = compiler_for(hardware.name)
        self._op_seconds: dict[tuple[Graph, int, tuple], tuple[OpCost, float, int]] = {}
        self._op_decided: dict[int, tuple] = {}  # id(OpSharding) -> (it, graph, kind, _op's)
        self._bodies: dict[int, tuple[Propagation, _Compute]] = {}
        # id(Part), or (id(Part), class of cost) for parts renamed from it -> (it, costs)
        self._parts: dict[int | tuple[int, int], tuple[Part, tuple]] = {}
        # A collective -> ((it, seconds, phase),)
        self._coll: dict[Collective, tuple[tuple[Collective, float, str]]] = {}
        self._coll_time: dict[tuple, float] = {}
        self.timelines = TimelineCache()

    def cache_entries(self) -> int:
        """How many entries this simulator's caches hold (to bound a long search's memory)."""
        t = self.timelines
        return (
            len(self._op_seconds)
            + len(self._op_decided)
            + len(self._bodies)
            + len(self._parts)
            + len(self._coll)
            + len(self._coll_time)
            + len(t.body_peaks)
            + len(t.resolutions)
            + len(t.resolution_colls)
            + len(t.resolutions_alike)
            + len(t.shape_sizes)
            + t.size_entries
            + len(t.moves)
            + len(t.slices)
            + len(t.loop_slices)
            + len(t.combined)
            + len(t.schedules)
            + len(t.scheduled)
            + len(t.fusion)
            + len(t.sources)
            + len(t.steps)
            + len(t.steps_by_fusion)
            + len(t.resharded)
            + len(t.runs)
        )

    def report(self, prop: Propagation, top_ops: int = 10) -> CostReport:
        """The full CostReport (per-op rows for the `top_ops` costliest ops)."""
        return self._report(prop, top_ops)

    def step_time_and_peak(self, prop: Propagation) -> tuple[float, int]:
        """(step seconds, per-device peak bytes): what a searcher compares, without the report."""
        compute = self._compute(prop, 1, None)
        exposed = self._comm(prop, compute, detail=False)[0]
        peak = memory_peak(prop, compiler=self.compiler, cache=self.timelines)
        return compute.forward + compute.backward + compute.other + exposed, peak

    # -- parts -------------------------------------------------------------------------------------

    def _op(self, g: Graph, op, factors) -> tuple[OpCost, float, int]:
        """(cost of one execution, roofline seconds, phase: 0 forward, 1 backward, 2 other).

        Ops of one kind (`Graph.op_kinds`) whose operands and results are alike fused cost alike:
        one entry serves them all (the OpCost names the first op of the kind costed)."""
        fused, kinds = g.derived("simulate.cost_kinds", _cost_kinds)
        key = (g, kinds[op.id], factors)  # the key keeps the graph alive
        hit = self._op_seconds.get(key)
        if hit is None:
            shapes = g.derived("simulate.cost_shapes", lambda g: CostShapes(g, fused))
            cost = shapes.cost(op, factors, self.topo.mesh)
            dev = self.hw.device
            peak = device_rate(dev, g, op, cost.primitive) if cost.flops else 1.0
            t = roofline_time(cost.flops, cost.bytes, peak, dev.memory_bandwidth)
            phase = 1 if "transpose(" in op.scope else 0 if "jvp(" in op.scope else 2
            hit = self._op_seconds[key] = (cost, t, phase)
        return hit

    def _compute(self, prop: Propagation, mult: int, rows: list | None) -> _Compute:
        """Compute of one execution of `prop` (bodies included); `rows`, when given, collects
        (graph, op, cost, seconds per step, executions per step) with `prop` run `mult` times.

        Sums run span by span (ir.propagate's spans, whether or not `prop` was made of cached
        Parts), so a plan costs the same to the last bit however it was propagated."""
        if rows is None:
            hit = self._bodies.get(id(prop))
            if hit is not None and hit[0] is prop:
                return hit[1]
        acc = [0.0, 0.0, 0.0, 0.0]  # forward, backward, other seconds; FLOPs
        if prop.parts and rows is None:
            parts = self._parts
            hits = list(map(parts.get, map(id, prop.parts)))  # at C speed: nearly all are known
            if None in hits or not all(map(operator.is_, map(_FIRST, hits), prop.parts)):
                alike = prop.graph.derived("simulate.span_costs", _span_costs)
                for k, part in enumerate(prop.parts):
                    hit = hits[k]
                    if hit is not None and hit[0] is part:
                        continue
                    # A part renamed from another span's costs what that one does where their
                    # ops cost alike and are alike live (the layers of an unrolled model); else
                    # what the first part renamed from the same span into its class of cost does
                    # (the layers after the first, whose first span reads another layer's values).
                    src = part.origin
                    if src is None:
                        src, key = part, id(part)
                    elif alike[src.span.index] == alike[part.span.index]:
                        key = id(src)
                    else:
                        key = (id(src), alike[part.span.index])
                    hit = parts.get(key)
                    if hit is None or hit[0] is not src:
                        hit = parts[key] = (
                            src,
                            self._span(prop, part.span.start, part.span.stop, 1, None, part),
                        )
                    hits[k] = parts[id(part)] = (part, hit[1])
            # Summed in program order, one after another, as the loop below sums spans.
            acc = [
                functools.reduce(operator.add, column, 0.0)
                for column in zip(*map(_SECOND, hits), strict=True)
            ]
        else:
            for a, b in prop.graph.derived("spans.bounds", span_bounds):
                c = self._span(prop, a, b, mult, rows, None)
                for k in range(4):
                    acc[k] += c[k]
        out = _Compute(*acc)
        if rows is None:
            self._bodies[id(prop)] = (prop, out)
        return out

    def _span(self, prop: Propagation, start: int, stop: int, mult: int, rows: list | None, part) -> tuple:
        """(forward, backward, other seconds, FLOPs) of ops [start, stop) of `prop`."""
        g = prop.graph
        acc = [0.0, 0.0, 0.0]
        flops = 0.0
        live = g.live_ops
        bodies = prop.bodies if part is None else dict(part.bodies)
        decided = prop.ops if part is None else part.ops
        at = 0 if part is None else start
        kinds = g.derived("simulate.cost_kinds", _cost_kinds)[1]
        by_decision = self._op_decided
        for op in g.ops[start:stop]:
            if op.id not in live:
                continue
            if op.rule is None:
                n = op.trip_count if op.primitive == "scan" else 1
                for sub in bodies.get(op.id, ()):
                    c = self._compute(sub, mult * n, rows)
                    acc[0] += c.forward * n
                    acc[1] += c.backward * n
                    acc[2] += c.other * n
                    flops += c.flops * n
                continue
            # Decisions are shared objects, one per (graph, op kind, operands) a PropagationCache
            # decided: their costs are found by identity first (hashing factors costs more).
            d = decided[op.id - at]
            hit = by_decision.get(id(d))
            if hit is None or hit[0] is not d or hit[1] is not g or hit[2] != kinds[op.id]:
                hit = by_decision[id(d)] = (d, g, kinds[op.id], self._op(g, op, d.factors))
            cost, t, phase = hit[3]
            acc[phase] += t
            flops += cost.flops
            if rows is not None:
                rows.append((g, op, cost, t * mult, mult))
        return (acc[0], acc[1], acc[2], flops)

    def _comm(self, prop: Propagation, compute: _Compute, detail: bool = True):
        """(exposed seconds, total seconds, (kind, axes) -> (bytes, seconds)); without `detail`
        only the exposed seconds (the others 0.0 and {})."""
        roles = prop.graph.derived("simulate.value_roles", _value_roles)
        by_key: dict[tuple[CollectiveKind, tuple[str, ...]], tuple[int, float]] = {}
        hideable_fwd = hideable_bwd = exposed = 0.0
        none = self.overlap is Overlap.NONE
        coll = self._coll
        for m in prop.moves:  # (see Propagation.moves)
            if m.__class__ is Collective:
                timed = coll.get(m)
                if timed is None:
                    timed = coll[m] = ((m, *self._timed(m, m.value, roles)),)
            else:  # a renamed part's collectives (or some of them), for the values it names
                if m.__class__ is Part:
                    colls, names = m.collectives, m.names
                else:
                    part, a, b = m
                    colls, names = part.collectives[a:b], part.names[a:b]
                timed = []
                for c, n in zip(colls, names, strict=True):
                    # Timed as the recorded part's collective (one size, one time); the value
                    # it moves here decides its phase.
                    hit = coll.get(c)
                    if hit is None:
                        hit = coll[c] = ((c, *self._timed(c, c.value, roles)),)
                    timed.append((c, hit[0][1], _phase(c.kind, n, roles)))
            for c, t, where in timed:
                if detail:
                    b, sec = by_key.get((c.kind, c.axes), (0, 0.0))
                    by_key[(c.kind, c.axes)] = (b + c.total_bytes, sec + t)
                if none or where == "exposed":
                    exposed += t
                elif where == "backward":
                    hideable_bwd += t
                else:
                    hideable_fwd += t
        exposed += max(0.0, hideable_bwd - compute.backward) + max(0.0, hideable_fwd - compute.forward)
        return exposed, sum(sec for _, sec in by_key.values()), by_key

    def _timed(self, c: Collective, value: str, roles: Mapping[str, Role]) -> tuple[float, str]:
        """(seconds, phase) of collective `c` moving the value named `value`. Collectives of
        different values but one size cost alike (an unrolled model's layers): timed once."""
        shape = (c.kind, c.axes, c.bytes, c.count)
        t = self._coll_time.get(shape)
        if t is None:
            t = self._coll_time[shape] = collective_time(c, self.topo)
        return t, _phase(c.kind, value, roles)

    def _report(self, prop: Propagation, top_ops: int) -> CostReport:
        rows: list = []
        compute = self._compute(prop, 1, rows)
        exposed, comm, by_key = self._comm(prop, compute)
        mem = memory(prop, compiler=self.compiler, cache=self.timelines)
        rows.sort(key=lambda r: -r[3])
        op_rows = tuple(
            OpRow(
                g.values[op.outputs[0]].name if op.outputs else op.primitive,
                cost.primitive,
                cost.flops * n,
                cost.bytes * n,
                t,
            )
            for g, op, cost, t, n in rows[:top_ops]
        )
        dev = self.hw.device
        total = compute.forward + compute.backward + compute.other
        return CostReport(
            step_time=total + exposed,
            compute_time=total,
            comm_time=comm,
            exposed_comm_time=exposed,
            flops=compute.flops,
            memory=mem,
            capacity=dev.hbm_capacity,
            fits=mem.peak <= dev.hbm_capacity,
            collectives=by_key,
            ops=op_rows,
        )


def _span_costs(g: Graph) -> tuple[int, ...]:
    """Per span (`ir.spans`), a class: spans whose ops cost alike in order (`_cost_kinds`) and
    are alike live cost alike under alike decisions."""
    kinds = g.derived("simulate.cost_kinds", _cost_kinds)[1]
    live = g.live_ops
    classes: dict[tuple, int] = {}
    return tuple(
        classes.setdefault((tuple(kinds[a:b]), tuple(n in live for n in range(a, b))), len(classes))
        for a, b in span_bounds(g)
    )


def _cost_kinds(g: Graph) -> tuple[frozenset[int], tuple[int, ...]]:
    """(the graph's fused values, per op a kind: ops of one `Graph.op_kinds` kind whose operands
    and results are alike fused cost alike)."""
    fused = fused_values(g)
    kinds: dict[tuple, int] = {}
    return fused, tuple(
        kinds.setdefault(
            (k, tuple(v in fused for v in op.inputs), tuple(v in fused for v in op.outputs)), len(kinds)
        )
        for k, op in zip(g.op_kinds, g.ops, strict=True)
    )


def device_rate(device: DeviceSpec, graph: Graph, op: Op, primitive: str) -> float:
    """The FLOP/s `device` runs `op` of `graph` at, as the simulator prices it.

    Args:
      device: the device (its `flops` and `matmul_flops` rates by dtype).
      graph: the graph holding `op` (its operand dtype picks the rate).
      op: the op.
      primitive: the op's primitive (matmuls and convolutions run at the matmul rate).
    """
    return _peak_flops(device, _dtype_key(graph, primitive, op), primitive)


def _peak_flops(dev, key: str, primitive: str) -> float:
    """The device's rate for `key`; a rate the preset lacks (tf32 on a CPU) falls back to float32."""
    rate = dev.matmul_flops if primitive in ("dot_general", "conv_general_dilated") else dev.flops
    try:
        return rate(key)
    except HardwareError:
        return rate("float32")


def _value_roles(graph: Graph) -> dict[str, Role]:
    """Value name -> role, over the graph and its loop bodies and branches (the first of a name)."""
    roles: dict[str, Role] = {}
    stack = [graph]
    while stack:
        g = stack.pop()
        for v in g.values:
            roles.setdefault(v.name, v.role)
        for op in g.ops:
            stack.extend(op.body)
    return roles


def _phase(kind: CollectiveKind, value: str, roles: Mapping[str, Role]) -> str:
    """'backward', 'forward' (parameter prefetch) or 'exposed' for a collective of `kind` moving
    the value named `value`."""
    if "transpose(" in value:
        return "backward"
    if kind is CollectiveKind.ALL_GATHER and roles.get(value) in (Role.PARAM, Role.OPT_STATE):
        return "forward"
    return "exposed"

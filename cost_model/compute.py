"""FLOPs and memory traffic of each op's local shard, per primitive; roofline time.

Counting follows XLA's HloCostAnalysis, so predictions compare with `Compiled.cost_analysis()`:
a dot or convolution costs 2 FLOPs per multiply-accumulate; an elementwise arithmetic op one
FLOP per output element; a transcendental (exp, tanh, sqrt, ...) none, counted apart; a
reduction one per input element it folds away (input minus output elements); an all-reduce one
per element it returns; data movement (reshape, transpose, broadcast, slice, gather, ...) none.
Local sizes come from the op's factor rule and the mesh axes propagation gave each factor, so
nothing here is written per sharding.

These are the FLOPs of the traced program as written. What XLA:CPU's simplifier, CSE, lowering
and fusion change about them (the figure `cost_analysis()` reports) is cost_model.xla_accounting.

Memory traffic: a value produced by an elementwise op and read only by elementwise ops (or by a
reduction) never touches memory; traffic is counted where a fusion reads an operand or writes a
result that leaves it (DESIGN: "bytes counted at fusion boundaries").
"""

from __future__ import annotations

import dataclasses
import math
import operator

from ir.graph import Graph, Op
from ir.propagate import Propagation
from ir.rules import ELEMENTWISE
from ir.sharding import MeshShape

TRANSCENDENTAL = frozenset(
    "exp exp2 expm1 log log1p tanh logistic sin cos tan asin acos atan atan2 sinh cosh asinh acosh atanh "
    "sqrt rsqrt cbrt erf erfc erf_inv lgamma digamma pow".split()
)
# Elementwise primitives XLA treats as free: no arithmetic, or removed before codegen.
NO_FLOPS = frozenset(
    "name copy copy_p stop_gradient optimization_barrier sharding_constraint mesh_cast reshard "
    "reduce_precision bitcast_convert_type real imag conj".split()
)
CONTRACTIONS = frozenset(("dot_general", "conv_general_dilated"))
REDUCTIONS = frozenset(
    ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or", "reduce_xor")
)
CUMULATIVE = frozenset(("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"))
FUSIBLE = frozenset(ELEMENTWISE) | {"broadcast_in_dim", "convert_element_type", "iota", "reshape", "squeeze"}


@dataclasses.dataclass(frozen=True, slots=True)
class OpCost:
    """The cost of one op on one device, per execution.

    Attributes:
      op: op id in its graph.
      primitive: the primitive.
      flops: floating-point operations of the op's local shard (`op_flops`).
      transcendentals: transcendental evaluations, likewise.
      bytes: memory traffic at fusion boundaries (operands read, results written).
      count: executions per step (scan trip counts).
    """

    op: int
    primitive: str
    flops: float
    transcendentals: float
    bytes: float
    count: int = 1


def local_sizes(op: Op, factors: tuple[tuple[str, ...], ...], mesh: MeshShape) -> tuple[int, ...]:
    """The size of each of the op's factors on one device."""
    of = mesh.axes_size
    return tuple(
        [size // of(axes) if axes else size for size, axes in zip(op.rule.sizes, factors, strict=True)]
    )


def _elements(dims, sizes) -> int:
    return math.prod([sizes[f] for fs in dims for f in fs])


def op_flops(op: Op, sizes: tuple[int, ...]) -> tuple[float, float]:
    """(flops, transcendentals) of one execution of `op` as traced, with local factor `sizes`."""
    rule = op.rule
    prim = op.primitive
    if prim == "dot_general":
        return 2.0 * math.prod(sizes), 0.0
    if prim == "conv_general_dilated":
        # Output elements x (input features x kernel window): the operand-only factors of the kernel.
        out = _elements(rule.results[0], sizes)
        out_factors = {f for fs in rule.results[0] for f in fs}
        window = math.prod(sizes[f] for fs in rule.operands[1] for f in fs if f not in out_factors)
        return 2.0 * out * window, 0.0
    if prim in REDUCTIONS:
        return float(_elements(rule.operands[0], sizes) - _elements(rule.results[0], sizes)), 0.0
    if prim == "integer_pow":
        return float(_elements(rule.results[0], sizes)) * _pow_multiplies(op.params["y"]), 0.0
    if prim == "select_n" or prim in ELEMENTWISE:
        n = float(_elements(rule.results[0], sizes))
        if prim in NO_FLOPS:
            return 0.0, 0.0
        if prim in TRANSCENDENTAL:
            return 0.0, n
        return n, 0.0
    if prim in CUMULATIVE:
        return float(_elements(rule.results[0], sizes)), 0.0
    return 0.0, 0.0


def _pow_multiplies(y: int) -> int:
    """Multiplies (and one divide for y < 0) of x**y by repeated squaring, as JAX lowers it."""
    if y == 0:
        return 0
    n = abs(int(y))
    muls = (n.bit_length() - 1) + (bin(n).count("1") - 1)
    return muls + (1 if y < 0 else 0)


def cumulative_flops(n: int, rows: int) -> float:
    """FLOPs of a cumulative sum over `n` elements in each of `rows` rows on XLA:CPU.

    JAX lowers it to a reduce-window of window n, and XLA:CPU rewrites windows over 16 into a
    two-level scan: an inclusive scan in each block of 16, a scan of the block totals, and one
    add per element to combine them.
    """
    if n <= 16:
        return float((n - 1) * n * rows)
    blocks = -(-n // 16)
    return float((15 * 16 * blocks + (blocks - 1) * (blocks + 1) + 16 * blocks) * rows)


def op_costs(
    prop: Propagation, mult: int = 1, *, recurse: bool = True, fused: frozenset[int] | None = None
) -> list[OpCost]:
    """Cost rows of every op of a propagated graph, and of its bodies when `recurse` (per device).

    FLOPs are what each op's local shard executes once (`op_flops`); what XLA's fusion copies or
    its simplifier removes is accounted by `cost_model.xla_accounting.xla_flops`, which the
    fidelity benchmark compares.

    Args:
      prop: the propagated graph.
      mult: executions of this graph per step (the enclosing scans' trip counts).
      recurse: also the rows of scan bodies and cond branches.
      fused: `fused_values(prop.graph)`, when the caller has it.
    """
    g: Graph = prop.graph
    fused = fused_values(g) if fused is None else fused
    out: list[OpCost] = []
    for op in g.ops:
        if op.id not in g.live_ops:
            continue
        if op.rule is None:
            if recurse:
                for sub in prop.bodies.get(op.id, ()):
                    out.extend(op_costs(sub, mult * (op.trip_count if op.primitive == "scan" else 1)))
            continue
        c = op_cost(g, op, prop.ops[op.id].factors, prop.mesh, fused)
        out.append(dataclasses.replace(c, count=mult) if mult != 1 else c)
    return out


def op_cost(
    g: Graph, op: Op, factors: tuple[tuple[str, ...], ...], mesh: MeshShape, fused: frozenset[int]
) -> OpCost:
    """One execution of `op` on one device with its factors sharded as `factors`: the local
    shard's FLOPs, and bytes read and written at fusion boundaries (values in `fused` stay in
    registers)."""
    sizes = local_sizes(op, factors, mesh)
    flops, trans = op_flops(op, sizes)
    traffic = 0.0
    for vid, dims in zip(op.inputs, op.rule.operands, strict=True):
        if vid not in fused:
            traffic += _elements(dims, sizes) * g.values[vid].itemsize
    for vid, dims in zip(op.outputs, op.rule.results, strict=True):
        if vid not in fused:
            traffic += _elements(dims, sizes) * g.values[vid].itemsize
    return OpCost(op.id, op.primitive, flops, trans, traffic)


class CostShapes:
    """`op_cost` for the ops of one graph and fused set, with what it reads of each op that no
    plan changes (factor sizes, which factors each counted tensor spans, the FLOP formula) worked
    out once per op, the first time it is costed: a searcher costs each op kind again under
    every new decision."""

    def __init__(self, g: Graph, fused: frozenset[int]):
        self.g = g
        self.fused = fused
        self._shapes: dict[int, tuple] = {}
        self._divisors: dict[MeshShape, _Divisors] = {}

    def cost(self, op: Op, factors: tuple[tuple[str, ...], ...], mesh: MeshShape) -> OpCost:
        """`op_cost(g, op, factors, mesh, fused)`, to the last bit."""
        shape = self._shapes.get(op.id)
        if shape is None:
            shape = self._shapes[op.id] = self._shape(op)
        divisors = self._divisors.get(mesh)
        if divisors is None:
            divisors = self._divisors[mesh] = _Divisors(mesh)
        sizes, how, a, b, k, terms = shape
        local = list(map(operator.floordiv, sizes, map(divisors.__getitem__, factors)))
        get = local.__getitem__
        trans = 0.0
        if how == _DOT:
            flops = 2.0 * math.prod(local)
        elif how == _COUNT:
            flops = float(math.prod(map(get, a)))
        elif how == _POW:
            flops = float(math.prod(map(get, a))) * k
        elif how == _REDUCE:
            flops = float(math.prod(map(get, a)) - math.prod(map(get, b)))
        elif how == _TRANSCENDENTAL:
            flops, trans = 0.0, float(math.prod(map(get, a)))
        elif how == _OTHER:
            flops, trans = op_flops(op, tuple(local))
        else:
            flops = 0.0
        traffic = 0.0
        for dims, itemsize in terms:
            traffic += math.prod(map(get, dims)) * itemsize
        return OpCost(op.id, op.primitive, flops, trans, traffic)

    def _shape(self, op: Op) -> tuple:
        """(factor sizes, FLOP formula, its factors a and b, its multiplier, the (factors, itemsize)
        of each operand and result counted in the traffic, in op_cost's order)."""
        rule, prim, g = op.rule, op.primitive, self.g

        def flat(dims) -> tuple[int, ...]:
            return tuple(f for fs in dims for f in fs)

        how, a, b, k = _NONE, (), (), 1
        if prim == "dot_general":
            how = _DOT
        elif prim == "conv_general_dilated":
            how = _OTHER
        elif prim in REDUCTIONS:
            how, a, b = _REDUCE, flat(rule.operands[0]), flat(rule.results[0])
        elif prim == "integer_pow":
            how, a, k = _POW, flat(rule.results[0]), _pow_multiplies(op.params["y"])
        elif prim == "select_n" or prim in ELEMENTWISE:
            if prim not in NO_FLOPS:
                how, a = (_TRANSCENDENTAL if prim in TRANSCENDENTAL else _COUNT), flat(rule.results[0])
        elif prim in CUMULATIVE:
            how, a = _COUNT, flat(rule.results[0])
        terms = tuple(
            (flat(dims), g.values[vid].itemsize)
            for vids, tensors in ((op.inputs, rule.operands), (op.outputs, rule.results))
            for vid, dims in zip(vids, tensors, strict=True)
            if vid not in self.fused
        )
        return tuple(rule.sizes), how, a, b, k, terms


# CostShapes' FLOP formulas: none; 2 x every factor; the elements of a; a times k; a's elements
# less b's; a's elements as transcendentals; op_flops itself.
_NONE, _DOT, _COUNT, _POW, _REDUCE, _TRANSCENDENTAL, _OTHER = range(7)


class _Divisors(dict):
    """Mesh axes -> the devices they span (1 for none), worked out when first asked for."""

    def __init__(self, mesh: MeshShape):
        super().__init__()
        self.mesh = mesh

    def __missing__(self, axes: tuple[str, ...]) -> int:
        n = self[axes] = self.mesh.axes_size(axes) if axes else 1
        return n


def fused_values(g: Graph) -> frozenset[int]:
    """Values that live inside a fusion: made by a fusible op and read only by fusible ops or by
    reductions (XLA fuses elementwise producers into a reduce's input)."""
    prims = {op.id: op.primitive for op in g.ops}
    fused = set()
    outputs = set(g.outputs)
    for op in g.ops:
        if op.primitive not in FUSIBLE:
            continue
        for vid in op.outputs:
            readers = g.consumers.get(vid, ())
            if (
                vid not in outputs
                and readers
                and all(prims[r] in FUSIBLE or prims[r] in REDUCTIONS for r in readers)
            ):
                fused.add(vid)
    return frozenset(fused)


def roofline_time(flops: float, traffic: float, peak_flops: float, bandwidth: float) -> float:
    """Seconds for one op: the slower of its arithmetic and its memory traffic.

    Args:
      flops: floating-point operations.
      traffic: bytes read and written.
      peak_flops: FLOP/s of the device for the op's dtype.
      bandwidth: memory bandwidth, B/s.
    """
    return max(flops / peak_flops, traffic / bandwidth)


__all__ = [
    "CostShapes",
    "OpCost",
    "cumulative_flops",
    "local_sizes",
    "op_costs",
    "op_flops",
    "roofline_time",
]

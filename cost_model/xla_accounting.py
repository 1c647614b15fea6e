"""FLOPs of the program XLA:CPU compiles from a propagated graph, as `Compiled.cost_analysis()` counts them.

XLA does not run the traced program as written, and at small sizes the difference is large (10%
of a tiny GPT step): its simplifier and CSE remove and merge work, lowering adds masks, the CPU
backend hands large reductions to a library, and its loop fusion copies cheap elementwise
producers into every consumer fusion rather than write them to memory once, each copy counted.
So an op's FLOPs here are those of the program XLA:CPU compiles: `_Program` rebuilds that program
from the propagated graph, with each op's arithmetic from the per-primitive counting of
cost_model.compute, and `_fusion_copies` replays the fusion pass on it (after
xla/service/instruction_fusion.cc with the ShouldFuse of cpu_instruction_fusion.cc). Like
HloCostAnalysis, `xla_flops` counts a loop body once; `cost_model.compute.op_costs` rows carry
trip counts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import gc
import math
from collections.abc import Mapping, Sequence
from typing import Any

from cost_model.compute import CUMULATIVE, REDUCTIONS, TRANSCENDENTAL, cumulative_flops, op_flops
from ir.comm import CollectiveKind
from ir.graph import Graph, Op, Role, _itemsize
from ir.propagate import Propagation
from ir.reshard import reshard
from ir.rules import ELEMENTWISE, FactorKind
from ir.sharding import Sharding


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
    with _gc_paused():
        prog = _Program(prop, loop)
        copies = _fusion_copies(prog)
    out: dict[int, tuple[float, float]] = {}
    for k, n in copies.items():
        inst = prog.insts[k]
        if inst.op >= 0 and n and (inst.flops or inst.trans):
            f, t = out.get(inst.op, (0.0, 0.0))
            out[inst.op] = (f + n * inst.flops, t + n * inst.trans)
    return out


@contextlib.contextmanager
def _gc_paused():
    """Pauses the cyclic garbage collector: rebuilding a program allocates many small records and
    creates no cycles, and with a large traced graph alive the collections it triggers took a
    third of the time (an 8B-parameter Llama, unrolled)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# --- the program XLA:CPU compiles ---------------------------------------------------------------


class _Kind(enum.Enum):
    """What an instruction is to XLA's fusion pass."""

    PARAM = "param"  # an argument, a constant, a loop's result: computed elsewhere
    ELEMENTWISE = "elementwise"
    BROADCAST = "broadcast"  # always copied into its consumers
    MOVE = "move"  # bitcast, transpose, slice, pad, concatenate, iota, dynamic-slice: no arithmetic
    REDUCE = "reduce"  # a reduce the loop fusion may take
    GATHER = "gather"
    OPAQUE = "opaque"  # dot, collective, scatter, sort, reduce-window, library fusion, loop
    ROOT = "root"  # the tuple of results


_LOOP_FUSIBLE = frozenset((_Kind.ELEMENTWISE, _Kind.BROADCAST, _Kind.MOVE, _Kind.REDUCE, _Kind.GATHER))
# Elementwise primitives the fusion pass will not copy (InstructionFusion::IsExpensive); sin, cos
# and tan of reals are cheap to it, though HloCostAnalysis counts them as transcendentals.
_EXPENSIVE = (TRANSCENDENTAL - {"sin", "cos", "tan"}) | {"div", "rem"}
_IDENTITY = frozenset(
    "name copy copy_p stop_gradient optimization_barrier sharding_constraint mesh_cast reshard".split()
)
_MOVES = frozenset(
    "reshape squeeze expand_dims transpose slice rev pad concatenate dynamic_slice dynamic_update_slice "
    "iota".split()
)
# Concatenate, pad and dynamic-update-slice (and reduce) defeat the fused emitter's index cache,
# so the fusion pass copies them into one consumer at most (CodeDuplicationTooHigh).
_INDEX_REBUILDING = frozenset(("concatenate", "pad", "dynamic_update_slice"))
# The library (YNNPACK) takes a float reduce of at least this many input elements, and grows its
# fusion through neighbours of that size it supports (xla/backends/cpu/ynn_support.cc). A smaller
# reduce of more than _TREE_WINDOW elements per output becomes reduce-window + reduce
# (TreeReductionRewriter), which the loop fusion does not take as a consumer.
_LIBRARY_MIN_ELEMENTS = 4096
_TREE_WINDOW = 32
_LIBRARY_ELEMENTWISE = frozenset(
    "add add_any sub mul div max min pow square integer_pow abs ceil floor round sign neg exp expm1 log "
    "log1p rsqrt sqrt tanh erf convert_element_type".split()
)
_FLOAT = frozenset(("float32", "bfloat16", "float64"))
_SUMS = (CollectiveKind.ALL_REDUCE, CollectiveKind.REDUCE_SCATTER)


@dataclasses.dataclass(eq=False, slots=True)
class _Inst:
    """One instruction of the compiled per-device program.

    Attributes:
      kind: what it is to the fusion pass.
      operands: instruction indices.
      elements: local elements of its result.
      rank: its dims of size > 1 (XLA's "true rank").
      flops: per copy, HloCostAnalysis convention; trans likewise for transcendentals.
      expensive: the fusion pass will not copy it into a second consumer.
      op: the graph op whose work it is (-1 for none).
      name: the primitive it comes from, or the HLO op it stands for.
      literal: the scalar literal operand of an elementwise op, or the value a broadcast spreads.
      library: a reduce the library takes over (it starts a library fusion).
      duplicable: copied into every consumer even when expensive (broadcasts, widening converts).
      floating: its elements are floating point (the library takes only those).
      reduced: for a reduce, the sizes of the dims it folds.
    """

    kind: _Kind
    operands: list[int]
    elements: int
    rank: int
    flops: float = 0.0
    trans: float = 0.0
    expensive: bool = False
    op: int = -1
    name: str = ""
    literal: Any = None
    library: bool = False
    duplicable: bool = False
    floating: bool = True
    reduced: tuple[int, ...] = ()


class _Program:
    """The per-device instructions XLA:CPU compiles for one graph (or loop body), before fusion.

    Each op becomes instructions over its local shapes: operands resharded as propagation reads
    them (a local slice, or a collective), dots fed [batch, rows, cols] operands, partial sums
    all-reduced; then the simplifier's rewrites that change the arithmetic are applied, and CSE
    merges identical instructions as they are built.
    """

    def __init__(self, prop: Propagation, loop: Op | None = None):
        self.prop = prop
        self.g: Graph = prop.graph
        self.insts: list[_Inst] = []
        self.op_inst: dict[int, int] = {}  # op id -> its (main) instruction
        self._cse: dict[tuple, int] = {}
        self._value: dict[int, int] = {}  # value id -> instruction holding it as stored
        self._reads: dict[tuple, int] = {}
        self._folded: set[int] = set()  # transposes folded into the dot that feeds them
        self._sizes: dict[tuple[str, ...], int] = {}
        g = self.g
        for vid in g.inputs:
            self._value[vid] = self._add(_Kind.PARAM, [], self._shape(vid))
        if loop is not None:  # a scan body reads its xs by dynamic-slice
            nc, nk = loop.params["num_consts"], loop.params["num_carry"]
            for vid in g.inputs[nc + nk :]:
                self._value[vid] = self._add(_Kind.MOVE, [self._value[vid]], self._shape(vid))
        for op in g.ops:
            if op.id in g.live_ops:
                self._lower(op)
        outs = [self._read(vid, s) for vid, s in zip(g.outputs, prop.outputs, strict=True)]
        if loop is not None:  # and writes its ys by dynamic-update-slice
            nk = loop.params["num_carry"]
            ys = [
                self._add(_Kind.MOVE, [o], (self.insts[o].elements,), name="dynamic_update_slice")
                for o in outs[nk:]
            ]
            outs = outs[:nk] + ys
        self.root = self._add(_Kind.ROOT, outs, ())
        self._simplify()

    # -- instructions --------------------------------------------------------------------------------

    def _add(
        self, kind: _Kind, operands: Sequence[int], shape: Sequence[int], *, key: Any = None, **fields
    ) -> int:
        """Appends an instruction; with a `key`, returns an identical one instead when there is (CSE)."""
        if key is not None:
            key = (key, tuple(operands), tuple(shape))
            if key in self._cse:
                return self._cse[key]
        self.insts.append(_Inst(kind, list(operands), math.prod(shape), sum(d > 1 for d in shape), **fields))
        if key is not None:
            self._cse[key] = len(self.insts) - 1
        return len(self.insts) - 1

    def _broadcast(self, inst: int, shape: Sequence[int]) -> int:
        return self._add(_Kind.BROADCAST, [inst], shape, key="broadcast", duplicable=True)

    def _axes_size(self, axes: tuple[str, ...]) -> int:
        if axes not in self._sizes:
            self._sizes[axes] = self.prop.mesh.axes_size(axes)
        return self._sizes[axes]

    def _shape(self, vid: int, dims=None) -> tuple[int, ...]:
        """The local shape of value `vid` sharded `dims` (default: as stored)."""
        dims = self.prop.shardings[vid].dims if dims is None else dims
        return tuple(n // self._axes_size(a) for n, a in zip(self.g.values[vid].shape, dims, strict=True))

    def _read(self, vid: int, want: Sharding | None) -> int:
        """The instruction holding value `vid` as read with sharding `want` (None: as stored)."""
        inst = self._value.get(vid)
        if inst is None:  # a constant
            inst = self._value[vid] = self._add(_Kind.PARAM, [], self._shape(vid))
        have = self.prop.shardings[vid].dims
        if want is None or want.dims == have:
            return inst
        if (vid, want.dims) not in self._reads:
            self._reads[(vid, want.dims)] = self._reshard(vid, inst, have, want.dims)
        return self._reads[(vid, want.dims)]

    def _reshard(self, vid: int, inst: int, have, want) -> int:
        """Value `vid`, held by `inst` sharded `have`, resharded `want` (dims; no pending sums)."""
        shape = self._shape(vid, want)
        if any(w[: len(h)] != h for h, w in zip(have, want, strict=True)):
            return self._add(_Kind.OPAQUE, [inst], shape, name="collective")
        # Each dim only gains axes: a local slice, and a slice of a broadcast is a smaller broadcast.
        source = self.insts[inst]
        if source.kind is _Kind.BROADCAST:
            return self._add(_Kind.BROADCAST, source.operands, shape, duplicable=True, literal=source.literal)
        return self._add(_Kind.MOVE, [inst], shape, name="dynamic_slice")

    # -- lowering --------------------------------------------------------------------------------

    def _lower(self, op: Op) -> None:
        g, prop = self.g, self.prop
        prim = op.primitive
        if op.rule is None:  # scan or cond: a loop the fusion pass does not enter
            loop = self._add(
                _Kind.OPAQUE, [self._read(vid, None) for vid in op.inputs], (), name=prim, op=op.id
            )
            for vid in op.outputs:
                self._value[vid] = self._add(_Kind.PARAM, [loop], self._shape(vid))
            return
        decided = prop.ops[op.id]
        sizes = tuple(n // self._axes_size(a) for n, a in zip(op.rule.sizes, decided.factors, strict=True))
        in_shapes = [tuple(math.prod(sizes[f] for f in fs) for fs in dims) for dims in op.rule.operands]
        out_shapes = [tuple(math.prod(sizes[f] for f in fs) for fs in dims) for dims in op.rule.results]
        # Scalar literals, and broadcasts of them into elementwise ops, are constants to XLA.
        elementwise = prim in ELEMENTWISE or prim == "select_n"
        ins, literals, literal_first = [], [], False
        for k, (vid, want) in enumerate(zip(op.inputs, decided.operands, strict=True)):
            if g.values[vid].role is Role.CONST and g.values[vid].rank == 0 and vid in g.consts:
                literals.append(_scalar(g.consts[vid]))
                literal_first |= k == 0
                continue
            inst = self._read(vid, want)
            if (
                elementwise
                and self.insts[inst].kind is _Kind.BROADCAST
                and self.insts[inst].literal is not None
            ):
                literals.append(self.insts[inst].literal)
                literal_first |= k == 0
            else:
                ins.append(inst)
        if (
            prim in _IDENTITY
            or op.id in self._folded
            or _is_identity(op, g, literals, literal_first, len(ins))
        ):
            for vid in op.outputs:
                self._value[vid] = ins[0] if ins else self._add(_Kind.PARAM, [], out_shapes[0])
            return
        flops, trans = op_flops(op, sizes)
        dtype = g.values[op.outputs[0]].dtype
        fields = {"op": op.id, "name": prim, "floating": dtype in _FLOAT}
        key = (prim, _params_key(op.params), tuple(literals))
        if prim == "split":
            for j, vid in enumerate(op.outputs):
                self._value[vid] = self._add(_Kind.MOVE, ins, out_shapes[j], key=(key, j), **fields)
            return
        out_shape = out_shapes[0]
        if prim == "dot_general":
            inst = self._dot(op, ins, in_shapes, out_shape, flops, key, fields)
        elif prim in REDUCTIONS or prim in ("argmax", "argmin"):
            inst = self._reduce(op, ins, in_shapes[0], out_shape, flops, key, fields)
        elif prim == "broadcast_in_dim":
            if ins and self.insts[ins[0]].elements == math.prod(out_shape):  # adds size-1 dims: a bitcast
                inst = self._add(_Kind.MOVE, ins[:1], out_shape, key=key, **fields)
            else:
                literal = literals[0] if literals and not ins else None
                inst = self._add(
                    _Kind.BROADCAST, ins[:1], out_shape, duplicable=True, literal=literal, key=key, **fields
                )
        elif prim == "gather":
            inst = self._gather(op, ins, in_shapes, out_shape, key, fields)
        elif prim in _MOVES:
            inst = self._add(_Kind.MOVE, ins, out_shape, key=key, **fields)
        elif elementwise:
            inst = self._elementwise(op, ins, literals, literal_first, out_shape, flops, trans, key, fields)
        else:  # scatter, sort, cumulative ops, custom calls: calls the loop fusion leaves alone
            if prim.startswith("scatter"):
                flops = float(math.prod(in_shapes[2])) if "add" in prim or "mul" in prim else 0.0
                # XLA's scatter reads its updates as [index, window...]: a reshaping copy first.
                ins = [*ins[:2], *(self._add(_Kind.MOVE, [i], in_shapes[2], key="updates") for i in ins[2:3])]
            elif prim in CUMULATIVE:
                n = in_shapes[0][op.params["axis"]]
                flops = cumulative_flops(n, math.prod(in_shapes[0]) // max(n, 1))
            elif prim in ("sort", "top_k"):  # HloCostAnalysis: n log2 n per sort
                n = math.prod(in_shapes[0])
                flops = float(n * max(1, math.ceil(math.log2(max(n, 2)))))
            inst = self._add(
                _Kind.OPAQUE, ins, out_shape, flops=flops, trans=trans, expensive=True, key=key, **fields
            )
        self.op_inst[op.id] = inst
        partial = frozenset(a for f in op.rule.factors_of(FactorKind.REDUCTION) for a in decided.factors[f])
        for k, vid in enumerate(op.outputs):
            produced = tuple(tuple(a for f in fs for a in decided.factors[f]) for fs in op.rule.results[k])
            stored = prop.shardings[vid].dims
            out = inst
            if partial:
                out = self._sum(op, vid, out, produced, partial)
            if produced != stored:
                out = self._reshard(vid, out, produced, stored)
            self._value[vid] = out

    def _sum(self, op: Op, vid: int, inst: int, produced, partial: frozenset[str]) -> int:
        """The all-reduces that resolve a partial sum, as propagation resolves it (one per sharded
        reduction dim). HloCostAnalysis charges an all-reduce one add per element it returns;
        XLA:CPU runs a reduce-scatter as an all-reduce and a slice."""
        v = self.g.values[vid]
        factors = self.prop.ops[op.id].factors
        groups = tuple(factors[f] for f in reversed(op.rule.factors_of(FactorKind.REDUCTION)) if factors[f])
        collectives, _ = reshard(
            v, Sharding(produced, partial), self.prop.shardings[vid], self.prop.mesh, groups
        )
        adds = float(sum(c.bytes // v.itemsize for c in collectives if c.kind in _SUMS))
        return self._add(
            _Kind.OPAQUE, [inst], self._shape(vid, produced), name="all-reduce", op=op.id, flops=adds
        )

    def _dot(self, op: Op, ins, in_shapes, out_shape, flops, key, fields) -> int:
        (lc, rc), (lb, rb) = dimension_numbers = op.params["dimension_numbers"]
        if math.prod(in_shapes[0][d] for d in lc) == 1:  # nothing to sum: an outer product, a multiply
            ins = [self._broadcast(i, out_shape) for i in ins]
            return self._add(
                _Kind.ELEMENTWISE, ins, out_shape, flops=float(math.prod(out_shape)), key=key, **fields
            )
        readers = self.g.consumers.get(op.outputs[0], ())
        if len(readers) == 1 and self.g.ops[readers[0]].primitive == "transpose" and len(out_shape) == 2:
            # transpose(dot(a, b)) is rewritten dot(b, a)
            self._folded.add(readers[0])
            ins = self._dot_operands(ins[::-1], in_shapes[::-1], ((rc, lc), (rb, lb)))[::-1]
        else:
            ins = self._dot_operands(ins, in_shapes, dimension_numbers)
        return self._add(_Kind.OPAQUE, ins, out_shape, flops=flops, expensive=True, key=key, **fields)

    def _dot_operands(self, ins, shapes, dimension_numbers) -> list[int]:
        """XLA's dot reads [batch..., rows, cols] operands: a bitcast merges runs of free and of
        contracting dims, a transpose first regroups them when they are not in runs. A dot whose
        lhs contracts its leading dim (a weight gradient x^T g) reads its rhs as [cols, rows]."""
        (lc, rc), (lb, rb) = dimension_numbers
        runs = [_dot_runs(shapes[k], (lb, rb)[k], (lc, rc)[k]) for k in (0, 1)]
        lhs_transposed = [r for r in runs[0] if r != "b"] == ["c", "f"]
        out = []
        for k, inst in enumerate(ins):
            shape, batch, contract, labels = shapes[k], (lb, rb)[k], (lc, rc)[k], runs[k]
            dims = [d for d in range(len(shape)) if shape[d] > 1]
            group = {d: _dot_group(d, batch, contract) for d in dims}
            if (
                list(batch) != list(range(len(batch)))
                or len(labels) != len(set(labels))
                or (k == 1 and lhs_transposed and labels[-2:] == ["c", "f"])
            ):
                order = tuple(d for g in "bfc" for d in dims if group[d] == g)
                target = [
                    math.prod(shape[d] for d in dims if group[d] == g) for g in "bfc" if g in group.values()
                ]
                out.append(self._add(_Kind.MOVE, [inst], target, key=("transpose", order), name="transpose"))
            elif len(labels) < len(shape):  # merge dims, or drop size-1 dims
                target = [math.prod(shape[d] for d in dims if group[d] == g) for g in labels]
                out.append(self._add(_Kind.MOVE, [inst], target, key="bitcast", name="bitcast"))
            else:
                out.append(inst)
        return out

    def _reduce(self, op: Op, ins, in_shape, out_shape, flops, key, fields) -> int:
        reduced = tuple(in_shape[d] for d in op.params["axes"])
        inst = self._add(_Kind.REDUCE, ins, out_shape, flops=flops, expensive=True, key=key, **fields)
        if op.primitive in ("argmax", "argmin"):  # variadic: neither the library nor the tree rewrite
            return inst
        self.insts[inst].reduced = reduced
        _place_reduce(self.insts[inst], self.insts[ins[0]].elements)
        return inst

    def _gather(self, op: Op, ins, in_shapes, out_shape, key, fields) -> int:
        """A gather; in mode FILL_OR_DROP (jnp.take's default) JAX masks rows out of range: two
        compares and an `and` per index, a select per output element."""
        gather = self._add(_Kind.GATHER, ins, out_shape, expensive=True, key=key, **fields)
        if "FILL" not in str(op.params.get("mode", "")):
            return gather
        idx = in_shapes[1][:-1]
        n = float(math.prod(idx))
        mask = {"op": op.id, "flops": n, "floating": False}
        lo = self._add(_Kind.ELEMENTWISE, ins[1:2], idx, name="ge", **mask)
        hi = self._add(_Kind.ELEMENTWISE, ins[1:2], idx, name="le", **mask)
        ok = self._broadcast(self._add(_Kind.ELEMENTWISE, [lo, hi], idx, name="and", **mask), out_shape)
        return self._add(
            _Kind.ELEMENTWISE,
            [ok, gather],
            out_shape,
            flops=float(math.prod(out_shape)),
            op=op.id,
            name="select",
        )

    def _elementwise(self, op: Op, ins, literals, literal_first, out_shape, flops, trans, key, fields) -> int:
        prim = op.primitive
        n = math.prod(out_shape)
        if prim == "logistic":  # expanded to 1 / (1 + exp(-x))
            x = self._add(
                _Kind.ELEMENTWISE, ins, out_shape, flops=n, key=("neg", key), **{**fields, "name": "neg"}
            )
            x = self._add(
                _Kind.ELEMENTWISE, [x], out_shape, trans=n, expensive=True, key=("exp", key), **fields
            )
            x = self._add(
                _Kind.ELEMENTWISE, [x], out_shape, flops=n, key=("add", key), **{**fields, "name": "add"}
            )
            return self._add(
                _Kind.ELEMENTWISE,
                [x],
                out_shape,
                flops=n,
                expensive=True,
                key=key,
                **{**fields, "name": "div"},
            )
        expensive = prim in _EXPENSIVE or (prim == "integer_pow" and op.params["y"] < 0)
        name, duplicable = prim, False
        if prim == "div" and literals and not literal_first:  # x / c is rewritten x * (1/c)
            name, expensive = "mul", False
        if name == "mul":  # mul(x, convert(pred)) is rewritten select(pred, x, 0)
            ins = [self.insts[i].operands[0] if self.insts[i].name == "from_pred" else i for i in ins]
        if prim == "convert_element_type":
            src, dst = self.g.values[op.inputs[0]].dtype, self.g.values[op.outputs[0]].dtype
            duplicable = _itemsize(dst) > _itemsize(src)
            name = "from_pred" if src == "bool" else prim
        ins = [i if self.insts[i].elements >= n else self._broadcast(i, out_shape) for i in ins]
        if (
            name == "div"
            and len(ins) == 2
            and self.insts[ins[1]].kind is _Kind.BROADCAST
            and self.insts[ins[1]].operands
        ):
            # x / broadcast(b) is rewritten x * broadcast(1 / b): the divide moves to the small operand.
            b = self.insts[ins[1]].operands[0]
            recip = self._add(
                _Kind.ELEMENTWISE,
                [b],
                (self.insts[b].elements,),
                key="reciprocal",
                flops=float(self.insts[b].elements),
                expensive=True,
                op=op.id,
                name="div",
            )
            self.insts[recip].rank = self.insts[b].rank
            ins = [ins[0], self._broadcast(recip, out_shape)]
            name, expensive = "mul", False
        return self._add(
            _Kind.ELEMENTWISE,
            ins,
            out_shape,
            flops=flops,
            trans=trans,
            expensive=expensive,
            literal=literals[0] if literals else None,
            duplicable=duplicable,
            key=key,
            **{**fields, "name": name},
        )

    # -- the simplifier ------------------------------------------------------------------------------

    def users(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in self.insts]
        for k, inst in enumerate(self.insts):
            for o in dict.fromkeys(inst.operands):
                out[o].append(k)
        return out

    def _simplify(self) -> None:
        """The algebraic simplifier's rewrites that change what is computed:
        mul(mul(a, c), broadcast(b)) -> mul(a, broadcast(mul(b, c))) for a literal c (the constant
        moves onto the smaller operand); reduce_sum(neg(x)) -> neg(reduce_sum(x)); and
        reduce(reduce(x)) -> one reduce."""
        insts = self.insts
        users = self.users()
        for k in range(len(insts)):
            inst = insts[k]
            if inst.kind is _Kind.ELEMENTWISE and inst.name == "mul" and len(inst.operands) == 2:
                for x, y in (inst.operands, inst.operands[::-1]):
                    a, b = insts[x], insts[y]
                    if not (
                        a.kind is _Kind.ELEMENTWISE
                        and a.name == "mul"
                        and a.literal is not None
                        and len(a.operands) == 1
                        and users[x] == [k]
                        and b.kind is _Kind.BROADCAST
                        and b.operands
                    ):
                        continue
                    small = insts[b.operands[0]]
                    insts.append(
                        _Inst(
                            _Kind.ELEMENTWISE,
                            [b.operands[0]],
                            small.elements,
                            small.rank,
                            flops=float(small.elements),
                            op=a.op,
                            name="mul",
                        )
                    )
                    insts.append(
                        _Inst(_Kind.BROADCAST, [len(insts) - 1], b.elements, b.rank, duplicable=True)
                    )
                    users[b.operands[0]].append(len(insts) - 2)
                    users += [[len(insts) - 1], [k]]
                    _swap(users[a.operands[0]], x, k)
                    users[x], users[y] = [], [u for u in users[y] if u != k]
                    inst.operands = [a.operands[0], len(insts) - 1]
                    break
            elif inst.name == "reduce_sum" and len(inst.operands) == 1:
                n = inst.operands[0]
                neg = insts[n]
                if neg.kind is _Kind.ELEMENTWISE and neg.name == "neg" and users[n] == [k]:
                    for u in users[k]:
                        _swap(insts[u].operands, k, n)
                    _swap(users[neg.operands[0]], n, k)
                    users[n], users[k] = users[k], [n]
                    inst.operands, neg.operands = list(neg.operands), [k]
                    neg.elements, neg.rank, neg.flops = inst.elements, inst.rank, float(inst.elements)
            if (
                inst.name in REDUCTIONS
                and inst.kind in (_Kind.REDUCE, _Kind.OPAQUE)
                and len(inst.operands) == 1
            ):
                i = inst.operands[0]
                inner = insts[i]
                if inner.name == inst.name and inner.kind in (_Kind.REDUCE, _Kind.OPAQUE) and users[i] == [k]:
                    _swap(users[inner.operands[0]], i, k)
                    users[i] = []
                    inst.operands = list(inner.operands)
                    inst.reduced = inner.reduced + inst.reduced
                    _place_reduce(inst, insts[inner.operands[0]].elements)


def _place_reduce(inst: _Inst, n_in: int) -> None:
    """Where XLA:CPU runs a reduce of `n_in` input elements, and what HloCostAnalysis charges.

    The library takes a float sum, max or min of at least _LIBRARY_MIN_ELEMENTS inputs.
    Otherwise, when a reduced dim is longer than _TREE_WINDOW, TreeReductionRewriter splits it
    into a reduce-window over windows of that size (padded to whole windows, which
    HloCostAnalysis charges) and a reduce of the partial results; the loop fusion does not take a
    reduce-window as a consumer.
    """
    n_out = max(1, inst.elements)
    inst.library = n_in >= _LIBRARY_MIN_ELEMENTS and inst.name in ("reduce_sum", "reduce_max", "reduce_min")
    inst.library = inst.library and inst.floating
    inst.flops = float(n_in - n_out)
    inst.kind = _Kind.REDUCE
    if not inst.library and any(n > _TREE_WINDOW for n in inst.reduced):
        windows = [min(n, _TREE_WINDOW) for n in inst.reduced]
        partial = n_out * math.prod(-(-n // w) for n, w in zip(inst.reduced, windows, strict=True))
        inst.flops = float((math.prod(windows) - 1) * partial + partial - n_out)
        inst.kind = _Kind.OPAQUE


def _swap(items: list[int], old: int, new: int) -> None:
    items[:] = [new if x == old else x for x in items]


def _dot_group(d: int, batch, contract) -> str:
    return "b" if d in batch else "c" if d in contract else "f"


def _dot_runs(shape, batch, contract) -> list[str]:
    """A dot operand's dims as runs of batch (b), free (f) and contracting (c) dims in memory
    order, size-1 dims dropped."""
    runs: list[str] = []
    for d, n in enumerate(shape):
        g = _dot_group(d, batch, contract)
        if n > 1 and (not runs or runs[-1] != g):
            runs.append(g)
    return runs


def _scalar(value) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return repr(value)


def _params_key(params: Mapping[str, Any]) -> tuple:
    out = []
    for k, v in sorted(params.items()):
        try:
            hash(v)
            out.append((k, v))
        except TypeError:
            out.append((k, repr(v)))
    return tuple(out)


def _is_identity(op: Op, g: Graph, literals, literal_first: bool, n_ins: int) -> bool:
    """Ops the simplifier removes: same-shape layout ops and conversions, x+0, x-0, x*1, x/1, x**1,
    max(x, -inf), min(x, inf)."""
    prim = op.primitive
    shape_in = g.values[op.inputs[0]].shape if op.inputs else None
    if prim == "convert_element_type":
        return g.values[op.inputs[0]].dtype == g.values[op.outputs[0]].dtype
    if prim in ("reshape", "squeeze", "expand_dims", "broadcast_in_dim"):
        return shape_in == g.values[op.outputs[0]].shape
    if prim == "transpose":
        return tuple(op.params["permutation"]) == tuple(range(len(op.params["permutation"])))
    if prim == "integer_pow":
        return op.params["y"] == 1
    if len(literals) != 1 or n_ins != 1:
        return False
    lit = literals[0]
    return (
        (prim in ("add", "add_any") and lit == 0.0)
        or (prim == "max" and lit == -math.inf)
        or (prim == "min" and lit == math.inf)
        or (prim == "mul" and lit == 1.0)
        or (prim == "sub" and lit == 0.0 and not literal_first)
        or (prim == "div" and lit == 1.0 and not literal_first)
    )


# --- fusion ---------------------------------------------------------------------------------------


def _fusion_copies(prog: _Program) -> dict[int, int]:
    """How many times the compiled program computes each live instruction.

    First the library fusions (computed once, opaque to what follows), then XLA's loop fusion over
    the rest (see `_LoopFusion`).
    """
    insts = prog.insts
    order = _post_order(insts, prog.root)
    users: list[list[int]] = [[] for _ in insts]
    for k in order:
        for o in dict.fromkeys(insts[k].operands):
            users[o].append(k)
    library = _library_fusions(insts, order, users)
    # One node per library fusion, standing for its members; every other node is an instruction.
    node = {k: ("library", library[k]) if k in library else k for k in order}
    nodes: dict[Any, _Node] = {}
    for k in order:
        n = nodes.setdefault(node[k], _Node(_Kind.OPAQUE, [], 0, 0, True))
        inst = insts[k]
        if k not in library:
            n.kind, n.elements, n.rank, n.expensive = inst.kind, inst.elements, inst.rank, inst.expensive
            n.inst = inst
        elif any(node[u] != node[k] for u in users[k]):  # the library fusion's result
            n.elements, n.rank = max((n.elements, n.rank), (inst.elements, inst.rank))
        for o in inst.operands:
            if node[o] != node[k] and node[o] not in n.operands:
                n.operands.append(node[o])
    copies = _LoopFusion(nodes, _topological(nodes), node[prog.root]).run()
    return {k: 1 if k in library else copies.get(k, 0) for k in order}


def _library_fusions(insts: list[_Inst], order: list[int], users: list[list[int]]) -> dict[int, int]:
    """Instruction -> library fusion. A fusion starts at each reduce the library takes (from the
    root up) and grows through neighbours it supports: up into producers all of whose users are
    inside, down into the single user of what it just took (backends/cpu/transforms/library_rewriter.cc)."""
    group: dict[int, int] = {}

    def supported(k: int) -> bool:
        inst = insts[k]
        if inst.kind is _Kind.BROADCAST:
            return True
        if inst.kind is _Kind.MOVE:
            return inst.name in ("bitcast", "reshape", "squeeze", "expand_dims", "broadcast_in_dim")
        if inst.kind is _Kind.REDUCE:
            return inst.library
        if inst.kind is not _Kind.ELEMENTWISE or inst.name not in _LIBRARY_ELEMENTWISE or not inst.floating:
            return False
        # The library only takes elementwise work big enough to pay for the call.
        return max((inst.elements, *(insts[o].elements for o in inst.operands))) >= _LIBRARY_MIN_ELEMENTS

    for start in reversed(order):
        if not insts[start].library or start in group:
            continue
        members = {start}
        group[start] = start
        frontier = [(o, True) for o in insts[start].operands]
        if len(users[start]) == 1:
            frontier.append((users[start][0], False))
        while frontier:
            k, up = frontier.pop(0)
            if k in group or insts[k].kind in (_Kind.ROOT, _Kind.PARAM) or not supported(k):
                continue
            if up and not all(u in members for u in users[k]):
                continue
            group[k] = start
            members.add(k)
            if up:
                frontier.extend((o, True) for o in insts[k].operands if o not in group)
            elif len(users[k]) == 1:
                frontier.append((users[k][0], False))
    return group


@dataclasses.dataclass(eq=False, slots=True)
class _Node:
    """An instruction, or a library fusion, as the loop fusion pass sees it."""

    kind: _Kind
    operands: list
    elements: int
    rank: int
    expensive: bool
    inst: _Inst | None = None


class _LoopFusion:
    """XLA's InstructionFusion (may_duplicate) with the CPU ShouldFuse, replayed.

    Consumers are visited in reverse post order and pull in their producers one at a time,
    operands nearest in the order first; a producer that has other users is copied. It is not
    fused when it is expensive and would be copied or read more than once per element (a
    broadcast, a dot), when it rebuilds its index (concatenate, pad, ...) and would be copied, or
    when it is "globally unfusible": it reads more than it writes and some path to a user cannot
    fuse it. A producer all of whose users took a copy disappears.
    """

    def __init__(self, nodes: dict, order: list, root):
        self.nodes = nodes
        self.order = order
        self.root = root
        self.position = {n: i for i, n in enumerate(order)}
        self.ancestors: dict = {}  # node -> bitset of the positions it depends on
        for n in order:
            bits = 0
            for o in nodes[n].operands:
                bits |= self.ancestors[o] | (1 << self.position[o])
            self.ancestors[n] = bits
        self.users: dict = {n: set() for n in order}
        for n in order:
            for o in nodes[n].operands:
                self.users[o].add(n)
        reusing = (_Kind.BROADCAST, _Kind.OPAQUE, _Kind.ROOT)
        # A fusion's state: its members, its operands, and the operands some member reads more
        # than once per element (a broadcast, a dot).
        self.state = {
            n: _Fusion(
                [n], list(nodes[n].operands), set(nodes[n].operands) if nodes[n].kind in reusing else set()
            )
            for n in order
        }
        self.unfusible: set = set()
        self._paths: dict = {}

    def run(self) -> dict:
        nodes = self.nodes
        for n in reversed(self.order):
            if self._globally_unfusible(n):
                self.unfusible.add(n)
        queue = list(self.order)
        index = {n: i for i, n in enumerate(queue)}
        fusions = 0
        while queue:
            while queue and queue[-1] is None:
                queue.pop()
            if not queue:
                break
            n = queue.pop()
            index.pop(n, None)
            st = self.state[n]
            if not st.fused and nodes[n].kind not in _LOOP_FUSIBLE:
                continue
            for o in sorted(
                (o for o in dict.fromkeys(st.operands) if o in index), key=index.__getitem__, reverse=True
            ):
                if o in self.unfusible or not self._should_fuse(n, o):
                    continue
                if not st.fused:  # the consumer becomes a fusion
                    fusions += 1
                    n, st = self._make_fusion(n, ("fusion", fusions))
                producer = self.state[o]
                st.members += producer.members
                st.operands = [p for p in st.operands if p != o] + producer.operands
                st.reused = (st.reused - {o}) | producer.reused
                self.users[o].discard(n)
                for p in set(producer.operands):
                    self.users[p].add(n)
                index[n] = len(queue)
                queue.append(n)  # look at its (new) operands again
                if not self.users[o]:  # every user took a copy
                    self.unfusible.discard(o)
                    queue[index.pop(o)] = None
                    for p in set(producer.operands):
                        self.users[p].discard(o)
                    del self.state[o]
                break
        copies: dict = {}
        for st in self.state.values():
            for m in st.members:
                copies[m] = copies.get(m, 0) + 1
        return copies

    def _make_fusion(self, n, f):
        st = self.state.pop(n)
        st.fused = True
        self.state[f] = st
        self.nodes[f] = self.nodes[n]
        self.users[f] = self.users.pop(n)
        for u in self.users[f]:
            self.state[u].operands = [f if p == n else p for p in self.state[u].operands]
        for p in set(st.operands):
            self.users[p].discard(n)
            self.users[p].add(f)
        self.ancestors[f], self.position[f] = self.ancestors[n], self.position[n]
        if n == self.root:
            self.root = f
        return f, st

    def _should_fuse(self, consumer, producer) -> bool:
        p = self.nodes[producer]
        if self.state[producer].fused or p.kind not in _LOOP_FUSIBLE or producer == self.root:
            return False
        if p.expensive and producer in self.state[consumer].reused:
            return False
        if len(self.users[producer]) > 1:
            inst = p.inst
            if p.expensive and not (inst and inst.duplicable):
                return False
            if inst and (inst.name in _INDEX_REBUILDING or inst.kind is _Kind.REDUCE):
                return False
        return self.state[consumer].fused or self.nodes[consumer].kind in _LOOP_FUSIBLE

    def _globally_unfusible(self, n) -> bool:
        """ComputeGloballyUnfusible: a producer with more than one operand as large as its result
        that reads more than it writes is not copied unless it fuses into every user on every path."""
        nodes = self.nodes
        node = nodes[n]
        if node.inst is None or node.kind is _Kind.PARAM:
            return False
        operands = list(dict.fromkeys(node.operands))
        large = sum(
            1
            for o in operands
            if nodes[o].kind is not _Kind.BROADCAST
            and not (nodes[o].inst and nodes[o].inst.name == "iota")
            and nodes[o].rank >= node.rank
        )
        if large <= 1 or sum(nodes[o].elements for o in operands) <= node.elements:
            return False
        return not all(self._fuses_on_all_paths(n, u) for u in self.users[n])

    def _fuses_on_all_paths(self, producer, consumer) -> bool:
        if consumer == producer:
            return True
        if self.nodes[consumer].kind not in _LOOP_FUSIBLE:
            return False
        key = (producer, consumer)
        if key not in self._paths:
            self._paths[key] = all(
                o not in self.unfusible
                and self._should_fuse(consumer, o)
                and self._fuses_on_all_paths(producer, o)
                for o in self.nodes[consumer].operands
                if o == producer or self.ancestors[o] >> self.position[producer] & 1
            )
        return self._paths[key]


@dataclasses.dataclass(eq=False, slots=True)
class _Fusion:
    members: list
    operands: list
    reused: set
    fused: bool = False


def _post_order(insts: list[_Inst], root: int) -> list[int]:
    """The instructions the root depends on, operands before users (dead code is dropped)."""
    order: list[int] = []
    done: dict[int, bool] = {}
    stack = [(root, 0)]
    while stack:
        k, i = stack.pop()
        if i == 0:
            if k in done:
                continue
            done[k] = False
        ops = insts[k].operands
        if i < len(ops):
            stack.append((k, i + 1))
            if ops[i] not in done:
                stack.append((ops[i], 0))
        elif not done[k]:
            done[k] = True
            order.append(k)
    return order


def _topological(nodes: dict) -> list:
    """The nodes (in post order already, but for library fusions) in an order where operands come first."""
    out, seen = [], set()
    for start in nodes:
        if start in seen:
            continue
        seen.add(start)
        stack = [(start, iter(nodes[start].operands))]
        while stack:
            cur, it = stack[-1]
            nxt = next((o for o in it if o not in seen), None)
            if nxt is None:
                stack.pop()
                out.append(cur)
            else:
                seen.add(nxt)
                stack.append((nxt, iter(nodes[nxt].operands)))
    return out


__all__ = ["compiled_op_flops", "xla_flops"]

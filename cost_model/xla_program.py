"""The per-device program XLA:CPU compiles from a propagated graph, rebuilt instruction by
instruction for cost_model.xla_accounting: what the simplifier, CSE and lowering make of each
op, with its arithmetic counted as HloCostAnalysis counts it."""

from __future__ import annotations

import dataclasses
import enum
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


class Kind(enum.Enum):
    """What an instruction is to XLA's fusion pass."""

    PARAM = "param"  # an argument, a constant, a loop's result: computed elsewhere
    ELEMENTWISE = "elementwise"
    BROADCAST = "broadcast"  # always copied into its consumers
    MOVE = "move"  # bitcast, transpose, slice, pad, concatenate, iota, dynamic-slice: no arithmetic
    REDUCE = "reduce"  # a reduce the loop fusion may take
    GATHER = "gather"
    OPAQUE = "opaque"  # dot, collective, scatter, sort, reduce-window, library fusion, loop
    ROOT = "root"  # the tuple of results


LOOP_FUSIBLE = frozenset((Kind.ELEMENTWISE, Kind.BROADCAST, Kind.MOVE, Kind.REDUCE, Kind.GATHER))
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
INDEX_REBUILDING = frozenset(("concatenate", "pad", "dynamic_update_slice"))
# The library (YNNPACK) takes a float reduce of at least this many input elements, and grows its
# fusion through neighbours of that size it supports (xla/backends/cpu/ynn_support.cc). A smaller
# reduce of more than _TREE_WINDOW elements per output becomes reduce-window + reduce
# (TreeReductionRewriter), which the loop fusion does not take as a consumer.
LIBRARY_MIN_ELEMENTS = 4096
_TREE_WINDOW = 32
LIBRARY_ELEMENTWISE = frozenset(
    "add add_any sub mul div max min pow square integer_pow abs ceil floor round sign neg exp expm1 log "
    "log1p rsqrt sqrt tanh erf convert_element_type".split()
)
_FLOAT = frozenset(("float32", "bfloat16", "float64"))
_SUMS = (CollectiveKind.ALL_REDUCE, CollectiveKind.REDUCE_SCATTER)


@dataclasses.dataclass(eq=False, slots=True)
class Inst:
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

    kind: Kind
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


class Program:
    """The per-device instructions XLA:CPU compiles for one graph (or loop body), before fusion.

    Each op becomes instructions over its local shapes: operands resharded as propagation reads
    them (a local slice, or a collective), dots fed [batch, rows, cols] operands, partial sums
    all-reduced; then the simplifier's rewrites that change the arithmetic are applied, and CSE
    merges identical instructions as they are built.
    """

    def __init__(self, prop: Propagation, loop: Op | None = None):
        self.prop = prop
        self.g: Graph = prop.graph
        self.insts: list[Inst] = []
        self.op_inst: dict[int, int] = {}  # op id -> its (main) instruction
        self._cse: dict[tuple, int] = {}
        self._value: dict[int, int] = {}  # value id -> instruction holding it as stored
        self._reads: dict[tuple, int] = {}
        self._folded: set[int] = set()  # transposes folded into the dot that feeds them
        self._sizes: dict[tuple[str, ...], int] = {}
        g = self.g
        for vid in g.inputs:
            self._value[vid] = self._add(Kind.PARAM, [], self._shape(vid))
        if loop is not None:  # a scan body reads its xs by dynamic-slice
            nc, nk = loop.params["num_consts"], loop.params["num_carry"]
            for vid in g.inputs[nc + nk :]:
                self._value[vid] = self._add(Kind.MOVE, [self._value[vid]], self._shape(vid))
        for op in g.ops:
            if op.id in g.live_ops:
                self._lower(op)
        outs = [self._read(vid, s) for vid, s in zip(g.outputs, prop.outputs, strict=True)]
        if loop is not None:  # and writes its ys by dynamic-update-slice
            nk = loop.params["num_carry"]
            ys = [
                self._add(Kind.MOVE, [o], (self.insts[o].elements,), name="dynamic_update_slice")
                for o in outs[nk:]
            ]
            outs = outs[:nk] + ys
        self.root = self._add(Kind.ROOT, outs, ())
        self._simplify()

    # -- instructions --------------------------------------------------------------------------------

    def _add(
        self, kind: Kind, operands: Sequence[int], shape: Sequence[int], *, key: Any = None, **fields
    ) -> int:
        """Appends an instruction; with a `key`, returns an identical one instead when there is (CSE)."""
        if key is not None:
            key = (key, tuple(operands), tuple(shape))
            if key in self._cse:
                return self._cse[key]
        self.insts.append(Inst(kind, list(operands), math.prod(shape), sum(d > 1 for d in shape), **fields))
        if key is not None:
            self._cse[key] = len(self.insts) - 1
        return len(self.insts) - 1

    def _broadcast(self, inst: int, shape: Sequence[int]) -> int:
        return self._add(Kind.BROADCAST, [inst], shape, key="broadcast", duplicable=True)

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
            inst = self._value[vid] = self._add(Kind.PARAM, [], self._shape(vid))
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
            return self._add(Kind.OPAQUE, [inst], shape, name="collective")
        # Each dim only gains axes: a local slice, and a slice of a broadcast is a smaller broadcast.
        source = self.insts[inst]
        if source.kind is Kind.BROADCAST:
            return self._add(Kind.BROADCAST, source.operands, shape, duplicable=True, literal=source.literal)
        return self._add(Kind.MOVE, [inst], shape, name="dynamic_slice")

    # -- lowering --------------------------------------------------------------------------------

    def _lower(self, op: Op) -> None:
        g, prop = self.g, self.prop
        prim = op.primitive
        if op.rule is None:  # scan or cond: a loop the fusion pass does not enter
            loop = self._add(
                Kind.OPAQUE, [self._read(vid, None) for vid in op.inputs], (), name=prim, op=op.id
            )
            for vid in op.outputs:
                self._value[vid] = self._add(Kind.PARAM, [loop], self._shape(vid))
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
                and self.insts[inst].kind is Kind.BROADCAST
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
                self._value[vid] = ins[0] if ins else self._add(Kind.PARAM, [], out_shapes[0])
            return
        flops, trans = op_flops(op, sizes)
        dtype = g.values[op.outputs[0]].dtype
        fields = {"op": op.id, "name": prim, "floating": dtype in _FLOAT}
        key = (prim, _params_key(op.params), tuple(literals))
        if prim == "split":
            for j, vid in enumerate(op.outputs):
                self._value[vid] = self._add(Kind.MOVE, ins, out_shapes[j], key=(key, j), **fields)
            return
        out_shape = out_shapes[0]
        if prim == "dot_general":
            inst = self._dot(op, ins, in_shapes, out_shape, flops, key, fields)
        elif prim in REDUCTIONS or prim in ("argmax", "argmin"):
            inst = self._reduce(op, ins, in_shapes[0], out_shape, flops, key, fields)
        elif prim == "broadcast_in_dim":
            if ins and self.insts[ins[0]].elements == math.prod(out_shape):  # adds size-1 dims: a bitcast
                inst = self._add(Kind.MOVE, ins[:1], out_shape, key=key, **fields)
            else:
                literal = literals[0] if literals and not ins else None
                inst = self._add(
                    Kind.BROADCAST, ins[:1], out_shape, duplicable=True, literal=literal, key=key, **fields
                )
        elif prim == "gather":
            inst = self._gather(op, ins, in_shapes, out_shape, key, fields)
        elif prim in _MOVES:
            inst = self._add(Kind.MOVE, ins, out_shape, key=key, **fields)
        elif elementwise:
            inst = self._elementwise(op, ins, literals, literal_first, out_shape, flops, trans, key, fields)
        else:  # scatter, sort, cumulative ops, custom calls: calls the loop fusion leaves alone
            if prim.startswith("scatter"):
                flops = float(math.prod(in_shapes[2])) if "add" in prim or "mul" in prim else 0.0
                # XLA's scatter reads its updates as [index, window...]: a reshaping copy first.
                ins = [*ins[:2], *(self._add(Kind.MOVE, [i], in_shapes[2], key="updates") for i in ins[2:3])]
            elif prim in CUMULATIVE:
                n = in_shapes[0][op.params["axis"]]
                flops = cumulative_flops(n, math.prod(in_shapes[0]) // max(n, 1))
            elif prim in ("sort", "top_k"):  # HloCostAnalysis: n log2 n per sort
                n = math.prod(in_shapes[0])
                flops = float(n * max(1, math.ceil(math.log2(max(n, 2)))))
            inst = self._add(
                Kind.OPAQUE, ins, out_shape, flops=flops, trans=trans, expensive=True, key=key, **fields
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
            Kind.OPAQUE, [inst], self._shape(vid, produced), name="all-reduce", op=op.id, flops=adds
        )

    def _dot(self, op: Op, ins, in_shapes, out_shape, flops, key, fields) -> int:
        (lc, rc), (lb, rb) = dimension_numbers = op.params["dimension_numbers"]
        if math.prod(in_shapes[0][d] for d in lc) == 1:  # nothing to sum: an outer product, a multiply
            ins = [self._broadcast(i, out_shape) for i in ins]
            return self._add(
                Kind.ELEMENTWISE, ins, out_shape, flops=float(math.prod(out_shape)), key=key, **fields
            )
        readers = self.g.consumers.get(op.outputs[0], ())
        if len(readers) == 1 and self.g.ops[readers[0]].primitive == "transpose" and len(out_shape) == 2:
            # transpose(dot(a, b)) is rewritten dot(b, a)
            self._folded.add(readers[0])
            ins = self._dot_operands(ins[::-1], in_shapes[::-1], ((rc, lc), (rb, lb)))[::-1]
        else:
            ins = self._dot_operands(ins, in_shapes, dimension_numbers)
        return self._add(Kind.OPAQUE, ins, out_shape, flops=flops, expensive=True, key=key, **fields)

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
                out.append(self._add(Kind.MOVE, [inst], target, key=("transpose", order), name="transpose"))
            elif len(labels) < len(shape):  # merge dims, or drop size-1 dims
                target = [math.prod(shape[d] for d in dims if group[d] == g) for g in labels]
                out.append(self._add(Kind.MOVE, [inst], target, key="bitcast", name="bitcast"))
            else:
                out.append(inst)
        return out

    def _reduce(self, op: Op, ins, in_shape, out_shape, flops, key, fields) -> int:
        reduced = tuple(in_shape[d] for d in op.params["axes"])
        inst = self._add(Kind.REDUCE, ins, out_shape, flops=flops, expensive=True, key=key, **fields)
        if op.primitive in ("argmax", "argmin"):  # variadic: neither the library nor the tree rewrite
            return inst
        self.insts[inst].reduced = reduced
        _place_reduce(self.insts[inst], self.insts[ins[0]].elements)
        return inst

    def _gather(self, op: Op, ins, in_shapes, out_shape, key, fields) -> int:
        """A gather; in mode FILL_OR_DROP (jnp.take's default) JAX masks rows out of range: two
        compares and an `and` per index, a select per output element."""
        gather = self._add(Kind.GATHER, ins, out_shape, expensive=True, key=key, **fields)
        if "FILL" not in str(op.params.get("mode", "")):
            return gather
        idx = in_shapes[1][:-1]
        n = float(math.prod(idx))
        mask = {"op": op.id, "flops": n, "floating": False}
        lo = self._add(Kind.ELEMENTWISE, ins[1:2], idx, name="ge", **mask)
        hi = self._add(Kind.ELEMENTWISE, ins[1:2], idx, name="le", **mask)
        ok = self._broadcast(self._add(Kind.ELEMENTWISE, [lo, hi], idx, name="and", **mask), out_shape)
        return self._add(
            Kind.ELEMENTWISE,
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
                Kind.ELEMENTWISE, ins, out_shape, flops=n, key=("neg", key), **{**fields, "name": "neg"}
            )
            x = self._add(
                Kind.ELEMENTWISE, [x], out_shape, trans=n, expensive=True, key=("exp", key), **fields
            )
            x = self._add(
                Kind.ELEMENTWISE, [x], out_shape, flops=n, key=("add", key), **{**fields, "name": "add"}
            )
            return self._add(
                Kind.ELEMENTWISE,
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
            and self.insts[ins[1]].kind is Kind.BROADCAST
            and self.insts[ins[1]].operands
        ):
            # x / broadcast(b) is rewritten x * broadcast(1 / b): the divide moves to the small operand.
            b = self.insts[ins[1]].operands[0]
            recip = self._add(
                Kind.ELEMENTWISE,
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
            Kind.ELEMENTWISE,
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
            if inst.kind is Kind.ELEMENTWISE and inst.name == "mul" and len(inst.operands) == 2:
                for x, y in (inst.operands, inst.operands[::-1]):
                    a, b = insts[x], insts[y]
                    if not (
                        a.kind is Kind.ELEMENTWISE
                        and a.name == "mul"
                        and a.literal is not None
                        and len(a.operands) == 1
                        and users[x] == [k]
                        and b.kind is Kind.BROADCAST
                        and b.operands
                    ):
                        continue
                    small = insts[b.operands[0]]
                    insts.append(
                        Inst(
                            Kind.ELEMENTWISE,
                            [b.operands[0]],
                            small.elements,
                            small.rank,
                            flops=float(small.elements),
                            op=a.op,
                            name="mul",
                        )
                    )
                    insts.append(Inst(Kind.BROADCAST, [len(insts) - 1], b.elements, b.rank, duplicable=True))
                    users[b.operands[0]].append(len(insts) - 2)
                    users += [[len(insts) - 1], [k]]
                    _swap(users[a.operands[0]], x, k)
                    users[x], users[y] = [], [u for u in users[y] if u != k]
                    inst.operands = [a.operands[0], len(insts) - 1]
                    break
            elif inst.name == "reduce_sum" and len(inst.operands) == 1:
                n = inst.operands[0]
                neg = insts[n]
                if neg.kind is Kind.ELEMENTWISE and neg.name == "neg" and users[n] == [k]:
                    for u in users[k]:
                        _swap(insts[u].operands, k, n)
                    _swap(users[neg.operands[0]], n, k)
                    users[n], users[k] = users[k], [n]
                    inst.operands, neg.operands = list(neg.operands), [k]
                    neg.elements, neg.rank, neg.flops = inst.elements, inst.rank, float(inst.elements)
            if (
                inst.name in REDUCTIONS
                and inst.kind in (Kind.REDUCE, Kind.OPAQUE)
                and len(inst.operands) == 1
            ):
                i = inst.operands[0]
                inner = insts[i]
                if inner.name == inst.name and inner.kind in (Kind.REDUCE, Kind.OPAQUE) and users[i] == [k]:
                    _swap(users[inner.operands[0]], i, k)
                    users[i] = []
                    inst.operands = list(inner.operands)
                    inst.reduced = inner.reduced + inst.reduced
                    _place_reduce(inst, insts[inner.operands[0]].elements)


def _place_reduce(inst: Inst, n_in: int) -> None:
    """Where XLA:CPU runs a reduce of `n_in` input elements, and what HloCostAnalysis charges.

    The library takes a float sum, max or min of at least LIBRARY_MIN_ELEMENTS inputs.
    Otherwise, when a reduced dim is longer than _TREE_WINDOW, TreeReductionRewriter splits it
    into a reduce-window over windows of that size (padded to whole windows, which
    HloCostAnalysis charges) and a reduce of the partial results; the loop fusion does not take a
    reduce-window as a consumer.
    """
    n_out = max(1, inst.elements)
    inst.library = n_in >= LIBRARY_MIN_ELEMENTS and inst.name in ("reduce_sum", "reduce_max", "reduce_min")
    inst.library = inst.library and inst.floating
    inst.flops = float(n_in - n_out)
    inst.kind = Kind.REDUCE
    if not inst.library and any(n > _TREE_WINDOW for n in inst.reduced):
        windows = [min(n, _TREE_WINDOW) for n in inst.reduced]
        partial = n_out * math.prod(-(-n // w) for n, w in zip(inst.reduced, windows, strict=True))
        inst.flops = float((math.prod(windows) - 1) * partial + partial - n_out)
        inst.kind = Kind.OPAQUE


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

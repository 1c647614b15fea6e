"""Which values of a propagated graph XLA writes to memory, and which share another's buffer.

A value is computed inside the fusions that read it, never written, when its op is loop-fusible
and every reader fuses it: a fusible op, or a reduction the backend fuses. A reduction that goes
to a library (XLA:CPU's YNNPACK rewriter takes reductions of at least a few thousand elements)
takes in only the elementwise producers no one else reads; a value it shares with other readers
is written, unless the library reads a local slice of it: then the slice is fused into the
value's producer and written, and the value itself is recomputed by its other readers. An expensive value (exp, tanh, div, ...) read more than once is written once rather
than recomputed in each reader (XLA's InstructionFusion will not duplicate it). A bool mask
converted to a float and multiplied in is a select (XLA's algebraic simplifier). An annotation
or a bitcast reshape shares its operand's buffer.

This is the memory-side view of XLA's fusion; cost_model.xla_accounting replays XLA:CPU's fusion pass in
full to count FLOPs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Set

from ir.propagate import Propagation
from ir.rules import ELEMENTWISE

# Ops whose result is their operand's buffer: annotations, and layout-preserving reshapes (bitcasts).
_ALIASES = frozenset(
    "name copy copy_p stop_gradient optimization_barrier sharding_constraint mesh_cast reshard "
    "reshape squeeze expand_dims".split()
)
# Ops a loop fusion takes in: elementwise arithmetic and data movement without arithmetic.
_LOOP_FUSIBLE = frozenset(ELEMENTWISE) | frozenset(
    "broadcast_in_dim convert_element_type iota reshape squeeze expand_dims transpose slice rev pad "
    "concatenate dynamic_slice select_n".split()
)
# Elementwise ops a fusion will not copy into each of several readers (XLA's IsExpensive).
_EXPENSIVE = frozenset(
    "exp exp2 expm1 log log1p tanh logistic sqrt rsqrt cbrt erf erfc erf_inv lgamma digamma pow div rem "
    "atan atan2 asinh acos asin acosh atanh sinh cosh".split()
)
_REDUCTIONS = frozenset(
    "reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or reduce_xor".split()
)
# Elementwise ops the XLA:CPU library rewriter (YNNPACK) takes into a library reduction.
_LIBRARY_ELEMENTWISE = frozenset(
    "add add_any sub mul div max min pow square integer_pow abs ceil floor round sign neg exp expm1 log "
    "log1p logistic rsqrt sqrt tanh erf convert_element_type broadcast_in_dim reshape squeeze expand_dims".split()
)
# Ops whose result XLA makes at whatever size it is read in (slicing them is simplified away).
GENERATED = frozenset(("broadcast_in_dim", "iota"))


def generated(g) -> frozenset[int]:
    """The values of `g` made by a GENERATED op (keep with the graph: `g.derived`)."""
    return frozenset(v for op in g.ops if op.primitive in GENERATED for v in op.outputs)


class FusionCache:
    """Memo tables for `fused_and_aliased` over many propagations of the same graphs: local
    element counts by (shape, sharding, mesh), and the fused set by (graph, aliases, library
    ops, library slices). Entries keep their graph alive."""

    def __init__(self):
        self.elements: dict[tuple, int] = {}
        self.fused: dict[tuple, tuple] = {}

    def __len__(self) -> int:
        return len(self.elements) + len(self.fused)


def fused_and_aliased(
    prop: Propagation, library_reduce_elements: int = 0, memo: FusionCache | None = None
) -> tuple[frozenset[int], dict[int, int], frozenset[int]]:
    """(values no buffer holds, value -> the value whose buffer it holds, ops in a library
    reduction).

    Args:
      prop: a propagated graph (local sizes decide which reductions go to a library).
      library_reduce_elements: see `cost_model.liveness.Compiler`; 0 for no library.
      memo: tables to reuse across calls: the fused set is a function of the aliases and
        library reductions, which few sharding changes change.

    A value is computed inside the fusions that read it, never written, when its op is loop-
    fusible and every reader fuses it: a fusible op, or a reduction the backend fuses (one that
    goes to a library takes in only producers no one else reads, or a local slice of the value,
    which the value's producer writes for it: cost_model.liveness makes that slice a buffer). An
    expensive value (exp, tanh, div, ...) read more than once is written once rather than
    recomputed in each reader. An annotation or bitcast reshape shares its operand's buffer.
    """
    g = prop.graph
    mesh = prop.mesh
    readers = g.consumers
    shardings = prop.shardings

    counts = memo.elements if memo is not None else {}

    values = g.values

    def elements(vid: int) -> int:  # of a local shard: a function of shape, layout and mesh
        s = shardings[vid]
        shape = values[vid].shape
        n = counts.get((shape, s, mesh))
        if n is None:
            n = counts[(shape, s, mesh)] = math.prod(
                n // mesh.axes_size(a) for n, a in zip(shape, s.dims, strict=True)
            )
        return n

    library: set[int] = set()  # ops inside a library reduction
    if library_reduce_elements:
        for op in reversed(g.ops):
            if (
                op.primitive in ("reduce_sum", "reduce_max", "reduce_min")
                and elements(op.inputs[0]) >= library_reduce_elements
            ):
                if g.values[op.inputs[0]].dtype in ("float32", "bfloat16", "float16", "float64"):
                    library.add(op.id)
            elif (
                op.primitive in _LIBRARY_ELEMENTWISE
                and len(op.outputs) == 1
                and readers.get(op.outputs[0])
                and all(r in library for r in readers[op.outputs[0]])
            ):
                library.add(op.id)
    alias: dict[int, int] = {}
    # Whether an alias op shares its operand's buffer is a function of its kind (shapes), its
    # decision and the two layouts: found once per (kind, decision, layouts) in a call (the
    # layers of an unrolled model are alike). Decisions are kept alive by `prop`: keyed by id.
    kinds = g.op_kinds
    decisions = prop.ops
    shares: dict[tuple, bool] = {}
    for op in g.derived("fusion.alias_ops", _alias_ops):
        decided = decisions[op.id]
        if decided is None:
            continue
        src, vid = op.inputs[0], op.outputs[0]
        have = shardings[src]
        key = (kinds[op.id], id(decided), have, shardings[vid])
        same = shares.get(key)
        if same is None:
            same = shares[key] = decided.operands[0] == have and elements(src) == elements(vid)
        if same:
            alias[vid] = alias.get(src, src)
    # Library ops that read a value as a local slice of it (XLA fuses the slice into the
    # value's producer and writes the slice the library reads, not the value).
    slices: set[tuple[int, int]] = set()
    for r in library:
        decided = prop.ops[r]
        if decided is None:
            continue
        for vid, want in zip(g.ops[r].inputs, decided.operands, strict=True):
            have = shardings[vid].dims
            if want.dims != have and all(w[: len(h)] == h for w, h in zip(want.dims, have, strict=True)):
                slices.add((r, vid))
    library = frozenset(library)
    if not library and not slices:
        # Where every alias op aliases (nearly every plan: a reshape keeps its operand's layout
        # and local size), the aliases and fused set are the graph's own, made once for it.
        every = g.derived("fusion.every_alias", every_alias)
        if len(alias) == len(every[0]):  # (the aliases are a subset of those: the same)
            return every[1], every[0], library
    if memo is None:
        return _fused(g, alias, library, slices), alias, library
    key = (id(g), frozenset(alias.items()), library, frozenset(slices))
    hit = memo.fused.get(key)
    if hit is None or hit[0] is not g:
        hit = memo.fused[key] = (g, _fused(g, alias, library, slices), alias)
    # The aliases as first made for this key: the same object for equal aliases (what is kept
    # by the aliases downstream is kept by their identity). Read only.
    return hit[1], hit[2], library


def fused_sources(
    g, vid: int, fused: frozenset[int], alias: Mapping[int, int], memo: dict[int, frozenset[int]]
) -> frozenset[int]:
    """The buffers a fused value is recomputed from in each reader: its producer's operands,
    through any that are fused themselves, each as the buffer it shares (`alias`). `memo` holds
    the answers for one (graph, fused, alias)."""
    hit = memo.get(vid)
    if hit is None:
        out: set[int] = set()
        for u in g.ops[g.producer[vid]].inputs:
            out |= fused_sources(g, u, fused, alias, memo) if u in fused else {alias.get(u, u)}
        hit = memo[vid] = frozenset(out)
    return hit


def every_alias(g) -> tuple[dict[int, int], frozenset[int], frozenset[int]]:
    """(the aliases where every alias op shares its operand's buffer, the fused set under them
    without library reductions, the values with no buffer of their own (`unbuffered`)): read
    only."""
    alias: dict[int, int] = {}
    for op in g.derived("fusion.alias_ops", _alias_ops):
        alias[op.outputs[0]] = alias.get(op.inputs[0], op.inputs[0])
    fused = _fused_by_aliases(g, alias)
    return alias, fused, unbuffered(g, fused, alias)


def pinned(g, alias: Mapping[int, int]) -> tuple[set[int], dict[int, None]]:
    """(the buffers of arguments and results, {buffer of a result: None}) under `alias`."""
    return {alias.get(v, v) for v in (*g.inputs, *g.outputs)}, dict.fromkeys(
        alias.get(v, v) for v in g.outputs
    )


def unbuffered(g, fused: frozenset[int], alias: Mapping[int, int]) -> frozenset[int]:
    """The values written in no buffer of their own: fused, an argument's or a result's, or
    sharing another's."""
    return fused | pinned(g, alias)[0] | alias.keys()


def _alias_ops(g) -> list:
    """The ops whose result may share their operand's buffer (annotations, reshapes, no-op casts)."""
    out = []
    for op in g.ops:
        same_type = (
            op.primitive == "convert_element_type"
            and op.inputs
            and g.values[op.inputs[0]].dtype == g.values[op.outputs[0]].dtype
        )
        if (op.primitive in _ALIASES or same_type) and len(op.outputs) == 1 and op.inputs:
            out.append(op)
    return out


def _fused(g, alias: dict[int, int], library: frozenset[int], slices: set[tuple[int, int]]) -> frozenset[int]:
    if not library and not slices:
        return _fused_by_aliases(g, alias)
    return _fused_walk(g, alias, library, slices)


def _fused_walk(
    g, alias: dict[int, int], library: frozenset[int], slices: set[tuple[int, int]]
) -> frozenset[int]:
    """`_fused` by a walk over every value and op."""
    readers = g.consumers
    ops = g.ops
    # The readers of a buffer: those of its value and of every value aliasing it.
    group_readers: dict[int, set[int]] = {}
    returned = {alias.get(vid, vid) for vid in g.outputs}
    for vid in range(len(g.values)):
        root = alias.get(vid, vid)
        for r in readers.get(vid, ()):
            if not (len(ops[r].outputs) == 1 and alias.get(ops[r].outputs[0]) == root):
                group_readers.setdefault(root, set()).add(r)
    fused: set[int] = set()
    for op in g.ops:
        if len(op.outputs) != 1 or op.outputs[0] in alias:
            continue
        vid = op.outputs[0]
        if _fuses(g, op, group_readers.get(vid, ()), vid in returned, library, slices):
            fused.add(vid)
    return frozenset(fused)


_NONE: frozenset = frozenset()


def _fused_by_aliases(g, alias: dict[int, int]) -> frozenset[int]:
    """`_fused` without library reductions, from the graph's fused set without aliases: an alias
    changes only whether the values it joins (the aliasing value and its root) are fused; every
    other value has the readers, and is returned or not, as without aliases."""
    base = g.derived("fusion.fused_without_aliases", lambda g: _fused_walk(g, {}, _NONE, _NONE))
    if not alias:
        return base
    readers = g.consumers
    ops = g.ops
    members: dict[int, list[int]] = {}
    for vid, root in alias.items():
        members.setdefault(root, [root]).append(vid)
    returned = {alias.get(vid, vid) for vid in g.outputs}
    producer = g.producer
    joined = []
    for root, vids in members.items():
        if root not in producer:
            continue
        rs = {
            r
            for vid in vids
            for r in readers.get(vid, ())
            if not (len(ops[r].outputs) == 1 and alias.get(ops[r].outputs[0]) == root)
        }
        op = ops[producer[root]]
        if len(op.outputs) == 1 and _fuses(g, op, rs, root in returned, _NONE, _NONE):
            joined.append(root)
    return base.difference(alias, members).union(joined)


def _fuses(g, op, rs, returned: bool, library: frozenset[int], slices: Set[tuple[int, int]]) -> bool:
    """Whether the single result of `op`, read by the ops `rs` (through its aliases), is computed
    inside its readers rather than written (see `fused_and_aliased`)."""
    if op.primitive not in _LOOP_FUSIBLE or returned or not rs:
        return False
    ops = g.ops
    vid = op.outputs[0]
    mask = op.primitive == "convert_element_type" and g.values[op.inputs[0]].dtype == "bool"
    if op.id in library or (mask and all(ops[r].primitive == "mul" for r in rs)):
        # A library takes it in; or x * convert(mask) is simplified to select(mask, x, 0).
        return True
    if len(rs) > 1 and op.primitive in _EXPENSIVE:
        return False
    return all(
        (ops[r].primitive in _LOOP_FUSIBLE or ops[r].primitive in _REDUCTIONS)
        and (r not in library or (r, vid) in slices)
        for r in rs
    )

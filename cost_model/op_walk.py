"""The walk of a schedule, op by op: the step at which each buffer is written and last read.

`cost_model.liveness` builds a propagated graph's timeline of buffers on it: it works out the
compiler's choices (resolutions, combined collectives, the schedule), then walks the schedule
here (`Walk.walk`, or `walk_parts` over the steps `cost_model.part_steps` worked out per cached
part) and settles the reads of fused values (`Walk.settle_fused`). `cost_model.walk_arrays`
finds the same bytes per step over arrays.

Buffers are (kind, value, bytes, first step, last step, extra) tuples; the kinds are below.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable
from typing import TYPE_CHECKING

from cost_model.compiler import Compiler, Resolution, local_bytes
from cost_model.fusion import every_alias, generated, pinned
from cost_model.part_steps import live_spans, moves, runs, sub_moves
from ir.comm import CollectiveKind
from ir.graph import Graph, Op
from ir.propagate import Propagation
from ir.sharding import Sharding

if TYPE_CHECKING:
    from cost_model.liveness import TimelineCache

# Kinds of buffer (see `liveness.Buffer.name`): a value's stored buffer; a pending sum as its op
# writes it; the full all-reduced sum of a reduce-scatter lowered as an all-reduce; a resharded
# copy; a copy of a donated input; a loop or branch body's peak; a combined collective's tuple.
VALUE, WRITTEN, REDUCED, COPY, DONATED, BODY, TUPLE = range(7)


def _single_results(g: Graph) -> tuple[tuple[int, tuple[int, ...]], ...]:
    """(result, operands) of each op with one result, last op first (a fused value's)."""
    return tuple((op.outputs[0], op.inputs) for op in reversed(g.ops) if len(op.outputs) == 1)


def shard_bytes(sizes: list, prop: Propagation, vid: int, s: Sharding, cache: TimelineCache | None) -> int:
    """Bytes of value `vid`'s local shard laid out as `s`, kept in `sizes` (per value id of
    `prop`'s graph None or {sharding: bytes}; `TimelineCache.value_sizes`). With a cache, values
    of one shape and item size share one table: an unrolled model's layers are sized once."""
    known = sizes[vid]
    v = prop.graph.values[vid]
    if known is None:  # (without a cache: a table per value, made as it is first sized)
        known = sizes[vid] = {}
    b = known.get(s)
    if b is None:
        b = known[s] = local_bytes(v.shape, v.itemsize, s, prop.mesh)
        if cache is not None:
            cache.size_entries += 1
    return b


def table_sizes(
    tables: list, layouts: list, vids: list[int], make: Callable[[int, Sharding], int]
) -> list[int]:
    """Per value, its bytes in its layout as its table (`shard_bytes`' per-shape tables) holds
    them, looked up at C speed; each (table, layout) missing is worked out once first, by
    `make(value, layout)` for the first value of it."""
    sizes = list(map(dict.get, tables, layouts))
    if None in sizes:
        missing = itertools.compress(
            zip(tables, layouts, vids, strict=True), map(operator.is_, sizes, itertools.repeat(None))
        )
        for (_, s), v in {(id(t), s): v for t, s, v in missing}.items():
            make(v, s)
        sizes = list(map(dict.get, tables, layouts))
    return sizes


class Walk:
    """The state of one walk of the schedule (see `liveness._buffers`): what each step writes and
    reads. `body_peak`: a loop or branch body's own peak (`liveness.temp_peak`, kept in `cache`)."""

    __slots__ = (
        "alias",
        "body_peak",
        "cache",
        "compiler",
        "copies",
        "full",
        "fused",
        "fused_read",
        "generated",
        "last_read",
        "library",
        "memo",
        "op_step",
        "out",
        "partial",
        "pinned",
        "prop",
        "resolutions",
        "resolving",
        "returned",
        "sizes",
        "sliced",
        "written",
    )

    def __init__(
        self,
        prop: Propagation,
        compiler: Compiler,
        cache: TimelineCache | None,
        fused,
        alias,
        library,
        memo,
        sizes: list,
        body_peak: Callable[[Propagation], int],
    ):
        self.prop = prop
        self.body_peak = body_peak
        self.compiler = compiler
        self.cache = cache
        self.fused = fused
        self.alias = alias
        self.library = library
        self.memo = memo
        self.sizes = sizes
        g = prop.graph
        # The buffers of arguments and results: a function of the aliases (kept with them; with
        # the graph under its own, `fusion.every_alias`, as nearly every plan has them).
        own = g.derived("fusion.every_alias", every_alias)[0]
        if alias is own:
            hit = g.derived("fusion.pinned_own", lambda g: (own, *pinned(g, own)))
        else:
            hit = cache.pinned.get(id(g)) if cache is not None else None
            if hit is None or hit[0] is not alias:
                hit = (alias, *pinned(g, alias))
                if cache is not None:
                    cache.pinned[id(g)] = hit
        self.pinned = hit[1]
        self.returned = hit[2]
        self.resolutions: dict[int, Resolution] = {}
        self.resolving: frozenset[int] = frozenset()  # ops that write a value `resolutions` resolves
        self.sliced: dict[int, int] = {}  # broadcast value -> the most bytes a reader reads it in
        self.full: dict[int, int] = {}  # broadcast value -> the last step that reads it whole
        self.generated = g.derived("fusion.generated", generated)
        self.written: dict[int, int] = {}  # value id -> step its stored buffer is written
        self.last_read: dict[int, int] = {}  # value id -> last step that reads its stored buffer
        self.fused_read: dict[int, int] = {}  # fused value id -> last step `walk` read it
        self.copies: dict[tuple[int, tuple], list] = {}  # (value, dims) -> [bytes, first, last step]
        self.out: list[tuple] = []
        self.partial: dict[int, int] = {}  # value id -> index in `out` of the buffer its op writes
        self.op_step: dict[int, int] = {}

    def size(self, vid: int, s: Sharding) -> int:
        """Bytes of value `vid`'s local shard laid out as `s`."""
        known = self.sizes[vid]
        b = known.get(s) if known is not None else None
        return b if b is not None else shard_bytes(self.sizes, self.prop, vid, s, self.cache)

    def visit(self, n: int, step: int) -> int:
        """Walks op `n` at the step after `step` (see `walk`). Returns its step."""
        return self.walk((n,), step, None)

    def walk(self, nodes, step: int, groups: list[list[Resolution]] | None) -> int:
        """Walks `nodes` (op ids, and collectives as -1 - group index into `groups`) one after
        another from the step after `step`: for each op, the copies of operands it reads
        resharded, its loop body, the buffers it reads and writes. Returns the last step."""
        prop = self.prop
        g = prop.graph
        ops = g.ops
        decisions = prop.ops
        bodies = prop.bodies
        shardings = prop.shardings
        fused, alias, last_read, written = self.fused, self.alias, self.last_read, self.written
        generated, op_step, resolving = self.generated, self.op_step, self.resolving
        fused_read = self.fused_read
        stacked_early = self.compiler.breadth_first
        for n in nodes:
            if n < 0:
                step = _collective(groups[-1 - n], step, self)
                continue
            op = ops[n]
            inputs = op.inputs
            decided = decisions[n]
            wants = decided.operands if decided is not None else None
            # Per operand read in another layout than stored: its copy's key, or None where the
            # read is a local slice that needs none. None while every operand is read as stored.
            targets: list | None = None
            if wants is not None:
                for k, vid in enumerate(inputs):
                    want = wants[k]
                    have = shardings[vid]
                    if want is None or want is have or want.dims == have.dims:
                        continue
                    if targets is None:
                        targets = [None] * len(inputs)
                    step = self._reshard(n, k, vid, want, step, targets)
            step += 1
            op_step[n] = step
            subs = bodies.get(n)
            if subs:  # a loop or branch: its body's own peak while it runs
                inner = max(self.body_peak(sub) for sub in subs)
                self.out.append((BODY, -1, inner, step, step, op.primitive))
            for k, vid in enumerate(inputs):
                key = targets[k] if targets is not None else None
                if key is not None:
                    self.copies[key][2] = step
                elif vid in fused:  # recomputed here from its operands: see `settle_fused`
                    fused_read[vid] = step
                else:
                    root = alias.get(vid, vid)
                    last_read[root] = step
                    if root in generated:
                        want = wants[k] if wants is not None else None
                        if want is not None and want.dims == shardings[vid].dims:
                            self.full[root] = step
            if stacked_early and op.primitive == "scan":
                # A scan's stacked outputs are loop-state buffers filled from zeros, which
                # depend on nothing: a breadth-first schedule makes them at the start.
                stacked = op.outputs[op.params["num_carry"] :]
                for vid in op.outputs:
                    written[vid] = 1 if vid in stacked else step
            else:
                for vid in op.outputs:
                    written[vid] = step
            if n in resolving:  # its pending sums' buffers, until the collectives that read them
                _written(self, op, step)
        return step

    def settle_fused(self) -> None:
        """The last reads of the buffers fused values read by `walk` are recomputed from (their
        sources, `fusion.fused_sources`): a fused value read last at step t keeps each of its
        producer's operands live until t, through any that are fused themselves. Worked back
        from the last producer, as one max per operand rather than a set of sources per value."""
        pending = self.fused_read
        if not pending:
            return
        fused, alias, last_read = self.fused, self.alias, self.last_read
        get = pending.get
        # Program order is topological: a fused value's operands are made by earlier ops.
        for vid, inputs in self.prop.graph.derived("liveness.single_results", _single_results):
            t = get(vid)
            if t is None:
                continue
            for u in inputs:
                if u in fused:
                    if get(u, -1) < t:
                        pending[u] = t
                else:
                    root = alias.get(u, u)
                    if last_read.get(root, -1) < t:
                        last_read[root] = t
        pending.clear()

    def _reshard(self, n: int, k: int, vid: int, want: Sharding, step: int, targets: list) -> int:
        """Operand `k` (value `vid`) of op `n` read as `want`, not as stored: a resharded copy
        (made before the op, at the next step, unless made already; its key in `targets`), or a
        local slice that needs none. Returns the last step taken."""
        key = (vid, want.dims)
        copies = self.copies
        if key in copies:
            targets[k] = key
            return step
        moved = moves(self.prop, vid, want, self.cache)
        if not moved and vid in self.fused:
            if n in self.library:
                # A library reads the slice: the value's producer writes it (see fusion).
                written = self.written[vid]
                copies[key] = [self.size(vid, want), written, written]
                targets[k] = key
            return step  # else a local slice of a fused value fuses too
        root = self.alias.get(vid, vid)
        if not moved and root in self.generated:
            # A slice of a broadcast or iota (or of an annotation of one) is a smaller one: made
            # at the size read, unless some op reads it as stored (`full`).
            self.sliced[root] = max(self.sliced.get(root, 0), self.size(vid, want))
            return step
        step += 1
        copies[key] = [self.size(vid, want), step, step]
        self.last_read[root] = max(self.last_read.get(root, 0), step)
        targets[k] = key
        return step


_FIFTH = operator.itemgetter(4)


def walk_parts(
    w: Walk,
    prop: Propagation,
    hits: list[tuple],
    nodes: list[int],
    groups: list[list[Resolution]],
    resolving: frozenset[int],
    cache: TimelineCache,
) -> int:
    """Walks the schedule of a propagation made of cached parts; returns the last step. Within
    each run of a part's live ops that the schedule keeps together, each run of plain ops
    (`part_steps.summary`) moves the walk in one go; every other op is walked by its entry, or
    in full."""
    if all(map(operator.is_, map(_FIFTH, hits), itertools.repeat(None))):
        return w.walk(nodes, 0, groups)  # none worked out (a graph's first walk): all in full
    last_read, written = w.last_read, w.written
    op_step = w.op_step if w.compiler.copies_donated_inputs else None
    spans, _ = prop.graph.derived("liveness.live_spans", live_spans)
    ops = prop.graph.ops
    step = 0
    for span, first, stop, one in runs(prop.graph, nodes, cache):
        if span < 0:
            step = _collective(groups[-1 - first], step, w)
            continue
        hit = hits[span]
        if hit[4] is None:  # steps not worked out: walked in full
            step = w.walk(spans[span][first:stop], step, None)
            continue
        entries, start = hit[2], hit[0].span.start
        if one >= 0:  # one op alone (a breadth-first schedule makes many)
            step = _entry(w, entries[one - start], one, step, op_step, resolving, ops)
            continue
        for move in hit[4] if one == -1 else sub_moves(w, hit, first, stop):
            if move.__class__ is int:
                step = _entry(w, entries[move - start], move, step, op_step, resolving, ops)
                continue
            ids, reads, outs, at = move
            for r, k in reads:
                last_read[r] = step + k
            for v, k in outs:
                written[v] = step + k
            if op_step is not None:
                for k, m in enumerate(ids, 1):
                    op_step[m] = step + k
            for m, k in at:
                if m in resolving:
                    _written(w, ops[m], step + k)
            step += len(ids)
    return step


def _entry(
    w: Walk, e: tuple | None, n: int, step: int, op_step: dict | None, resolving: frozenset[int], ops
) -> int:
    """Walks op `n` by its entry `e` (`part_steps.part_steps`), or in full where that is None;
    returns its step."""
    if e is None:
        return w.visit(n, step)
    last_read, written, copies = w.last_read, w.written, w.copies
    reads, outs, copied, extra = e
    if copied:  # each operand read resharded: a copy made the first time (key), else reused
        for key, b, root in copied:
            if key not in copies:
                step += 1
                copies[key] = [b, step, step]
                if root is not None:
                    last_read[root] = step
        step += 1
        for key, _, _ in copied:
            copies[key][2] = step
    else:
        step += 1
    for r in reads:
        last_read[r] = step
    for v in outs:
        written[v] = step
    if extra is not None:
        made, body = extra
        sliced = w.sliced
        for root, b in made:
            if b < 0:
                w.full[root] = step
            else:
                sliced[root] = max(sliced.get(root, 0), b)
        if body is not None:  # a loop or branch: its body's own peak while it runs
            inner, primitive, early = body
            w.out.append((BODY, -1, inner, step, step, primitive))
            for v in early:
                written[v] = 1
    if op_step is not None:
        op_step[n] = step
    if n in resolving:
        _written(w, ops[n], step)
    return step


def _written(w: Walk, op: Op, step: int) -> None:
    """The buffers an op writes its pending sums into, until the collectives that read them."""
    for vid in op.outputs:
        r = w.resolutions.get(vid)
        if r is not None:
            w.written[vid] = step
            w.partial[vid] = len(w.out)
            w.out.append((WRITTEN, vid, w.size(vid, Sharding(r.produced.dims)), step, step, None))


def _collective(group: list[Resolution], step: int, w: Walk) -> int:
    """Appends the buffers of one (combined) collective at the next step; returns the last step."""
    step += 1
    out = w.out
    if len(group) > 1:  # a tuple-shaped collective: its table of pointers
        out.append((TUPLE, -1, w.compiler.pointer_bytes * len(group), step, step, None))
    sliced = False
    for r in group:
        vid = r.value
        kind, v, b, start, _, extra = out[w.partial[vid]]
        out[w.partial[vid]] = (kind, v, b, start, step, extra)
        w.written[vid] = step
        if w.compiler.reduce_scatter_as_all_reduce and r.key and r.first is CollectiveKind.REDUCE_SCATTER:
            # An all-reduce at the written size, then this device's slice one step on.
            full = w.size(vid, Sharding(r.produced.dims))
            out.append((REDUCED, vid, full, step, step + 1, None))
            w.written[vid] = step + 1
            sliced = True
    return step + sliced

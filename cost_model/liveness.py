"""The per-device program a plan describes, as a timeline of buffers, under a model of the compiler.

Each buffer is live from the step that writes it to the last step that reads it:
  - a value that leaves a fusion (cost_model.fusion) occupies its local shard; an annotation or a
    bitcast reshape shares its operand's buffer; a value computed inside its readers' fusions
    keeps what it is computed from alive until its last reader;
  - a value left as a pending partial sum occupies its partial buffer until the collective that
    resolves it, whose result is a second buffer: input and output of a collective are both live;
  - XLA's all-reduce combiner merges mutually independent all-reduces over the same mesh axes
    into one (up to a byte threshold, `Compiler`), placed after the last of them: every data-
    parallel gradient is then held twice at the end of the backward pass, partial and reduced;
  - an operand read in another layout (a gathered weight, say) is one resharded copy per value
    and layout (CSE merges the forward and backward gathers), live from its first reader to its
    last; a slice of a broadcast (or iota) is a smaller broadcast made where it is read: the
    broadcast is whole from its write to its last whole read, or, if none reads it whole, the
    size of its largest slice until its last reader;
  - a donated input also read off the path to the output that overwrites it is copied first
    where copy insertion runs before scheduling (XLA:CPU);
  - a scan holds its stacked outputs, loop-state buffers filled from zeros (which a breadth-first
    schedule makes at the start, as they depend on nothing), and the peak of its body while it
    runs.
Dead ops (whose results no output needs) are dropped, as XLA's DCE does. Remat needs no special
case: the recomputation is explicit in the differentiated program, so saved residuals are exactly
the values that live from the forward pass into the backward pass. Steps follow program order,
or XLA:CPU's breadth-first schedule; a collective waits for all its inputs and its readers wait
for it.
"""

from __future__ import annotations

import dataclasses
import itertools
import operator
from collections.abc import Sequence

import numpy as np

from cost_model import walk_arrays
from cost_model.compiler import (
    XLA_CPU,
    Compiler,
    Resolution,
    combine,
    donated_copies,
    local_bytes,
    renamed_resolutions,
    resolutions_of,
    schedule,
)
from cost_model.fusion import (
    GENERATED,
    FusionCache,
    every_alias,
    fused_and_aliased,
    generated,
    pinned,
    unbuffered,
)
from cost_model.part_steps import live_spans, moves, part_hits, runs, sub_moves
from cost_model.walk_arrays import walk_peak
from ir.comm import CollectiveKind
from ir.graph import Graph, Op
from ir.propagate import Propagation
from ir.sharding import MeshShape, Sharding


@dataclasses.dataclass(frozen=True, slots=True)
class Buffer:
    """One temporary buffer of the per-device program.

    Attributes:
      name: the value it holds; 'NAME [as written]' before its pending sum (or layout) is
        resolved, 'NAME [all-reduced]' for the full sum before a slice, 'NAME -> [SPEC]' for a
        resharded copy; '(scan body peak)' for a loop body's own temporaries.
      value: the graph value id (-1 for none).
      bytes: its size on one device.
      start: the step that writes it.
      end: the last step that reads it (>= start).
    """

    name: str
    value: int
    bytes: int
    start: int
    end: int


def peak(buffers: Sequence[Buffer]) -> tuple[int, list[tuple[str, int]]]:
    """The most bytes live at one step, and the buffers live then (name, bytes)."""
    delta: dict[int, int] = {}
    for b in buffers:
        delta[b.start] = delta.get(b.start, 0) + b.bytes
        delta[b.end + 1] = delta.get(b.end + 1, 0) - b.bytes
    best, best_step, current = 0, None, 0
    for t in sorted(delta):
        current += delta[t]
        if current > best:
            best, best_step = current, t
    return best, [(b.name, b.bytes) for b in buffers if b.bytes and b.start <= best_step <= b.end]


# --------------------------------------------------------------------------------- the timeline


class TimelineCache:
    """Memo tables for the timelines of many propagations of one graph under one compiler (a
    searcher's inner loop): loop-body peaks by body propagation (a `PropagationCache` returns a
    body it has seen as the same object), each op's pending-sum resolutions by its decision,
    the fused values by the aliases, the combined groups by their candidates, the schedule by
    the groups, and what each propagation part's ops do by (part, fusion). Keys hold graph
    ids; entries keep their graph alive."""

    def __init__(self):
        self.body_peaks: dict[int, tuple[Propagation, int]] = {}
        self.fusion = FusionCache()
        # (graph, fused set) -> [fused set, memo, the aliases, the values with no buffer of their own]
        self.sources: dict[tuple, list] = {}
        self.resolutions: dict[tuple, tuple] = {}
        self.resolution_colls: dict[tuple, tuple] = {}  # see compiler.resolutions_of
        # (graph, op kind, decision, result layouts) -> (decision, op id, its resolutions)
        self.resolutions_alike: dict[tuple, tuple] = {}
        self.combined: dict[tuple, list[list[int]]] = {}
        self.schedules: dict[tuple, list[int]] = {}
        self.scheduled: dict[tuple, tuple] = {}  # (graph, resolutions) -> (them, groups, ...)
        # (graph id, mesh) -> (graph, per value id {sharding: bytes of its local shard}); the
        # tables are shared by values of one shape, item size and mesh (`shape_sizes`)
        self.sizes: dict[tuple, tuple[Graph, list]] = {}
        self.shape_sizes: dict[tuple, dict] = {}
        self.size_entries = 0  # how many (shape, sharding) entries the tables hold
        self.slices: dict[tuple, tuple] = {}
        self.loop_slices: dict[tuple, tuple] = {}  # (graph, its loops' bodies) -> (bodies, slices)
        self.moves: dict[tuple, bool] = {}  # (shape, dtype, have, want) -> whether a collective moves it
        self.steps: dict[int, tuple] = {}  # part -> what its ops do (see part_steps.part_hits)
        # (span's decisions, its operands' layouts) -> (decisions, operands read resharded)
        self.resharded: dict[tuple, tuple] = {}  # see walk_arrays._resharded
        self.steps_by_fusion: dict[tuple, tuple] = {}  # (part, fused set) -> ... under another fusion
        self.runs: dict[int, tuple] = {}  # schedule -> its runs of span ops (see part_steps.runs)
        self.walks: dict[int, int] = {}  # graph id -> parts walks (see part_steps.part_hits)
        # graph id -> (aliases, buffers of arguments and results, {buffer of a result: None})
        self.pinned: dict[int, tuple] = {}

    def value_sizes(self, g: Graph, mesh: MeshShape) -> list:
        """Per value id of `g`, {sharding: bytes of its local shard} on `mesh` (see `_Walk.size`):
        one table per shape and item size, made when the graph is first seen rather than as each
        value is first sized (the unrolled Llama-8B: 18,794 values of 50 shapes)."""
        hit = self.sizes.get((id(g), mesh))
        if hit is None or hit[0] is not g:
            of_value, shapes = g.derived("liveness.shape_classes", _shape_classes)
            tables = []
            for shape, itemsize in shapes:
                known = self.shape_sizes.get((shape, itemsize, mesh))
                if known is None:
                    known = self.shape_sizes[(shape, itemsize, mesh)] = {}
                tables.append(known)
            hit = self.sizes[(id(g), mesh)] = (g, [tables[c] for c in of_value])
        return hit[1]


def _shape_classes(g: Graph) -> tuple[list[int], list[tuple[tuple[int, ...], int]]]:
    """(per value id its class, per class (shape, item size)): values of one class have local
    shards of one size under one layout."""
    classes: dict[tuple, int] = {}
    of_value = [classes.setdefault((v.shape, v.itemsize), len(classes)) for v in g.values]
    return of_value, list(classes)


def _single_results(g: Graph) -> tuple[tuple[int, tuple[int, ...]], ...]:
    """(result, operands) of each op with one result, last op first (a fused value's)."""
    return tuple((op.outputs[0], op.inputs) for op in reversed(g.ops) if len(op.outputs) == 1)


def _order(g: Graph) -> tuple[list[Op], list[Op]]:
    """(live ops in program order, scan ops)."""
    return [op for op in g.ops if op.id in g.live_ops], [op for op in g.ops if op.primitive == "scan"]


def timeline(
    prop: Propagation, compiler: Compiler = XLA_CPU, cache: TimelineCache | None = None
) -> list[Buffer]:
    """The temporary buffers of one propagated graph, with the steps that write and last read them.

    Arguments and the buffers of outputs are not temporaries; everything else that is written is:
    op results, partial sums and their reduced results, resharded copies, copies of donated
    inputs. A loop or branch appears as one buffer, its body's own peak, at the step it runs.

    Args:
      prop: a propagated graph (a step, or a loop body).
      compiler: the backend's choices (see `Compiler`).
      cache: memo tables reused across calls with one compiler (see `TimelineCache`).
    """
    values = prop.graph.values
    buffers, _ = _buffers(prop, compiler, cache)
    return [Buffer(_name(values, kind, vid, extra), vid, b, s, e) for kind, vid, b, s, e, extra in buffers]


def temp_peak(prop: Propagation, compiler: Compiler = XLA_CPU, cache: TimelineCache | None = None) -> int:
    """`peak(timeline(prop, compiler, cache))[0]`, without naming the buffers."""
    delta, _ = _buffers(prop, compiler, cache, peak_only=True)
    if isinstance(delta, np.ndarray):
        return max(0, int(np.cumsum(delta).max()))
    return max(0, *itertools.accumulate(delta))


# Kinds of buffer, for their names (see Buffer.name).
_VALUE, _WRITTEN, _REDUCED, _COPY, _DONATED, _BODY, _TUPLE = range(7)


def _name(values, kind: int, vid: int, extra) -> str:
    if kind == _VALUE:
        return values[vid].name
    if kind == _WRITTEN:
        return f"{values[vid].name} [as written]"
    if kind == _REDUCED:
        return f"{values[vid].name} [all-reduced]"
    if kind == _COPY:
        return f"{values[vid].name} -> {_spec(extra)}"
    if kind == _DONATED:
        return f"{values[vid].name} (copy)"
    if kind == _BODY:
        return f"({extra} body peak)"
    return "(combined collective)"


def _buffers(
    prop: Propagation, compiler: Compiler, cache: TimelineCache | None, peak_only: bool = False
) -> tuple[list, int]:
    """The timeline as (kind, value, bytes, start, end, extra) tuples, and the last step; with
    `peak_only`, instead of the tuples the bytes each step adds to those live (a list over
    steps 0..last + 1, whose running sum is the bytes live at each step; a numpy array where
    `walk_arrays.walk_peak` worked it out)."""
    g = prop.graph
    order, scans = g.derived("liveness.order", _order)
    if cache is None:
        fused, alias, library = fused_and_aliased(prop, compiler.library_reduce_elements)
        memo: dict[int, frozenset[int]] = {}
        sizes: list = [None] * len(g.values)
    else:
        fused, alias, library = fused_and_aliased(prop, compiler.library_reduce_elements, cache.fusion)
        hit = cache.sources.get((id(g), id(fused)))
        if hit is None or hit[0] is not fused:
            hit = cache.sources[(id(g), id(fused))] = [fused, {}, None, None]
        memo = hit[1]
        sizes = cache.value_sizes(g, prop.mesh)
    w = _Walk(prop, compiler, cache, fused, alias, library, memo, sizes)
    # The values written in no buffer of their own (fused, an argument's or a result's, or
    # sharing another's): one set, kept with the fused set and the aliases it was made for.
    every = g.derived("fusion.every_alias", every_alias)
    if alias is every[0] and fused is every[1]:
        none_own = every[2]  # (nearly every plan: the graph's own, made with it)
    elif cache is not None and hit[2] is alias:
        none_own = hit[3]
    else:
        none_own = unbuffered(g, fused, alias)
        if cache is not None:
            hit[2], hit[3] = alias, none_own
    # Per op of a cached propagation: what it does to the timeline, worked out once per (Part,
    # fusion) (see `_steps`); None where the op is walked in full.
    steps = part_hits(w, prop.parts) if cache is not None and prop.parts else None

    resolutions = w.resolutions
    if steps is None:
        maybe = order
    else:
        maybe = [g.ops[n] for hit in steps for n in hit[3]]
    shardings = prop.shardings
    gid = id(g)
    kinds = g.op_kinds
    for op in maybe:
        decided = prop.ops[op.id]
        if decided is None or op.rule is None:
            continue  # a loop or branch writes its results as its body leaves them
        if cache is None:
            found = resolutions_of(prop, op, compiler)
        else:
            # Decisions are shared objects (a PropagationCache hands the same one out again):
            # keyed by identity, kept alive by the entry.
            outs = op.outputs
            key = (
                gid,
                op.id,
                id(decided),
                shardings[outs[0]] if len(outs) == 1 else tuple(shardings[v] for v in outs),
            )
            hit = cache.resolutions.get(key)
            if hit is None or hit[0] is not decided:
                # An op of the same kind decided alike (an unrolled model's layers) resolves
                # alike: its resolutions, renamed value for value.
                alike = (gid, kinds[op.id], *key[2:])
                like = cache.resolutions_alike.get(alike)
                if like is not None and like[0] is decided:
                    found = renamed_resolutions(like[2], g.ops[like[1]], op, g)
                else:
                    found = resolutions_of(prop, op, compiler, cache.resolution_colls)
                    cache.resolutions_alike[alike] = (decided, op.id, found)
                hit = cache.resolutions[key] = (decided, found)
            found = hit[1]
        for r in found:
            resolutions[r.value] = r
    if cache is None:
        groups, resolving, nodes = _scheduled(g, order, resolutions, compiler, None)
    else:
        # What follows from the resolutions (shared objects, one tuple per op decision): kept
        # per sequence of them.
        rs = tuple(resolutions.values())
        key = (id(g), *map(id, rs))
        hit = cache.scheduled.get(key)
        if hit is None or not all(map(operator.is_, hit[0], rs)):
            hit = cache.scheduled[key] = (rs, *_scheduled(g, order, resolutions, compiler, cache))
        _, groups, resolving, nodes = hit
    w.resolving = resolving
    w.sliced = _loop_slices(prop, scans, cache)
    big = len(g.live_ops) >= walk_arrays.MIN_OPS
    if peak_only and big and (steps is None or all(hit[4] is None for hit in steps)):
        # Nothing worked out per part, and a graph big enough: the whole walk over arrays.
        found = walk_peak(w, order, nodes, groups, none_own, cache.resharded if cache is not None else {})
        if found is not None:
            return found
    written, last_read, out = w.written, w.last_read, w.out
    step = 0
    if steps is None:
        step = w.walk(nodes, step, groups)
    else:
        step = _walk_parts(w, prop, steps, nodes, groups, resolving, cache)
    w.settle_fused()
    last_read.update(dict.fromkeys(w.returned, step))  # results are read when the step returns
    if compiler.copies_donated_inputs:
        out += [
            (_DONATED, src, b, first, last, None)
            for src, b, first, last in donated_copies(prop, order, groups, alias, w.op_step, w.size)
        ]
    sliced = w.sliced
    full = w.full
    size = w.size
    delta = None
    if peak_only:  # bytes live per step as differences: the buffers are not kept
        delta = [0] * (step + 2)
        for _, _, b, first, last, _ in out:
            delta[first] += b
            delta[last + 1] -= b
        for b, first, last in w.copies.values():
            delta[first] += b
            delta[last + 1] -= b
    sizes = w.sizes
    for vid, s in written.items():
        if vid in none_own:
            continue
        e = last_read.get(vid)
        if e is None:
            continue
        if vid not in sliced:
            known = sizes[vid]  # `w.size` inline: a call per buffer costs more than the lookup
            b = known.get(shardings[vid]) if known is not None else None
            if b is None:
                b = size(vid, shardings[vid])
        elif vid in full:  # made whole for its whole reads; each slice is made where it is read
            b, e = size(vid, shardings[vid]), full[vid]
        else:
            b = sliced[vid]
        if e < s:
            e = s
        if delta is None:
            out.append((_VALUE, vid, b, s, e, None))
        else:
            delta[s] += b
            delta[e + 1] -= b
    if delta is not None:
        return delta, step
    for (vid, dims), (b, first, last) in w.copies.items():
        out.append((_COPY, vid, b, first, last, dims))
    return out, step


def _scheduled(
    g: Graph,
    order: list[Op],
    resolutions: dict[int, Resolution],
    compiler: Compiler,
    cache: TimelineCache | None,
) -> tuple[list[list[Resolution]], frozenset[int], list[int]]:
    """(the collectives as groups, combined as the compiler combines them; the ops that write a
    value a resolution resolves; the schedule (`compiler.schedule`))."""
    cands = [r for r in resolutions.values() if r.key is not None]
    if cache is None or not cands:
        combined = combine(g, order, cands, compiler)
    else:
        key = (id(g), tuple((c.value, c.key, c.bytes) for c in cands))
        combined = cache.combined.get(key)
        if combined is None:
            combined = cache.combined[key] = combine(g, order, cands, compiler)
    groups = [[cands[m] for m in members] for members in combined]
    groups += [[r] for r in resolutions.values() if r.key is None]
    resolving = frozenset(g.producer[v] for v in resolutions)
    nodes = schedule(g, order, groups, compiler.breadth_first, cache.schedules if cache is not None else None)
    return groups, resolving, nodes


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


class _Walk:
    """The state of one walk of the schedule (see `_buffers`): what each step writes and reads."""

    __slots__ = (
        "alias",
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

    def __init__(self, prop, compiler, cache, fused, alias, library, memo, sizes):
        self.prop = prop
        self.compiler = compiler
        self.cache = cache
        self.fused = fused
        self.alias = alias
        self.library = library
        self.memo = memo
        self.sizes = sizes
        g = prop.graph
        # The buffers of arguments and results: a function of the aliases (kept with them).
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

    def body_peak(self, sub: Propagation) -> int:
        return _body_peak(sub, self.compiler, self.cache)

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
                inner = max(_body_peak(sub, self.compiler, self.cache) for sub in subs)
                self.out.append((_BODY, -1, inner, step, step, op.primitive))
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


def _walk_parts(
    w: _Walk,
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
    w: _Walk, e: tuple | None, n: int, step: int, op_step: dict | None, resolving: frozenset[int], ops
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
            w.out.append((_BODY, -1, inner, step, step, primitive))
            for v in early:
                written[v] = 1
    if op_step is not None:
        op_step[n] = step
    if n in resolving:
        _written(w, ops[n], step)
    return step


def _written(w: _Walk, op: Op, step: int) -> None:
    """The buffers an op writes its pending sums into, until the collectives that read them."""
    for vid in op.outputs:
        r = w.resolutions.get(vid)
        if r is not None:
            w.written[vid] = step
            w.partial[vid] = len(w.out)
            w.out.append((_WRITTEN, vid, w.size(vid, Sharding(r.produced.dims)), step, step, None))


def _body_peak(sub: Propagation, compiler: Compiler, cache: TimelineCache | None) -> int:
    if cache is None:
        return temp_peak(sub, compiler)
    hit = cache.body_peaks.get(id(sub))
    if hit is None or hit[0] is not sub:
        hit = cache.body_peaks[id(sub)] = (sub, temp_peak(sub, compiler, cache))
    return hit[1]


def _loop_slices(prop: Propagation, scans: list[Op], cache: TimelineCache | None = None) -> dict[int, int]:
    """Broadcasts and iotas a loop takes as constants and whose body reads them only sliced
    locally: value -> bytes of the largest slice read (XLA makes the smaller broadcast). A new
    dict (the walk adds to it)."""
    if not scans:
        return {}
    if cache is None:
        return _merged_slices(prop, scans, None)
    # Kept per combination of the loops' bodies, and copied for the walk.
    firsts = tuple([subs[0] if subs else None for subs in map(prop.bodies.get, [op.id for op in scans])])
    key = (id(prop.graph), *map(id, firsts))
    hit = cache.loop_slices.get(key)
    if hit is None or not all(map(operator.is_, hit[0], firsts)):
        hit = cache.loop_slices[key] = (firsts, _merged_slices(prop, scans, cache))
    return dict(hit[1])


def _merged_slices(prop: Propagation, scans: list[Op], cache: TimelineCache | None) -> dict[int, int]:
    out: dict[int, int] = {}
    for op in scans:
        subs = prop.bodies.get(op.id)
        if not subs:
            continue
        sub = subs[0]
        if cache is None:
            found = _slices(prop, op, sub, None)
        else:
            # What decides it is the body's propagation (a PropagationCache hands out the same
            # body object for the same entry shardings): keyed by identity, kept alive by the entry.
            key = (id(prop.graph), op.id, id(sub))
            hit = cache.slices.get(key)
            if hit is None or hit[0] is not sub:
                hit = cache.slices[key] = (sub, _slices(prop, op, sub, cache))
            found = hit[1]
        for vid, b in found:
            out[vid] = max(out.get(vid, 0), b)
    return out


def _generated_consts(g: Graph, op: Op) -> list[tuple[int, int]]:
    """(value, body input) of each loop constant made by a broadcast or iota."""
    out = []
    for k, vid in enumerate(op.inputs[: op.params["num_consts"]]):
        if vid in g.producer and g.ops[g.producer[vid]].primitive in GENERATED:
            out.append((vid, op.body[0].inputs[k]))
    return out


def _slices(
    prop: Propagation, op: Op, sub: Propagation, cache: TimelineCache | None
) -> list[tuple[int, int]]:
    """(value, bytes of the largest slice its body reads) of one loop's sliced constants."""
    out = []
    for vid, b in _generated_consts(prop.graph, op):
        v = sub.graph.values[b]
        largest = 0
        for r in sub.graph.consumers.get(b, ()):
            decided = sub.ops[r]
            wants = (
                [w for u, w in zip(sub.graph.ops[r].inputs, decided.operands, strict=True) if u == b]
                if decided
                else [None]
            )
            for w in wants:
                if w is None or moves(sub, b, w, cache):
                    largest = -1
                    break
                largest = max(largest, local_bytes(v.shape, v.itemsize, w, prop.mesh))
            if largest < 0:
                break
        if largest >= 0:  # 0: the body does not read it (XLA drops it from the loop)
            out.append((vid, largest))
    return out


def _collective(group: list[Resolution], step: int, w: _Walk) -> int:
    """Appends the buffers of one (combined) collective at the next step; returns the last step."""
    step += 1
    out = w.out
    if len(group) > 1:  # a tuple-shaped collective: its table of pointers
        out.append((_TUPLE, -1, w.compiler.pointer_bytes * len(group), step, step, None))
    sliced = False
    for r in group:
        vid = r.value
        kind, v, b, start, _, extra = out[w.partial[vid]]
        out[w.partial[vid]] = (kind, v, b, start, step, extra)
        w.written[vid] = step
        if (
            w.compiler.reduce_scatter_as_all_reduce
            and r.key
            and r.collectives[0].kind is CollectiveKind.REDUCE_SCATTER
        ):
            # An all-reduce at the written size, then this device's slice one step on.
            full = w.size(vid, Sharding(r.produced.dims))
            out.append((_REDUCED, vid, full, step, step + 1, None))
            w.written[vid] = step + 1
            sliced = True
    return step + sliced


def _spec(dims: tuple[tuple[str, ...], ...]) -> str:
    return "[" + ", ".join("+".join(axes) if axes else "-" for axes in dims) + "]"

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

Here the compiler's choices are worked out for a plan and the timeline assembled; the walk of
the schedule step by step is `cost_model.op_walk` (or, for a peak alone, `cost_model.walk_arrays`).
"""

from __future__ import annotations

import dataclasses
import itertools
import operator
from collections.abc import Callable, Sequence

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
    unbuffered,
)
from cost_model.op_walk import (
    BODY,
    COPY,
    DONATED,
    REDUCED,
    VALUE,
    WRITTEN,
    Walk,
    walk_parts,
)
from cost_model.part_steps import mostly_new, moves, part_hits
from cost_model.walk_arrays import walk_peak
from ir.graph import Graph, Op
from ir.propagate import Propagation
from ir.sharding import MeshShape
from ir.spans import entries_getter


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

    def value_sizes(self, g: Graph, mesh: MeshShape) -> tuple:
        """Per value id of `g`, {sharding: bytes of its local shard} on `mesh` (see `op_walk.Walk.size`):
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
            hit = self.sizes[(id(g), mesh)] = (g, of_value(tables))
        return hit[1]


def _shape_classes(g: Graph) -> tuple[Callable[[list], tuple], list[tuple[tuple[int, ...], int]]]:
    """(a function from a list per class to the tuple of its entries per value id, per class
    (shape, item size)): values of one class have local shards of one size under one layout."""
    classes: dict[tuple, int] = {}
    of_value = tuple([classes.setdefault((v.shape, v.itemsize), len(classes)) for v in g.values])
    return entries_getter(of_value), list(classes)


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


def _name(values, kind: int, vid: int, extra) -> str:
    if kind == VALUE:
        return values[vid].name
    if kind == WRITTEN:
        return f"{values[vid].name} [as written]"
    if kind == REDUCED:
        return f"{values[vid].name} [all-reduced]"
    if kind == COPY:
        return f"{values[vid].name} -> {_spec(extra)}"
    if kind == DONATED:
        return f"{values[vid].name} (copy)"
    if kind == BODY:
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
    w = Walk(
        prop,
        compiler,
        cache,
        fused,
        alias,
        library,
        memo,
        sizes,
        lambda sub: _body_peak(sub, compiler, cache),
    )
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
    big = len(g.live_ops) >= walk_arrays.MIN_OPS
    steps = part_hits(w, prop.parts, big) if cache is not None and prop.parts else None

    resolutions = w.resolutions
    if steps is None:
        maybe = order
    else:
        maybe = [g.ops[n] for hit in steps for n in hit[3]]
    _resolve(prop, maybe, compiler, cache, resolutions)
    shardings = prop.shardings
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
    if peak_only and big and (steps is None or mostly_new(steps, len(g.ops))):
        # Little worked out per part, and a graph big enough: the whole walk over arrays.
        found = walk_peak(w, order, nodes, groups, none_own, cache.resharded if cache is not None else {})
        if found is not None:
            return found
    written, last_read, out = w.written, w.last_read, w.out
    step = 0
    if steps is None:
        step = w.walk(nodes, step, groups)
    else:
        step = walk_parts(w, prop, steps, nodes, groups, resolving, cache)
    w.settle_fused()
    last_read.update(dict.fromkeys(w.returned, step))  # results are read when the step returns
    if compiler.copies_donated_inputs:
        out += [
            (DONATED, src, b, first, last, None)
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
            out.append((VALUE, vid, b, s, e, None))
        else:
            delta[s] += b
            delta[e + 1] -= b
    if delta is not None:
        return delta, step
    for (vid, dims), (b, first, last) in w.copies.items():
        out.append((COPY, vid, b, first, last, dims))
    return out, step


def _resolve(
    prop: Propagation,
    maybe: Sequence[Op],
    compiler: Compiler,
    cache: TimelineCache | None,
    resolutions: dict[int, Resolution],
) -> None:
    """Adds to `resolutions` those of the ops `maybe` (value -> Resolution)."""
    g = prop.graph
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
                    found = renamed_resolutions(like[2], g.ops[like[1]], op)
                else:
                    found = resolutions_of(prop, op, compiler, cache.resolution_colls)
                    cache.resolutions_alike[alike] = (decided, op.id, found)
                hit = cache.resolutions[key] = (decided, found)
            found = hit[1]
        for r in found:
            resolutions[r.value] = r


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


def _spec(dims: tuple[tuple[str, ...], ...]) -> str:
    return "[" + ", ".join("+".join(axes) if axes else "-" for axes in dims) + "]"

"""What the memory timeline works out once per cached propagation part and reuses (see
cost_model.liveness): what each op of a part reads, writes and copies, the part as moves of the
walk, and the schedule cut into runs of each part's ops."""

from __future__ import annotations

import itertools
import operator
from typing import TYPE_CHECKING

from cost_model.fusion import fused_sources, generated
from ir.graph import Graph
from ir.propagate import Propagation
from ir.reshard import reshard
from ir.sharding import Sharding
from ir.spans import Part, spans_of

if TYPE_CHECKING:
    from cost_model.liveness import TimelineCache
    from cost_model.op_walk import Walk

_FIRST, _SECOND, _THIRD = operator.itemgetter(0), operator.itemgetter(1), operator.itemgetter(2)


def moves(prop: Propagation, vid: int, want: Sharding, cache: TimelineCache | None) -> bool:
    """Whether reading value `vid` as `want` takes a collective (else it is a local slice)."""
    g = prop.graph
    have = prop.shardings[vid]
    if cache is None:
        return bool(reshard(g.values[vid], have, Sharding(want.dims), prop.mesh)[0])
    v = g.values[vid]
    key = (v.shape, v.dtype, have, want)  # values of one shape and dtype move alike
    colls = cache.moves.get(key)
    if colls is None:
        colls = cache.moves[key] = bool(reshard(v, have, Sharding(want.dims), prop.mesh)[0])
    return colls


def part_hits(w: Walk, parts: tuple[Part, ...], arrays: bool = False) -> list[tuple]:
    """Per part, its entry of `TimelineCache.steps`: (part, fusion, per op of its span what it
    does to the timeline or None (`part_steps`), the live ops whose results may be resolved,
    the part as moves of the walk or None (`summary`), and the moves of runs of part of its live
    ops, (first, stop) -> moves, made as a schedule needs them (`sub_moves`)).

    In a searcher's walk nearly every part is walked again, so once a graph has been walked its
    new parts' steps are worked out the first time they are seen. They are not in a graph's
    first walk (a single evaluation), nor, where the graph can be walked over arrays
    (`arrays`: `walk_arrays.walk_peak`), when the new parts hold more than `NEW_SHARE` of its ops
    (`mostly_new`: the walk over arrays costs less); they are worked out if seen again."""
    cache = w.cache
    g = w.prop.graph
    live = g.live_ops
    # By graph id, how many walks: only decides how much work is done ahead, never a result.
    eager = cache.walks.get(id(g), 0) > 0
    cache.walks[id(g)] = cache.walks.get(id(g), 0) + 1
    fused = w.fused
    # By part: its entry under the fusion it was first walked in (nearly every part is only ever
    # walked in one); under any other, by (part, fusion) in `steps_by_fusion`.
    hits = list(map(cache.steps.get, map(id, parts)))  # at C speed
    if (
        None not in hits
        and all(map(operator.is_, map(_FIRST, hits), parts))
        and all(map(operator.is_, map(_SECOND, hits), itertools.repeat(fused)))
        and None not in map(_THIRD, hits)
    ):
        return hits  # every part known under this fusion (an entry keeps its part and fusion)
    # Only the parts not known (or not worked out) yet are looked at one by one.
    others = cache.steps_by_fusion
    if eager and arrays:
        new = sum(
            part.span.stop - part.span.start
            for hit, part in zip(hits, parts, strict=True)
            if hit is None or hit[0] is not part or hit[1] is not fused or hit[2] is None
        )
        eager = new <= NEW_SHARE * len(g.ops)
    for k, part in enumerate(parts):
        hit = hits[k]
        if hit is not None and hit[0] is part and hit[1] is fused and hit[2] is not None:
            continue
        # The part's own entry, unless it holds the part under another fusion.
        own = hit is None or hit[0] is not part or hit[1] is fused
        if not own:
            hit = others.get((id(part), id(fused)))
        if hit is None or hit[0] is not part or hit[1] is not fused:
            resolvable = tuple([n for n in part.rewritten if n in live]) if part.rewritten else ()
            if eager:
                made = part_steps(w, part)
                hit = (
                    part,
                    fused,
                    made,
                    resolvable,
                    summary(w, part, made, resolvable, _live_of(w, part)),
                    {},
                )
            else:
                hit = (part, fused, None, resolvable, None, None)
        elif hit[2] is None:
            made = part_steps(w, part)
            hit = (part, fused, made, hit[3], summary(w, part, made, hit[3], _live_of(w, part)), {})
        if own:
            cache.steps[id(part)] = hit
        else:
            others[(id(part), id(fused))] = hit
        hits[k] = hit
    return hits


# Above this share of a graph's ops in parts new to the timeline cache, their steps are not worked
# out ahead where the graph can be walked over arrays (`part_hits`). A one-decision walk over
# unrolled Llama-8B (data=8,model=8, h100; 150 plans, three pairs): 45.2 / 46.5 / 48.0 plans/s
# working every new part out ahead, 47.6 / 51.8 / 50.9 so (the share 0.03 to 0.25 alike).
NEW_SHARE = 0.25


def mostly_new(hits: list[tuple], n_ops: int) -> bool:
    """Whether the parts of `part_hits`' entries with no steps worked out hold more than
    `NEW_SHARE` of the graph's `n_ops` ops: the walk over arrays (`walk_arrays.walk_peak`) then
    costs less than walking the parts."""
    return sum(hit[0].span.stop - hit[0].span.start for hit in hits if hit[4] is None) > NEW_SHARE * n_ops


def _live_of(w: Walk, part: Part) -> tuple[int, ...]:
    """The live op ids of a part's span (`live_spans`)."""
    return w.prop.graph.derived("liveness.live_spans", live_spans)[0][part.span.index]


def sub_moves(w: Walk, hit: tuple, first: int, stop: int) -> tuple:
    """The moves (`summary`) of live ops first..stop-1 of a part's span (`part_hits` entry
    `hit`, its steps worked out), made once per entry."""
    got = hit[5].get((first, stop))
    if got is None:
        part = hit[0]
        ids = _live_of(w, part)[first:stop]
        got = hit[5][(first, stop)] = summary(w, part, hit[2], hit[3], ids)
    return got


def summary(w: Walk, part: Part, entries: tuple, resolvable: tuple[int, ...], ids: tuple[int, ...]) -> tuple:
    """Live ops `ids` of a part, run one after another, as moves of the walk: per run of
    consecutive plain ops (reading their operands as they are stored, running no body, reading
    no broadcast) one move, (its ops, per buffer read the last of them to read it, per value
    written the one that writes it, per op of `resolvable` among them its position; 1-based);
    every other op by its id, walked by its entry (`part_steps`) or in full."""
    start = part.span.start
    out: list = []
    run: list[int] = []

    def close() -> None:
        if not run:
            return
        last: dict[int, int] = {}
        outs = []
        for k, n in enumerate(run, 1):
            for r in entries[n - start][0]:
                last[r] = k
            outs.extend((v, k) for v in entries[n - start][1])
        at = tuple((m, run.index(m) + 1) for m in resolvable if m in run)
        out.append((tuple(run), tuple(last.items()), tuple(outs), at))
        run.clear()

    for n in ids:
        e = entries[n - start]
        if e is None or e[2] or e[3] is not None:
            close()
            out.append(n)
        else:
            run.append(n)
    close()
    return tuple(out)


def runs(g: Graph, nodes: list[int], cache: TimelineCache) -> list[tuple[int, int, int, int]]:
    """The schedule as (span index, first, stop, op) for each run of a span's live ops
    first..stop-1 (indices into `live_spans`) that run one after another, op the id of the one
    op of a run of one and -1 for a run of all the span's live ops (else -2), and
    (-1, node, 0, 0) for each collective; kept with the schedule."""
    hit = cache.runs.get(id(nodes))
    if hit is not None and hit[0] is nodes:
        return hit[1]
    spans, span_of = g.derived("liveness.live_spans", live_spans)
    at = g.derived("liveness.live_positions", _live_positions)
    out = []
    pos = 0
    while pos < len(nodes):
        n = nodes[pos]
        if n < 0:
            out.append((-1, n, 0, 0))
            pos += 1
            continue
        i = span_of[n]
        ids = spans[i]
        first = stop = at[n]
        while pos < len(nodes) and stop < len(ids) and nodes[pos] == ids[stop]:
            pos += 1
            stop += 1
        op = ids[first] if stop - first == 1 else -1 if first == 0 and stop == len(ids) else -2
        out.append((i, first, stop, op))
    cache.runs[id(nodes)] = (nodes, out)
    return out


def _live_positions(g: Graph) -> dict[int, int]:
    """Per live op id, its position among the live ops of its span."""
    spans, _ = g.derived("liveness.live_spans", live_spans)
    return {n: k for ids in spans for k, n in enumerate(ids)}


def live_spans(g: Graph) -> tuple[tuple[tuple[int, ...], ...], dict[int, int]]:
    """(per span of `g` (ir.spans), its live op ids; per op id, its span)."""
    spans = spans_of(g)
    return (
        tuple(tuple(n for n in range(s.start, s.stop) if n in g.live_ops) for s in spans),
        {n: s.index for s in spans for n in range(s.start, s.stop)},
    )


def part_steps(w: Walk, part: Part) -> tuple:
    """What each op of a part does to the timeline: (the buffers it reads (through fused values
    and aliases; buffers only), the values it writes, the copies of operands it reads resharded
    ((value, dims), bytes, the buffer copied or None), and None or what else it does: (per
    broadcast or iota it reads, (the value, the bytes of the slice it reads or -1 for whole);
    for a loop or branch None or (its body's peak, its primitive, the stacked outputs a
    breadth-first schedule makes at the start))). None for an op walked in full: one that reads
    a local slice of a fused value into a library call. A part fixes its ops' decisions, bodies
    and the shardings of everything they read, so this holds in any plan the part is in, under
    one fusion (fused values, aliases and library calls)."""
    prop, fused, alias, memo = w.prop, w.fused, w.alias, w.memo
    g = prop.graph
    shardings = prop.shardings
    producer = g.producer
    ops = g.ops
    pinned = w.pinned
    keep_fused = bool(w.compiler.library_reduce_elements)  # a library copy needs their steps
    made_at_size = g.derived("fusion.generated", generated)
    library = w.library
    bodies = dict(part.bodies)
    span = part.span

    def kept(vs):
        if keep_fused:
            return tuple(vs)
        return tuple([v for v in vs if not (v in fused or v in pinned or v in alias)])

    entries = []
    for op, decided in zip(ops[span.start : span.stop], part.ops, strict=True):
        reads: dict[int, None] = {}
        copied = []
        made = []
        wants = decided.operands if decided is not None else (None,) * len(op.inputs)
        for vid, want in zip(op.inputs, wants, strict=True):
            root = alias.get(vid, vid)
            if want is not None and want.dims != shardings[vid].dims:
                moved = moves(prop, vid, want, w.cache)
                if not moved and vid in fused:
                    if library:
                        break  # a library call may read the slice a copy (see visit)
                    reads.update(dict.fromkeys(fused_sources(g, vid, fused, alias, memo)))
                elif not moved and root in made_at_size:
                    reads[root] = None
                    made.append((root, w.size(vid, want)))
                else:
                    keep = root in producer and root not in fused and root not in pinned
                    copied.append(((vid, want.dims), w.size(vid, want), root if keep else None))
            elif vid in fused:
                reads.update(dict.fromkeys(fused_sources(g, vid, fused, alias, memo)))
            else:
                reads[root] = None
                if want is not None and root in made_at_size:
                    made.append((root, -1))
        else:
            roots = tuple([r for r in reads if r in producer and r not in fused and r not in pinned])
            body = None
            if op.id in bodies:
                inner = max(w.body_peak(sub) for sub in bodies[op.id])
                stacked = op.outputs[op.params["num_carry"] :] if op.primitive == "scan" else ()
                early = stacked if w.compiler.breadth_first else ()
                outs = kept([v for v in op.outputs if v not in early])
                body = (inner, op.primitive, kept(early))
            else:
                outs = kept(op.outputs)
            extra = (tuple(made), body) if made or body else None
            entries.append((roots, outs, tuple(copied), extra))
            continue
        entries.append(None)
    return tuple(entries)

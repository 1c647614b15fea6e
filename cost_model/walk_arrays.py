"""The bytes live per step of a whole walk of the schedule, worked out over arrays.

`cost_model.liveness` walks the schedule op by op (`op_walk.Walk.walk`) and settles the reads of
fused values afterwards (`Walk.settle_fused`). A searcher's peak needs only the bytes each step adds
to those live, not the named buffers, and when no part of a propagation has its steps worked out
(`part_steps`: a graph's first walk, or every walk of a searcher that keeps no caches) the same
peak is found here with one pass of Python over the collectives and numpy over every read and
write:

- the step of each node is a running sum (one per op, one per new resharded copy before it, one
  per collective);
- each buffer's last read is a max over its readers' steps; a fused value's last read reaches its
  producer's operands up its chains of fused producers: under the graph's own fusion at once,
  over (fused value, buffer) pairs worked out with the graph (40,144 on Llama-8B); under
  another, in rounds (as many as the longest chain: 14 on Llama-8B);
- which operands an op reads resharded, whether each read takes a collective and its bytes are
  a function of its span's decisions and the layouts of what the span reads: found once per
  (decisions, layouts), so the 32 layers of an unrolled model, decided alike, are looked at
  once; the copies they make (one per value and layout, before its first reader) are found
  over arrays of the reads.

XLA:CPU's choices are kept: a library reduction reading a slice of a fused value gets the slice
written, a breadth-first schedule makes a scan's stacked outputs first, a reduce-scatter is an
all-reduce and a slice one step on, donated inputs read off their update path are copied
(`compiler.donated_copies`). Graphs of fewer than `MIN_OPS` live ops (a loop body) are walked op
by op (`walk_peak` returns None). tests/test_memory.py checks that both walks give the same bytes
at every step.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import numpy as np

from cost_model.compiler import Resolution, donated_copies
from cost_model.fusion import every_alias, generated
from cost_model.op_walk import table_sizes
from cost_model.part_steps import moves
from ir.comm import CollectiveKind
from ir.graph import Graph, Op
from ir.sharding import Sharding
from ir.spans import entries_getter, spans_of

if TYPE_CHECKING:
    from cost_model.op_walk import Walk

_VALUE = operator.attrgetter("value")
_PRODUCED = operator.attrgetter("produced")


# Below this many live ops the op-by-op walk costs less than the arrays' fixed cost (a cold walk
# under XLA:GPU, fusion and schedule included, on 2x4: a 91-120-op Llama-8B loop body 532 ->
# 700 us; tiny Llama, 905 ops, 7.7 -> 7.3 ms; tiny BERT, 1,380 ops, 11.8 -> 11.0 ms; unrolled
# Llama-8B, 14,323 ops, walk and settling 23 -> 9 ms).
MIN_OPS = 1000


class _Arrays:
    """What `walk_peak` reads of a graph (`Graph.derived`): its edges as arrays."""

    def __init__(self, g: Graph):
        ops = g.ops
        n_values = len(g.values)
        self.n_values = n_values
        live = np.zeros(len(ops), dtype=bool)
        live[sorted(g.live_ops)] = True
        self.n_live = int(live.sum())
        counts = np.array([len(op.inputs) for op in ops], dtype=np.int64)
        # Every operand read, op by op: where an op's start, which value, which op.
        self.in_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.in_value = np.array([v for op in ops for v in op.inputs], dtype=np.int64)
        self.in_op = np.repeat(np.arange(len(ops), dtype=np.int64), counts)
        self.in_live = live[self.in_op]
        # Every result of a live op, and the op.
        made = [(op.id, v) for op in ops if live[op.id] for v in op.outputs]
        self.out_op = np.array([n for n, _ in made], dtype=np.int64)
        self.out_value = np.array([v for _, v in made], dtype=np.int64)
        # Per live scan, its stacked outputs (made first by a breadth-first schedule).
        self.stacked = [
            (op.id, list(op.outputs[op.params["num_carry"] :]))
            for op in ops
            if live[op.id] and op.primitive == "scan"
        ]
        self.generated = np.zeros(n_values, dtype=bool)
        self.generated[sorted(generated(g))] = True
        # Per value made by an op with one result, that op's operands (as `settle_fused` reads).
        by_value = {op.outputs[0]: op.inputs for op in ops if len(op.outputs) == 1}
        per = np.zeros(n_values, dtype=np.int64)
        for v, ins in by_value.items():
            per[v] = len(ins)
        self.src_ptr = np.concatenate([[0], np.cumsum(per)]).astype(np.int64)
        self.src_value = np.array([u for v in range(n_values) for u in by_value.get(v, ())], dtype=np.int64)
        # Per span (`ir.spans.spans_of`, as propagation cuts them): its ops (start, stop), and its
        # live ops' operands as (op, position) and as values.
        self.spans = []
        for span in spans_of(g):
            reads = tuple(
                (n, k) for n in range(span.start, span.stop) if live[n] for k in range(len(ops[n].inputs))
            )
            # (the layouts of the values read, as one tuple, at C speed)
            layouts = entries_getter(tuple(ops[n].inputs[k] for n, k in reads))
            self.spans.append((span.start, span.stop, reads, layouts))


def _fusion_arrays(
    n_values: int, fused: frozenset[int], alias: dict[int, int], unbuffered
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(per value whether it is fused, the value whose buffer it holds, whether it has a buffer of
    its own)."""
    is_fused = np.zeros(n_values, dtype=bool)
    if fused:
        is_fused[np.fromiter(fused, np.int64, len(fused))] = True
    root_of = np.arange(n_values, dtype=np.int64)
    if alias:
        root_of[np.fromiter(alias.keys(), np.int64, len(alias))] = np.fromiter(
            alias.values(), np.int64, len(alias)
        )
    own = np.ones(n_values, dtype=bool)
    if unbuffered:
        own[np.fromiter(unbuffered, np.int64, len(unbuffered))] = False
    return is_fused, root_of, own


def _fused_reach(
    g: Graph, is_fused: np.ndarray, root_of: np.ndarray, a: _Arrays
) -> tuple[np.ndarray, np.ndarray]:
    """(fused value, buffer) pairs: per fused value, the buffers a read of it keeps live up its
    chains of fused producers (the closure `walk_peak`'s rounds work out read by read)."""
    producer = g.producer
    reach: dict[int, frozenset[int]] = {}
    pairs_v: list[int] = []
    pairs_root: list[int] = []
    src_ptr, src_value = a.src_ptr.tolist(), a.src_value.tolist()
    fused_ids = np.flatnonzero(is_fused).tolist()
    for v in sorted(fused_ids, key=lambda v: producer.get(v, -1)):  # producers first
        found: set[int] = set()
        for u in src_value[src_ptr[v] : src_ptr[v + 1]]:
            if is_fused[u]:
                found |= reach[u]
            else:
                found.add(int(root_of[u]))
        reach[v] = frozenset(found)
        pairs_v += [v] * len(found)
        pairs_root += sorted(found)
    return np.array(pairs_v, dtype=np.int64), np.array(pairs_root, dtype=np.int64)


def _fused_rounds(
    a: _Arrays, is_fused: np.ndarray, root_of: np.ndarray, fused_read: np.ndarray, last_read: np.ndarray
) -> None:
    """`_fused_reach`'s closure under a fusion other than the graph's own: rounds over the fused
    values whose last read moved in the round before, each passing it to its producer's operands
    (as many rounds as the longest chain of fused producers). Updates `last_read` (and
    `fused_read`)."""
    src_ptr, src_value = a.src_ptr, a.src_value
    front = np.flatnonzero(fused_read >= 0)
    while front.size:
        starts = src_ptr[front]
        counts = src_ptr[front + 1] - starts
        total = int(counts.sum())
        if not total:
            break
        offsets = np.cumsum(counts) - counts
        sources = src_value[np.repeat(starts - offsets, counts) + np.arange(total)]
        times = np.repeat(fused_read[front], counts)
        inner = is_fused[sources]
        np.maximum.at(last_read, root_of[sources[~inner]], times[~inner])
        was = fused_read.copy()
        np.maximum.at(fused_read, sources[inner], times[inner])
        front = np.flatnonzero(fused_read > was)


class _Reads:
    """The operands read resharded, as arrays with one entry per read: the op, the operand's
    position, whether reading it takes a collective (else it is a local slice), its bytes as read,
    and its layout read (dims) as an index among the walk's."""

    __slots__ = ("moved", "nbytes", "op", "operand", "want")

    def __init__(self, op, operand, moved, nbytes, want):
        self.op, self.operand, self.moved, self.nbytes, self.want = op, operand, moved, nbytes, want

    @classmethod
    def of(cls, chunks: list[tuple]) -> _Reads:
        """The reads of chunks (op, operand, moved, bytes, layout) of arrays, one after another."""
        return cls(*map(np.concatenate, zip(_NO_READS, *chunks, strict=True)))

    def sorted_by(self, position: np.ndarray) -> _Reads:
        """The reads by (schedule position of their op, operand position)."""
        order = np.lexsort((self.operand, position[self.op]))
        return _Reads(
            *(column[order] for column in (self.op, self.operand, self.moved, self.nbytes, self.want))
        )


_NO_READS = (
    np.empty(0, np.int64),
    np.empty(0, np.int64),
    np.empty(0, bool),
    np.empty(0, np.int64),
    np.empty(0, np.int64),
)


def _span_reads(w: Walk, decided: tuple, start: int, reads: tuple, have: tuple) -> tuple:
    """`_resharded`'s entry for a span: (its decisions; None if it reads nothing resharded, else per
    such read its op's offset in the span, the operand position, whether it moves, its bytes as
    read, its layout read's dims). Spans entered alike (one class, the same layouts) read alike."""
    found = []
    for (n, k), h in zip(reads, have, strict=True):
        d = decided[n - start]
        want = d.operands[k] if d is not None else None
        if want is not None and want is not h and want.dims != h.dims:
            found.append((n, k, want))
    if not found:
        return (decided, None)
    prop = w.prop
    ops = prop.graph.ops
    return (
        decided,
        np.array([n - start for n, _, _ in found], dtype=np.int64),
        np.array([k for _, k, _ in found], dtype=np.int64),
        np.array([moves(prop, ops[n].inputs[k], want, w.cache) for n, k, want in found], dtype=bool),
        np.array([w.size(ops[n].inputs[k], want) for n, k, want in found], dtype=np.int64),
        tuple(want.dims for _, _, want in found),
    )


def _library_slices(r: _Reads, r_value: np.ndarray, of_fused: np.ndarray, library) -> tuple[dict, list]:
    """({(value, layout): [bytes, first step, last step]}, [((value, layout), op, operand position)])
    of the local slices of fused values (`of_fused` of the reads `r`, in schedule order) that a
    library reads: the value's producer writes the slice, read by that library op and every
    later reader of the same slice; readers before the first library one fuse it."""
    copies: dict[tuple, list] = {}
    reads = []
    for i in np.flatnonzero(of_fused).tolist():
        n = int(r.op[i])
        key = (int(r_value[i]), int(r.want[i]))
        if key not in copies:
            if n not in library:
                continue
            copies[key] = [int(r.nbytes[i]), 0, 0]
        reads.append((key, n, int(r.operand[i])))
    return copies, reads


def _resharded(w: Walk, a: _Arrays, memo: dict) -> tuple[_Reads, int]:
    """(every operand of a live op read in another layout than stored, in no order; how many
    layouts they are read in). By span: a function of the span's decisions and the layouts of
    its operands, kept in `memo`, so the layers of an unrolled model, decided alike, are looked
    at once."""
    prop = w.prop
    shardings = prop.shardings
    parts = prop.parts
    layouts: dict[tuple, int] = {}  # dims -> index
    if len(parts) == len(a.spans):
        by_entry: dict[int, list] = {}  # id(entry) -> [entry, the starts of the spans it is]
        for part, (start, stop, reads, read_layouts) in zip(parts, a.spans, strict=True):
            if part.span.start != start or part.span.stop != stop:
                break  # not the graph's spans: op by op, below
            if not reads:
                continue
            have = read_layouts(shardings)
            key = (id(part.ops), have)
            hit = memo.get(key)
            if hit is None or hit[0] is not part.ops:
                hit = memo[key] = _span_reads(w, part.ops, start, reads, have)
            if hit[1] is not None:
                seen = by_entry.get(id(hit))
                if seen is None:
                    by_entry[id(hit)] = [hit, [start]]
                else:
                    seen[1].append(start)
        else:
            chunks = []
            for (_, at, ks, moved, nbytes, dims), starts in by_entry.values():
                times = len(starts)
                ids = np.array([layouts.setdefault(d, len(layouts)) for d in dims], dtype=np.int64)
                chunks.append(
                    (
                        (np.array(starts, dtype=np.int64)[:, None] + at).ravel(),
                        np.tile(ks, times),
                        np.tile(moved, times),
                        np.tile(nbytes, times),
                        np.tile(ids, times),
                    )
                )
            return _Reads.of(chunks), len(layouts)
    ops = prop.graph.ops
    decisions = prop.ops
    found = []
    for n in prop.graph.live_ops:
        decided = decisions[n]
        if decided is None:
            continue
        for k, (vid, want) in enumerate(zip(ops[n].inputs, decided.operands, strict=True)):
            if want is not None:
                have = shardings[vid]
                if want is not have and want.dims != have.dims:
                    found.append((n, k, vid, want))
    chunk = (
        np.array([n for n, _, _, _ in found], dtype=np.int64),
        np.array([k for _, k, _, _ in found], dtype=np.int64),
        np.array([moves(prop, vid, want, w.cache) for _, _, vid, want in found], dtype=bool),
        np.array([w.size(vid, want) for _, _, vid, want in found], dtype=np.int64),
        np.array([layouts.setdefault(want.dims, len(layouts)) for _, _, _, want in found], dtype=np.int64),
    )
    return _Reads.of([chunk]), len(layouts)


def _sizes(w: Walk, vids: list[int], layouts: list[Sharding]) -> list[int]:
    """Bytes of each value's local shard in its layout, as `Walk.size` keeps them, looked up at C
    speed; those not kept yet worked out first."""
    tables = list(map(w.sizes.__getitem__, vids))
    if None in tables:  # (no cache: a table per value, made as it is first sized)
        return list(map(w.size, vids, layouts))
    return table_sizes(tables, layouts, vids, w.size)


def walk_peak(
    w: Walk,
    order: list[Op],
    nodes: list[int],
    groups: list[list[Resolution]],
    unbuffered: frozenset[int] | set[int],
    memo: dict,
) -> tuple[np.ndarray, int] | None:
    """(per step 0..last + 1, the bytes it adds to those live; the last step) of walking `nodes`
    (as `Walk.walk` numbers steps; `order` the live ops in program order) and settling the fused
    reads, as `liveness._buffers` counts them with `peak_only`; None where the graph is walked op
    by op. `memo`: the operands read resharded by span (see `_resharded`), kept across walks of
    one graph."""
    prop = w.prop
    g = prop.graph
    if len(g.live_ops) < MIN_OPS:
        return None
    ops = g.ops
    a: _Arrays = g.derived("walk_arrays", _Arrays)
    node = np.array(nodes, dtype=np.int64)
    is_op = node >= 0
    op_nodes = node[is_op]
    if len(op_nodes) != a.n_live:
        return None  # a schedule of part of the graph
    n_values = a.n_values
    shardings = prop.shardings
    fused, alias = w.fused, w.alias

    every = g.derived("fusion.every_alias", every_alias)
    if fused is every[1] and alias is every[0] and unbuffered is every[2]:
        # (nearly every plan: the graph's own fusion, its arrays made once with it)
        is_fused, root_of, own = g.derived(
            "walk_arrays.every_alias", lambda g: _fusion_arrays(n_values, fused, alias, unbuffered)
        )
        reach = g.derived("walk_arrays.fused_reach", lambda g: _fused_reach(g, is_fused, root_of, a))
    else:
        is_fused, root_of, own = _fusion_arrays(n_values, fused, alias, unbuffered)
        reach = None

    # Operands read resharded, in schedule order: a copy made before the op the first time
    # (value, layout) is read, reused after; a local slice of a fused or generated value needs none.
    position = np.empty(len(ops), dtype=np.int64)
    position[op_nodes] = np.flatnonzero(is_op)
    r, n_layouts = _resharded(w, a, memo)
    r = r.sorted_by(position)
    r_value = a.in_value[a.in_ptr[r.op] + r.operand]
    r_root = root_of[r_value]
    r_fused = is_fused[r_value]
    # Copies: what moves, and local slices of what is neither fused nor generated.
    copied = r.moved | ~(r_fused | a.generated[r_root])
    # Per copy, (value, layout) as one number; its first read (`made`, in schedule order) makes it.
    r_key = r_value[copied] * max(1, n_layouts) + r.want[copied]
    keys, first, of_key = np.unique(r_key, return_index=True, return_inverse=True)
    made = np.sort(first)
    made_before = r.op[copied][made]  # the op each copy is made before
    increment = np.ones(len(node), dtype=np.int64)
    if len(made):
        np.add.at(increment, position[made_before], 1)
    # A local slice of a generated value: the value is made at the size read.
    sliced = w.sliced
    of_generated = ~copied & ~r_fused
    for root, b in zip(r_root[of_generated].tolist(), r.nbytes[of_generated].tolist(), strict=True):
        sliced[root] = max(sliced.get(root, 0), b)
    # A library reading a slice of a fused value: its producer writes the slice (see
    # `_library_slices`). Else a local slice of a fused value fuses too.
    library = w.library
    slices_of_fused = ~copied & r_fused
    if library and slices_of_fused.any():
        lib_copies, lib_reads = _library_slices(r, r_value, slices_of_fused, library)
    else:
        lib_copies, lib_reads = {}, []
    # A reduce-scatter lowered as an all-reduce: the slice one step after the collective.
    as_all_reduce = {}
    if w.compiler.reduce_scatter_as_all_reduce:
        for p in np.flatnonzero(~is_op).tolist():
            group = groups[-1 - nodes[p]]
            found = [x for x in group if x.key and x.first is CollectiveKind.REDUCE_SCATTER]
            if found:
                as_all_reduce[p] = found
                increment[p] += 1
    step_of_node = np.cumsum(increment)
    last = int(step_of_node[-1]) if len(step_of_node) else 0
    step = np.zeros(len(ops), dtype=np.int64)
    step[op_nodes] = step_of_node[is_op]

    last_read = np.full(n_values, -1, dtype=np.int64)
    # The copies made before one op take a step each just before it, in the order first read.
    copy_at = step[made_before]
    if len(made):
        new_op = np.ones(len(made), dtype=bool)
        new_op[1:] = made_before[1:] != made_before[:-1]
        run = np.cumsum(new_op) - 1
        run_start = np.flatnonzero(new_op)
        run_length = np.diff(np.append(run_start, len(made)))
        copy_at = copy_at - run_length[run] + (np.arange(len(made)) - run_start[run])
        np.maximum.at(last_read, r_root[copied][made], copy_at)
    copy_first = np.empty(len(keys), dtype=np.int64)
    copy_first[of_key[made]] = copy_at
    copy_last = np.full(len(keys), -1, dtype=np.int64)
    np.maximum.at(copy_last, of_key, step[r.op[copied]])
    copy_bytes = r.nbytes[copied][first]
    written = np.full(n_values, -1, dtype=np.int64)
    written[a.out_value] = step[a.out_op]
    if w.compiler.breadth_first:
        for _, stacked in a.stacked:
            written[stacked] = 1
    via_copy = np.zeros(len(a.in_value), dtype=bool)
    via_copy[a.in_ptr[r.op[copied]] + r.operand[copied]] = True
    for (vid, _), copy in lib_copies.items():
        copy[1] = copy[2] = int(written[vid])
    for key, n, k in lib_reads:
        via_copy[a.in_ptr[n] + k] = True
        copy = lib_copies[key]
        copy[2] = max(copy[2], int(step[n]))

    # Reads as stored: of a buffer (through its alias), or of a fused value (settled below).
    read = a.in_live & ~via_copy
    of_fused = is_fused[a.in_value]
    plain = read & ~of_fused
    at_edge = step[a.in_op]
    roots = root_of[a.in_value[plain]]
    np.maximum.at(last_read, roots, at_edge[plain])
    fused_read = np.full(n_values, -1, dtype=np.int64)
    into_fused = read & of_fused
    np.maximum.at(fused_read, a.in_value[into_fused], at_edge[into_fused])
    # A generated value some op reads whole (as stored) is made whole (`Walk.full`).
    full: dict[int, int] = {}
    reads_generated = a.generated[roots]
    if reads_generated.any():
        decisions = prop.ops
        for e in np.flatnonzero(plain)[reads_generated].tolist():
            n = int(a.in_op[e])
            decided = decisions[n]
            want = decided.operands[e - int(a.in_ptr[n])] if decided is not None else None
            vid = int(a.in_value[e])
            if want is not None and want.dims == shardings[vid].dims:
                root = int(root_of[vid])
                full[root] = max(full.get(root, 0), int(step[n]))

    delta = np.zeros(last + 2, dtype=np.int64)
    # Pending sums: written at their op's step into a buffer of the layout written, until the
    # collective that resolves them; the value is written then.
    at_steps: list[int] = []  # bytes added at steps, summed into `delta` at once
    added: list[int] = []
    if groups:
        # Per collective (group k), the step it runs at; per member (in groups' order), its
        # value, the step its op writes it, its bytes as written (the layout without the
        # pending axes: 4-9 distinct ones for 356-647 resolutions a cold unrolled plan).
        at_of = np.empty(len(groups), dtype=np.int64)
        at_of[-1 - node[~is_op]] = step_of_node[~is_op]
        for p in as_all_reduce:  # (the slice runs a step after the all-reduce)
            at_of[-1 - nodes[p]] -= 1
        members = [r for group in groups for r in group]
        summed = list(map(_VALUE, members))
        produced = list(map(_PRODUCED, members))
        bare = {s: Sharding(s.dims) for s in set(produced)}
        made_as = list(map(bare.__getitem__, produced))
        nbytes = _sizes(w, summed, made_as)
        counts = np.fromiter(map(len, groups), np.int64, len(groups))
        at = np.repeat(at_of, counts)
        sums = np.array(nbytes, dtype=np.int64)
        np.add.at(delta, step[list(map(g.producer.__getitem__, summed))], sums)
        np.add.at(delta, at + 1, -sums)
        tuples = counts > 1  # a tuple-shaped collective: its table of pointers
        pointers = w.compiler.pointer_bytes * counts[tuples]
        np.add.at(delta, at_of[tuples], pointers)
        np.add.at(delta, at_of[tuples] + 1, -pointers)
        written[summed] = at
        for p, reduced in as_all_reduce.items():  # the full sum, then this device's slice
            at_p = int(at_of[-1 - nodes[p]])
            for r in reduced:
                full_sum = w.size(r.value, Sharding(r.produced.dims))
                at_steps += (at_p, at_p + 2)
                added += (full_sum, -full_sum)
                written[r.value] = at_p + 1
    for n, subs in prop.bodies.items():  # a loop or branch: its body's own peak while it runs
        if subs and n in g.live_ops:
            inner = max(w.body_peak(sub) for sub in subs)
            delta[step[n]] += inner
            delta[step[n] + 1] -= inner

    # A fused value read at step t keeps its producer's operands live until t, through those
    # fused themselves: under the graph's own fusion at once, over the pairs (fused value, buffer
    # it keeps live) worked out with it; else in rounds up the chains.
    if reach is not None:
        np.maximum.at(last_read, reach[1], fused_read[reach[0]])
    else:
        _fused_rounds(a, is_fused, root_of, fused_read, last_read)
    last_read[np.fromiter(w.returned, np.int64, len(w.returned))] = last  # read as the step returns

    if w.compiler.copies_donated_inputs:
        for _, b, first, end in donated_copies(prop, order, groups, alias, step.tolist(), w.size):
            delta[first] += b
            delta[end + 1] -= b
    for b, first, end in lib_copies.values():
        at_steps += (first, end + 1)
        added += (b, -b)
    np.add.at(delta, copy_first, copy_bytes)
    np.add.at(delta, copy_last + 1, -copy_bytes)
    if at_steps:
        np.add.at(delta, at_steps, added)
    vids = np.flatnonzero((written >= 0) & own & (last_read >= 0))
    listed = vids.tolist()
    sizes = _sizes(w, listed, list(map(shardings.__getitem__, listed)))
    ends = last_read[vids]
    for v in sliced:  # a generated value made at the size its readers read, unless one reads it whole
        i = int(np.searchsorted(vids, v))
        if i < len(listed) and listed[i] == v:
            if v in full:
                sizes[i], ends[i] = w.size(v, shardings[v]), full[v]
            else:
                sizes[i] = sliced[v]
    nbytes = np.array(sizes, dtype=np.int64)
    starts = written[vids]
    np.add.at(delta, starts, nbytes)
    np.add.at(delta, np.maximum(ends, starts) + 1, -nbytes)
    return delta, last

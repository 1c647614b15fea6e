"""The ILP's memory rows: the simulator's per-device buffers as linear terms in the strategies of the
model's nodes, and the program points whose bytes must fit.

It follows cost_model.liveness (the simulator's memory, the reference) buffer for buffer, the
positions of a graph's buffers fixed by program order rather than by the plan:
  - arguments are live throughout; so are outputs not written over a donated input (XLA counts
    every output buffer for the whole step);
  - a value has a buffer where cost_model.fusion says XLA writes it (the fusion and aliases of
    the replicated plan); a fused value keeps what it is recomputed from alive until its last
    reader; a buffer is live from its op to its last reader. A reshape whose layout gives its
    result other local elements than its operand is no bitcast: a buffer of its own;
  - a value left as a pending sum is two buffers: as written, until the collective that reduces
    it, and as stored from there. That collective runs after the last member of the group XLA's
    combiner merges it into (`_collective_positions`): a data-parallel gradient of a small model
    is held twice at the end of the backward pass;
  - a value read in another layout than stored (a gathered weight; a local slice, unless it
    fuses into its reader) is a copy per value and layout, live from its first reader in that
    layout to its last (CSE merges the forward and backward gathers); its bytes depend on the
    value's node and the reader's: a pair term. The value itself is needed only until the first
    read of each layout it is copied to and the last read as stored (`_Timeline._held`);
  - a broadcast is made at the size its reader reads it in (XLA slices it away);
  - a loop or branch adds its body's buffers at the body's heaviest position (the body's inputs
    and outputs are the loop's own buffers) to the position of the op that runs it.
Positions: 2·i while op i runs, 2·i + 1 after it (where collectives run); 2·len(ops) is the end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from cost_model.compiler import Compiler
from cost_model.fusion import fused_and_aliased, fused_sources, generated
from ir.graph import Graph, Op, Value
from ir.propagate import Propagation, propagate
from ir.sharding import MeshShape, Sharding
from search.ilp_nodes import CONST_NODE, Interner, MemoryPoint, Node, NodeKind, Source

# A term's key: a node (bytes per strategy, [n]) or a pair of nodes (per pair of strategies, [n, m]).
Key = int | tuple[int, int]
# Sampled assignments of the decisions whose bytes per position choose the positions, at most.
_SAMPLES = 256
_NOTHING = (CONST_NODE, np.zeros(1))


@dataclasses.dataclass(slots=True)
class _Buffer:
    """Bytes of one buffer per strategy of `key`, live at positions start..end; `what` it holds."""

    key: Key
    bytes: np.ndarray
    start: int
    end: int
    what: str = ""


@dataclasses.dataclass(slots=True)
class _Copy:
    """A value read in a layout: its copy's bytes per strategy of `key` (0 where it is read as stored),
    its first and last reader's positions, the layout's id per sampled assignment (None: unknown)."""

    value: int
    key: Key
    bytes: np.ndarray
    first: int
    last: int
    layout: np.ndarray | None
    held: np.ndarray  # the value's own bytes as stored, per strategy of `key`
    absorbed: bool = False  # read alike with an earlier copy under most sampled assignments


class Liveness:
    """The buffers of the step and of its loop bodies, collected while the model is built.

    The builder says where it is (`timeline(g).here`), which values it reads in which layout
    (`read`, `read_pairs`), which bodies an op runs (`runs`) and, when a graph is done, how its
    values follow the nodes (`finish`); `points` then makes the memory rows.

    Args:
      g: the top graph.
      mesh: the mesh its values are sharded over.
      compiler: the backend (fusion and the all-reduce combiner's threshold).
      intern: the builder's interned shardings (the copies' cache keys).
      nodes: the builder's nodes (a list it goes on adding to; the constant node's `sample` says how
        many sampled assignments of the decisions there are).
    """

    def __init__(self, g: Graph, mesh: MeshShape, compiler: Compiler, intern: Interner, nodes: list[Node]):
        self.g, self.mesh, self.compiler, self.intern, self.nodes = g, mesh, compiler, intern, nodes
        n = len(nodes[CONST_NODE].sample)
        self.rows = np.linspace(0, n - 1, min(n, _SAMPLES)).round().astype(np.int64)
        self._props: dict[int, Propagation] | None = None
        self._timelines: dict[int, _Timeline] = {}
        self._fraction_cache: dict[int, tuple] = {}
        self._read_cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self._axes_ids: dict[tuple[str, ...], int] = {}
        self._prefix = np.ones((0, 0), dtype=bool)

    # -- sizes ------------------------------------------------------------------------------------

    def bytes(self, v: Value, s: Source) -> np.ndarray:
        """Per-device bytes of `v` per strategy of its node."""
        hit = self._fraction_cache.get(id(s.shardings))
        if hit is None or hit[0] is not s.shardings:
            fractions = np.array([sh.shard_fraction(self.mesh) for sh in s.shardings], dtype=np.float64)
            hit = self._fraction_cache[id(s.shardings)] = (s.shardings, fractions)
        return v.nbytes / hit[1]

    def _read_bytes(
        self, v: Value, have: tuple[Sharding, ...], want: tuple[Sharding, ...], free: bool
    ) -> tuple:
        """Reading `v` stored as have[a] as want[b], [n_have, n_want] each: the bytes of its copy
        (want[b]'s shard where the layouts differ, but for a local slice of a value `free` to
        slice: fused into its reader, or a broadcast), of `v` made at the size it is read in (a
        broadcast: want[b]'s shard for a local slice, else have[a]'s), and of `v` as stored. A
        read is a local slice (no collective, ir.reshard) where each dim's axes as stored are a
        prefix of its axes as read."""
        ids = self.intern.items(have), self.intern.items(want)
        key = (v.shape, v.dtype, ids[0].tobytes(), ids[1].tobytes(), free)
        hit = self._read_cache.get(key)
        if hit is not None:
            return hit
        _, rows, row_of = np.unique(ids[0], return_index=True, return_inverse=True)
        _, cols, col_of = np.unique(ids[1], return_index=True, return_inverse=True)
        h, w = self._dim_ids([have[a] for a in rows]), self._dim_ids([want[b] for b in cols])
        sliced = np.ones((len(rows), len(cols)), dtype=bool)
        same = np.ones((len(rows), len(cols)), dtype=bool)
        for d in range(h.shape[1]):
            sliced &= self._prefix[h[:, d][:, None], w[:, d][None, :]]
            same &= h[:, d][:, None] == w[:, d][None, :]
        as_read = np.broadcast_to(
            v.nbytes / np.array([want[b].shard_fraction(self.mesh) for b in cols]), same.shape
        )
        as_stored = np.broadcast_to(
            v.nbytes / np.array([have[a].shard_fraction(self.mesh) for a in rows])[:, None], same.shape
        )
        copy = np.where(same | (sliced & free), 0.0, as_read)
        made = np.where(sliced, as_read, as_stored)
        r, c = row_of.ravel(), col_of.ravel()
        hit = self._read_cache[key] = copy[r][:, c], made[r][:, c], as_stored[r][:, c]
        return hit

    def _dim_ids(self, shardings: list[Sharding]) -> np.ndarray:
        """Per sharding and dim, an id of the dim's axes ([n, rank]); `_prefix[i, j]`: whether the
        axes of id i are a prefix of those of id j."""
        ids, n = self._axes_ids, len(self._axes_ids)
        out = np.array([[ids.setdefault(d, len(ids)) for d in s.dims] for s in shardings], dtype=np.int64)
        if len(ids) > n:
            self._prefix = np.array([[y[: len(x)] == x for y in ids] for x in ids], dtype=bool)
        return out.reshape(len(shardings), -1)

    # -- what the builder reports -----------------------------------------------------------------

    def timeline(self, g: Graph) -> _Timeline:
        """The timeline of graph `g` (the step, a loop body or a branch)."""
        t = self._timelines.get(id(g))
        if t is None:
            t = self._timelines[id(g)] = _Timeline(g, *self._fusion(g))
        return t

    def _fusion(self, g: Graph) -> tuple[frozenset[int], Mapping[int, int]]:
        """The values XLA computes inside their readers, and those sharing another's buffer, as
        the simulator finds them for the replicated plan (the step's, or a body's within it)."""
        if self._props is None:
            self._props = {}
            todo = [propagate(self.g, self.mesh, {})]
            while todo:
                p = todo.pop()
                self._props[id(p.graph)] = p
                todo.extend(sub for subs in p.bodies.values() for sub in subs)
        prop = self._props.get(id(g))
        if prop is None:
            return frozenset(), {}
        fused, alias, _ = fused_and_aliased(prop, self.compiler.library_reduce_elements)
        return fused, alias

    def read(self, g: Graph, vid: int, key: object, have: Source, want: Source) -> None:
        """Value `vid` of `g` (stored as `have` says) is read as `want` says where `g` is now;
        reads of one key (the value and the layout's fingerprint) share one copy."""
        ids = self.intern.items(want.shardings)

        def layout() -> np.ndarray | None:
            if want.node == CONST_NODE:
                return np.full(len(self.rows), ids[0])
            sample = self.nodes[want.node].sample
            return None if sample is None else ids[sample[self.rows]]

        self._note(g, vid, key, have, want.shardings, lambda m: _term(have.node, want.node, m), layout)

    def read_pairs(
        self, g: Graph, vid: int, key: object, have: Source, wants, a: int, b: int, table: np.ndarray
    ) -> None:
        """`read` by a MERGE node over nodes a and b: its strategy table[i, j] reads `vid` as
        wants[table[i, j]] (a pair term over a and b)."""

        def term(m: np.ndarray) -> tuple[Key, np.ndarray]:
            if have.node == a:
                return (a, b), m[np.arange(table.shape[0])[:, None], table]
            if have.node == b:
                return (a, b), m[np.arange(table.shape[1])[None, :], table]
            return (a, b), m[0][table]

        def layout() -> np.ndarray | None:
            sa, sb = self.nodes[a].sample, self.nodes[b].sample
            if sa is None or sb is None:
                return None
            return self.intern.items(wants)[table[sa[self.rows], sb[self.rows]]]

        self._note(g, vid, key, have, wants, term, layout)

    def _note(self, g: Graph, vid: int, key: object, have: Source, wants, term: Callable, layout: Callable):
        """Records a read: its copy (one per key), and the size of a broadcast it is the first to read."""
        t = self.timeline(g)
        hit = t.copies.get(key)
        sized = vid in t.slices or (vid not in t.generated and vid not in t.args)
        t.read_at.setdefault(vid, set()).add(t.here)
        if hit is not None:
            hit.last = t.here
            if sized:
                return
        free = vid in t.fused or t.alias.get(vid, vid) in t.generated
        copy, made, held = self._read_bytes(g.values[vid], have.shardings, wants, free)
        if hit is None:
            if copy.any():
                k, b = term(copy)
                t.copies[key] = _Copy(vid, k, b, t.here, t.here, layout(), term(held)[1])
            else:
                t.copies[key] = _Copy(vid, *_NOTHING, t.here, t.here, None, _NOTHING[1])
        if not sized:  # (an argument: of a loop body, whose loop may pass it a broadcast)
            t.slices[vid] = term(made)

    def runs(self, g: Graph, op: Op, body: Graph) -> None:
        """Where `g` is now, `op` runs `body` (a loop body or a branch)."""
        t = self.timeline(g)
        inner = self.timeline(body)
        t.inner.setdefault(t.here, []).append(inner)
        for vid, bid in zip(op.inputs[-len(body.inputs) :], body.inputs, strict=True):
            if vid in t.generated and vid not in t.loop_args:
                t.loop_args[vid] = (inner, bid)

    def finish(self, g: Graph, src: Mapping[int, Source], written: Mapping[int, Source]) -> None:
        """Graph `g` is built: each value is stored as `src` says and written as `written` says."""
        t = self.timeline(g)
        t.src, t.written = src, written
        t.here = t.end

    # -- the rows ---------------------------------------------------------------------------------

    def points(self, nodes: Sequence[Node], env: Mapping[int, Source], n_points: int) -> list[MemoryPoint]:
        """Rows at up to `n_points` positions of the step: the fullest at every buffer's most bytes
        and at its fewest, then those nearest the peak of the most sampled assignments
        (`_cover`); at a position that runs a body, a row per heaviest position of the body.

        Args:
          nodes: the model's nodes (an INPUT node's `bytes` are its arguments', live throughout).
          env: how each argument follows a node.
          n_points: how many positions to keep.
        """
        g = self.g
        top = self.timeline(g)
        fixed = [_Buffer(k, n.bytes, 0, top.end) for k, n in enumerate(nodes) if n.kind is NodeKind.INPUT]
        const = sum(self.bytes(g.values[v], env[v])[0] for v in g.inputs if env[v].node == CONST_NODE)
        if len(g.outputs) > 1:  # the output tuple: a table of pointers
            const += self.compiler.pointer_bytes * len(g.outputs)
        alias = g.output_alias or (-1,) * len(g.outputs)
        for k, vid in enumerate(g.outputs):
            if alias[k] < 0 or alias[k] not in g.donated:
                s = top.src[vid].resolved()
                fixed.append(_Buffer(s.node, self.bytes(g.values[vid], s), 0, top.end, g.values[vid].name))
        buffers = fixed + top.buffers(self)
        inner = {x: [r for t in ts for r in t.reps(self)] for x, ts in top.inner.items()}
        starts, ends = np.array([b.start for b in buffers]), np.array([b.end for b in buffers])
        out = []
        for x in _cover(*_curves(buffers, inner, self), n_points):
            terms = _terms([buffers[k] for k in np.flatnonzero((starts <= x) & (ends >= x))])
            for body in inner.get(x, [{}]):
                out.append(_point(_where(g, x), const, _sum(terms, body)))
        return out


class _Timeline:
    """The buffers of one graph at its positions (see the module doc)."""

    def __init__(self, g: Graph, fused: frozenset[int], alias: Mapping[int, int]):
        self.g = g
        self.fused, self.alias = fused, alias
        self.end = 2 * len(g.ops)
        self.here = 0  # the builder's position
        self.copies: dict[object, _Copy] = {}  # (value, the layout's fingerprint) -> its copy
        self.inner: dict[int, list[_Timeline]] = {}  # position -> the bodies an op runs there
        self.generated = g.derived("fusion.generated", generated)
        self.args = frozenset(g.inputs)
        self.slices: dict[int, tuple[Key, np.ndarray]] = {}  # value -> its bytes as first read
        self.loop_args: dict[int, tuple[_Timeline, int]] = {}  # broadcast -> (a body, its input)
        self.src: Mapping[int, Source] = {}
        self.written: Mapping[int, Source] = {}
        # value an alias op makes -> [position written, position last read, its operand]
        self.reshaped: dict[int, list] = {}
        self.read_at: dict[int, set[int]] = {}  # value -> positions of the reads the builder reported
        self.kept: dict[int, int] = {}  # value -> last position a fused or aliasing reader needs it
        self.positions: dict[int, list[int]] = {}  # value -> positions of the ops that read it
        self._reps: list[dict[Key, np.ndarray]] | None = None
        self._spans: dict[int, tuple[int, int]] | None = None

    def spans(self) -> dict[int, tuple[int, int]]:
        """Value id -> (position written, position last read) of the values with a buffer of their
        own: not computed inside their readers, not sharing another's, not an argument or result."""
        if self._spans is None:
            self._spans = self._walk()
        return self._spans

    def _walk(self) -> dict[int, tuple[int, int]]:
        g, fused, alias = self.g, self.fused, self.alias
        pinned = {alias.get(v, v) for v in (*g.inputs, *g.outputs)}
        memo: dict[int, frozenset[int]] = {}
        born: dict[int, int] = {}
        last: dict[int, int] = {}
        for i, op in enumerate(g.ops):
            if op.id not in g.live_ops:
                continue
            for vid in op.inputs:
                roots = fused_sources(g, vid, fused, alias, memo) if vid in fused else (alias.get(vid, vid),)
                for r in roots:
                    last[r] = 2 * i
                    if r != vid:  # a read of what is computed from it, or of what shares it
                        self.kept[r] = 2 * i
                self.positions.setdefault(vid, []).append(2 * i)
                if vid in self.reshaped:
                    self.reshaped[vid][1] = 2 * i
            for vid in op.outputs:
                if vid not in fused and vid not in alias and vid not in pinned:
                    born[vid] = 2 * i
                elif vid in alias and op.inputs and alias[vid] not in pinned:
                    self.reshaped[vid] = [2 * i, 2 * i, op.inputs[0]]
        return {vid: (i, last[vid]) for vid, i in born.items() if vid in last}

    def buffers(self, live: Liveness) -> list[_Buffer]:
        """The graph's buffers: values (a pending sum as written and as stored) and copies."""
        g = self.g
        out: list[_Buffer] = []
        copies = _bridged(self.copies.values(), live)
        families: dict[int, list[_Copy]] = {}
        for c in copies:
            families.setdefault(c.value, []).append(c)
        sums: dict[int, tuple[int, float]] = {}
        parts: dict[int, tuple[Source, np.ndarray, Source, int]] = {}
        for vid, (i, j) in self.spans().items():
            v = g.values[vid]
            s = self.src.get(vid)
            if s is None:  # made by an op the model does not derive: as the replicated plan has it
                out.append(_Buffer(CONST_NODE, np.array([float(v.nbytes)]), i, j, v.name))
                continue
            w = self.written.get(vid, s)
            partial = np.array([bool(x.partial) for x in w.shardings])
            if not partial.any():
                made = self._made(vid)
                if made is not None:
                    out.append(_Buffer(*made, i, j, v.name))
                else:
                    out += self._held(vid, s.node, live.bytes(v, s.resolved()), i, j, families.get(vid, []))
                continue
            sums[vid] = (i, float(live.bytes(v, w)[partial].max()))
            parts[vid] = (w, partial, s.resolved(), j)
        at = _collective_positions(g, sums, live.compiler)
        for vid, (w, partial, s, j) in parts.items():
            i, c, v = sums[vid][0], at[vid], g.values[vid]
            wb = live.bytes(v, w)
            out.append(_Buffer(w.node, np.where(partial, wb, 0.0), i, c, f"{v.name} [as written]"))
            out.append(_Buffer(w.node, np.where(partial, 0.0, wb), i, c - 1, v.name))  # no sum
            out.append(_Buffer(s.node, live.bytes(v, s), c, max(j, c), v.name))  # reduced
        for vid, (i, j, u) in self.reshaped.items():
            # Counted where the result and its operand follow one node.
            s, o = self.src.get(vid), self.src.get(u)
            if s is not None and o is not None and s.node == o.node:
                b = live.bytes(g.values[vid], s.resolved())
                differ = np.abs(b - live.bytes(g.values[u], o.resolved())) > 0.5
                if differ.any():
                    out.append(_Buffer(s.node, np.where(differ, b, 0.0), i, j, g.values[vid].name))
        for c in copies:
            if c.bytes.any():
                out.append(_Buffer(c.key, c.bytes, c.first, c.last, f"{g.values[c.value].name} (copy)"))
        return out

    def _held(self, vid: int, node: int, b: np.ndarray, i: int, j: int, reads: list[_Copy]) -> list[_Buffer]:
        """A value's own buffer: from its op to the last read that needs it, where each layout it
        is read in is copied from it at the first read in that layout (cost_model.liveness): until
        the last read in its layout as stored, the last first read of another layout, and the last
        read of an op the builder does not report (a loop's, a fused reader's); after that, live
        while the reads of the layout that ends last (of those that end later) read it as stored."""
        name = self.g.values[vid].name
        if not reads:
            return [_Buffer(node, b, i, j, name)]
        others = [x for x in self.positions.get(vid, ()) if x not in self.read_at.get(vid, ())]
        sure = max([i, self.kept.get(vid, i), *others, *(c.first for c in reads if not c.absorbed)])
        sure = max([sure, *(c.last for c in reads if not c.bytes.any())])
        out = [_Buffer(node, b, i, max(sure, i), name)]
        later = sorted((c for c in reads if c.bytes.any() and c.last > sure), key=lambda c: -c.last)
        for k, c in enumerate(later):
            start = max(sure, later[k + 1].last if k + 1 < len(later) else sure) + 1
            out.append(_Buffer(c.key, np.where(c.bytes > 0, 0.0, c.held), start, c.last, name))
        return out

    def _made(self, vid: int) -> tuple[Key, np.ndarray] | None:
        """A broadcast's bytes as XLA makes it: at the size its first reader (or a loop body it is
        passed to) reads it in; None for other values."""
        if vid not in self.generated:
            return None
        if vid in self.loop_args:
            body, bid = self.loop_args[vid]
            if not any(r in body.g.live_ops for r in body.g.consumers.get(bid, ())):
                return _NOTHING  # the body does not read it: XLA drops it
            return body.slices.get(bid)
        return self.slices.get(vid)

    def reps(self, live: Liveness) -> list[dict[Key, np.ndarray]]:
        """The body's bytes at its fullest positions, at its buffers' most and fewest bytes."""
        if self._reps is None:
            buffers = self.buffers(live)
            inner = {x: [r for t in ts for r in t.reps(live)] for x, ts in self.inner.items()}
            self._reps = [
                _sum(_terms([b for b in buffers if b.start <= x <= b.end]), body)
                for x in _cover(*_curves(buffers, inner, live), 2, samples=False)
                for body in inner.get(x, [{}])
            ]
        return self._reps


def _bridged(copies, live: Liveness) -> list[_Copy]:
    """The copies, each (in place) live until the last read of a later copy of its value that reads
    its layout under most sampled assignments where it copies (the forward and backward matmuls
    reading a gathered weight, say: XLA keeps one copy); elsewhere it is counted too long."""
    by_value: dict[int, list[_Copy]] = {}
    for c in copies:
        by_value.setdefault(c.value, []).append(c)
    out = []
    for cs in by_value.values():
        cs.sort(key=lambda c: c.first)
        moved = [_sampled(c.key, c.bytes, live) > 0 for c in cs]
        for k, a in enumerate(cs):
            if a.absorbed or a.layout is None or not moved[k].any():
                continue
            for m in range(k + 1, len(cs)):
                b = cs[m]
                if b.layout is not None and not b.absorbed:
                    alike = moved[k] & moved[m] & (a.layout == b.layout)
                    if 2 * alike.sum() >= moved[k].sum():
                        a.last = max(a.last, b.last)
                        b.absorbed = True
        out += cs
    return out


def _collective_positions(
    g: Graph, sums: Mapping[int, tuple[int, float]], compiler: Compiler
) -> dict[int, int]:
    """Per value that may be a pending sum ((position written, most bytes written)), the position of
    the collective that reduces it: after the last op that writes a member of its combined group.
    As XLA's combiner (cost_model.compiler.combine), in program order per key, a group takes the
    next sums while under the threshold and independent of its members; one over it is alone.
    XLA's key (kind, mesh axes, dtype) depends on the plan; this is (dtype, whether a sum depends
    on it: parameters' gradients apart from activations'). (Keyed by how each sampled plan reduces
    a sum, DP gradients of different parameters fall apart: 12% under on tiny GPT's DP plan.)"""
    if not sums:
        return {}
    bit = {vid: 1 << k for k, vid in enumerate(sums)}
    anc: dict[int, int] = {}  # value -> the sums it depends on (bits)
    for op in g.ops:
        if op.id in g.live_ops:
            a = 0
            for u in op.inputs:
                a |= anc.get(u, 0) | bit.get(u, 0)
            if a:
                anc.update(dict.fromkeys(op.outputs, a))
    below = 0  # the sums another sum depends on
    for vid in sums:
        below |= anc.get(vid, 0)
    keys: dict[tuple, list[int]] = {}
    for vid in sorted(sums, key=lambda v: sums[v][0]):
        keys.setdefault((g.values[vid].dtype, bool(below & bit[vid])), []).append(vid)
    cap = compiler.all_reduce_combine_bytes
    at: dict[int, int] = {}

    def close(group: list[int]) -> None:
        last = max(sums[m][0] for m in group)
        at.update(dict.fromkeys(group, last + 1))

    for members in keys.values():
        group: list[int] = []
        total, bits = 0.0, 0
        for vid in members:
            b = sums[vid][1]
            if b > cap:
                at[vid] = sums[vid][0] + 1
                continue
            if group and (total + b > cap or anc.get(vid, 0) & bits or len(group) >= compiler.combine_count):
                close(group)
                group, total, bits = [], 0.0, 0
            group.append(vid)
            total += b
            bits |= bit[vid]
        if group:
            close(group)
    return at


def _sampled(key: Key, b: np.ndarray, live: Liveness) -> np.ndarray:
    """A term's bytes under each sampled assignment of `live.rows` (a node with no sample: its
    fewest)."""
    rows, nodes = live.rows, live.nodes
    if key == CONST_NODE:
        return np.full(len(rows), float(b[0]))
    samples = [nodes[k].sample for k in (key if isinstance(key, tuple) else (key,))]
    if any(s is None for s in samples):
        return np.full(len(rows), b.min())
    return b[tuple(s[rows] for s in samples)]


def _curves(buffers: Sequence[_Buffer], inner: Mapping[int, list], live: Liveness) -> tuple:
    """(positions, bytes live there [rows, positions]) at every buffer's most bytes, at its fewest,
    and under each sampled assignment of `live.rows`; the positions where a buffer starts or a body
    runs (the bytes live peak at one of them), a body's heaviest added where it runs."""

    def at(key: Key, b: np.ndarray) -> np.ndarray:
        return np.concatenate(([b.max(), b.min()], _sampled(key, b, live)))

    starts, ends = np.array([b.start for b in buffers], dtype=np.int64), np.array([b.end for b in buffers])
    where = np.unique(np.concatenate([starts, np.array(list(inner), dtype=np.int64)]))
    v = np.array([at(b.key, b.bytes) for b in buffers]).reshape(len(buffers), 2 + len(live.rows))
    delta = np.zeros((len(where) + 1, v.shape[1]))
    np.add.at(delta, np.searchsorted(where, starts), v)
    np.add.at(delta, np.searchsorted(where, ends, side="right"), -v)
    curves = np.cumsum(delta, axis=0)[:-1].T
    for x, bodies in inner.items():
        heaviest = np.max([sum((at(k, b) for k, b in t.items()), np.zeros(len(curves))) for t in bodies], 0)
        curves[:, np.searchsorted(where, x)] += heaviest
    return where, curves


def _cover(where: np.ndarray, curves: np.ndarray, n_points: int, *, samples: bool = True) -> list[int]:
    """Up to `n_points` of the positions `where` (columns of `curves`): the fullest at every
    buffer's most and fewest bytes (rows 0 and 1), then, greedily, the one that brings the rows
    nearest their own peaks (the fraction of its peak each row reaches at the positions chosen,
    summed), while any row gains."""
    if not curves.shape[1]:
        return []
    picks = {int(np.argmax(curves[0])), int(np.argmax(curves[1]))}
    if not samples:
        return sorted(where[list(picks)].tolist())
    frac = curves / np.maximum(curves.max(axis=1, keepdims=True), 1.0)
    covered = frac[:, sorted(picks)].max(axis=1)
    while len(picks) < min(n_points, curves.shape[1]):
        gain = np.maximum(frac, covered[:, None]).sum(axis=0)
        gain[sorted(picks)] = -1.0
        x = int(np.argmax(gain))
        if gain[x] <= covered.sum() + 1e-9:
            break
        picks.add(x)
        covered = np.maximum(covered, frac[:, x])
    return sorted(where[list(picks)].tolist())


def _terms(buffers: Sequence[_Buffer]) -> dict[Key, np.ndarray]:
    """The buffers' bytes summed per key (constants under CONST_NODE)."""
    terms: dict[Key, np.ndarray] = {}
    for b in buffers:
        terms[b.key] = terms[b.key] + b.bytes if b.key in terms else b.bytes
    return terms


def _sum(x: Mapping[Key, np.ndarray], y: Mapping[Key, np.ndarray]) -> dict[Key, np.ndarray]:
    out = dict(x)
    for k, b in y.items():
        out[k] = out[k] + b if k in out else b
    return out


def _term(have: int, want: int, m: np.ndarray) -> tuple[Key, np.ndarray]:
    """A read's bytes per (have strategy, want strategy) as a term: a node's where one node decides."""
    if have == want:
        return have, np.diagonal(m).copy()
    if have == CONST_NODE:
        return want, m[0].copy()
    if want == CONST_NODE:
        return have, m[:, 0].copy()
    return (have, want), m


def _point(where: str, const: float, terms: Mapping[Key, np.ndarray]) -> MemoryPoint:
    const += float(terms[CONST_NODE][0]) if CONST_NODE in terms else 0.0
    nodes = {k: b for k, b in terms.items() if isinstance(k, int) and k != CONST_NODE}
    return MemoryPoint(where, const, nodes, {k: b for k, b in terms.items() if isinstance(k, tuple)})


def _where(g: Graph, x: int) -> str:
    if x >= 2 * len(g.ops):
        return "end"
    return f"{'after ' if x % 2 else ''}op {x // 2} ({g.ops[x // 2].primitive})"

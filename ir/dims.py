"""Dimension groups: tensor dims that the factor rules tie together across the whole graph.

Two dims are in one group when some op's rule maps both to the same factor (for a compound dim,
its major factor: sharding a merged [heads*head_dim] dim shards its heads). Scan and cond tie
their operands and results to their bodies' inputs and outputs. "Shard group G over mesh axis a"
is then one decision for every tensor in G — the unit all searchers share (TOAST, PartIR).

A tensor that holds one group in two dims (attention scores [b, h, s_q, s_k] hold the sequence
group twice) is a conflict: at most one of those dims can take the group's axis.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from ir.graph import Graph

DimKey = tuple[int, int, int]  # (graph number in walk order, value id, dim)


@dataclasses.dataclass(frozen=True, slots=True)
class DimGroup:
    """One group of tied dims.

    Attributes:
      id: index in `DimGroups.groups`.
      name: a readable representative, e.g. 'params/layers_0/mlp/w_in:1'.
      size: the smallest size among its dims (a shard count must divide the dims it shards).
      members: (graph number, value id, dim) of every dim in the group; graph 0 is the top graph.
      loop: True for the stacked (iteration) dim of a scan's sliced inputs and stacked outputs;
        sharding it would be pipeline parallelism, which a scan does not run.
    """

    id: int
    name: str
    size: int
    members: tuple[DimKey, ...]
    loop: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class DimGroups:
    """All groups of a graph.

    Attributes:
      groups: the groups, largest first.
      of: (graph number, value id, dim) -> group id.
      conflicts: (graph number, value id, group id) for tensors holding a group in two dims.
      graphs: the graphs by number (0 is the top graph, then bodies in walk order).
    """

    groups: tuple[DimGroup, ...]
    of: dict[DimKey, int]
    conflicts: tuple[tuple[int, int, int], ...]
    graphs: tuple[Graph, ...]

    def group_of(self, value_id: int, dim: int, graph: int = 0) -> DimGroup:
        return self.groups[self.of[(graph, value_id, dim)]]


class _UnionFind:
    def __init__(self):
        self.parent: dict[DimKey, DimKey] = {}

    def add(self, x: DimKey) -> None:
        self.parent.setdefault(x, x)

    def find(self, x: DimKey) -> DimKey:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: DimKey, b: DimKey) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _graphs(graph: Graph) -> Iterator[Graph]:
    yield graph
    for op in graph.ops:
        for body in op.body:
            yield from _graphs(body)


def dim_groups(graph: Graph) -> DimGroups:
    """Unifies tensor dims through every op's factor rule and every loop or branch boundary."""
    graphs = tuple(_graphs(graph))
    number = {id(g): n for n, g in enumerate(graphs)}
    uf = _UnionFind()
    loops: list[DimKey] = []
    for n, g in enumerate(graphs):
        for v in g.values:
            for d, size in enumerate(v.shape):
                if size > 1:
                    uf.add((n, v.id, d))
    for n, g in enumerate(graphs):
        for op in g.ops:
            if op.rule is not None:
                by_factor: dict[int, DimKey] = {}
                tensors = (
                    *zip(op.inputs, op.rule.operands, strict=True),
                    *zip(op.outputs, op.rule.results, strict=True),
                )
                for vid, dims in tensors:
                    for d, fs in enumerate(dims):
                        if fs:
                            key = (n, vid, d)
                            first = by_factor.setdefault(fs[0], key)
                            uf.union(first, key)
            elif op.primitive == "scan":
                _tie_scan(uf, n, number[id(op.body[0])], op, g)
                nc, nk = op.params["num_consts"], op.params["num_carry"]
                stacked = [(n, v, 0) for v in (*op.inputs[nc + nk :], *op.outputs[nk:])]
                stacked = [k for k in stacked if k in uf.parent]
                for k in stacked:
                    uf.union(stacked[0], k)
                loops.extend(stacked[:1])
            elif op.primitive == "cond":
                for branch in op.body:
                    b = number[id(branch)]
                    _tie(uf, n, op.inputs[1:], b, branch.inputs, g, 0)
                    _tie(uf, n, op.outputs, b, branch.outputs, g, 0)
    members: dict[DimKey, list[DimKey]] = {}
    for key in uf.parent:
        members.setdefault(uf.find(key), []).append(key)
    ordered = sorted(members.values(), key=lambda m: (-len(m), min(m)))
    groups, of = [], {}
    loop_roots = {uf.find(k) for k in loops}
    for gid, keys in enumerate(ordered):
        keys.sort()
        size = min(graphs[n].values[vid].shape[d] for n, vid, d in keys)
        loop = uf.find(keys[0]) in loop_roots
        groups.append(DimGroup(gid, _name(graphs, keys), size, tuple(keys), loop))
        for k in keys:
            of[k] = gid
    conflicts = []
    for n, g in enumerate(graphs):
        for v in g.values:
            seen: set[int] = set()
            for d in range(v.rank):
                gid = of.get((n, v.id, d))
                if gid is None:
                    continue
                if gid in seen:
                    conflicts.append((n, v.id, gid))
                seen.add(gid)
    return DimGroups(tuple(groups), of, tuple(dict.fromkeys(conflicts)), graphs)


def _tie(uf: _UnionFind, n: int, outer, b: int, inner, g: Graph, offset: int) -> None:
    """Ties dims of outer values to the matching inner values' dims (outer dim = inner + offset)."""
    for ov, iv in zip(outer, inner, strict=True):
        for d in range(g.values[ov].rank - offset):
            a, c = (n, ov, d + offset), (b, iv, d)
            if a in uf.parent and c in uf.parent:
                uf.union(a, c)


def _tie_scan(uf: _UnionFind, n: int, b: int, op, g: Graph) -> None:
    body = op.body[0]
    nc, nk = op.params["num_consts"], op.params["num_carry"]
    fixed = nc + nk
    _tie(uf, n, op.inputs[:fixed], b, body.inputs[:fixed], g, 0)
    _tie(uf, n, op.inputs[fixed:], b, body.inputs[fixed:], g, 1)  # xs: stacked on dim 0
    _tie(uf, n, op.outputs[:nk], b, body.outputs[:nk], g, 0)
    _tie(uf, n, op.outputs[nk:], b, body.outputs[nk:], g, 1)  # ys: stacked on dim 0
    for j in range(nk):  # a carry keeps its layout from one trip to the next
        _tie(uf, b, [body.inputs[nc + j]], b, [body.outputs[j]], body, 0)


def _name(graphs: tuple[Graph, ...], keys: list[DimKey]) -> str:
    """Prefers a parameter or batch input as the representative, else the first member."""

    def rank(k: DimKey) -> tuple:
        v = graphs[k[0]].values[k[1]]
        pref = {"param": 0, "batch": 1}.get(v.role.value, 2)
        return (pref, k[0], k[1], k[2])

    n, vid, d = min(keys, key=rank)
    return f"{graphs[n].values[vid].name}:{d}"

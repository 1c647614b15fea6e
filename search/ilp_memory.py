"""The ILP's memory rows: buffers' live ranges and the program points whose per-device bytes must fit."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from cost_model.compute import fused_values
from cost_model.fusion import GENERATED, fused_sources
from ir.graph import Graph, Op, Value
from ir.sharding import MeshShape, Sharding
from search.ilp_nodes import CONST_NODE, MemoryPoint, Node, NodeKind, Source

# Ops whose result is their operand's buffer (cost_model.fusion's aliases).
_ALIASES = frozenset(
    "name copy copy_p stop_gradient optimization_barrier sharding_constraint mesh_cast reshard reshape squeeze "
    "expand_dims".split()
)


def live_ranges(
    g: Graph, to_end: Sequence[int] = (), in_place: Sequence[int] = ()
) -> dict[int, tuple[int, int]]:
    """Value id -> (op index that writes it, op index that last reads it) of the buffers of `g`.

    A value computed inside its readers' fusions has no buffer, but keeps the buffers it is
    computed from alive until its last reader; an annotation or reshape shares its operand's
    buffer. `to_end`: values live to the end of the graph; `in_place`: values written over an
    argument's buffer (counted with the arguments).
    """
    fused = fused_values(g)
    root: dict[int, int] = {}
    for op in g.ops:
        if op.primitive in _ALIASES and op.inputs and op.outputs:
            root[op.outputs[0]] = root.get(op.inputs[0], op.inputs[0])
    memo: dict[int, frozenset[int]] = {}

    born: dict[int, int] = {}
    last: dict[int, int] = {}
    for i, op in enumerate(g.ops):
        for vid in op.inputs:
            for r in fused_sources(g, vid, fused, root, memo) if vid in fused else (root.get(vid, vid),):
                last[r] = max(last.get(r, i), i)
        if op.primitive in GENERATED:
            continue  # made at the size each reader reads it in, where it reads it
        for vid in op.outputs:
            if vid not in fused and vid not in root:
                born[vid] = i
    for vid in to_end:
        r = root.get(vid, vid)
        last[r] = len(g.ops)
    skip = set(in_place)
    return {vid: (i, last[vid]) for vid, i in born.items() if vid in last and vid not in skip}


class Liveness:
    """Per-device bytes live at program points of the top graph (a scan adds its body's peak).

    Args:
      g: the top graph.
      mesh: the mesh its values are sharded over.
    """

    def __init__(self, g: Graph, mesh: MeshShape):
        self.g = g
        self.mesh = mesh
        alias = g.output_alias or (-1,) * len(g.outputs)
        # Outputs live to the end, but those written over a donated input in place.
        kept = [vid for k, vid in enumerate(g.outputs) if alias[k] < 0 or alias[k] not in g.donated]
        in_place = [vid for k, vid in enumerate(g.outputs) if alias[k] >= 0 and alias[k] in g.donated]
        self.spans = live_ranges(g, kept, in_place)
        self.order = {op.id: i for i, op in enumerate(g.ops)}
        self.inside: dict[int, list[tuple[Value, Source]]] = {}
        self._fraction_cache: dict[int, tuple] = {}

    def bytes(self, v: Value, s: Source) -> np.ndarray:
        """Per-device bytes of `v` per strategy of its node."""
        return v.nbytes / self._fractions(s.shardings)

    def _fractions(self, shardings: tuple[Sharding, ...]) -> np.ndarray:
        """How many pieces each sharding splits its tensor into (cached per tuple object)."""
        hit = self._fraction_cache.get(id(shardings))
        if hit is None or hit[0] is not shardings:
            hit = self._fraction_cache[id(shardings)] = (
                shardings,
                np.array([sh.shard_fraction(self.mesh) for sh in shardings], dtype=np.float64),
            )
        return hit[1]

    def body(self, op: Op, body: Graph, inner: Mapping[int, Source]) -> None:
        """A scan body's buffers at its heaviest point (by unsharded bytes) count at the scan."""
        spans = live_ranges(body, body.outputs)
        live = np.zeros(len(body.ops) + 1)
        for vid, (i, j) in spans.items():
            live[i : j + 1] += body.values[vid].nbytes
        p = int(np.argmax(live)) if len(live) else 0
        self.inside[op.id] = [
            (body.values[v], inner[v]) for v, (i, j) in spans.items() if i <= p <= j and v in inner
        ]

    def points(
        self, nodes: Sequence[Node], src: Mapping[int, Source], env: Mapping[int, Source], n_points: int
    ) -> list[MemoryPoint]:
        """The `n_points` points with most bytes live, half by unsharded and half by fully sharded size.

        Args:
          nodes: the model's nodes (an INPUT node's `bytes` are its arguments', live throughout).
          src: how each value of the top graph follows a node.
          env: how each argument follows a node.
          n_points: how many points to keep.
        """
        g = self.g
        n = len(g.ops) + 1
        spans = [(vid, i, j) for vid, (i, j) in self.spans.items()]
        per_value = {vid: self.bytes(g.values[vid], src[vid]) for vid, _, _ in spans}
        high, low = np.zeros(n), np.zeros(n)
        for vid, i, j in spans:
            high[i : j + 1] += per_value[vid].max()
            low[i : j + 1] += per_value[vid].min()
        inside = {
            self.order[op_id]: [(s, self.bytes(v, s)) for v, s in items]
            for op_id, items in self.inside.items()
        }
        for i, items in inside.items():
            high[i] += sum(b.max() for _, b in items)
            low[i] += sum(b.min() for _, b in items)
        half = max(1, n_points // 2)
        picks = sorted(
            set(np.argsort(-high, kind="stable")[:half].tolist())
            | set(np.argsort(-low, kind="stable")[:half].tolist())
        )
        args = {k: node.bytes for k, node in enumerate(nodes) if node.kind is NodeKind.INPUT}
        args_const = sum(
            g.values[vid].nbytes / env[vid].shardings[0].shard_fraction(self.mesh)
            for vid in g.inputs
            if env[vid].node == CONST_NODE
        )
        out = []
        for p in picks:
            terms = {k: b.copy() for k, b in args.items()}
            const = float(args_const)
            items = [(src[vid], per_value[vid]) for vid, i, j in spans if i <= p <= j] + inside.get(p, [])
            for s, b in items:
                if s.node == CONST_NODE:
                    const += float(b[0])
                elif s.node in terms:
                    terms[s.node] = terms[s.node] + b
                else:
                    terms[s.node] = b.copy()
            where = f"op {p} ({g.ops[p].primitive})" if p < len(g.ops) else "end"
            out.append(MemoryPoint(where, const, terms))
        return out

"""The ILP's model of where pending sums are resolved: into the layout of the step input their
readers meet (ir.sum_targets), as ir.propagate does.

Propagation resolves a data-parallel gradient at its first read into the layout the optimizer
state it meets a few ops on implies (a reduce-scatter), and a loop body resolves a sum it leaves
in a stacked output into the layout the update after the loop implies. That layout depends on two
nodes of the model, the sum's and the met input's, so the outcome is a MERGE node over their
strategy pairs (Alpa-style pair booleans), its reshard priced per pair. A mixin of
search.ilp_model.Builder: it reads the builder's nodes, prices and constraint.
"""

from __future__ import annotations

import numpy as np

from ir.graph import Graph, Op
from ir.sharding import Sharding
from ir.sum_targets import resolution, scatters, stacked_target, sum_kind, sum_paths
from search.ilp_factors import Groups
from search.ilp_nodes import CONST_NODE, N_PARTS, Combo, Node, NodeKind, Source


class SumResolution:
    """Builder methods for resolving pending sums into met layouts (see the module doc).

    Uses the builder's `nodes`, `combos`, `by_key`, `prices`, `mesh`, `constraint`, `reachable`
    and `_add`; keeps `_written` ((id of graph, value) -> the source as its op writes it, for
    memory) and `_stacked` (id of a loop body -> per stacked output, the layout per strategy of a
    node).
    """

    def _to_partner(self, g: Graph, vid: int, have: Source, meetings, src, mult: int) -> Source:
        """The first read of pending sum `vid` resolves it into the layout of the step input its
        readers meet (ir.sum_targets.resolution, as ir.propagate does): per strategy of its node, or
        per pair of strategies of its node and the met input's (a MERGE node over the two). Values
        the meetings consult that depend on a third node are beyond the model: the sum is left to
        its reader."""
        a = have.node
        consulted = self._consulted(g, meetings, src, self._stacked.get(id(g), {}))
        others = list(dict.fromkeys(s.node for _, s in consulted if s.node not in (a, CONST_NODE)))
        if len(others) > 1:
            return have
        b = others[0] if others else CONST_NODE
        pairs = self.reachable(a, b) if others else [(i, 0) for i in range(self.nodes[a].size)]
        known = _Known()
        outs: dict[int, Sharding] = {}
        outcome: dict[tuple[Sharding, Groups], int] = {}
        table = np.zeros((self.nodes[a].size, self.nodes[b].size), dtype=np.int64)
        for i, j in pairs:
            h = have.shardings[i]
            want = None
            if h.partial:
                pick = {a: i, b: j, CONST_NODE: 0}
                known.clear()
                outs.clear()
                for u, s in consulted:
                    x = s.shardings[pick[s.node]]
                    if isinstance(u, tuple):
                        if x is not None:  # a stacked output with no layout under this strategy
                            outs[u[1]] = x
                    else:
                        known[u] = x
                want = resolution(g, meetings, h, known, self.constraint, self.mesh, outs)
                if want is not None and not scatters(sum_kind(g, vid), have.groups[i], h, want, self.mesh):
                    want = Sharding(h.dims)  # all-reduced, then sliced where read (ir.propagate)
            table[i, j] = outcome.setdefault(
                (h, have.groups[i]) if want is None else (want, ()), len(outcome)
            )
        made = list(outcome)
        if all(made[table[i, j]] == (have.shardings[i], have.groups[i]) for i, j in pairs):
            return have
        strategies = tuple(s for s, _ in made)
        m = self.prices.matrix(g, vid, have, strategies) * mult  # [n_a, n_outcomes, P]
        if not others:
            # Every strategy of `a` resolves as it alone says: the read is charged to it.
            rows = np.arange(table.shape[0])
            self.nodes[a].cost += m[rows, table[:, 0]]
            return Source(
                a, tuple(strategies[t] for t in table[:, 0]), tuple(made[t][1] for t in table[:, 0])
            )
        cost = m[np.arange(table.shape[0])[:, None], table]
        # The sums of one parameter in every layer resolve alike over the same two nodes (the
        # decision space ties layers): one node serves them all, their reshards summed.
        key = ("resolved", a, b, table.tobytes(), tuple(made))
        idx = self.by_key.get(key)
        if idx is not None:
            self.nodes[idx].members += 1
            self.combos[idx].cost += cost
            return Source(idx, strategies, tuple(gr for _, gr in made))
        name = f"{g.values[vid].name} (resolved)"
        node = Node(NodeKind.MERGE, name, list(made), np.zeros((len(made), N_PARTS)))
        na, nb = self.nodes[a].sample, self.nodes[b].sample
        node.sample = table[na, nb] if na is not None and nb is not None else None
        idx = self.by_key[key] = self._add(node)
        self.combos[idx] = Combo(a, b, table, cost)
        return Source(idx, strategies, tuple(gr for _, gr in made))

    def _consulted(self, g: Graph, meetings, src, stacked) -> list[tuple[object, Source]]:
        """(value id, or ("out", index) of a stacked output, its source) of what a resolution over
        `meetings` may consult, in the order ir.sum_targets looks (it stops at the first meeting
        that decides under every strategy)."""
        out: list[tuple[object, Source]] = []
        for m in meetings:
            if self.constraint is not None and any(
                self.constraint(g.values[g.ops[op_id].outputs[0]]) is not None for op_id, _ in m.path
            ):
                break  # a constraint on its path decides
            if m.output >= 0:
                if m.output in stacked:
                    out.append((("out", m.output), stacked[m.output]))
                    break  # a given layout decides
                continue
            u = next((u for u in m.chain if u in src), None)
            if u is None:
                continue
            out.append((u, src[u]))
            if not any(x.partial for x in src[u].shardings):
                break  # this meeting decides under every strategy
        return out

    def _stacked_targets(self, g: Graph, op: Op, src: dict[int, Source]) -> dict[int, Source]:
        """Per stacked output of loop `op`, the layout a sum its body leaves there is resolved
        into, per strategy of the node the meetings after the loop consult (as ir.propagate does
        with ir.sum_targets.stacked_targets); outputs whose layout would depend on two nodes are
        left out."""
        meetings = g.derived("propagate.sum_paths", sum_paths)
        out: dict[int, Source] = {}
        nk = op.params["num_carry"]
        for j, vid in enumerate(op.outputs[nk:], start=nk):
            if vid not in meetings:
                continue
            # With no stacked layouts given, only values are consulted (no ("out", j) entries).
            consulted = self._consulted(g, meetings[vid], src, {})
            nodes = list(dict.fromkeys(s.node for _, s in consulted if s.node != CONST_NODE))
            if len(nodes) > 1:
                continue
            b = nodes[0] if nodes else CONST_NODE
            made = []
            known = _Known()
            for k in range(self.nodes[b].size):
                known.clear()
                known.update((u, s.shardings[k if s.node == b else 0]) for u, s in consulted)
                made.append(stacked_target(g, meetings[vid], known, self.constraint, self.mesh))
            if any(t is not None for t in made):
                out[j] = Source(b, tuple(made), ((),) * len(made))
        return out

    def _as_written(self, g: Graph, src: dict[int, Source]) -> dict[int, Source]:
        """`src` with each sum resolved into a met input's layout as its op writes it."""
        gid = id(g)
        return {**src, **{vid: s for (k, vid), s in self._written.items() if k == gid}}


class _Known(dict):
    """Shardings of the values a resolution consults, None for the rest (not yet made)."""

    def __missing__(self, key):
        return None

"""The ILP's strategies of an op: its factors, what it reads and writes, per strategy of its node.

An op's factors are read off its operands' shardings as ir.propagate reads them (`merge`), so an
op that follows one node or merges two takes, per strategy (or strategy pair) of those nodes,
the factors propagation would give it. Here those factors are worked out and memoised, with the
shardings each operand is read in and each result is written in per strategy, and the
fingerprints by which ops that shard alike under every sampled assignment share a node. A mixin
of search.ilp_model.Builder.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ir.factors import tensor_dims
from ir.rules import OpRule
from ir.sharding import Sharding
from search.ilp_factors import Factors, Groups, merge, result_sharding
from search.ilp_nodes import CONST_NODE, Source, check_deadline


class Strategies:
    """Builder methods for an op's factors per strategy of the nodes it reads (see the module doc).

    Uses the builder's `nodes`, `intern`, `mesh`, `deadline`, `exact`, `free` and `samples`; keeps
    `_merge_cache` (what decides an op's factors -> them per strategy), `_fingerprints`,
    `_fingerprint_ids`, `_wants_cache` and `_results_cache`.
    """

    def _follow(self, rule: OpRule, operands, prios, proposing, fixed, node: int) -> list[Factors]:
        n = self.nodes[node].size
        key = self._layout(rule, operands, prios, proposing, fixed)
        hit = self._merge_cache.get(key)
        if hit is None:
            hit = self._merged(
                rule, operands, prios, proposing, fixed, [{node: i, CONST_NODE: 0} for i in range(n)]
            )
            self._merge_cache[key] = hit
        return hit

    def _merged(self, rule: OpRule, operands, prios, proposing, fixed, picks) -> list[Factors]:
        """`merge` of the operands at each of `picks` (node -> its strategy), memoised by what the
        operands' shardings are (many strategy pairs shard an op's operands alike)."""
        ids = [self.intern.items(operands[k].shardings) for k in proposing]
        nodes = [operands[k].node for k in proposing]
        memo: dict[tuple, Factors] = {}
        out = []
        for pick in picks:
            key = tuple(int(x[pick[n]]) for x, n in zip(ids, nodes, strict=True))
            f = memo.get(key)
            if f is None:
                check_deadline(self.deadline, "building the model")
                at = [pick[operands[k].node] for k in proposing]
                f = memo[key] = _merge_at(rule, operands, prios, proposing, fixed, at, self.mesh)
            out.append(f)
        return out

    def _picker(self, rule: OpRule, operands, prios, proposing, fixed, strategies) -> Callable:
        """`Node.pick` of a FREE node made for an op: `merge` of its operands under the strategies
        their nodes take, as an index into the node's strategies (memoised)."""
        index = {f: s for s, f in enumerate(strategies)}
        nodes = [operands[k].node for k in proposing]
        memo: dict[tuple[int, ...], int | None] = {}
        mesh = self.mesh

        def pick(chosen: np.ndarray) -> int | None:
            at = tuple(int(chosen[n]) for n in nodes)
            if at not in memo:
                memo[at] = index.get(_merge_at(rule, operands, prios, proposing, fixed, at, mesh))
            return memo[at]

        return pick

    def _layout(self, rule: OpRule, operands, prios, proposing, fixed) -> tuple:
        """What decides an op's factors, exactly: its rule, operand nodes and shardings, constraints."""
        return (
            rule,
            fixed,
            tuple(
                (k, operands[k].node, self.intern.source(operands[k]).tobytes(), prios[k]) for k in proposing
            ),
        )

    def _fingerprints_of(self, operands, prios, proposing) -> tuple:
        """What ops that share a node have alike besides rule and constraints."""
        return tuple((self._fingerprint(operands[k]), prios[k]) for k in proposing)

    def _fingerprint(self, s: Source) -> int:
        """What the source's sharding is under each sampled assignment, as an interned number
        (equal numbers: sharded alike under every sample; a node without a sample, a FREE node
        of an exact or `free` model, is its own)."""
        ids = self.intern.source(s)
        key = (s.node, ids.tobytes())
        hit = self._fingerprints.get(key)
        if hit is None:
            sample = self.nodes[s.node].sample
            full = key if sample is None else ids[sample].astype(np.int32).tobytes()
            hit = self._fingerprints[key] = self._fingerprint_ids.setdefault(full, len(self._fingerprint_ids))
        return hit

    def _wants(self, rule: OpRule, strategies: list[Factors], k: int) -> tuple[Sharding, ...]:
        """The sharding operand `k` is read with, per strategy (cached per strategy list)."""
        key = (id(strategies), k)
        hit = self._wants_cache.get(key)
        if hit is None or hit[0] is not strategies:
            hit = self._wants_cache[key] = (
                strategies,
                tuple(Sharding(tensor_dims(rule.operands[k], f)) for f in strategies),
            )
        return hit[1]

    def _results(
        self, rule: OpRule, strategies: list[Factors], k: int
    ) -> tuple[tuple[Sharding, ...], tuple[Groups, ...]]:
        """Result `k`'s sharding and sum groups per strategy (cached per strategy list)."""
        key = (id(strategies), k)
        hit = self._results_cache.get(key)
        if hit is None or hit[0] is not strategies:
            made = [result_sharding(rule, k, f) for f in strategies]
            hit = self._results_cache[key] = (
                strategies,
                tuple(s for s, _ in made),
                tuple(gr for _, gr in made),
            )
        return hit[1], hit[2]

    def _sample_picks(self, rule: OpRule, operands, prios, proposing, fixed) -> list[Factors] | None:
        """`merge` of the operands under each sampled assignment (one per row of the samples); None
        in an exact or `free` model, or when an operand's node has no sample."""
        nodes = [operands[k].node for k in proposing]
        if self.exact or self.free or any(n != CONST_NODE and self.nodes[n].sample is None for n in nodes):
            return None
        columns = [(n, self.nodes[n].sample) for n in nodes if n != CONST_NODE]
        rows = [{CONST_NODE: 0, **{n: int(c[r]) for n, c in columns}} for r in range(len(self.samples))]
        return self._merged(rule, operands, prios, proposing, fixed, rows)


def _merge_at(rule: OpRule, operands, prios, proposing, fixed, at, mesh) -> Factors:
    """`merge` of an op's proposing operands, operand k sharded as its source's strategy at[k]."""
    props = [
        (prios[k], rule.operands[k], operands[k].shardings[s]) for k, s in zip(proposing, at, strict=True)
    ]
    return merge(rule, props + list(fixed), mesh)

"""An op's factor assignments for the ILP: the one ir.propagate derives from its operands, or any (FREE).

A factor assignment gives each factor of the op's rule the mesh axes it is sharded over; the
shardings of the op's operands and results follow from it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from ir.factors import assign_factors, make_contiguous, result_shardings
from ir.rules import FactorKind, OpRule
from ir.sharding import MeshShape, Sharding

Factors = tuple[tuple[str, ...], ...]  # mesh axes per rule factor
Groups = tuple[tuple[str, ...], ...]  # partial axes grouped by the reduction dim that made them
# Propagation's priority of a proposal: (a constrained result, derived from the batch, bytes, earlier).
Priority = tuple[int, bool, int, int]
DimsMap = tuple[tuple[int, ...], ...]  # a tensor's factors per dim


def merge(rule: OpRule, proposals: Sequence[tuple[Priority, DimsMap, Sharding]], mesh: MeshShape) -> Factors:
    """The factors propagation gives an op whose operands (and constrained results) are sharded as
    proposed: `ir.propagate.assign_factors`."""
    return assign_factors(rule, proposals, mesh)


def op_strategies(rule: OpRule, mesh: MeshShape, max_axes: int = 2) -> list[Factors]:
    """Every assignment of the mesh's axes to the op's shardable factors (a FREE node's strategies).

    A factor is shardable when it is not LOCAL and some operand holds it (propagation never shards
    a factor no operand proposes). Each mesh axis goes to at most one factor, a factor takes at
    most `max_axes` axes in mesh order, and their product must divide it.
    """
    eligible = sorted(
        {f for t in rule.operands for d in t for f in d if rule.kinds[f] is not FactorKind.LOCAL}
    )
    axes = [a for a, n in zip(mesh.axes, mesh.shape, strict=True) if n > 1]
    out: list[Factors] = []
    for choice in itertools.product((None, *eligible), repeat=len(axes)):
        factors: list[tuple[str, ...]] = [()] * rule.num_factors
        for a, f in zip(axes, choice, strict=True):
            if f is not None:
                factors[f] = (*factors[f], a)
        if any(len(fa) > max_axes or rule.sizes[f] % mesh.axes_size(fa) for f, fa in enumerate(factors)):
            continue
        fixed = list(factors)
        make_contiguous(rule, fixed, mesh)
        if fixed == factors:
            out.append(tuple(factors))
    return out


def result_sharding(rule: OpRule, k: int, factors: Factors) -> tuple[Sharding, Groups]:
    """Result `k`'s sharding (a pending sum over the reduction factors' axes) and its sum groups."""
    results, groups = result_shardings(rule, factors)
    return results[k], groups

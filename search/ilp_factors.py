"""An op's factor assignments for the ILP: the one ir.propagate derives from its operands, or any (FREE).

A factor assignment gives each factor of the op's rule the mesh axes it is sharded over; the
shardings of the op's operands and results follow from it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from ir.rules import FactorKind, OpRule
from ir.sharding import MeshShape, Sharding

Factors = tuple[tuple[str, ...], ...]  # mesh axes per rule factor
Groups = tuple[tuple[str, ...], ...]  # partial axes grouped by the reduction dim that made them
# Propagation's priority of a proposal: (a constrained result, derived from the batch, bytes, earlier).
Priority = tuple[int, bool, int, int]
DimsMap = tuple[tuple[int, ...], ...]  # a tensor's factors per dim


def merge(rule: OpRule, proposals: Sequence[tuple[Priority, DimsMap, Sharding]], mesh: MeshShape) -> Factors:
    """The factors propagation gives an op whose operands (and constrained results) are sharded as
    proposed.

    Each (priority, the tensor's factors per dim, sharding) proposes its dims' axes for their
    factors (major factor first in a compound dim); the highest priority takes a factor, a LOCAL
    factor takes nothing, an axis goes to one factor only and must divide it; then minor factors
    that would break a compound dim are unsharded. This is ir.propagate's rule.
    """
    props: list[tuple[Priority, int, tuple[str, ...]]] = []
    for prio, dims_map, s in proposals:
        for d, fs in enumerate(dims_map):
            axes = s.dims[d]
            if not axes or not fs:
                continue
            if len(fs) == 1:
                props.append((prio, fs[0], axes))
                continue
            rest = list(axes)
            for f in fs:
                taken: list[str] = []
                while rest and rule.sizes[f] % mesh.axes_size((*taken, rest[0])) == 0:
                    taken.append(rest.pop(0))
                if taken:
                    props.append((prio, f, tuple(taken)))
                if mesh.axes_size(taken) != rule.sizes[f]:
                    break
    factors: list[tuple[str, ...] | None] = [None] * rule.num_factors
    used: set[str] = set()
    for _, f, axes in sorted(props, key=lambda p: p[0], reverse=True):
        if factors[f] is not None or rule.kinds[f] is FactorKind.LOCAL:
            continue
        taken = []
        for a in axes:
            if a in used or rule.sizes[f] % mesh.axes_size((*taken, a)):
                break
            taken.append(a)
        if taken:
            factors[f] = tuple(taken)
            used.update(taken)
    out = [f or () for f in factors]
    _make_contiguous(rule, out, mesh)
    return tuple(out)


def _make_contiguous(rule: OpRule, factors: list[tuple[str, ...]], mesh: MeshShape) -> None:
    """A compound dim is one block only if each factor before its minor-most sharded one is whole."""
    for tensor in (*rule.operands, *rule.results):
        for fs in tensor:
            if len(fs) < 2:
                continue
            broken = False
            for f in fs:
                if broken:
                    factors[f] = ()
                elif mesh.axes_size(factors[f]) != rule.sizes[f]:
                    broken = True


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
        _make_contiguous(rule, fixed, mesh)
        if fixed == factors:
            out.append(tuple(factors))
    return out


def tensor_dims(dims_map: DimsMap, factors: Factors) -> tuple[tuple[str, ...], ...]:
    """The mesh axes of each dim of a tensor whose dims hold `dims_map`'s factors."""
    return tuple(tuple(a for f in fs for a in factors[f]) for fs in dims_map)


def result_sharding(rule: OpRule, k: int, factors: Factors) -> tuple[Sharding, Groups]:
    """Result `k`'s sharding (a pending sum over the reduction factors' axes) and its sum groups."""
    red = rule.factors_of(FactorKind.REDUCTION)
    partial = frozenset(a for f in red for a in factors[f])
    # XLA reduces each sharded reduction dim by its own all-reduce, minor dim first.
    groups = tuple(factors[f] for f in reversed(red) if factors[f]) if partial else ()
    return Sharding(tensor_dims(rule.results[k], factors), partial), groups

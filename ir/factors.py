"""The one rule that assigns mesh axes to an op's factors from the shardings its tensors propose,
and the shardings that follow from an assignment; used by propagation and by the ILP."""

from __future__ import annotations

from collections.abc import Sequence

from ir.rules import FactorKind, OpRule
from ir.sharding import MeshShape, Sharding


def assign_factors(
    rule: OpRule, proposals: Sequence[tuple[tuple, tuple[tuple[int, ...], ...], Sharding]], mesh: MeshShape
) -> tuple[tuple[str, ...], ...]:
    """The mesh axes of each factor of an op whose tensors are sharded as proposed.

    Each (priority, the tensor's factors per dim, sharding) proposes its dims' axes for their
    factors; in a compound dim the axes fill its factors major first, a factor taking axes while
    their product divides it. The highest priority takes a factor, a LOCAL factor takes nothing,
    an axis goes to one factor only and must divide it. Last, a compound dim is a contiguous block
    only if every factor before its minor-most sharded one is wholly sharded: the minor factors
    that break this are unsharded.
    """
    props: list[tuple[tuple, int, tuple[str, ...]]] = []
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
    make_contiguous(rule, out, mesh)
    return tuple(out)


def make_contiguous(rule: OpRule, factors: list[tuple[str, ...]], mesh: MeshShape) -> None:
    """Unshards, in place, the minor factors of a compound dim that would break it into pieces."""
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


def tensor_dims(dims_map, factors) -> tuple[tuple[str, ...], ...]:
    """The mesh axes of each dim of a tensor whose dims hold `dims_map`'s factors."""
    # A dim of one factor (nearly all) takes that factor's axes tuple as it is.
    return tuple(
        [factors[fs[0]] if len(fs) == 1 else tuple([a for f in fs for a in factors[f]]) for fs in dims_map]
    )


def result_shardings(
    rule: OpRule, factors: tuple[tuple[str, ...], ...]
) -> tuple[tuple[Sharding, ...], tuple[tuple[str, ...], ...]]:
    """Each result's sharding (a pending sum over the sharded reduction factors' axes), and the
    partial axes grouped as XLA's partitioner reduces them: one all-reduce per sharded reduction
    dim, minor dim first (factors are numbered in operand dim order)."""
    red = rule.factors_of(FactorKind.REDUCTION)
    partial = frozenset(a for f in red for a in factors[f])
    groups = tuple(factors[f] for f in reversed(red) if factors[f]) if partial else ()
    return tuple(Sharding(tensor_dims(dims, factors), partial) for dims in rule.results), groups

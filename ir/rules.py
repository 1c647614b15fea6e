"""One factor rule per primitive: how each tensor dim of an op maps to shared iteration factors.

A rule reads like Shardy's `([i, k], [k, j])->([i, j]) {i=8, j=16, k=32} reduction={k}`: every
operand and result dim lists the factors it is made of (major to minor; reshape makes compound
dims). A factor of kind PASS may be sharded freely; REDUCTION factors appear only in operands and
sharding them leaves a pending partial sum; LOCAL factors must stay unsharded (sort dims, sliced
dims, ...). Propagation, the decision space and the cost model read these rules and nothing else.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

Shape = tuple[int, ...]
DimFactors = tuple[int, ...]  # factor ids of one tensor dim, major to minor


class FactorKind(enum.Enum):
    PASS = "pass"
    REDUCTION = "reduction"
    LOCAL = "local"


@dataclasses.dataclass(frozen=True, slots=True)
class OpRule:
    """The factor form of one op.

    Attributes:
      operands: per operand, per dim, the factor ids the dim is made of (empty for size-1 dims).
      results: the same for results.
      sizes: size of each factor.
      kinds: kind of each factor.
      conservative: True for the fallback rule of a primitive without a rule of its own.
    """

    operands: tuple[tuple[DimFactors, ...], ...]
    results: tuple[tuple[DimFactors, ...], ...]
    sizes: tuple[int, ...]
    kinds: tuple[FactorKind, ...]
    conservative: bool = False

    @property
    def num_factors(self) -> int:
        return len(self.sizes)

    def factors_of(self, kind: FactorKind) -> tuple[int, ...]:
        return tuple(f for f, k in enumerate(self.kinds) if k is kind)

    def __str__(self) -> str:
        names = _factor_names(len(self.sizes))

        def tensor(dims: tuple[DimFactors, ...]) -> str:
            return "[" + ", ".join("".join(names[f] for f in d) if d else "1" for d in dims) + "]"

        def group(tensors) -> str:
            return "(" + ", ".join(tensor(t) for t in tensors) + ")"

        text = f"{group(self.operands)}->{group(self.results)}"
        if self.sizes:
            text += " {" + ", ".join(f"{names[f]}={s}" for f, s in enumerate(self.sizes)) + "}"
        for kind in (FactorKind.REDUCTION, FactorKind.LOCAL):
            fs = self.factors_of(kind)
            if fs:
                text += f" {kind.value}={{" + ", ".join(names[f] for f in fs) + "}"
        if self.conservative:
            text += " conservative"
        return text


def _factor_names(n: int) -> list[str]:
    letters = string.ascii_lowercase[8:] + string.ascii_lowercase[:8]  # i, j, k, ... like Shardy
    return [letters[f] if f < 26 else f"z{f}" for f in range(n)]


class _Builder:
    """Accumulates factors while a rule function maps dims to them."""

    def __init__(self):
        self.sizes: list[int] = []
        self.kinds: list[FactorKind] = []

    def new(self, size: int, kind: FactorKind = FactorKind.PASS) -> DimFactors:
        if size == 1:
            return ()
        self.sizes.append(size)
        self.kinds.append(kind)
        return (len(self.sizes) - 1,)

    def rule(self, operands, results, conservative: bool = False) -> OpRule:
        # Number factors by first appearance (operands, then results) so rules print canonically.
        order: dict[int, int] = {}
        for tensor in (*operands, *results):
            for dim in tensor:
                for f in dim:
                    order.setdefault(f, len(order))

        def renumber(tensors):
            return tuple(tuple(tuple(order[f] for f in dim) for dim in t) for t in tensors)

        used = sorted(order, key=order.get)
        return OpRule(
            renumber(operands),
            renumber(results),
            tuple(self.sizes[f] for f in used),
            tuple(self.kinds[f] for f in used),
            conservative,
        )


RuleFn = Callable[[Sequence[Shape], Sequence[Shape], Mapping[str, Any]], OpRule]
_RULES: dict[str, RuleFn] = {}


def register(*primitives: str):
    def wrap(fn: RuleFn) -> RuleFn:
        for p in primitives:
            _RULES[p] = fn
        return fn

    return wrap


def has_rule(primitive: str) -> bool:
    return primitive in _RULES


def rule_for(
    primitive: str, in_shapes: Sequence[Shape], out_shapes: Sequence[Shape], params: Mapping[str, Any]
) -> OpRule:
    """The rule of one op; the conservative rule when the primitive has none."""
    fn = _RULES.get(primitive, conservative_rule)
    return fn(tuple(map(tuple, in_shapes)), tuple(map(tuple, out_shapes)), params)


def conservative_rule(in_shapes, out_shapes, params=None) -> OpRule:
    """Every factor local: operands gathered, results replicated."""
    b = _Builder()
    ops = [[b.new(n, FactorKind.LOCAL) for n in s] for s in in_shapes]
    res = [[b.new(n, FactorKind.LOCAL) for n in s] for s in out_shapes]
    return b.rule(ops, res, conservative=True)


# --- elementwise --------------------------------------------------------------------------------

ELEMENTWISE = (
    "abs acos acosh add add_any and asin asinh atan atan2 atanh cbrt ceil clamp conj convert_element_type "
    "copy copy_p cos cosh digamma div erf erf_inv erfc exp exp2 expm1 floor imag integer_pow is_finite "
    "lgamma log log1p logistic max min mul ne eq ge gt le lt neg nextafter not or pow real reduce_precision "
    "rem round rsqrt select_n shift_left shift_right_arithmetic shift_right_logical sign sin sinh sqrt "
    "square stop_gradient sub tan tanh xor population_count bitcast_convert_type name optimization_barrier "
    "sharding_constraint mesh_cast reshard"
).split()


@register(*ELEMENTWISE)
def elementwise(in_shapes, out_shapes, params) -> OpRule:
    """Same-shape operands share a factor per dim; rank-0 operands (scalars) have none, and a size-1
    dim that broadcasts against a larger one has none either (`[8, 32, 1] == [1, 1, 256]`)."""
    rank = max(len(s) for s in (*in_shapes, *out_shapes))
    full = tuple(
        max(dims) for dims in zip(*(s for s in (*in_shapes, *out_shapes) if len(s) == rank), strict=True)
    )
    b = _Builder()
    dims = [b.new(n) for n in full]

    def map_tensor(shape):
        if len(shape) != len(full):
            return [() for _ in shape]
        return [d if n == m else () for d, n, m in zip(dims, shape, full, strict=True)]

    return b.rule([map_tensor(s) for s in in_shapes], [map_tensor(s) for s in out_shapes])


# --- contractions -------------------------------------------------------------------------------


@register("dot_general")
def dot_general(in_shapes, out_shapes, params) -> OpRule:
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    lhs, rhs = in_shapes
    b = _Builder()
    lmap: list[DimFactors] = [()] * len(lhs)
    rmap: list[DimFactors] = [()] * len(rhs)
    out: list[DimFactors] = []
    for i, j in zip(lb, rb, strict=True):
        f = b.new(lhs[i])
        lmap[i], rmap[j] = f, f
        out.append(f)
    for i, j in zip(lc, rc, strict=True):
        f = b.new(lhs[i], FactorKind.REDUCTION)
        lmap[i], rmap[j] = f, f
    for i in range(len(lhs)):
        if i not in lb and i not in lc:
            lmap[i] = b.new(lhs[i])
            out.append(lmap[i])
    for j in range(len(rhs)):
        if j not in rb and j not in rc:
            rmap[j] = b.new(rhs[j])
            out.append(rmap[j])
    return b.rule([lmap, rmap], [out])


@register("conv_general_dilated")
def conv_general_dilated(in_shapes, out_shapes, params) -> OpRule:
    """Batch and output features pass, input features reduce; spatial dims stay local (halos)."""
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    lhs, rhs = in_shapes
    (out,) = out_shapes
    groups = params.get("feature_group_count", 1) * params.get("batch_group_count", 1)
    b = _Builder()
    lmap: list[DimFactors] = [()] * len(lhs)
    rmap: list[DimFactors] = [()] * len(rhs)
    omap: list[DimFactors] = [()] * len(out)
    batch = b.new(lhs[lhs_spec[0]])
    lmap[lhs_spec[0]] = omap[out_spec[0]] = batch
    if groups == 1:
        fin = b.new(lhs[lhs_spec[1]], FactorKind.REDUCTION)
        lmap[lhs_spec[1]] = rmap[rhs_spec[1]] = fin
        fout = b.new(rhs[rhs_spec[0]])
        rmap[rhs_spec[0]] = omap[out_spec[1]] = fout
    else:
        lmap[lhs_spec[1]] = b.new(lhs[lhs_spec[1]], FactorKind.LOCAL)
        rmap[rhs_spec[1]] = b.new(rhs[rhs_spec[1]], FactorKind.LOCAL)
        rmap[rhs_spec[0]] = b.new(rhs[rhs_spec[0]], FactorKind.LOCAL)
        omap[out_spec[1]] = b.new(out[out_spec[1]], FactorKind.LOCAL)
    for spec, shape, m in ((lhs_spec, lhs, lmap), (rhs_spec, rhs, rmap), (out_spec, out, omap)):
        for d in spec[2:]:
            m[d] = b.new(shape[d], FactorKind.LOCAL)
    return b.rule([lmap, rmap], [omap])


# --- reductions ---------------------------------------------------------------------------------


@register("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or", "reduce_xor")
def reduce(in_shapes, out_shapes, params) -> OpRule:
    (x,) = in_shapes
    axes = set(params["axes"])
    b = _Builder()
    xmap = [b.new(n, FactorKind.REDUCTION if d in axes else FactorKind.PASS) for d, n in enumerate(x)]
    return b.rule([xmap], [[f for d, f in enumerate(xmap) if d not in axes]])


@register("argmax", "argmin")
def arg_reduce(in_shapes, out_shapes, params) -> OpRule:
    (x,) = in_shapes
    axes = set(params["axes"])
    b = _Builder()
    xmap = [b.new(n, FactorKind.LOCAL if d in axes else FactorKind.PASS) for d, n in enumerate(x)]
    return b.rule([xmap], [[f for d, f in enumerate(xmap) if d not in axes]])


@register("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp")
def cumulative(in_shapes, out_shapes, params) -> OpRule:
    (x,) = in_shapes
    b = _Builder()
    xmap = [b.new(n, FactorKind.LOCAL if d == params["axis"] else FactorKind.PASS) for d, n in enumerate(x)]
    return b.rule([xmap], [xmap])


@register("sort")
def sort(in_shapes, out_shapes, params) -> OpRule:
    shape = in_shapes[0]
    b = _Builder()
    m = [
        b.new(n, FactorKind.LOCAL if d == params["dimension"] else FactorKind.PASS)
        for d, n in enumerate(shape)
    ]
    return b.rule([m] * len(in_shapes), [m] * len(out_shapes))


@register("top_k")
def top_k(in_shapes, out_shapes, params) -> OpRule:
    """Every dim local: XLA's SPMD partitioner has no sharded form of the TopK op for its batch
    dims (it takes its default action: operand replicated, results sliced afterwards), so a
    sharded operand is all-gathered whatever the plan says (docs/xla-partitioner.md)."""
    (x,) = in_shapes
    b = _Builder()
    lead = [b.new(n, FactorKind.LOCAL) for n in x[:-1]]
    return b.rule(
        [[*lead, b.new(x[-1], FactorKind.LOCAL)]],
        [[*lead, b.new(s[-1], FactorKind.LOCAL)] for s in out_shapes],
    )


# --- layout -------------------------------------------------------------------------------------


@register("transpose")
def transpose(in_shapes, out_shapes, params) -> OpRule:
    (x,) = in_shapes
    b = _Builder()
    xmap = [b.new(n) for n in x]
    return b.rule([xmap], [[xmap[p] for p in params["permutation"]]])


@register("broadcast_in_dim")
def broadcast_in_dim(in_shapes, out_shapes, params) -> OpRule:
    x = in_shapes[0]
    (out,) = out_shapes
    b = _Builder()
    omap: list[DimFactors] = [()] * len(out)
    xmap: list[DimFactors] = []
    for d, od in enumerate(params["broadcast_dimensions"]):
        f = b.new(out[od]) if x[d] == out[od] else ()
        xmap.append(f)
        omap[od] = f
    for od, n in enumerate(out):
        if od not in params["broadcast_dimensions"] or not omap[od]:
            omap[od] = b.new(n)
    # Dynamic-shape operands (rare) get nothing.
    return b.rule([xmap] + [[() for _ in s] for s in in_shapes[1:]], [omap])


@register("squeeze")
def squeeze(in_shapes, out_shapes, params) -> OpRule:
    (x,) = in_shapes
    dropped = {d % len(x) for d in params["dimensions"]}
    b = _Builder()
    xmap = [b.new(n) for n in x]
    return b.rule([xmap], [[f for d, f in enumerate(xmap) if d not in dropped]])


@register("expand_dims")
def expand_dims(in_shapes, out_shapes, params) -> OpRule:
    return reshape(in_shapes, out_shapes, params)


@register("reshape")
def reshape(in_shapes, out_shapes, params) -> OpRule:
    """Compound factors: the common refinement of both shapes, major to minor.

    Walking both shapes, the gcd of the remaining sizes is a factor both share (the top part of the
    same flat index range). When no common factor is left, the rest of both sides is local.
    """
    x = in_shapes[0]
    (out,) = out_shapes
    b = _Builder()
    xmap: list[list[int]] = [[] for _ in x]
    omap: list[list[int]] = [[] for _ in out]
    i = j = 0
    ri = x[0] if x else 1
    rj = out[0] if out else 1
    while i < len(x) and j < len(out):
        if ri == 1:
            i += 1
            ri = x[i] if i < len(x) else 1
            continue
        if rj == 1:
            j += 1
            rj = out[j] if j < len(out) else 1
            continue
        g = math.gcd(ri, rj)
        if g == 1:
            break
        (f,) = b.new(g)
        xmap[i].append(f)
        omap[j].append(f)
        ri //= g
        rj //= g
    # Whatever is left could not be matched: local on both sides.
    for d in range(i, len(x)):
        rest = ri if d == i else x[d]
        if rest > 1:
            xmap[d].extend(b.new(rest, FactorKind.LOCAL))
    for d in range(j, len(out)):
        rest = rj if d == j else out[d]
        if rest > 1:
            omap[d].extend(b.new(rest, FactorKind.LOCAL))
    return b.rule(
        [[tuple(m) for m in xmap]] + [[() for _ in s] for s in in_shapes[1:]], [[tuple(m) for m in omap]]
    )


@register("rev")
def rev(in_shapes, out_shapes, params) -> OpRule:
    (x,) = in_shapes
    b = _Builder()
    m = [
        b.new(n, FactorKind.LOCAL if d in params["dimensions"] else FactorKind.PASS) for d, n in enumerate(x)
    ]
    return b.rule([m], [m])


def _same_or_local(b: _Builder, x: Shape, out: Shape, keep: Callable[[int], bool]):
    """Dims where `keep(d)` share one factor; the others are local on each side."""
    xmap, omap = [], []
    for d, (n, m) in enumerate(zip(x, out, strict=True)):
        if keep(d) and n == m:
            f = b.new(n)
            xmap.append(f)
            omap.append(f)
        else:
            xmap.append(b.new(n, FactorKind.LOCAL))
            omap.append(b.new(m, FactorKind.LOCAL))
    return xmap, omap


@register("slice")
def slice_(in_shapes, out_shapes, params) -> OpRule:
    (x,) = in_shapes
    (out,) = out_shapes
    strides = params.get("strides") or (1,) * len(x)
    b = _Builder()
    xmap, omap = _same_or_local(b, x, out, lambda d: strides[d] == 1 and x[d] == out[d])
    return b.rule([xmap], [omap])


@register("pad")
def pad(in_shapes, out_shapes, params) -> OpRule:
    x = in_shapes[0]
    (out,) = out_shapes
    cfg = params["padding_config"]
    b = _Builder()
    xmap, omap = _same_or_local(b, x, out, lambda d: tuple(cfg[d]) == (0, 0, 0))
    return b.rule([xmap, []], [omap])


@register("dynamic_slice")
def dynamic_slice(in_shapes, out_shapes, params) -> OpRule:
    x = in_shapes[0]
    (out,) = out_shapes
    b = _Builder()
    xmap, omap = _same_or_local(b, x, out, lambda d: True)
    return b.rule([xmap] + [[() for _ in s] for s in in_shapes[1:]], [omap])


@register("dynamic_update_slice")
def dynamic_update_slice(in_shapes, out_shapes, params) -> OpRule:
    x, upd = in_shapes[0], in_shapes[1]
    b = _Builder()
    xmap, umap = [], []
    for n, m in zip(x, upd, strict=True):
        if n == m:
            f = b.new(n)
            xmap.append(f)
            umap.append(f)
        else:
            xmap.append(b.new(n, FactorKind.LOCAL))
            umap.append(b.new(m, FactorKind.LOCAL))
    return b.rule([xmap, umap] + [[() for _ in s] for s in in_shapes[2:]], [xmap])


@register("concatenate")
def concatenate(in_shapes, out_shapes, params) -> OpRule:
    (out,) = out_shapes
    axis = params["dimension"]
    b = _Builder()
    shared = [b.new(n) if d != axis else () for d, n in enumerate(out)]

    def with_axis(shape):
        m = list(shared)
        m[axis] = b.new(shape[axis], FactorKind.LOCAL)
        return m

    return b.rule([with_axis(s) for s in in_shapes], [with_axis(out)])


@register("split")
def split(in_shapes, out_shapes, params) -> OpRule:
    (x,) = in_shapes
    axis = params["axis"]
    b = _Builder()
    shared = [b.new(n) if d != axis else () for d, n in enumerate(x)]

    def with_axis(shape):
        m = list(shared)
        m[axis] = b.new(shape[axis], FactorKind.LOCAL)
        return m

    return b.rule([with_axis(x)], [with_axis(s) for s in out_shapes])


@register("iota")
def iota(in_shapes, out_shapes, params) -> OpRule:
    b = _Builder()
    return b.rule([[() for _ in s] for s in in_shapes], [[b.new(n) for n in s] for s in out_shapes])


@register("full", "broadcast")
def result_only(in_shapes, out_shapes, params) -> OpRule:
    return iota(in_shapes, out_shapes, params)


# --- gather / scatter ---------------------------------------------------------------------------


@register("gather")
def gather(in_shapes, out_shapes, params) -> OpRule:
    """Index batch dims pass to the output; operand window dims pass where the slice is whole."""
    operand, indices = in_shapes
    (out,) = out_shapes
    dn = params["dimension_numbers"]
    slice_sizes = params["slice_sizes"]
    b = _Builder()
    omap: list[DimFactors] = [()] * len(out)
    imap: list[DimFactors] = [()] * len(indices)
    xmap: list[DimFactors] = [()] * len(operand)
    offset_dims = tuple(dn.offset_dims)
    batch_out = [d for d in range(len(out)) if d not in offset_dims]
    index_vector_dim = len(indices) - 1  # jax always puts the index vector last
    index_batch = [d for d in range(len(indices)) if d != index_vector_dim]
    operand_batch = tuple(getattr(dn, "operand_batching_dims", ()))
    index_batching = tuple(getattr(dn, "start_indices_batching_dims", ()))
    for od, idim in zip(batch_out, index_batch, strict=True):
        f = b.new(out[od])
        omap[od] = imap[idim] = f
        if idim in index_batching:
            xmap[operand_batch[index_batching.index(idim)]] = f
    window = [d for d in range(len(operand)) if d not in dn.collapsed_slice_dims and d not in operand_batch]
    for od, xd in zip(offset_dims, window, strict=True):
        if slice_sizes[xd] == operand[xd] and xd not in dn.start_index_map:
            f = b.new(operand[xd])
            omap[od] = xmap[xd] = f
        else:
            omap[od] = b.new(out[od], FactorKind.LOCAL)
    for xd, n in enumerate(operand):
        if not xmap[xd]:
            xmap[xd] = b.new(n, FactorKind.LOCAL)
    imap[index_vector_dim] = b.new(indices[index_vector_dim], FactorKind.LOCAL)
    return b.rule([xmap, imap], [omap])


def scatter(in_shapes, out_shapes, params, additive: bool = False) -> OpRule:
    """Update window dims pass to the operand; update scatter dims reduce (for scatter-add).

    Sharding an update scatter dim leaves each device with a partial result over the whole operand,
    which is exactly the data-parallel embedding gradient: a pending sum, all-reduced later.
    """
    operand, indices, updates = in_shapes[:3]
    dn = params["dimension_numbers"]
    b = _Builder()
    xmap: list[DimFactors] = [()] * len(operand)
    umap: list[DimFactors] = [()] * len(updates)
    imap: list[DimFactors] = [()] * len(indices)
    window = tuple(dn.update_window_dims)
    operand_window = [
        d
        for d in range(len(operand))
        if d not in dn.inserted_window_dims and d not in tuple(getattr(dn, "operand_batching_dims", ()))
    ]
    for ud, xd in zip(window, operand_window, strict=True):
        if updates[ud] == operand[xd] and xd not in dn.scatter_dims_to_operand_dims:
            f = b.new(operand[xd])
            umap[ud] = xmap[xd] = f
        else:
            umap[ud] = b.new(updates[ud], FactorKind.LOCAL)
    scatter_dims = [d for d in range(len(updates)) if d not in window]
    index_dims = [d for d in range(len(indices)) if d != len(indices) - 1]
    operand_batch = tuple(getattr(dn, "operand_batching_dims", ()))
    index_batch = tuple(getattr(dn, "scatter_indices_batching_dims", ()))
    for ud, idim in zip(scatter_dims, index_dims, strict=True):
        if idim in index_batch:
            # A batching dim pairs each update with its own operand slice: it passes through,
            # as in a batched take_along_axis transpose, instead of summing over devices.
            f = b.new(updates[ud])
            xmap[operand_batch[index_batch.index(idim)]] = f
        else:
            f = b.new(updates[ud], FactorKind.REDUCTION if additive else FactorKind.LOCAL)
        umap[ud] = imap[idim] = f
    if indices:
        imap[-1] = b.new(indices[-1], FactorKind.LOCAL)
    for xd, n in enumerate(operand):
        if not xmap[xd]:
            xmap[xd] = b.new(n, FactorKind.LOCAL)
    return b.rule([xmap, imap, umap], [xmap])


register("scatter-add", "scatter_add")(lambda i, o, p: scatter(i, o, p, additive=True))
register("scatter", "scatter-mul", "scatter_mul", "scatter-min", "scatter_min", "scatter-max", "scatter_max")(
    scatter
)


def rules_table() -> dict[str, RuleFn]:
    """Primitive name -> rule function (for listing and tests)."""
    return dict(_RULES)

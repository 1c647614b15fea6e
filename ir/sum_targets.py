"""Where a pending partial sum is wanted sharded: the layouts its readers meet a few ops on.

A reduction over a sharded dim leaves each device a partial sum (the data-parallel gradient of a
weight). Forward propagation alone resolves it at its first reader, and a reader with no sharded
operand (the transpose of a weight gradient, `g * (1 - b1)`, `g ** 2`) wants it whole: an
all-reduce. XLA's propagation runs both ways: the optimizer state the update meets a few ops later
is sharded, that sharding flows back to the gradient, and the sum is reduce-scattered into it
(ZeRO-2 and FSDP as XLA compiles them; benchmarks/xla_agreement.py, portable mode).

`sum_paths` finds, once per graph, for each value a reduction can leave partial, the ways its
readers meet another value: the path of ops from the sum to an elementwise op, and the partner
that op combines it with (with the chain of elementwise producers behind it, `b1 * mu` back to
`mu`). `target` maps a partner's sharding back along a path through the ops' factor rules, which
is what propagation resolves the sum into (`ir.propagate`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

from ir.factors import assign_factors, tensor_dims
from ir.graph import Graph, Value
from ir.rules import ELEMENTWISE, FactorKind
from ir.sharding import MeshShape, Sharding

_ELEMENTWISE = frozenset(ELEMENTWISE)
_SCATTERED = frozenset(("dot_general", "reduce_sum", "scatter-add"))
# Ops a sum travels through to its meeting point: elementwise ones and layout changes (the
# transpose of a weight's gradient, the reshape and size-1 reduction of a bias's).
_PATH = _ELEMENTWISE | frozenset("transpose reshape squeeze expand_dims reduce_sum".split())
# How many ops from the sum a meeting point is looked for (a tied embedding's gradient meets its
# Adam state six on: two transposes, the add of both uses, square, scale, add), and how many
# elementwise ops behind a partner.
_DEPTH = 8
_BEHIND = 4


@dataclasses.dataclass(frozen=True, slots=True)
class Meeting:
    """One way a sum's readers meet another value.

    Attributes:
      path: (op id, operand index) from the sum's first reader to the meeting op, each op reading
        the previous one's result.
      partner: the meeting op's operand index of the value met.
      chain: that value, then the values it is made from by elementwise ops of one same-shape
        operand (nearest first), back to an input of the step (a parameter or optimizer state,
        whose layout the plan gives): the first whose sharding is known stands for it.
      output: for a meeting with what reads a loop body's output instead (the optimizer update
        after the loop that stacks a gradient per layer): that output's index, with `path`
        ending at the op that makes it (empty if the sum is the output), and no partner; -1
        otherwise.
    """

    path: tuple[tuple[int, int], ...]
    partner: int
    chain: tuple[int, ...]
    output: int = -1


def sum_kind(g: Graph, vid: int) -> tuple:
    """What decides how XLA's partitioner resolves value `vid`'s pending sum (see `scatters`): its
    producer's primitive, with a scatter-add's scattered dims."""
    p = g.producer.get(vid)
    if p is None:
        return ("",)
    op = g.ops[p]
    if op.primitive == "scatter-add":
        return (op.primitive, tuple(op.params["dimension_numbers"].scatter_dims_to_operand_dims))
    return (op.primitive,)


def scatters(kind: tuple, groups: tuple, have: Sharding, want: Sharding, mesh: MeshShape) -> bool:
    """Whether XLA's partitioner reduce-scatters a pending sum made by an op of `kind` (`sum_kind`),
    over `groups`, laid out `have`, into `want`: a dot's over any groups (one reduce-scatter, the
    other groups all-reduced after), a reduce_sum's over one group of axes, a scatter-add's over
    one group into its scattered dims. Other such sums (over several groups, a scatter-add into its
    window dims) it all-reduces and then slices. A dot's scattered over 2 devices into a layout
    left whole over some other mesh axis it computes otherwise: each device takes a slice of the
    output, all-reduces it and collective-permutes it to its owner (measured on meshes 2x4, 4x2,
    2x2 and 2x2x2: groups of 4 and 8 are reduce-scattered; benchmarks/xla_agreement.py and
    benchmarks/sim_fidelity.py, constrained mode): not modelled, so such a sum is left to its
    reader."""
    primitive = kind[0]
    if primitive == "reduce_sum":
        return len(groups) <= 1
    if primitive == "scatter-add":
        return len(groups) <= 1 and all(
            d in kind[1] for d, (h, w) in enumerate(zip(have.dims, want.dims, strict=True)) if h != w
        )
    if primitive == "dot_general":
        scattered = [a for d in want.dims for a in d if a in have.partial]
        used = {a for d in want.dims for a in d} | set(have.partial)
        whole = any(a not in used and n > 1 for a, n in zip(mesh.axes, mesh.shape, strict=True))
        return not (whole and mesh.axes_size(scattered) == 2)
    return True


def sum_paths(g: Graph) -> dict[int, tuple[Meeting, ...]]:
    """value -> its meetings, nearest first, for each value that a dot, a reduce_sum or a
    scatter-add makes (the sums XLA may reduce-scatter, see `scatters`), and each output a loop
    stacks (its body may leave it a sum: see `stacked_targets`)."""
    out: dict[int, tuple[Meeting, ...]] = {}
    outputs = {vid: j for j, vid in enumerate(g.outputs)}
    for op in g.ops:
        if op.primitive == "scan":
            made = op.outputs[op.params["num_carry"] :]
        elif op.primitive in _SCATTERED and op.rule.factors_of(FactorKind.REDUCTION):
            made = op.outputs
        else:
            continue
        for vid in made:
            found = _meetings(g, vid, outputs)
            if found:
                out[vid] = found
    return out


def stacked_targets(
    g: Graph,
    op,
    meetings: dict[int, tuple[Meeting, ...]],
    shardings: Sequence[Sharding | None],
    constraint: Callable[[Value], Sharding | None] | None,
    mesh: MeshShape,
) -> dict[int, Sharding]:
    """Per body output of loop `op` that the loop stacks: the layout (one iteration's, without
    the stacked dim) the values its readers meet after the loop imply, where they shard it and
    leave the stacked dim whole. A sum the body leaves in that output is resolved into it there
    (`resolution`'s `outputs`): a data-parallel gradient reduce-scattered per layer inside the
    backward loop, as XLA propagates the optimizer state's layout into it."""
    nk = op.params["num_carry"]
    out: dict[int, Sharding] = {}
    for j, vid in enumerate(op.outputs[nk:], start=nk):
        if vid in meetings:
            t = stacked_target(g, meetings[vid], shardings, constraint, mesh)
            if t is not None:
                out[j] = t
    return out


def stacked_target(
    g: Graph,
    meetings: tuple[Meeting, ...],
    shardings: Sequence[Sharding | None],
    constraint: Callable[[Value], Sharding | None] | None,
    mesh: MeshShape,
) -> Sharding | None:
    """One stacked output's layout per iteration (see `stacked_targets`), from the meetings of the
    loop's output; None where they imply none."""
    want = _wanted(g, meetings, shardings, constraint, mesh, {})
    if want is not None and not want.dims[0] and want.used_axes:
        return Sharding(want.dims[1:])
    return None


def resolution(
    g: Graph,
    meetings: tuple[Meeting, ...],
    have: Sharding,
    shardings: Sequence[Sharding | None],
    constraint: Callable[[Value], Sharding | None] | None,
    mesh: MeshShape,
    outputs: Mapping[int, Sharding] | None = None,
) -> Sharding | None:
    """The layout to resolve a pending sum laid out `have` into, or None to leave it to its reader.

    The first meeting decides whose partner's sharding is known (in `shardings`, per value id;
    None where not yet propagated) or, for a meeting at a loop body's output, whose layout is
    given in `outputs` (per output index: see `stacked_targets`); a constraint on a value along
    its path is met first. Its layout, mapped back to the sum, is taken where it shards dims
    `have` leaves whole over some of the sum's partial axes and adds nothing else (the layout a
    reduce-scatter gives).
    """
    want = _wanted(g, meetings, shardings, constraint, mesh, outputs or {})
    if want is None:
        return None
    added = False
    for h, w in zip(have.dims, want.dims, strict=True):
        if w == h:
            continue
        if h or any(a not in have.partial for a in w):
            return None
        added = True
    return want if added else None


def _wanted(
    g: Graph,
    meetings: tuple[Meeting, ...],
    shardings: Sequence[Sharding | None],
    constraint: Callable[[Value], Sharding | None] | None,
    mesh: MeshShape,
    outputs: Mapping[int, Sharding],
) -> Sharding | None:
    """The layout the first decisive meeting implies for the value met from (see `resolution`)."""
    for m in meetings:
        if constraint is not None:
            c = next(
                (
                    (i, c)
                    for i, (op_id, _) in enumerate(m.path)
                    if (c := constraint(g.values[g.ops[op_id].outputs[0]])) is not None
                ),
                None,
            )
            if c is not None:
                return back(g, m.path[: c[0] + 1], c[1], mesh)
        if m.output >= 0:
            s = outputs.get(m.output)
            if s is not None:
                return back(g, m.path, s, mesh)
            continue
        s = next((shardings[u] for u in m.chain if shardings[u] is not None), None)
        if s is not None and not s.partial:
            # Mapped back once per (meeting, partner layout, mesh) and kept with the graph (a
            # searcher asks again for every plan; the meetings live as long as the graph).
            memo = g.derived("sum_targets.targets", _new_memo)
            key = (id(m), s, mesh)
            hit = memo.get(key)
            if hit is None:
                hit = memo[key] = target(g, m, s, mesh)
            return hit
    return None


def _new_memo(_: Graph) -> dict:
    return {}


def target(g: Graph, meeting: Meeting, partner: Sharding, mesh: MeshShape) -> Sharding:
    """The sharding of the sum that the partner's sharding implies, mapped back along the path."""
    op_id, k = meeting.path[-1]
    rule = g.ops[op_id].rule
    s = _through(rule, rule.operands[meeting.partner], partner, rule.operands[k], mesh)
    return back(g, meeting.path[:-1], s, mesh)


def back(g: Graph, path: tuple[tuple[int, int], ...], s: Sharding, mesh: MeshShape) -> Sharding:
    """The sharding of the sum that sharding `s` of the last path op's result implies."""
    for op_id, k in reversed(path):
        rule = g.ops[op_id].rule
        s = _through(rule, rule.results[0], s, rule.operands[k], mesh)
    return s


def _through(rule, known_map, known: Sharding, want_map, mesh: MeshShape) -> Sharding:
    factors = assign_factors(rule, [((0,), known_map, known)], mesh)
    return Sharding(tensor_dims(want_map, factors))


def _meetings(g: Graph, vid: int, outputs: Mapping[int, int]) -> tuple[Meeting, ...]:
    values = g.values
    if not values[vid].shape:
        return ()
    out: list[Meeting] = []
    seen: set[int] = {vid}
    frontier: list[tuple[int, tuple[tuple[int, int], ...]]] = [(vid, ())]
    for _ in range(_DEPTH):
        nxt = []
        for v, path in frontier:
            if v in outputs:
                out.append(Meeting(path, -1, (), outputs[v]))
            for r in g.consumers.get(v, ()):
                op = g.ops[r]
                if op.primitive not in _PATH or op.rule is None or len(op.outputs) != 1:
                    continue
                k = op.inputs.index(v)
                here = (*path, (r, k))
                if op.primitive in _ELEMENTWISE:
                    rank = len(values[op.outputs[0]].shape)
                    for j, u in enumerate(op.inputs):
                        if u in seen or len(values[u].shape) != rank or not rank:
                            continue
                        seen.add(u)
                        chain = _behind(g, u)
                        if chain[-1] not in g.producer:  # state the step is given: not an activation
                            out.append(Meeting(here, j, chain))
                res = op.outputs[0]
                if res not in seen:
                    seen.add(res)
                    nxt.append((res, here))
        frontier = nxt
    return tuple(out)


def _behind(g: Graph, u: int) -> tuple[int, ...]:
    """`u` and the values it is made from by elementwise ops of one same-shape operand."""
    chain = [u]
    shape = g.values[u].shape
    for _ in range(_BEHIND):
        p = g.producer.get(chain[-1])
        if p is None:
            break
        op = g.ops[p]
        if op.primitive not in _ELEMENTWISE or len(op.outputs) != 1:
            break
        full = [x for x in op.inputs if g.values[x].shape == shape]
        if len(full) != 1 or any(g.values[x].shape not in (shape, ()) for x in op.inputs):
            break
        chain.append(full[0])
    return tuple(chain)

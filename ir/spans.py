"""Spans: the runs of consecutive ops propagation replays when they are entered alike.

A searcher propagates thousands of plans of one graph. With a `PropagationCache`, ir.propagate
runs the ops in spans of up to `SPAN_OPS` (a loop or branch alone, a run of ops reading only what
constants make as one however long; the repeats of a periodic run, an unrolled model's layers, cut
alike); a span entered with the shardings it was entered with before
(of the values it reads, the sum groups of the pending sums among them, and the values whose
layouts decide where a sum it reads is resolved) is replayed from what it did then, a `Part`:
decisions, collectives and all.
"""

from __future__ import annotations

import dataclasses
import itertools
import operator
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING

import numpy as np

from ir.comm import Collective
from ir.graph import Graph, Op
from ir.rules import FactorKind
from ir.sharding import Sharding
from ir.sum_targets import sum_kind, sum_paths

if TYPE_CHECKING:
    from ir.propagate import OpSharding, Propagation


@dataclasses.dataclass(frozen=True, slots=True)
class Span:
    """A run of consecutive ops propagated as one unit (see `Part`).

    Attributes:
      index: its position among the graph's spans.
      start, stop: op ids [start, stop).
      reads: values its ops read that are made before it (inputs, constants, earlier results).
      defs: values its ops make.
      exported: those of `defs` read after the span or returned.
      watched: values made before it that it does not read but whose shardings decide where a
        pending sum it reads is resolved to (`ir.sum_targets`).
      summable: those of `reads` that may be pending sums (made by an op with a reduction
        factor), in order.
      outputs: in a loop body, the indices of the stacked outputs whose given layouts decide
        where a pending sum it reads is resolved to (`ir.sum_targets.stacked_targets`).
      def_range: (first, stop) when `defs` are in order and every value id between first and
        stop-1 that is not one of them is a constant (no op makes it, the graph is not given
        it: its sharding never changes); a part then stores the shardings of all of first..stop-1
        with one slice assignment. None otherwise.
      read: per-value list -> the tuple of its entries at `reads` (an `operator.itemgetter`;
        made from `reads`).
    """

    index: int
    start: int
    stop: int
    reads: tuple[int, ...]
    defs: tuple[int, ...]
    exported: frozenset[int]
    watched: tuple[int, ...] = ()
    summable: tuple[int, ...] = ()
    outputs: tuple[int, ...] = ()
    def_range: tuple[int, int] | None = None
    read: Callable[[list], tuple] = dataclasses.field(init=False, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "read", entries_getter(self.reads))


def entries_getter(ids: tuple[int, ...]) -> Callable[[list], tuple]:
    """A function from a list to the tuple of its entries at `ids`, at C speed."""
    if not ids:
        return lambda _: ()
    if len(ids) == 1:
        get = operator.itemgetter(ids[0])
        return lambda values: (get(values),)
    return operator.itemgetter(*ids)


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class Part:
    """What propagating one span of ops did, given the shardings of the values it reads.

    Propagation is a pure function of those shardings (and of the sum groups of the pending sums
    among them), so a span entered alike again is replayed from its Part instead of propagated.

    Attributes:
      span: the ops.
      ops: the factor assignment of each op of the span.
      defs: the sharding of each of the span's values at its end; of every value id in
        `span.def_range` when that is set.
      sum_groups: (value, groups) of the span's values left as pending sums.
      collectives: every collective the span made, in order (see `names`).
      outside: per read of a value made before the span, in order: (index into `collectives`
        where its collectives start, how many, value, sharding read, the value's sharding once
        its pending sum is resolved or None). A read another span already made costs nothing.
      inside_reads: (value, sharding read) of the span's exported values it read itself.
      bodies: op id -> body propagations of the span's loops and branches.
      rewritten: ids of the span's ops whose results are not stored as the op writes them (a
        pending sum, or a constraint that lays them out otherwise).
      names: for a part renamed from another span's (`renamed`): per collective, the name of
        the value it moves here (`collectives` are then the recorded part's, named for its
        values: `named_collectives` names them for these); else ().
      origin: for a part renamed from another span's (`renamed`), the part recorded; else None.
      plain: whether it leaves no pending sum, reads nothing made before it in another layout,
        records no read of its own values and runs no body (made from the others).
    """

    span: Span
    ops: tuple[OpSharding | None, ...]
    defs: tuple[Sharding | None, ...]
    sum_groups: tuple[tuple[int, tuple], ...]
    collectives: tuple[Collective, ...]
    outside: tuple[tuple[int, int, int, Sharding, Sharding | None], ...]
    inside_reads: tuple[tuple[int, Sharding], ...]
    bodies: tuple[tuple[int, tuple[Propagation, ...]], ...]
    rewritten: tuple[int, ...] = ()
    names: tuple[str, ...] = ()
    origin: Part | None = dataclasses.field(default=None, compare=False, repr=False)
    plain: bool = dataclasses.field(init=False, compare=False, repr=False)

    def __post_init__(self):
        # Most parts only lay out their values and add their collectives (see `ir.propagate.run`).
        plain = not (self.sum_groups or self.outside or self.inside_reads or self.bodies)
        object.__setattr__(self, "plain", plain)

    def named_collectives(self) -> tuple[Collective, ...]:
        """Every collective the span made, in order, each named for the value it moves here."""
        if not self.names:
            return self.collectives
        return tuple(map(Collective.named, self.collectives, self.names))


# Ops per span: long enough that replaying a span is much cheaper than propagating it, short
# enough that a change of one input leaves most spans of a step entered as before. 8 measured
# best of 4, 6, 8, 10, 12, 16 on Llama-8B one-decision changes (benchmarks/sim_speed.py).
SPAN_OPS = 8


# Ops per span in a periodic run (`periodic_runs`): each repeat of the period is cut into equal
# spans of at most this many, so a span and the same span of every other repeat are of one class
# (`span_classes`) and are propagated once per plan, not once per phase of SPAN_OPS against the
# period. Measured on the unrolled Llama-8B (benchmarks/sim_speed.py, all three modes): 16 and 32
# alike, 48 and a whole layer (143 ops) slower on independent plans.
PERIOD_SPAN_OPS = 32
# The longest period looked for (an unrolled Llama-8B layer: 143 ops forward, 120 backward).
MAX_PERIOD = 1024


def span_bounds(graph: Graph) -> tuple[tuple[int, int], ...]:
    """The spans' op ranges [start, stop): runs of up to `SPAN_OPS` consecutive ops, each loop
    or branch alone in its own (what a loop is entered with changes more often than what the
    ops around it read, and a loop is the costliest op to propagate again). A run of ops that
    read only what constants make (position tables, masks: laid out alike in every plan) is
    one span however long: it is entered alike every time, so a longer span costs nothing. In a
    periodic run (`periodic_runs`: no loop is in one) each repeat is cut alike, into equal spans
    of up to `PERIOD_SPAN_OPS`."""
    out: list[tuple[int, int]] = []
    a = 0
    for first, period, count in graph.derived("spans.periodic", periodic_runs):
        out += _cut(graph, a, first)
        pieces = -(-period // PERIOD_SPAN_OPS)
        cuts = [period * k // pieces for k in range(pieces + 1)]
        for j in range(first, first + count * period, period):
            out += [(j + x, j + y) for x, y in itertools.pairwise(cuts)]
        a = first + count * period
    return tuple(out + _cut(graph, a, len(graph.ops)))


def periodic_runs(graph: Graph) -> tuple[tuple[int, int, int], ...]:
    """Runs of ops that repeat a period of ops of the same kinds (`Graph.op_kinds`) at least
    three times, as (first op, period, repeats), in program order: an unrolled model's layers,
    forward and backward, and the optimizer's update of each layer's parameters. Periods of
    `SPAN_OPS` to `MAX_PERIOD` ops; the runs that cover the most ops are taken first (the
    shortest period of equal cover: a layer rather than two), none overlapping another."""
    kinds = np.asarray(graph.op_kinds, dtype=np.int64)
    n = len(kinds)
    found = []
    for period in range(SPAN_OPS, min(MAX_PERIOD, n // 3) + 1):
        same = np.concatenate(([0], (kinds[:-period] == kinds[period:]).view(np.int8), [0]))
        edges = np.diff(same)
        starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        # kinds[i] == kinds[i + period] for i in [start, stop): ops start..stop+period-1 repeat
        for start, length in zip(starts.tolist(), (stops - starts).tolist(), strict=True):
            count = (length + period) // period
            if count >= 3:
                found.append((-count * period, start, period, count))
    taken: list[tuple[int, int, int]] = []
    for cover, start, period, count in sorted(found):  # (stable: shorter periods first on ties)
        stop = start - cover
        if all(stop <= a or start >= a + p * c for a, p, c in taken):
            taken.append((start, period, count))
    return tuple(sorted(taken))


def _cut(graph: Graph, start: int, stop: int) -> list[tuple[int, int]]:
    """Ops start..stop-1 as spans (`span_bounds`, outside periodic runs)."""
    fixed = graph.derived("spans.fixed", _fixed_values)
    out = []
    a = start
    mixed = False  # whether ops a.. include one that reads what may vary
    for op in graph.ops[start:stop]:
        n = op.id
        if op.body:
            if a < n:
                out.append((a, n))
            out.append((n, n + 1))
            a, mixed = n + 1, False
            continue
        varies = not all(v in fixed for v in op.inputs)
        if varies and not mixed and n - a >= SPAN_OPS:  # a run of such ops ends its span
            out.append((a, n))
            a = n
        mixed = mixed or varies
        if mixed and n + 1 - a >= SPAN_OPS:
            out.append((a, n + 1))
            a, mixed = n + 1, False
    if a < stop:
        out.append((a, stop))
    return out


def _fixed_values(graph: Graph) -> frozenset[int]:
    """Values laid out alike in every plan: constants (no op makes them and the graph is not
    given them) and what ops without a body make from them alone."""
    given = set(graph.inputs)
    fixed = {v.id for v in graph.values if v.id not in graph.producer and v.id not in given}
    for op in graph.ops:
        if not op.body and all(v in fixed for v in op.inputs):
            fixed.update(op.outputs)
    return frozenset(fixed)


def spans_of(graph: Graph) -> tuple[Span, ...]:
    later_reads: set[int] = set(graph.outputs)
    bounds = span_bounds(graph)
    meetings = graph.derived("propagate.sum_paths", sum_paths)
    producer = graph.producer
    given = set(graph.inputs)
    out = []
    for index, (a, b) in reversed(list(enumerate(bounds))):
        ops = graph.ops[a:b]
        defs = tuple(v for op in ops for v in op.outputs)
        mine = set(defs)
        reads = tuple(dict.fromkeys(v for op in ops for v in op.inputs if v not in mine))
        earlier = set(reads)
        watched = tuple(
            dict.fromkeys(
                u
                for op in ops
                for v in _consulting(graph, op)
                for m in meetings.get(v, ())
                for u in m.chain
                if u not in earlier and u not in mine and producer.get(u, -1) < a
            )
        )
        outputs = tuple(
            sorted(
                {
                    m.output
                    for op in ops
                    for v in _consulting(graph, op)
                    for m in meetings.get(v, ())
                    if m.output >= 0
                }
            )
        )
        exported = frozenset(v for v in defs if v in later_reads)
        summable = tuple(v for v in reads if v in producer and leaves_sums(graph.ops[producer[v]]))
        contiguous = (
            bool(defs)
            and all(v in mine or (v not in producer and v not in given) for v in range(defs[0], defs[-1] + 1))
            and list(defs) == sorted(defs)
        )
        out.append(
            Span(
                index,
                a,
                b,
                reads,
                defs,
                exported,
                watched,
                summable,
                outputs,
                (defs[0], defs[-1] + 1) if contiguous else None,
            )
        )
        later_reads.update(reads)
    return tuple(reversed(out))


def leaves_sums(op: Op) -> bool:
    """Whether `op` may leave its results pending sums (its rule has a reduction factor)."""
    return op.rule is not None and FactorKind.REDUCTION in op.rule.kinds


def _consulting(graph: Graph, op: Op) -> tuple[int, ...]:
    """The values whose meetings (`ir.sum_targets`) `op` consults: the sums it reads, or a loop's
    stacked outputs (the layouts its body resolves sums into)."""
    if op.primitive == "scan":
        return op.outputs[op.params["num_carry"] :]
    producer = graph.producer
    return tuple(v for v in op.inputs if v in producer and graph.ops[producer[v]].primitive != "scan")


class PropagationCache:
    """Memo tables shared by many propagations of one graph on one mesh (a searcher's inner loop).

    Propagation is a pure function of the input shardings, so each op's decision is a function of
    its operands' shardings (and the constraints on its results), each read of a value a function
    of (have, want), and each loop body's propagation a function of the shardings it is entered
    with. Plans that differ in one decision share most of these, and a cached body is returned as
    the same object, so costs computed per body (cost_model.simulate) can be cached by identity.
    Keep one cache per (graph, mesh, constraint): keys hold graph identities, not contents.
    """

    def __init__(self):
        self.ops: dict[tuple, tuple] = {}
        # (graph key, rule and operand order (`ir.propagate._decides_as`), operands, targets) ->
        # a decision, shared by ops of other kinds that decide alike
        self.decisions: dict[tuple, tuple] = {}
        self.reads: dict[tuple, tuple[list[Collective], Sharding]] = {}
        self.reshards: dict[tuple, tuple[list[Collective], Sharding]] = {}  # by (shape, dtype, ...)
        self.bodies: dict[tuple, Propagation] = {}
        self.parts: dict[tuple, Part] = {}
        # (graph key, span class, reads) -> [a Part of the class, None or its `renaming`]
        self.classed: dict[tuple, list] = {}
        self.repeated: dict[tuple, tuple] = {}  # (body, trip count) -> its collectives repeated
        self.repeated_once: dict[tuple, Collective] = {}  # (collective, trip count) -> repeated
        self.named: dict[int, tuple] = {}  # renamed part -> (it, its collectives named)
        self._keys: dict[tuple[int, Hashable], int] = {}
        self._alive: list[Graph] = []  # graphs whose ids are in keys

    def graph_key(self, graph: Graph, context: Hashable) -> int:
        """A small number for (graph, `context`: what else its parts are replayed under)."""
        k = (id(graph), context)
        if k not in self._keys:
            self._keys[k] = len(self._keys)
            self._alive.append(graph)
        return self._keys[k]

    def __len__(self) -> int:
        return (
            len(self.ops)
            + len(self.decisions)
            + len(self.reads)
            + len(self.reshards)
            + len(self.bodies)
            + len(self.parts)
            + len(self.classed)
            + len(self.repeated)
            + len(self.repeated_once)
            + len(self.named)
        )


def layout(
    graph: Graph, batch: frozenset[int]
) -> tuple[tuple[Span, ...], frozenset[int], tuple[int, ...], tuple[int, ...]]:
    """(spans, values derived from `batch`, per op its kind for decisions, per span its class
    (`span_classes`))."""
    derived = set(batch)
    for op in graph.ops:
        if any(i in derived for i in op.inputs):
            derived.update(op.outputs)
    kinds: dict[tuple, int] = {}
    op_kinds = graph.op_kinds
    decides = tuple(
        kinds.setdefault((op_kinds[op.id], tuple(i in derived for i in op.inputs)), len(kinds))
        for op in graph.ops
    )
    spans = spans_of(graph)
    return spans, frozenset(derived), decides, span_classes(graph, spans, decides)


def span_classes(graph: Graph, spans: tuple[Span, ...], decides: tuple[int, ...]) -> tuple[int, ...]:
    """Per span, a class: spans of one class (the layers of an unrolled model) propagate alike,
    value for value in the order of their `reads`, `defs` and `watched`, when they are entered
    alike (`PropagationCache.classed`): the same ops in the same order (kinds for decisions),
    wired alike among themselves and to what they read, the same of their values read later,
    the same kinds of pending sums read, and the sums they read meeting their partners along
    paths of alike ops (`ir.sum_targets`) with chains of values in the same places (or the same
    of the `outputs` whose layouts a loop body is given). Spans with a loop or branch, or with
    two values of one name (collectives are named per value) are not classed: -1, each its
    own. Under a constraint (which looks at names) classes are not used (`ir.propagate`)."""
    meetings = graph.derived("propagate.sum_paths", sum_paths)
    values = graph.values
    op_kinds = graph.op_kinds
    classes: dict[tuple, int] = {}
    out = []
    for span in spans:
        ops = graph.ops[span.start : span.stop]
        names = {values[v].name for v in (*span.reads, *span.defs)}
        if len(names) < len(span.reads) + len(span.defs) or any(op.body for op in ops):
            out.append(-1)
            continue
        pos = {v: (0, k) for k, v in enumerate(span.reads)}
        pos.update({v: (1, k) for k, v in enumerate(span.defs)})
        pos.update({v: (2, k) for k, v in enumerate(span.watched)})
        inputs = [tuple(pos[v] for v in op.inputs) for op in ops]
        met = tuple(
            (
                pos[v],
                tuple(
                    (
                        tuple((op_kinds[n], k) for n, k in m.path),
                        m.partner,
                        tuple(pos.get(u, (3, 0)) for u in m.chain),  # (3: made after the span)
                        span.outputs.index(m.output) if m.output >= 0 else -1,
                    )
                    for m in meetings[v]
                ),
            )
            for op in ops
            for v in _consulting(graph, op)
            if v in meetings
        )
        key = (
            len(span.reads),
            len(span.watched),
            tuple((decides[op.id], ins, len(op.outputs)) for op, ins in zip(ops, inputs, strict=True)),
            tuple(k for k, v in enumerate(span.defs) if v in span.exported),
            tuple((pos[v], sum_kind(graph, v)) for v in span.summable),
            met,
            None
            if span.def_range is None
            else tuple(
                # a def by position, else a constant (laid out replicated): by rank
                pos[v] if v in pos and pos[v][0] == 1 else (9, values[v].rank)
                for v in range(*span.def_range)
            ),
        )
        out.append(classes.setdefault(key, len(classes)))
    return tuple(out)


def renaming(part: Part, graph: Graph) -> tuple:
    """What `renamed` needs of `part` beyond the part, worked out once for every span it is
    renamed for: per value it names (sum groups, reads, collectives), that value's position in
    its span's `reads + defs` (a def where a value is both, as in propagation)."""
    at, by_name = _positions(part.span, graph)
    return (
        tuple([at[v] for v, _ in part.sum_groups]),
        tuple([by_name[c.value] for c in part.collectives]),
        tuple([at[v] for _, _, v, _, _ in part.outside]),
        tuple([at[v] for v, _ in part.inside_reads]),
    )


def _positions(span: Span, graph: Graph) -> tuple[dict[int, int], dict[str, int]]:
    """Per value of the span's `reads + defs`, its position there (a def where a value is both),
    by id and by name: a function of the graph, kept with it."""
    table = graph.derived("spans.positions", lambda g: {})
    hit = table.get(span.index)
    if hit is None:
        at = {v: k for k, v in enumerate(span.reads + span.defs)}
        values = graph.values
        hit = table[span.index] = (
            at,
            {values[v].name: k for v, k in at.items()},
        )  # (names are unique in a classed span)
    return hit


def renamed(part: Part, span: Span, graph: Graph, names: tuple) -> Part:
    """`part`, recorded for a span of `span`'s class (`span_classes`), as propagating `span`
    entered alike makes it: value for value by position in `reads` and `defs`, op for op by
    position, the value each collective moves here named (`Part.names`). `names`:
    `renaming(part, graph)`."""
    was = part.span
    shift = span.start - was.start
    rewritten = tuple([n + shift for n in part.rewritten]) if part.rewritten else ()
    if part.plain and not part.collectives:  # (most: nothing named by value)
        return _made(span, part.ops, part.defs, (), (), (), (), (), rewritten, (), part.origin or part, True)
    sums, named, outside, inside = names
    now = span.reads + span.defs
    values = graph.values
    # The collectives stay the recorded part's; the names of the values they move here are
    # kept beside them (named only when asked for: `Propagation.collectives`).
    return _made(
        span,
        part.ops,
        part.defs,
        tuple([(now[k], g) for (_, g), k in zip(part.sum_groups, sums, strict=True)]),
        part.collectives,
        tuple(
            [
                (at, n, now[k], want, res)
                for (at, n, _, want, res), k in zip(part.outside, outside, strict=True)
            ]
        ),
        tuple([(now[k], s) for (_, s), k in zip(part.inside_reads, inside, strict=True)]),
        (),
        rewritten,
        tuple([values[now[k]].name for k in named]),
        part.origin or part,
        part.plain,  # (renamed alike: the same fields empty)
    )


def _made(
    span, ops, defs, sum_groups, collectives, outside, inside_reads, bodies, rewritten, names, origin, plain
):
    """A Part of its fields, `plain` included, set slot by slot: `Part(...)` (a frozen dataclass
    with a `__post_init__`) costs ~1.4 us against ~0.75 here, and a cold evaluation of the
    unrolled Llama-8B renames ~620 parts."""
    part = _NEW(Part)
    _SET_SPAN(part, span)
    _SET_OPS(part, ops)
    _SET_DEFS(part, defs)
    _SET_SUM_GROUPS(part, sum_groups)
    _SET_COLLECTIVES(part, collectives)
    _SET_OUTSIDE(part, outside)
    _SET_INSIDE_READS(part, inside_reads)
    _SET_BODIES(part, bodies)
    _SET_REWRITTEN(part, rewritten)
    _SET_NAMES(part, names)
    _SET_ORIGIN(part, origin)
    _SET_PLAIN(part, plain)
    return part


_NEW = object.__new__
(
    _SET_SPAN,
    _SET_OPS,
    _SET_DEFS,
    _SET_SUM_GROUPS,
    _SET_COLLECTIVES,
    _SET_OUTSIDE,
    _SET_INSIDE_READS,
    _SET_BODIES,
    _SET_REWRITTEN,
    _SET_NAMES,
    _SET_ORIGIN,
    _SET_PLAIN,
) = (Part.__dict__[f.name].__set__ for f in dataclasses.fields(Part))

"""Sharding propagation over factor rules: the sharding of every value and the collectives it costs.

Given the shardings of a graph's inputs (and constraints on named values), each op in program
order picks an assignment of mesh axes to its rule's factors from the shardings its operands
propose, reshards operands that disagree, and gives its results the assignment. The procedure is
written once over `OpRule`s; the only structural cases are loops (`scan`) and branches (`cond`).

Conflicts (two factors of one op proposing the same mesh axis) go to the proposal of highest
priority: a constraint on a result first, then operands derived from the batch (activations stay
put and weights move, which is what FSDP and ZeRO do), then larger operands, then operand order.

A reduction factor sharded over axes leaves its result a pending partial sum over those axes. The
sum is resolved where the value is first read: into the layout of the step input its readers
meet a few ops on, where that layout shards it over partial axes (the data-parallel gradient
reduce-scattered into its optimizer state's or parameter's layout, as XLA's two-way propagation
does: `ir.sum_targets`); else by a reduce-scatter when that reader wants it sharded along a
partial axis, or by all-reduces, one per sharded reduction dim as XLA's partitioner emits them
(a sum XLA does not reduce-scatter is all-reduced and sliced). A loop body resolves a sum it
leaves in a stacked output into the layout the ops after the loop meet. The resolved sharding is
the value's sharding from then on. `ir.reshard.reshard` prices every change of sharding the way
XLA's SPMD partitioner carries it out (docs/xla-partitioner.md).

A searcher propagates thousands of plans of one graph: with a `PropagationCache`, the ops run in
spans (`ir.spans`), and a span entered with shardings seen before is replayed from what it did
then (a `Part`), decisions, collectives and all, instead of propagated again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping

from ir.comm import Collective
from ir.factors import assign_factors, result_shardings, tensor_dims
from ir.graph import Graph, Op, Role, Value
from ir.reshard import reshard
from ir.sharding import MeshShape, Sharding
from ir.spans import Part, PropagationCache, Span, layout, leaves_sums, renamed, renaming
from ir.sum_targets import resolution, scatters, stacked_targets, sum_kind, sum_paths

Constraint = Callable[[Value], Sharding | None]


@dataclasses.dataclass(frozen=True, slots=True)
class OpSharding:
    """What propagation decided for one op.

    Attributes:
      factors: mesh axes per rule factor.
      operands: the sharding each operand is read with (after resharding).
    """

    factors: tuple[tuple[str, ...], ...]
    operands: tuple[Sharding, ...]


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class Propagation:
    """The sharded program a plan describes.

    Attributes:
      graph: the graph propagated.
      mesh: the mesh.
      shardings: per value id, its sharding once materialised (pending sums resolved).
      ops: per op id, the factor assignment (None for scan and cond).
      moves: every collective of the step, bodies included (counts hold trip counts), in order:
        a Collective; for the collectives of a part renamed from another span's
        (`ir.spans.renamed`), the Part (its `collectives` are the recorded part's, its `names`
        those of the values they move here), or (the Part, first, stop) for its collectives
        first..stop-1. `collectives` names them; a searcher's simulator reads these as they are.
      bodies: op id -> propagation of each body (scan) or branch (cond).
      live: per value id, whether the value is read or returned (dead values are not constrained).
      outputs: per output position, the sharding the step returns it with.
      parts: the `Part`s the ops were propagated in, in program order, when a
        PropagationCache was used (the same object for the same part under the same entry
        shardings, so costs can be cached per part by identity); () otherwise.
    """

    graph: Graph
    mesh: MeshShape
    shardings: tuple[Sharding, ...]
    ops: tuple[OpSharding | None, ...]
    moves: tuple[Collective | Part | tuple[Part, int, int], ...]
    bodies: Mapping[int, tuple[Propagation, ...]]
    live: tuple[bool, ...]
    outputs: tuple[Sharding, ...]
    parts: tuple[Part, ...] = ()
    _named: list = dataclasses.field(default_factory=lambda: [None], init=False, repr=False)

    @property
    def collectives(self) -> tuple[Collective, ...]:
        """Every collective of the step, bodies included (counts hold trip counts), each named
        for the value it moves: `moves`, named once when first asked for."""
        named = self._named[0]
        if named is None:
            named = self._named[0] = tuple(named_moves(self.moves))
        return named


def named_moves(moves) -> Iterator[Collective]:
    """The collectives of `Propagation.moves` in order, each named for the value it moves."""
    for m in moves:
        if m.__class__ is Collective:
            yield m
        elif m.__class__ is Part:
            yield from m.named_collectives()
        else:
            part, a, b = m
            yield from map(Collective.named, part.collectives[a:b], part.names[a:b])


def _start(graph: Graph) -> tuple[Sharding | None, ...]:
    """Values no op makes (inputs and constants) replicated, the others None."""
    return tuple(None if v.id in graph.producer else Sharding.replicated(v.rank) for v in graph.values)


def _sum_readers(graph: Graph) -> frozenset[int]:
    """Ids of the ops that may read a pending sum: a value made by an op whose rule has a
    reduction factor, by a loop or branch, or given to the graph (a loop body's carries)."""
    maybe = set(graph.inputs)
    for op in graph.ops:
        if op.rule is None or leaves_sums(op):
            maybe.update(op.outputs)
    return frozenset(op.id for op in graph.ops if any(v in maybe for v in op.inputs))


def _batch_inputs(graph: Graph) -> frozenset[int]:
    return frozenset(i for i in graph.inputs if graph.values[i].role is Role.BATCH)


def _live(graph: Graph) -> tuple[bool, ...]:
    live = [False] * len(graph.values)
    for op in graph.ops:
        for i in op.inputs:
            live[i] = True
    for o in graph.outputs:
        live[o] = True
    return tuple(live)


def propagate(
    graph: Graph,
    mesh: MeshShape,
    inputs: Mapping[int, Sharding],
    *,
    constraint: Constraint | None = None,
    outputs: Mapping[int, Sharding] | None = None,
    batch_inputs: frozenset[int] | None = None,
    cache: PropagationCache | None = None,
    stacked: Mapping[int, Sharding] | None = None,
) -> Propagation:
    """Propagates input shardings through the graph.

    Args:
      graph: the program.
      mesh: the device mesh.
      inputs: sharding per input value id (missing inputs are replicated).
      constraint: sharding a named value must have, or None (e.g. `Plan.activation_sharding`).
      outputs: sharding per output position the step must return (e.g. new params like params).
      batch_inputs: input ids derived from the batch (default: inputs with role BATCH).
      cache: memo tables to reuse across propagations of this graph, mesh and constraint.
      stacked: for a loop body, per output index the layout a pending sum left in that output is
        resolved into (`ir.sum_targets.stacked_targets`).

    Returns:
      The Propagation: every value's sharding and the step's collectives.
    """
    return _Propagator(graph, mesh, constraint, batch_inputs, cache, stacked).run(inputs, outputs or {})


class _Propagator:
    def __init__(
        self,
        graph: Graph,
        mesh: MeshShape,
        constraint: Constraint | None,
        batch_inputs: frozenset[int] | None,
        cache: PropagationCache | None = None,
        stacked: Mapping[int, Sharding] | None = None,
    ):
        self.g = graph
        self.stacked = stacked or {}
        self.mesh = mesh
        self.constraint = constraint
        self.cur: list[Sharding | None] = []  # per value id, its sharding so far (set by run)
        self.ops: list[OpSharding | None] = [None] * len(graph.ops)
        self.colls: list[Collective] = []
        self.bodies: dict[int, tuple[Propagation, ...]] = {}
        self.memo: set[tuple[int, Sharding]] = set()
        # Per value with a pending sum: its partial axes grouped as XLA reduces them (see reshard).
        self.sum_groups: dict[int, tuple[tuple[str, ...], ...]] = {}
        if batch_inputs is None:
            batch_inputs = graph.derived("propagate.batch_inputs", _batch_inputs)
        elif batch_inputs.__class__ is not frozenset:
            batch_inputs = frozenset(batch_inputs)
        self.cache = cache
        # Parts are replayed per graph and batch; a span whose sums are resolved into a loop
        # body's stacked outputs also per those outputs' given layouts (`Span.outputs`).
        self.gkey = cache.graph_key(graph, batch_inputs) if cache is not None else None
        self.parts: list[Part] = []
        self.rewritten: list[int] = []  # ops whose results are not stored as written (see Part)
        self.outside: list | None = None  # while a span is recorded: its reads of earlier values
        self.before: frozenset[int] | set[int] = frozenset()  # ... and the values that are earlier
        # Fixed by the graph, kept with it: the spans, the values derived from the batch, and per
        # op its kind for decisions (ops of one `Graph.op_kinds` kind whose operands are alike
        # derived from the batch decide alike).
        spans, self.batch, self.kinds, classes = graph.derived(
            ("propagate.layout", batch_inputs), lambda g: layout(g, batch_inputs)
        )
        self.spans: tuple[Span, ...] = spans if cache is not None else ()  # replayed with a cache
        # Spans of one class entered alike propagate alike (`ir.spans.span_classes`); a
        # constraint looks at value names, so under one each span is its own.
        self.classes: tuple[int, ...] | None = classes if constraint is None else None
        self.meetings = graph.derived("propagate.sum_paths", sum_paths)
        self.sum_readers = graph.derived("propagate.sum_readers", _sum_readers)
        # Per op, what its decision is a function of besides its operands' layouts and targets
        # (`_decide`): its rule and the order its operands propose in.
        self.decides_as = (
            graph.derived(("propagate.decides_as", self.batch), lambda g: _decides_as(g, self.batch))
            if cache is not None
            else None
        )

    # -- driver ----------------------------------------------------------------------------------

    def run(self, inputs: Mapping[int, Sharding], outputs: Mapping[int, Sharding]) -> Propagation:
        g = self.g
        # Inputs and constants start replicated; the inputs given are set over them.
        self.cur = cur = list(g.derived("propagate.start", _start))
        for vid in g.inputs:
            s = inputs.get(vid)
            if s:
                cur[vid] = s
        if self.spans:
            # Each span replayed from the Part recorded when it was entered alike (see Part):
            # the shardings it reads, the sum groups of the pending sums among them, the layouts
            # that decide where a sum it reads is resolved.
            parts = self.cache.parts
            gkey, sum_groups, stacked, apply = self.gkey, self.sum_groups, self.stacked, self._apply
            # (`_record` puts back the lists it swaps out: these stay the propagation's own.)
            decided, colls, applied = self.ops, self.colls, self.parts
            for span in self.spans:
                key = (gkey, span.index, span.read(cur))
                if span.summable:
                    key += (tuple([sum_groups.get(v) for v in span.summable if cur[v].partial]),)
                if span.watched:
                    key += (tuple([cur[v] for v in span.watched]),)
                if span.outputs:
                    key += (tuple([stacked.get(o) for o in span.outputs]),)
                part = parts.get(key)
                fresh = part is None
                if fresh:
                    part = parts[key] = self._new_part(span, key)
                decided[span.start : span.stop] = part.ops
                if span.def_range is not None:
                    cur[span.def_range[0] : span.def_range[1]] = part.defs
                else:
                    any(map(cur.__setitem__, span.defs, part.defs))  # cur[v] = s for each, at C speed
                if not part.plain:
                    apply(part, fresh)
                elif part.collectives:
                    if not part.names:
                        colls.extend(part.collectives)
                    elif fresh:  # a renamed part's collectives, named when asked for
                        colls.append(part)
                    else:  # replayed: named once, for every replay
                        colls.extend(self._named(part))
                applied.append(part)
        else:
            for op in g.ops:
                self._one(op)
        returned = []
        for k, vid in enumerate(g.outputs):
            want = outputs.get(k)
            if want is None:
                s = cur[vid]
                want = Sharding(s.dims) if s.partial else s
            if cur[vid] is not want:  # (interned: read as stored costs nothing)
                self._read(vid, want)
            returned.append(want)
        live = g.derived("propagate.live", _live)
        # Values still pending a sum at the end are stored reduced (only those with sum groups
        # were ever partial).
        for vid in self.sum_groups:
            s = cur[vid]
            if s.partial:
                cur[vid] = Sharding(s.dims)
        shardings = tuple(cur)
        return Propagation(
            g,
            self.mesh,
            shardings,
            tuple(self.ops),
            tuple(self.colls),
            self.bodies,
            live,
            tuple(returned),
            tuple(self.parts),
        )

    def _one(self, op: Op) -> None:
        if op.primitive == "scan":
            self._scan(op)
        elif op.primitive == "cond":
            self._cond(op)
        else:
            self._op(op)

    # -- spans: runs of ops replayed when entered alike ---------------------------------------------

    def _new_part(self, span: Span, key: tuple) -> Part:
        """The Part of a span entered as `key` says: another span of its class entered alike
        renamed (`ir.spans.renamed`), else recorded."""
        cls = self.classes[span.index] if self.classes is not None else -1
        if cls < 0:
            return self._record(span)
        ckey = (self.gkey, cls, *key[2:])  # (what the span is entered with, by position)
        seen = self.cache.classed.get(ckey)
        if seen is not None:
            if seen[1] is None:
                seen[1] = renaming(seen[0], self.g)
            return renamed(seen[0], span, self.g, seen[1])
        part = self._record(span)
        self.cache.classed[ckey] = [part, None]
        return part

    def _record(self, span: Span) -> Part:
        """Propagates the span's ops, collecting what they do as a Part (applied by `run`)."""
        colls, self.colls = self.colls, []
        self.outside, self.before = [], set(span.reads)
        inside: list[tuple[int, Sharding]] = []
        memo, self.memo = self.memo, set()
        mark = len(self.rewritten)  # the span's own ops are appended after it
        try:
            for op in self.g.ops[span.start : span.stop]:
                self._one(op)
            inside = [r for r in self.memo if r[0] in span.exported]
            return Part(
                span,
                tuple(self.ops[span.start : span.stop]),
                tuple(self.cur[span.def_range[0] : span.def_range[1]])
                if span.def_range is not None
                else tuple(self.cur[v] for v in span.defs),
                tuple((v, self.sum_groups[v]) for v in span.defs if v in self.sum_groups),
                tuple(self.colls),
                tuple(self.outside),
                tuple(inside),
                tuple((i, self.bodies[i]) for i in range(span.start, span.stop) if i in self.bodies),
                tuple(self.rewritten[mark:]),
            )
        finally:
            self.colls, self.memo = colls, memo
            self.outside, self.before = None, frozenset()

    def _named(self, part: Part) -> tuple[Collective, ...]:
        """A renamed part's collectives, named for the values they move (once per part)."""
        hit = self.cache.named.get(id(part))
        if hit is None or hit[0] is not part:
            hit = self.cache.named[id(part)] = (part, part.named_collectives())
        return hit[1]

    def _apply(self, part: Part, fresh: bool = True) -> None:
        """What a part that is not `Part.plain` adds once its values are laid out (see `run`): its
        pending sums, its collectives (a read of an earlier value that another span made already
        costs nothing), its reads of its own values, its bodies. A renamed part's collectives
        stay unnamed in `Propagation.moves` when the part is `fresh` (made for this propagation:
        in a cold evaluation, every one); a part replayed again adds them named."""
        if part.sum_groups:
            self.sum_groups.update(part.sum_groups)
        colls, names = part.collectives, part.names
        if names and not fresh:
            colls, names = self._named(part), ()
        memo = self.memo
        out = self.colls
        if part.outside:
            made = [0]  # the runs of `colls` made: first, stop, first, stop, ...
            for at, n, vid, want, resolved in part.outside:
                if (vid, want) in memo:  # read before: its collectives at..at+n-1 are not made
                    if n:
                        if made[-1] == at:
                            made.pop()
                        else:
                            made.append(at)
                        made.append(at + n)
                else:
                    memo.add((vid, want))
                if resolved is not None:
                    self.cur[vid] = resolved
            made.append(len(colls))
            for a, b in zip(made[::2], made[1::2], strict=True):
                if a >= b:
                    continue
                if names:  # (a renamed part's: named when asked for, see Propagation.moves)
                    out.append(part if b - a == len(colls) else (part, a, b))
                else:
                    out.extend(colls[a:b])
        elif colls:
            if names:
                out.append(part)
            else:
                out.extend(colls)
        if part.inside_reads:
            memo.update(part.inside_reads)
        if part.bodies:
            self.bodies.update(part.bodies)

    # -- one op ----------------------------------------------------------------------------------

    def _op(self, op: Op) -> None:
        g = self.g
        cur = self.cur
        ins = tuple([cur[vid] for vid in op.inputs])
        if op.id in self.sum_readers and any(s.partial for s in ins):
            ins = self._sums_to_partners(op, ins)
        constrained = self.constraint is not None
        targets = (
            tuple(self.constraint(g.values[vid]) for vid in op.outputs)
            if constrained
            else (None,) * len(op.outputs)
        )
        # Ops of a kind decide alike on alike operands: one entry serves every layer of a model.
        key = (self.gkey, self.kinds[op.id], ins, targets) if self.cache is not None else None
        decided = self.cache.ops.get(key) if key is not None else None
        if decided is None:
            decided = self._decide(op, ins, targets)
            if key is not None:
                self.cache.ops[key] = decided
        decision, results, groups = decided
        if groups or (
            constrained and any(t is not None and t != r for t, r in zip(targets, results, strict=True))
        ):
            self.rewritten.append(op.id)
        for vid, want in zip(op.inputs, decision.operands, strict=True):
            if cur[vid] is not want:  # (shardings are interned: read as stored costs nothing)
                self._read(vid, want)
        for k, vid in enumerate(op.outputs):
            cur[vid] = results[k]
            if groups:
                self.sum_groups[vid] = groups
            if targets[k] is not None:
                # The constrained value is the target: every reader sees it so.
                self._read(vid, targets[k])
                cur[vid] = targets[k]
        # One object per decision, the same however often it is made again: costs and memory
        # resolutions downstream are cached by its identity.
        self.ops[op.id] = decision

    def _sums_to_partners(self, op: Op, ins: tuple) -> tuple:
        """Resolves each pending sum `op` reads into the layout the values its readers meet imply
        (`ir.sum_targets.resolution`): a reduce-scatter into the optimizer state's layout, as XLA
        propagates it back. Returns the operand shardings after."""
        cur = self.cur
        for vid, have in zip(op.inputs, ins, strict=True):
            if have.partial and vid in self.meetings and cur[vid].partial:
                want = resolution(
                    self.g, self.meetings[vid], have, cur, self.constraint, self.mesh, self.stacked
                )
                if want is not None:
                    self._read(vid, want)
        return tuple(cur[vid] for vid in op.inputs)

    def _decide(self, op: Op, ins: tuple, targets: tuple) -> tuple:
        """(OpSharding, result shardings, sum groups) of one op.

        With a cache, ops of other kinds with the same rule, operand order, operands' layouts
        and targets (an add and a multiply of one shape) share the work: each kind gets its own
        OpSharding of the same factors (costs and resolutions downstream are kept per decision
        object and op kind)."""
        if self.cache is not None:
            alike = (self.gkey, self.decides_as[op.id], ins, targets)
            made = self.cache.decisions.get(alike)
            if made is not None:
                return OpSharding(made[0].factors, made[0].operands), made[1], made[2]
        rule = op.rule
        g = self.g
        proposals = [
            ((0, vid in self.batch, g.values[vid].nbytes, -k), rule.operands[k], ins[k])
            for k, vid in enumerate(op.inputs)
        ]
        proposals += [((1, True, 0, -k), rule.results[k], want) for k, want in enumerate(targets) if want]
        factors = assign_factors(rule, proposals, self.mesh)
        operands = tuple(Sharding(tensor_dims(rule.operands[k], factors)) for k in range(len(op.inputs)))
        results, groups = result_shardings(rule, factors)
        out = OpSharding(factors, operands), results, groups
        if self.cache is not None:
            self.cache.decisions[alike] = out
        return out

    # -- reading a value with a given sharding -----------------------------------------------------

    def _read(self, vid: int, want: Sharding) -> None:
        """Reshards value `vid` to `want` (counting collectives once per value and target)."""
        have = self.cur[vid]
        if have == want:
            return
        if (
            have.partial
            and want.dims != have.dims
            and not scatters(sum_kind(self.g, vid), self.sum_groups.get(vid, ()), have, want, self.mesh)
        ):
            # A sum XLA does not reduce-scatter: all-reduced, then this device's slice read.
            self._read(vid, Sharding(have.dims))
            have = self.cur[vid]
            if have == want:
                return
        if vid in self.before:
            # A span being recorded reads a value made before it: kept apart, because whether
            # the read costs anything depends on what ran before the span (see `_apply`).
            colls, resolved = self._reshard(vid, have, want)
            self.outside.append((len(self.colls), len(colls), vid, want, resolved if have.partial else None))
            self.colls.extend(colls)
            if have.partial:
                self.cur[vid] = resolved
            return
        if (vid, want) in self.memo:
            return
        self.memo.add((vid, want))
        colls, resolved = self._reshard(vid, have, want)
        self.colls.extend(colls)
        if have.partial:
            self.cur[vid] = resolved

    def _reshard(self, vid: int, have: Sharding, want: Sharding) -> tuple[list[Collective], Sharding]:
        groups = self.sum_groups.get(vid)
        key = (self.gkey, vid, have, want, groups) if self.cache is not None else None
        hit = self.cache.reads.get(key) if key is not None else None
        if hit is None:
            v = self.g.values[vid]
            if key is None:
                return reshard(v, have, want, self.mesh, groups)
            # Values of one shape and dtype reshard alike (the layers of an unrolled model): the
            # collectives are worked out once and named for each value.
            alike = (v.shape, v.dtype, have, want, groups)
            made = self.cache.reshards.get(alike)
            if made is None:
                made = self.cache.reshards[alike] = reshard(v, have, want, self.mesh, groups)
            colls, resolved = made
            hit = self.cache.reads[key] = (
                [c.named(v.name) for c in colls] if colls and colls[0].value != v.name else colls,
                resolved,
            )
        return hit

    # -- structure -------------------------------------------------------------------------------

    def _resolved(self, vid: int) -> Sharding:
        s = self.cur[vid]
        if s.partial:
            self._read(vid, Sharding(s.dims))
        return self.cur[vid]

    def _scan(self, op: Op) -> None:
        body = op.body[0]
        nc, nk = op.params["num_consts"], op.params["num_carry"]
        body_in: dict[int, Sharding] = {}
        body_batch = set()
        for k, (vid, bid) in enumerate(zip(op.inputs, body.inputs, strict=True)):
            s = self._resolved(vid)
            if k >= nc + nk:
                if s.dims[0]:
                    s = Sharding(((), *s.dims[1:]))
                    self._read(vid, s)
                s = Sharding(s.dims[1:])
            body_in[bid] = s
            if vid in self.batch:
                body_batch.add(bid)
        carry_out = {j: body_in[body.inputs[nc + j]] for j in range(nk)}
        stacked = stacked_targets(self.g, op, self.meetings, self.cur, self.constraint, self.mesh)
        sub = self._body(body, body_in, carry_out, frozenset(body_batch), stacked)
        self.bodies[op.id] = (sub,)
        self.colls.extend(self._repeated(sub, op.trip_count))
        for j, vid in enumerate(op.outputs):
            if j < nk:
                self.cur[vid] = carry_out[j]
            else:
                self.cur[vid] = Sharding(((), *sub.outputs[j].dims))

    def _body(
        self,
        body: Graph,
        inputs: dict[int, Sharding],
        outputs: Mapping[int, Sharding],
        batch: frozenset[int],
        stacked: Mapping[int, Sharding] | None = None,
    ) -> Propagation:
        """A body's propagation, cached by the shardings it is entered and left with (and the
        layouts sums left in its stacked outputs are resolved into)."""

        def fresh() -> Propagation:
            return propagate(
                body,
                self.mesh,
                inputs,
                constraint=self.constraint,
                outputs=outputs,
                batch_inputs=batch,
                cache=self.cache,
                stacked=stacked,
            )

        if self.cache is None:
            return fresh()
        self.cache.graph_key(body, batch)  # keeps the body alive while its id is a key
        key = (
            id(body),
            tuple(inputs.get(b) for b in body.inputs),
            tuple(sorted(outputs.items())),
            batch,
            tuple(sorted((stacked or {}).items())),
        )
        sub = self.cache.bodies.get(key)
        if sub is None:
            sub = fresh()
            self.cache.bodies[key] = sub
        return sub

    def _repeated(self, sub: Propagation, times: int) -> tuple[Collective, ...]:
        """A loop body's collectives, each run `times` times (made once per body object with a
        cache)."""
        if self.cache is None:
            return tuple(c.repeated(times) for c in sub.collectives)
        hit = self.cache.repeated.get((id(sub), times))
        if hit is None or hit[0] is not sub:
            # Bodies share most of their collectives (interned): each repeated once per cache.
            once = self.cache.repeated_once
            out = []
            for c in sub.collectives:
                r = once.get((c, times))
                if r is None:
                    r = once[(c, times)] = c.repeated(times)
                out.append(r)
            hit = self.cache.repeated[(id(sub), times)] = (sub, tuple(out))
        return hit[1]

    def _cond(self, op: Op) -> None:
        self._resolved(op.inputs[0])
        subs = []
        outs: dict[int, Sharding] = {}
        for branch in op.body:
            body_in = {
                bid: self._resolved(vid) for vid, bid in zip(op.inputs[1:], branch.inputs, strict=True)
            }
            sub = self._body(
                branch,
                body_in,
                outs,
                frozenset(b for v, b in zip(op.inputs[1:], branch.inputs, strict=True) if v in self.batch),
            )
            if not outs:
                outs = dict(enumerate(sub.outputs))
            subs.append(sub)
            self.colls.extend(sub.collectives)
        self.bodies[op.id] = tuple(subs)
        for j, vid in enumerate(op.outputs):
            self.cur[vid] = outs[j]


def _decides_as(graph: Graph, batch: frozenset[int]) -> tuple[int, ...]:
    """Per op, a number for what `_Propagator._decide` reads of it besides its operands' layouts
    and targets: its rule, and the order its operands propose in (those derived from the batch
    first, then the larger, then the first). -1 for an op without a rule."""
    values = graph.values
    kinds = graph.op_kinds  # (ops of one kind have equal rules: each kind's rule is hashed once)
    seen: dict[tuple, int] = {}
    by_kind: dict[tuple, int] = {}
    out = []
    for op in graph.ops:
        if op.rule is None:
            out.append(-1)
            continue
        ins = op.inputs
        order = tuple(
            sorted(range(len(ins)), key=lambda k: (ins[k] in batch, values[ins[k]].nbytes, -k), reverse=True)
        )
        key = (kinds[op.id], order)
        n = by_kind.get(key)
        if n is None:
            n = by_kind[key] = seen.setdefault((op.rule, order), len(seen))
        out.append(n)
    return tuple(out)


def propagate_plan(graph: Graph, plan) -> Propagation:
    """Propagates a Plan: its input shardings, its activation constraints, and outputs that
    update an input (new params, new optimizer state) returned sharded like that input."""
    inputs = plan.input_shardings(graph)
    outputs = {k: inputs[a] for k, a in enumerate(graph.output_alias) if a >= 0 and a in inputs}
    return propagate(
        graph,
        plan.mesh,
        inputs,
        constraint=lambda v: plan.activation_sharding(v.name, v.shape),
        outputs=outputs,
    )

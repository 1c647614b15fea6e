"""Propagation as tables: input shardings -> result sharding and the collectives they cost."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import pytest
from jax.ad_checkpoint import checkpoint_name

from ir.comm import CollectiveKind as K
from ir.graph import Value
from ir.propagate import propagate
from ir.reshard import reshard
from ir.sharding import MeshShape, Sharding
from ir.sum_targets import scatters
from ir.trace import trace
from ir.workload import Workload

MESH = MeshShape(("data", "model"), (2, 4))
F32 = jnp.float32


def S(*spec, partial=()):
    return Sharding(
        tuple(() if a is None else (a,) if isinstance(a, str) else tuple(a) for a in spec), frozenset(partial)
    )


def _key(c):
    return (c[0].value, c[1], c[2])


def _run(fn, shapes, in_specs, **kw):
    args = tuple(jax.ShapeDtypeStruct(s, F32) for s in shapes)
    names = ("batch", "params", "opt_state")[: len(shapes)]  # roles: batch-derived values win conflicts
    g = trace(Workload(fn, args, arg_names=names))
    prop = propagate(g, MESH, {i: s for i, s in zip(g.inputs, in_specs, strict=True)}, **kw)
    colls = sorted(((c.kind, c.axes, c.bytes) for c in prop.collectives), key=_key)
    return g, prop, colls


CASES = [
    # name, fn, shapes, input shardings, result sharding, collectives (kind, axes, bytes per device)
    (
        "matmul batch-sharded",
        lambda x, w: x @ w,
        [(8, 16), (16, 32)],
        [S("data", None), S(None, None)],
        S("data", None),
        [],
    ),
    (
        "matmul contraction-sharded: all-reduce of the result",
        lambda x, w: x @ w,
        [(8, 16), (16, 32)],
        [S(None, "model"), S("model", None)],
        S(None, None),
        [(K.ALL_REDUCE, ("model",), 8 * 32 * 4)],
    ),
    (
        "column-parallel: output sharded like the weight",
        lambda x, w: x @ w,
        [(8, 16), (16, 32)],
        [S("data", None), S(None, "model")],
        S("data", "model"),
        [],
    ),
    (
        "FSDP conflict: the batch stays, the weight is gathered",
        lambda x, w: x @ w,
        [(8, 16), (16, 32)],
        [S("data", None), S("data", None)],
        S("data", None),
        [(K.ALL_GATHER, ("data",), 16 * 32 * 4)],
    ),
    (
        "elementwise operands that disagree: all-to-all",
        lambda a, b: a + b,
        [(8, 16), (8, 16)],
        [S("model", None), S(None, "model")],
        S("model", None),
        [(K.ALL_TO_ALL, ("model",), 8 * 16 * 4 // 4)],
    ),
    (
        "split heads keeps the sharding on the heads factor",
        lambda x: x.reshape(8, 4, 16),
        [(8, 64)],
        [S(None, "model")],
        S(None, "model", None),
        [],
    ),
    (
        "sum over a sharded dim leaves a partial, all-reduced at the output",
        lambda x: x.sum(axis=1),
        [(8, 64)],
        [S("data", "model")],
        S("data"),
        [(K.ALL_REDUCE, ("model",), 8 * 4 // 2)],
    ),
    (
        "two mesh axes on one dim",
        lambda x, w: x @ w,
        [(8, 16), (16, 32)],
        [S(("data", "model"), None), S(None, None)],
        S(("data", "model"), None),
        [],
    ),
]


@pytest.mark.parametrize("name,fn,shapes,ins,out,colls", CASES, ids=[c[0] for c in CASES])
def test_propagation_table(name, fn, shapes, ins, out, colls):
    _, prop, got = _run(fn, shapes, ins)
    assert prop.outputs[0] == out
    assert got == sorted(colls, key=_key)


def test_partial_sum_resolved_by_reduce_scatter_when_the_reader_wants_it_sharded():
    """The DP gradient meeting a sharded optimizer state: reduce-scatter, not all-reduce (the
    batch on the 4-way axis: see `test_which_pending_sums_xla_reduce_scatters` for 2-way)."""

    def f(x, dy, mu):
        grad = x.T @ dy  # contracts the batch: partial over data
        return mu + grad

    _, prop, colls = _run(
        f, [(8, 16), (8, 32), (16, 32)], [S("model", None), S("model", None), S("model", None)]
    )
    assert colls == [(K.REDUCE_SCATTER, ("model",), 16 * 32 * 4)]
    assert prop.outputs[0] == S("model", None)


def test_partial_sum_resolved_into_the_layout_of_the_state_its_readers_meet():
    """Its first reader (a transpose) shards nothing, but the Adam-like update two ops on meets
    optimizer state sharded over the sum's axis: reduce-scattered into that layout mapped back
    through the transpose, as XLA's two-way propagation does (not all-reduced at the transpose)."""

    def f(x, dy, mu):
        grad = (x.T @ dy).T  # (32, 16), partial over data, first read by the transpose
        return 0.9 * mu + 0.1 * grad

    _, prop, colls = _run(
        f, [(8, 16), (8, 32), (32, 16)], [S("model", None), S("model", None), S("model", None)]
    )
    assert colls == [(K.REDUCE_SCATTER, ("model",), 16 * 32 * 4)]
    assert prop.outputs[0] == S("model", None)


def test_which_pending_sums_xla_reduce_scatters():
    """A dot's sum over any groups, a reduce_sum's over one, a scatter-add's over one into its
    scattered dims; the rest are all-reduced and sliced. A dot's scattered over 2 devices into a
    layout left whole over another axis XLA slices, all-reduces and permutes instead (measured:
    benchmarks/sim_fidelity.py, bert/vit/moe fsdp_tp on 2x4), so it is left to its reader."""
    mesh, wide = MeshShape.parse("data=2,model=4"), MeshShape.parse("data=4,model=2")
    have = Sharding(((), ()), partial=("data", "model"))
    rows = Sharding((("data",), ()), partial=("data", "model"))
    cols = Sharding(((), ("data",)), partial=("data", "model"))
    one, two = ((("data",),)), ((("data",),), (("model",),))
    assert scatters(("dot_general",), two, have, rows, mesh)
    assert scatters(("reduce_sum",), one, have, rows, mesh)
    assert not scatters(("reduce_sum",), two, have, rows, mesh)
    assert scatters(("scatter-add", (0,)), one, have, rows, mesh)
    assert not scatters(("scatter-add", (0,)), one, have, cols, mesh)  # a window dim
    assert not scatters(("scatter-add", (0,)), two, have, rows, mesh)
    over_data = Sharding(((), ()), partial=("data",))
    assert not scatters(("dot_general",), one, over_data, Sharding((("data",), ())), mesh)
    assert scatters(("dot_general",), one, over_data, Sharding((("data",), ())), wide)
    assert scatters(("dot_general",), one, over_data, Sharding((("data",), ("model",))), mesh)
    assert scatters(("reduce_sum",), one, over_data, Sharding((("data",), ())), mesh)


def test_named_constraint_reshards_the_value():
    def f(x, w):
        return checkpoint_name(x @ w, "h") * 2.0

    def constraint(v: Value):
        return S(None, "model") if v.name == "activations/h/0" else None

    _, prop, colls = _run(f, [(8, 16), (16, 32)], [S("data", None), S(None, None)], constraint=constraint)
    assert prop.outputs[0] == S(None, "model")
    assert colls == [(K.ALL_GATHER, ("data",), 8 * 32 * 4 // 4)]


def test_scan_body_collectives_count_each_trip():
    def f(ws, x):
        return jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, ws)[0]

    _, prop, _ = _run(f, [(3, 16, 16), (8, 16)], [S(None, "model", None), S("data", None)])
    (ar,) = [c for c in prop.collectives if c.kind is K.ALL_REDUCE]
    assert (ar.axes, ar.count, ar.total_bytes) == (("model",), 3, 3 * 4 * 16 * 4)


@pytest.mark.parametrize(
    "have,want,expect",
    [
        (S("data", None), S(None, None), [(K.ALL_GATHER, ("data",), 8 * 16 * 4)]),
        (S(("data", "model"), None), S("data", None), [(K.ALL_GATHER, ("model",), 4 * 16 * 4)]),
        (S(None, None), S("data", "model"), []),
        (S(None, None, partial=("data",)), S("data", None), [(K.REDUCE_SCATTER, ("data",), 8 * 16 * 4)]),
        (S(None, None, partial=("data", "model")), S(None, None), [(K.ALL_REDUCE, ("data", "model"), 512)]),
        (S("model", None), S(None, "model"), [(K.ALL_TO_ALL, ("model",), 2 * 16 * 4)]),
    ],
)
def test_reshard_table(have, want, expect):
    v = Value(0, "t", (8, 16), "float32", None)
    colls, _ = reshard(v, have, want, MESH)
    assert [(c.kind, c.axes, c.bytes) for c in colls] == expect


def _made_in_threads(make, n: int = 500, threads: int = 4) -> list:
    """`make(i)` for i in range(n), in each of `threads` threads at once: every object made."""
    import threading

    made: list = []
    workers = [
        threading.Thread(target=lambda: made.extend(make(i) for i in range(n))) for _ in range(threads)
    ]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return made


def test_shardings_are_interned_through_pickling_copies_and_threads():
    # Shardings are one object per value and compare by identity: a pickled one (Ray workers,
    # Optuna journals), a copy, a replace, or one made by another thread must be that object.
    import copy
    import pickle

    s = S("data", None, partial=("model",))
    for t in (pickle.loads(pickle.dumps(s)), copy.deepcopy(s), dataclasses.replace(s)):
        assert t is s and t == s and hash(t) == hash(s) and {s: 1}[t] == 1
    assert dataclasses.replace(s, partial=frozenset()) is S("data", None)
    assert S("data", None) != S(None, "data") and S("data", None) != s

    made = _made_in_threads(lambda i: Sharding(((f"t{i}",), ())))
    assert len({id(m) for m in made}) == 500


def test_spans_cover_the_program_in_order_with_each_loop_alone():
    # Replayed spans: runs of at most SPAN_OPS consecutive ops, a loop in a span of its own (what
    # it is entered with changes more often than the reads of the ops around it), and a run of
    # ops that read only what constants make (laid out alike in every plan) in one span.
    from auto_partition.workloads import resolve
    from ir.spans import SPAN_OPS, span_bounds, spans_of

    g = trace(resolve("builtin:llama:tiny:scan"))
    bounds = span_bounds(g)
    assert bounds[0][0] == 0 and bounds[-1][1] == len(g.ops)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    assert all(b > a for a, b in bounds)
    given = set(g.inputs)
    fixed = {v.id for v in g.values if v.id not in g.producer and v.id not in given}
    for op in g.ops:
        if all(v in fixed for v in op.inputs):
            fixed.update(op.outputs)
    long = [(a, b) for a, b in bounds if b - a > SPAN_OPS]
    assert long  # the rotary position tables
    assert all(all(v in fixed for op in g.ops[a:b] for v in op.inputs) for a, b in long)
    loops = [op.id for op in g.ops if op.body]
    assert len(loops) == 2  # the forward and the backward scan
    assert all((n, n + 1) in bounds for n in loops)
    assert [(s.start, s.stop) for s in spans_of(g)] == list(bounds)


def _llama_layers(n: int) -> Workload:
    """The tiny Llama unrolled with `n` layers (periodic runs need three repeats)."""
    from models import llama

    return llama.build(dataclasses.replace(llama.SIZES["tiny"], n_layers=n), scan=False, source=f"llama-{n}")


def test_each_repeat_of_a_periodic_run_is_cut_alike_into_spans_of_one_class():
    # An unrolled model's layers repeat (forward, backward, the optimizer's updates): each repeat
    # is cut into the same spans, so a layer's span is of one class with the same span of every
    # other layer, whatever the layer's phase against SPAN_OPS.
    from ir.graph import Role
    from ir.spans import MAX_PERIOD, PERIOD_SPAN_OPS, SPAN_OPS, layout, periodic_runs, span_bounds

    g = trace(_llama_layers(4))
    runs = periodic_runs(g)
    kinds = g.op_kinds
    assert len(runs) >= 3  # forward, backward, updates
    assert [r[2] for r in runs[:2]] == [4, 4]  # the forward and backward passes: one per layer
    for first, period, count in runs:
        assert SPAN_OPS <= period <= MAX_PERIOD and count >= 3
        assert all(kinds[n] == kinds[n + period] for n in range(first, first + (count - 1) * period))
    assert all(a + p * c <= b for (a, p, c), (b, _, _) in itertools.pairwise(runs))  # in order, apart
    bounds = span_bounds(g)
    assert bounds[0][0] == 0 and bounds[-1][1] == len(g.ops)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    classes = layout(g, frozenset(i for i in g.inputs if g.values[i].role is Role.BATCH))[3]
    at = {b: k for k, b in enumerate(bounds)}
    for r, (first, period, count) in enumerate(runs):
        cut = [(a - first, b - first) for a, b in bounds if first <= a and b <= first + period]
        assert cut[0][0] == 0 and cut[-1][1] == period
        assert all(b - a <= PERIOD_SPAN_OPS for a, b in cut)
        for j in range(1, count):
            assert all((first + j * period + a, first + j * period + b) in at for a, b in cut)
        if r < 2:  # a layer's passes are wired alike
            for a, b in cut:
                spans = [at[(first + j * period + a, first + j * period + b)] for j in range(1, count)]
                assert len({classes[k] for k in spans}) == 1 and classes[spans[0]] >= 0


@pytest.mark.parametrize("source", ["builtin:llama:tiny", "builtin:gpt:tiny", "builtin:moe:tiny", "llama-4"])
def test_a_span_entered_as_another_of_its_class_replays_its_part_renamed_as_recorded(source):
    # The layers of an unrolled model: a span entered as another span of its class was is not
    # propagated again but takes that span's Part, renamed value for value. Every part must come
    # out as recording its own span makes it (a constraint that constrains nothing turns the
    # classes off), collectives named for their own values.
    import random

    from auto_partition.workloads import resolve
    from ir.graph import Role
    from ir.spans import Part, PropagationCache, layout
    from search.space import build_space

    g = trace(_llama_layers(4) if source == "llama-4" else resolve(source))
    space = build_space(g, MESH)
    classes = layout(g, frozenset(i for i in g.inputs if g.values[i].role is Role.BATCH))[3]
    classed = [c for c in classes if c >= 0]
    assert len(set(classed)) < len(classed)  # some class holds several spans
    valid = list(space.enumerate())
    renamed = 0
    for a in random.Random(0).sample(valid, min(12, len(valid))):
        inputs = space.shardings(a)
        for pid, opts in space.opt_state.items():
            for o in opts if pid in inputs else ():
                inputs[o] = inputs[pid]
        outputs = {k: inputs[x] for k, x in enumerate(g.output_alias) if x >= 0 and x in inputs}
        by_class, alone = PropagationCache(), PropagationCache()
        mine = propagate(g, MESH, inputs, outputs=outputs, cache=by_class)
        own = propagate(g, MESH, inputs, outputs=outputs, cache=alone, constraint=lambda v: None)
        assert not alone.classed
        recorded = {id(p) for p, _ in by_class.classed.values()}
        renamed += sum(id(p) not in recorded for p in mine.parts)
        assert len(mine.parts) == len(own.parts)
        for p, q in zip(mine.parts, own.parts, strict=True):
            assert p.span is q.span
            # (inside_reads is a set: what the span read of its own values, in no order; origin
            # says where a part was renamed from; a renamed part keeps the recorded part's
            # collectives and the names of the values they move here)
            fields = [
                f.name for f in dataclasses.fields(Part) if f.name not in ("origin", "collectives", "names")
            ]
            assert [set(p.inside_reads) if f == "inside_reads" else getattr(p, f) for f in fields] == [
                set(q.inside_reads) if f == "inside_reads" else getattr(q, f) for f in fields
            ]
            assert p.named_collectives() == q.named_collectives() == q.collectives
            assert not q.names
            assert p.origin is None or p.origin.span is not p.span
        assert (mine.shardings, mine.ops, mine.collectives) == (own.shardings, own.ops, own.collectives)
    assert renamed  # (not every span was recorded)


def test_ops_of_other_kinds_that_decide_alike_share_the_decision_work_not_the_object():
    # An add and a multiply of one shape, with the same operand order and layouts, take the same
    # factors: with a cache the factors are assigned once, but each op kind keeps a decision
    # object of its own (costs and resolutions downstream are kept per object and kind), and
    # the propagation is the one made without a cache.
    import random

    from ir.spans import PropagationCache
    from search.space import build_space

    g = trace(_llama_layers(4))
    space = build_space(g, MESH)
    for a in random.Random(1).sample(list(space.enumerate()), 4):
        inputs = space.shardings(a)
        cache = PropagationCache()
        shared = propagate(g, MESH, inputs, cache=cache)
        alone = propagate(g, MESH, inputs)
        assert (shared.shardings, shared.ops, shared.collectives) == (
            alone.shardings,
            alone.ops,
            alone.collectives,
        )
        assert 0 < len(cache.decisions) < len(cache.ops)
        kinds_of = {}
        for op, d in zip(g.ops, shared.ops, strict=True):
            if d is not None:
                kinds_of.setdefault(id(d), set()).add(g.op_kinds[op.id])
        assert all(len(ks) == 1 for ks in kinds_of.values())  # no object serves two kinds


def test_renamed_parts_name_their_collectives_only_when_asked_or_replayed():
    # A part renamed from another span's keeps the recorded part's collectives and the names
    # of the values they move here: a propagation that makes it holds it in `moves` unnamed, and
    # one that replays it from the cache adds its collectives named. Both name the same
    # collectives in the same order, and the simulator times them alike.
    import random

    from cost_model.hardware import load_hardware
    from cost_model.meshes import topology
    from cost_model.simulate import Simulator
    from ir.comm import Collective
    from ir.spans import Part, PropagationCache
    from search.space import build_space

    g = trace(_llama_layers(4))
    space = build_space(g, MESH)
    hw = load_hardware("h100")
    for a in random.Random(2).sample(list(space.enumerate()), 3):
        inputs = space.shardings(a)
        cache = PropagationCache()
        first = propagate(g, MESH, inputs, cache=cache)
        again = propagate(g, MESH, inputs, cache=cache)
        alone = propagate(g, MESH, inputs)
        kinds = lambda p: {m.__class__ for m in p.moves}  # noqa: E731
        assert Part in kinds(first) and kinds(again) == {Collective}
        assert first.collectives == again.collectives == alone.collectives
        assert all(c.value for c in first.collectives)
        times = [Simulator(hw, topology(hw, MESH)).step_time_and_peak(p) for p in (first, again, alone)]
        assert times[0] == times[1] == times[2]


def test_collectives_are_interned_and_held_weakly():
    # Collectives key the simulator's cost table by identity: equal ones must be one object,
    # however made (pickled by a Ray worker, copied, replaced, made by another thread), and the
    # table of them must not keep alive those no one else holds.
    import copy
    import gc
    import pickle

    from ir.comm import _INTERNED, Collective

    c = Collective(K.ALL_REDUCE, ("data",), 1024, "w")
    for t in (pickle.loads(pickle.dumps(c)), copy.deepcopy(c), dataclasses.replace(c)):
        assert t is c and t == c and {c: 1}[t] == 1
    assert (
        c.repeated(3) is Collective(K.ALL_REDUCE, ("data",), 1024, "w", 3) is dataclasses.replace(c, count=3)
    )
    assert c != Collective(K.ALL_REDUCE, ("data",), 1024, "v") and c.repeated(3).total_bytes == 3072

    made = _made_in_threads(lambda i: Collective(K.ALL_GATHER, ("model",), i, "threads"))
    assert len({id(m) for m in made}) == 500

    key = (K.ALL_GATHER, ("model",), 7, "threads", 1)
    assert key in _INTERNED
    made.clear()
    gc.collect()
    assert key not in _INTERNED

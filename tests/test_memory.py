"""Per-device memory by liveness: closed forms for small programs, each buffer counted by hand."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import operator
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from auto_partition.workloads import resolve
from cost_model import compiler
from cost_model.memory import XLA_CPU, XLA_GPU, Buffer, compiler_for, memory, peak
from ir.comm import CollectiveKind
from ir.propagate import propagate, propagate_plan
from ir.sharding import MeshShape, Sharding
from ir.trace import trace
from ir.workload import Workload
from search.baselines import baseline_plans

F32 = 4
ONE = MeshShape(("data",), (8,))  # everything replicated: local bytes are global bytes
FOUR = MeshShape(("data",), (4,))
IN_ORDER = dataclasses.replace(XLA_CPU, breadth_first=False)


def _prop(fn, shapes, names, mesh=ONE, shardings=(), donate=()):
    args = tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes)
    g = trace(Workload(fn, args, donate_argnums=donate, arg_names=names))
    inputs = {vid: s for vid, s in zip(g.inputs, shardings, strict=False) if s is not None}
    outputs = {k: inputs[a] for k, a in enumerate(g.output_alias) if a in inputs}
    return propagate(g, mesh, inputs, outputs=outputs)


def test_peak_of_a_timeline():
    buffers = [Buffer("a", 0, 100, 0, 2), Buffer("b", 1, 50, 1, 3), Buffer("c", 2, 70, 3, 4)]
    assert peak(buffers) == (150, [("a", 100), ("b", 50)])
    assert peak([]) == (0, [])


@pytest.mark.parametrize("compiler", [XLA_CPU, XLA_GPU])
def test_a_chain_of_matmuls_holds_two_results(compiler):
    # y1 = x @ w lives until y2 = y1 @ w is written; y3 is the output.
    prop = _prop(lambda x, w: ((x @ w) @ w) @ w, [(64, 64), (64, 64)], ("x", "params"))
    r = memory(prop, compiler=compiler)
    assert (r.arguments, r.outputs, r.aliased) == (2 * 64 * 64 * F32, 64 * 64 * F32, 0)
    assert r.temp == 2 * 64 * 64 * F32


def test_a_fused_value_keeps_what_it_is_computed_from():
    # h * 2 is never written: the reduction recomputes it from h, so h lives until then, beside z.
    def f(x, w1, w2):
        h = x @ w1
        z = x @ w2
        return (h * 2.0 + z).sum()

    prop = _prop(f, [(32, 32)] * 3, ("x", "params", "weights"))
    assert memory(prop, compiler=IN_ORDER).temp == 2 * 32 * 32 * F32


def test_donated_params_are_updated_in_place():
    prop = _prop(
        lambda params, x: (params - 0.1 * (x @ params),), [(32, 32), (32, 32)], ("params", "x"), donate=(0,)
    )
    r = memory(prop)
    w = 32 * 32 * F32
    assert (r.arguments, r.outputs, r.aliased, r.temp) == (2 * w, w, w, w)
    assert r.peak == 3 * w  # params (then the new params), x, and x @ params


def test_a_donated_input_read_off_its_update_path_is_copied_on_cpu_only():
    # params * 2 overwrites params; the matmul also reads params but does not lead there, so copy
    # insertion before scheduling (XLA:CPU) keeps a copy of params for it.
    prop = _prop(
        lambda params, x: (params * 2.0, (x @ params).sum()),
        [(32, 32), (32, 32)],
        ("params", "x"),
        donate=(0,),
    )
    w = 32 * 32 * F32
    no_copies = dataclasses.replace(XLA_CPU, copies_donated_inputs=False)
    assert memory(prop).temp - memory(prop, compiler=no_copies).temp == w
    assert not XLA_GPU.copies_donated_inputs


def test_several_outputs_are_a_tuple_of_pointers():
    prop = _prop(lambda x: (x * 2.0, x * 3.0), [(16, 16)], ("x",))
    assert memory(prop).outputs == 2 * 16 * 16 * F32 + 2 * 8


def test_a_scan_holds_its_stacked_outputs_and_its_body():
    # Per step (x @ w) is written before it is doubled into the step's slice of ys [4, 16, 32];
    # the sum reads ys after the loop.
    def f(xs, w):
        _, ys = jax.lax.scan(lambda c, x: (c, (x @ w) * 2.0), 0.0, xs)
        return ys.sum()

    prop = _prop(f, [(4, 16, 32), (32, 32)], ("x", "params"))
    ys = 4 * 16 * 32 * F32
    step = 16 * 32 * F32
    assert memory(prop).temp == memory(prop, compiler=IN_ORDER).temp == ys + step


def test_a_breadth_first_schedule_makes_a_scans_outputs_first():
    # Breadth first, ys (filled from zeros, which depend on nothing) is made at the start, and
    # the loop, whose inputs are ready, runs before the sum that reads xs @ w: ys, xs @ w and the
    # body together. In program order xs @ w is summed before the loop.
    def f(xs, w):
        first = jnp.tanh(xs @ w).sum()
        _, ys = jax.lax.scan(lambda c, x: (c, (x @ w) * 2.0), 0.0, xs)
        return ys.sum() + first

    prop = _prop(f, [(4, 16, 32), (32, 32)], ("x", "params"))
    ys = 4 * 16 * 32 * F32
    step = 16 * 32 * F32
    assert memory(prop, compiler=IN_ORDER).temp == ys + step + F32  # and the first sum
    assert memory(prop).temp == ys + ys + step


def test_a_resharded_operand_is_one_copy_from_first_to_last_reader():
    # w is sharded like FSDP; both matmuls read it gathered: one 32x16 copy, live across both,
    # beside the two [64/4, 16] results.
    rows = Sharding.from_spec(["data", None])
    prop = _prop(
        lambda x, data, params: x @ params + data @ params,
        [(64, 32), (64, 32), (32, 16)],
        ("x", "data", "params"),
        mesh=FOUR,
        shardings=(rows, rows, rows),
    )
    assert memory(prop).temp == 32 * 16 * F32 + 2 * (64 // 4) * 16 * F32


def test_independent_all_reduces_are_combined_and_held_together():
    # Two weight-gradient-like contractions over the sharded batch: each result is a pending sum.
    def f(x, data, inputs, batch):
        return jnp.einsum("bi,bj->ij", x, inputs).sum() + jnp.einsum("bi,bj->ij", data, batch).sum()

    rows = Sharding.from_spec(["data", None])
    prop = _prop(
        f, [(32, 16), (32, 16), (32, 8), (32, 8)], ("x", "data", "inputs", "batch"), FOUR, (rows,) * 4
    )
    s = 16 * 8 * F32
    # Combined (XLA:CPU, no byte limit): both partial and both reduced sums live at the tuple
    # all-reduce, with its table of two pointers.
    assert memory(prop).temp == 4 * s + 2 * 8
    # One at a time. Breadth first, both contractions run before either sum is reduced: the
    # first reduced sum waits beside the second's partial and reduced sums.
    apart = dataclasses.replace(XLA_CPU, all_reduce_combine_bytes=0)
    assert memory(prop, compiler=apart).temp == 3 * s
    # In program order the first is summed to a scalar before the second is computed.
    assert memory(prop, compiler=dataclasses.replace(apart, breadth_first=False)).temp == 2 * s + F32


def test_data_parallel_mlp_holds_every_gradient_twice():
    # XLA:CPU combines the gradient all-reduces into one at the end of the backward pass: every
    # partial and every reduced gradient is live then (and the loss, partial and reduced, and
    # the seven-element tuple's pointers).
    g = trace(resolve("mlp"))
    prop = propagate_plan(g, baseline_plans(g, ONE)["dp"])
    params = sum(v.nbytes for v in g.input_values() if v.role.value == "param")
    r = memory(prop)
    assert r.temp == 2 * params + 2 * F32 + 7 * 8
    assert r.by_kind["gradients"] == 2 * params


def test_compiler_presets():
    assert compiler_for("cpu") is XLA_CPU
    assert compiler_for("h100") is XLA_GPU
    assert XLA_CPU.reduce_scatter_as_all_reduce and not XLA_GPU.reduce_scatter_as_all_reduce
    assert XLA_GPU.all_reduce_combine_bytes == 30 * 2**20


def test_a_library_reduction_reading_a_slice_gets_the_slice_written():
    # v = a * 2 is read whole by a fusible add and as a local slice (beside the batch-sharded b)
    # by a reduction big enough for XLA:CPU's library: the slice fuses into v's producer and is
    # written (64 x 1024 / 4 floats); v itself is recomputed in the add's fusion, never written.
    # XLA's memory_analysis() for this program on 4 CPU devices: temp 65,540 bytes.
    def f(a, b):
        v = a * 2.0
        return (v * b).sum(), v + 1.0

    args = tuple(jax.ShapeDtypeStruct((64, 1024), jnp.float32) for _ in range(2))
    g = trace(Workload(f, args, arg_names=("params", "batch")))
    prop = propagate(g, FOUR, {g.inputs[1]: Sharding((("data",), ()))})
    r = memory(prop, compiler=XLA_CPU)
    assert r.temp == 64 * 1024 * F32 // 4
    assert [name for name, _ in r.largest] == ["%3 -> [data, -]"]


@pytest.mark.parametrize("dot_first", [True, False])
def test_a_broadcast_read_whole_and_sliced_is_made_whole_in_either_order(dot_first):
    # v = broadcast(c), pinned replicated, is read whole by a matmul and as a local slice (beside
    # the batch-sharded b) by a fusible mul: v is made whole for the matmul, and the slice is a
    # quarter-size broadcast inside the mul's fusion, read through v's annotation at no copy;
    # which reader comes first does not matter. XLA's memory_analysis() for both programs on 4
    # CPU devices: temp 262,148 bytes (4 more: the reduction's partial sum, which XLA keeps
    # beside v).
    whole = NamedSharding(Mesh(np.array(jax.devices()[:4]), ("data",)), P())

    def f(c, w, b):
        v = jax.lax.with_sharding_constraint(jnp.broadcast_to(c, (64, 1024)), whole)
        if dot_first:
            y = v @ w
            s = (v * b).sum()
        else:
            s = (v * b).sum()
            y = v @ w
        return jax.lax.with_sharding_constraint(y, whole), s

    args = (
        jax.ShapeDtypeStruct((1024,), jnp.float32),
        jax.ShapeDtypeStruct((1024, 1024), jnp.float32),
        jax.ShapeDtypeStruct((64, 1024), jnp.float32),
    )
    g = trace(Workload(f, args, arg_names=("params", "weights", "batch")))
    prop = propagate(g, FOUR, {g.inputs[2]: Sharding((("data",), ()))})
    r = memory(prop, compiler=XLA_CPU)
    assert r.temp == 64 * 1024 * F32
    assert [name for name, _ in r.largest][:1] == ["%3"]


@pytest.mark.parametrize("source", ["builtin:gpt:tiny", "builtin:llama:tiny:scan", "builtin:moe:tiny"])
def test_the_program_order_schedule_is_the_list_schedulers(source, monkeypatch):
    # Without a breadth-first scheduler, cost_model.compiler takes nodes in program order and lets
    # only those that read a later-ranked collective wait; the list scheduler with a heap over
    # every node is the reference. Every expert plan on 2x4, loop bodies included.
    fast = compiler._program_order
    seen = []

    def checked(g, order, groups):
        nodes = fast(g, order, groups)
        assert nodes == compiler._nodes(g, order, groups, False)
        seen.append(len(groups))
        return nodes

    monkeypatch.setattr(compiler, "_program_order", checked)
    g = trace(resolve(source))
    mesh = MeshShape.parse("data=2,model=4")
    for plan in baseline_plans(g, mesh).values():
        memory(propagate_plan(g, plan), compiler=XLA_GPU)
    assert len(seen) >= 4 and max(seen) > 1


@pytest.mark.parametrize("source", ["builtin:gpt:tiny", "builtin:llama:tiny:scan", "builtin:moe:tiny"])
def test_the_per_graph_shortcuts_agree_with_walking_the_plan(source, monkeypatch):
    # A plan's fused values are the graph's own corrected at its aliases (or, where every
    # alias op aliases, the graph's set for that), and the combiner's dependences are read off
    # bitsets made once per graph; walking every value and op of the plan is the reference for
    # both. Every expert plan on 2x4 under XLA:GPU (no library reductions), loop bodies included.
    from cost_model import fusion, liveness

    fused_of, combine_of = liveness.fused_and_aliased, liveness.combine
    seen = {"fused": 0, "aliased": 0, "every": 0, "combined": 0}

    def fused_checked(prop, *args):
        fused, alias, library = fused_of(prop, *args)
        assert not library
        assert fused == fusion._fused_walk(prop.graph, alias, library, set())
        seen["fused"] += 1
        seen["aliased"] += bool(alias)
        seen["every"] += alias is prop.graph.derived("fusion.every_alias", fusion.every_alias)[0]
        return fused, alias, library

    def combine_checked(g, order, cands, compiler_):
        groups = combine_of(g, order, cands, compiler_)
        bits = [1 << c for c in range(len(cands))]
        reference = compiler._group(cands, compiler._ancestors(g, order, cands), bits, compiler_)
        assert groups == reference
        seen["combined"] += len(groups) < len(cands)
        return groups

    monkeypatch.setattr(liveness, "fused_and_aliased", fused_checked)
    monkeypatch.setattr(liveness, "combine", combine_checked)
    g = trace(resolve(source))
    mesh = MeshShape.parse("data=2,model=4")
    for plan in baseline_plans(g, mesh).values():
        memory(propagate_plan(g, plan), compiler=XLA_GPU)
    # (both ways: the graph's set where every alias op aliases, corrected at the aliases else)
    assert seen["fused"] >= 4 and seen["aliased"] > seen["every"] > 0 and seen["combined"]


def _combined_by_rescan(cands, anc, bit, compiler_):
    """The combiner as XLA states it, rescanning every candidate left for each group: the first
    left opens a group of its key, later ones of that key join in order while the bytes stay
    under the threshold (one over it alone is a group), until one depends on a member."""
    limit = {
        CollectiveKind.ALL_REDUCE: compiler_.all_reduce_combine_bytes,
        CollectiveKind.REDUCE_SCATTER: compiler_.reduce_scatter_combine_bytes,
    }
    anc = list(anc)
    left, groups = list(range(len(cands))), []
    while left:
        chosen, key, total = [], None, 0
        for c in list(left):
            key = cands[c].key if not chosen else key
            if cands[c].key != key:
                continue
            if cands[c].bytes > limit[key[0]]:
                left.remove(c)
                groups.append([c])
                continue
            if total + cands[c].bytes > limit[key[0]] or any(
                anc[c] & bit[m] or anc[m] & bit[c] for m in chosen
            ):
                break
            chosen.append(c)
            total += cands[c].bytes
            left.remove(c)
            if len(chosen) >= compiler_.combine_count:
                break
        if chosen:
            groups.append(chosen)
        bits = sum(bit[m] for m in chosen)
        mask = functools.reduce(operator.or_, (anc[m] | bit[m] for m in chosen), 0)
        for c in range(len(cands)) if len(chosen) > 1 else ():
            if anc[c] & bits:
                anc[c] |= mask
    return groups


def test_combiner_groups_match_rescanning_every_candidate_left():
    # compiler._group places each key's candidates first to last instead of rescanning; on
    # random candidates (keys, sizes around the thresholds, dependencies) the groups are the same.
    rng = random.Random(0)
    merged = 0
    for _ in range(400):
        n = rng.randint(0, 40)
        keys = [
            (rng.choice(list(compiler._SUMS)), ("data",), rng.choice(["float32", "bfloat16"]))
            for _ in range(3)
        ]
        comp = dataclasses.replace(
            XLA_GPU,
            all_reduce_combine_bytes=rng.choice([100, 1000]),
            reduce_scatter_combine_bytes=rng.choice([100, 1000]),
            combine_count=rng.choice([2, 3, 256]),
        )
        cands = [
            compiler.Resolution(i, None, None, rng.choice(keys), rng.choice([1, 50, 200, 2000]))
            for i in range(n)
        ]
        anc: list[int] = []
        for i in range(n):  # transitively closed: a candidate depends on what its inputs depend on
            anc.append(
                functools.reduce(
                    operator.or_, ((1 << j) | anc[j] for j in range(i) if rng.random() < 0.05), 0
                )
            )
        bit = [1 << i for i in range(n)]
        groups = compiler._group(cands, list(anc), bit, comp)
        assert groups == _combined_by_rescan(cands, anc, bit, comp)
        assert sorted(c for g in groups for c in g) == list(range(n))
        merged += sum(len(g) > 1 for g in groups)
    assert merged  # (some groups merge several)


@pytest.mark.parametrize("compiler_", [XLA_GPU, XLA_CPU], ids=["gpu", "cpu"])
@pytest.mark.parametrize(
    "source", ["builtin:gpt:tiny", "builtin:llama:tiny", "builtin:llama:tiny:scan", "builtin:moe:tiny"]
)
def test_the_walk_over_arrays_gives_the_op_by_op_walks_bytes_at_every_step(source, compiler_, monkeypatch):
    # A peak with no part's steps worked out comes from cost_model.walk_arrays; the timeline
    # (walked op by op) is the reference: the bytes live at every step are the same, under
    # XLA:GPU and XLA:CPU (library slices, stacked outputs made first, reduce-scatters as
    # all-reduces, donated copies). Expert plans and random plans of the search space on 2x4 and
    # 2x2x2, propagated with a part cache (the layers of the unrolled Llama share their resharded
    # reads) and without; loop bodies included.
    from cost_model import liveness, walk_arrays
    from ir.spans import PropagationCache
    from search.space import build_space

    calls = []
    walk_peak = walk_arrays.walk_peak

    def counted(*args):
        found = walk_peak(*args)
        calls.append(found is not None)
        return found

    monkeypatch.setattr(liveness, "walk_peak", counted)
    monkeypatch.setattr(walk_arrays, "MIN_OPS", 0)  # loop bodies and small graphs too
    g = trace(resolve(source))
    rng = random.Random(0)
    for axes in ("data=2,model=4", "data=2,fsdp=2,model=2"):
        mesh = MeshShape.parse(axes)
        space = build_space(g, mesh)
        plans = list(baseline_plans(g, mesh).values())
        valid = list(itertools.islice(space.enumerate(), 5000))
        plans += [space.plan(rng.choice(valid)) for _ in range(6)]
        for plan in plans:
            for parts in (PropagationCache(), None):
                inputs = plan.input_shardings(g)
                outputs = {k: inputs[a] for k, a in enumerate(g.output_alias) if a >= 0 and a in inputs}
                prop = propagate(g, mesh, inputs, outputs=outputs, cache=parts)
                cache = liveness.TimelineCache()
                delta, last = liveness._buffers(prop, compiler_, cache, peak_only=True)
                assert isinstance(delta, np.ndarray)
                assert bool(cache.resharded) == bool(prop.parts)  # found by span where parts are
                reference = np.zeros(last + 2, dtype=np.int64)
                for b in liveness.timeline(prop, compiler_, cache):
                    reference[b.start] += b.bytes
                    reference[b.end + 1] -= b.bytes
                np.testing.assert_array_equal(np.cumsum(delta), np.cumsum(reference))
                assert liveness.temp_peak(prop, compiler_) == peak(liveness.timeline(prop, compiler_))[0]
    assert calls and all(calls)

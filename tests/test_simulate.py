"""simulate(): closed-form step times and memory on a made-up device, and the overlap assumption."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from cost_model.hardware import DeviceSpec, Hardware, LinkSpec
from cost_model.simulate import Overlap, simulate
from ir.comm import CollectiveKind as K
from ir.sharding import MeshShape, Sharding
from ir.trace import trace
from ir.workload import Workload

MESH = MeshShape(("data", "model"), (2, 4))
# Round numbers so every expectation below is arithmetic by hand.
HW = Hardware(
    name="toy",
    device=DeviceSpec("toy", {"float32": 1e12, "tf32": 1e12}, hbm_bandwidth=1e11, hbm_capacity=10**9),
    intra_node=LinkSpec(bandwidth=1e10, latency=1e-12),
    inter_node=LinkSpec(bandwidth=1e9, latency=1e-12),
    devices_per_node=8,
)


class _Plan:
    """The minimum simulate() needs of a plan: a mesh and input shardings (no activation rules)."""

    def __init__(self, mesh, shardings):
        self.mesh = mesh
        self._s = shardings

    def input_shardings(self, graph):
        return {i: self._s[k] for k, i in enumerate(graph.inputs)}

    def activation_sharding(self, name, shape):
        return None


def _graph(fn, *shapes):
    args = tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes)
    return trace(Workload(fn, args, arg_names=("batch", "params")[: len(shapes)]))


def test_one_matmul_is_compute_bound_roofline():
    g = _graph(lambda x, w: x @ w, (1024, 1024), (1024, 1024))
    r = simulate(g, _Plan(MESH, [Sharding.from_spec([("data", "model")], 2), Sharding.replicated(2)]), HW)
    flops = 2 * 128 * 1024 * 1024  # each device multiplies its 1024/8 rows by the whole weight
    traffic = 4 * (128 * 1024 + 1024 * 1024 + 128 * 1024)
    assert r.flops == flops
    assert r.compute_time == pytest.approx(max(flops / 1e12, traffic / 1e11))
    assert r.comm_time == 0 and r.step_time == r.compute_time


def test_contraction_sharded_pays_a_ring_all_reduce():
    g = _graph(lambda x, w: x @ w, (256, 1024), (1024, 512))
    plan = _Plan(MESH, [Sharding.from_spec([None, "model"]), Sharding.from_spec(["model", None])])
    r = simulate(g, plan, HW)
    size = 256 * 512 * 4
    assert r.collectives[(K.ALL_REDUCE, ("model",))] == (size, pytest.approx(2 * 3 / 4 * size / 1e10))
    # An activation all-reduce on the critical path is exposed whatever the overlap assumption.
    assert r.exposed_comm_time == pytest.approx(r.comm_time)
    assert r.step_time == pytest.approx(r.compute_time + r.comm_time)


def test_gradient_all_reduce_hides_behind_backward_compute_unless_overlap_is_off():
    def step(batch, params):
        return jax.grad(lambda w: jnp.sum(jnp.tanh(batch @ w)))(params)

    g = _graph(step, (4096, 1024), (1024, 1024))
    plan = _Plan(MESH, [Sharding.from_spec([("data", "model")], 2), Sharding.replicated(2)])
    hidden = simulate(g, plan, HW)
    exposed = simulate(g, plan, HW, overlap=Overlap.NONE)
    assert hidden.comm_time == exposed.comm_time > 0
    assert exposed.exposed_comm_time == pytest.approx(exposed.comm_time)
    # The gradient reduction (1024x1024 f32 over 8 devices) fits behind the backward matmul.
    assert hidden.exposed_comm_time < exposed.exposed_comm_time
    assert hidden.step_time < exposed.step_time


def test_a_plan_that_does_not_fit_is_reported_with_its_breakdown():
    g = _graph(lambda x, w: jnp.tanh(x @ w).sum(), (8192, 8192), (8192, 8192))
    small = Hardware(
        name="small",
        device=DeviceSpec("small", {"float32": 1e12, "tf32": 1e12}, hbm_bandwidth=1e11, hbm_capacity=10**8),
        intra_node=LinkSpec(bandwidth=1e10, latency=1e-12),
        inter_node=LinkSpec(bandwidth=1e9, latency=1e-12),
        devices_per_node=8,
    )
    r = simulate(g, _Plan(MESH, [Sharding.replicated(2), Sharding.replicated(2)]), small)
    assert not r.fits
    assert r.memory.peak > r.capacity == 10**8
    assert r.memory.arguments == 2 * 8192 * 8192 * 4
    assert r.memory.by_kind["batch"] + r.memory.by_kind["params"] == r.memory.arguments
    assert r.memory.largest  # what is live at the peak is named


def _flat(prop):
    out = [prop.shardings, prop.ops, prop.collectives, prop.live, prop.outputs]
    for k in sorted(prop.bodies):
        out.append((k, [_flat(b) for b in prop.bodies[k]]))
    return out


@pytest.mark.parametrize(
    "source", ["builtin:gpt:tiny", "builtin:llama:tiny:scan", "builtin:llama:tiny", "builtin:moe:tiny"]
)
@pytest.mark.parametrize("hardware", ["h100", "cpu"])
def test_cached_evaluation_is_exactly_a_fresh_one(source, hardware):
    # A searcher's evaluations replay cached spans of propagation and memoised timeline pieces,
    # and share decisions and op costs between ops of a kind (the layers of an unrolled model);
    # every plan must come out as a fresh propagation and a fresh simulator price it, to the bit.
    import random

    from auto_partition.workloads import resolve
    from cost_model.compute import op_costs
    from cost_model.hardware import load_hardware
    from cost_model.meshes import topology
    from cost_model.simulate import Simulator
    from ir.propagate import propagate
    from search.evaluate import Evaluator, clear_shared
    from search.problem import SearchProblem
    from search.space import build_space

    g = trace(resolve(source))
    mesh = MeshShape(("data", "model", "pipe"), (2, 2, 2))
    hw = load_hardware(hardware)
    space = build_space(g, mesh)
    clear_shared()
    ev = Evaluator(SearchProblem(g, mesh, hw), space)
    topo = topology(hw, mesh, None)
    valid = list(space.enumerate())
    rng = random.Random(0)
    for a in rng.sample(valid, min(25, len(valid))):
        cached = ev.propagation(a)
        inputs = space.shardings(a)
        for pid, opts in space.opt_state.items():
            for o in opts if pid in inputs else ():
                inputs[o] = inputs[pid]
        outputs = {k: inputs[x] for k, x in enumerate(g.output_alias) if x >= 0 and x in inputs}
        fresh = propagate(g, mesh, inputs, outputs=outputs)
        assert _flat(cached) == _flat(fresh)
        report = Simulator(hw, topo).report(fresh)
        assert ev.simulator.step_time_and_peak(cached) == (report.step_time, report.memory.peak)
        # ... and every op costed on its own comes to the same FLOPs.
        assert report.flops == pytest.approx(sum(c.flops * c.count for c in op_costs(fresh)), rel=1e-12)
    clear_shared()


def test_a_long_search_starts_its_caches_afresh_and_scores_alike(monkeypatch):
    # The evaluator bounds its caches (a long search would grow them without end): once they
    # exceed the bound they start afresh, and plans score exactly as before.
    import search.evaluate as evaluate
    from auto_partition.workloads import resolve
    from cost_model.hardware import load_hardware
    from search.problem import SearchProblem
    from search.space import build_space

    g = trace(resolve("builtin:gpt:tiny"))
    mesh = MeshShape(("data", "model"), (2, 4))
    space = build_space(g, mesh)
    plans = list(space.enumerate())[:300]
    evaluate.clear_shared()
    reference = evaluate.Evaluator(SearchProblem(g, mesh, load_hardware("h100")), space)
    expected = [reference.score(a) for a in plans]
    evaluate.clear_shared()
    monkeypatch.setattr(evaluate, "_CACHE_ENTRIES", 500)
    ev = evaluate.Evaluator(SearchProblem(g, mesh, load_hardware("h100")), space)
    first = ev.prop_cache
    assert [ev.score(a) for a in plans] == expected
    assert ev.prop_cache is not first and len(ev.prop_cache) + ev.simulator.cache_entries() < 2_000
    evaluate.clear_shared()


# ------------------------------------------------------------------------------ garbage collector


class _Node:
    def __init__(self):
        self.other = None


def test_evaluations_inside_a_search_are_frozen_and_handed_back():
    import gc
    import weakref

    from cost_model.gc_pause import gc_paused, long_lived

    def cycle():
        a, b = _Node(), _Node()
        a.other, b.other = b, a
        return weakref.ref(a)

    outside = gc.get_freeze_count()
    with gc_paused():  # not in a search: nothing is frozen
        kept = [_Node() for _ in range(100)]
    assert gc.get_freeze_count() == outside
    with long_lived():
        entered = gc.get_freeze_count()
        assert gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
            kept += [_Node() for _ in range(100)]
            dead = cycle()  # garbage once made: frozen with the rest, so not collected here
        assert gc.isenabled()
        assert gc.get_freeze_count() >= entered + 102  # the 100 kept and the cycle
        gc.collect()
        assert dead() is not None
    assert gc.get_freeze_count() == 0
    gc.collect()  # handed back on exit: the cycle is collected
    assert dead() is None

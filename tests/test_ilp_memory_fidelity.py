"""The ILP model's per-device memory against the simulator's (cost_model.memory, the reference): the
buffers it used to miss (resharded copies, pending sums held until their combined collective,
fusion and aliasing as XLA does them, broadcasts made at the size they are read in) and the ones it
counted twice (a loop body's outputs), on tiny models whose plans show each."""

from __future__ import annotations

import math
import random
import statistics

import jax
import jax.numpy as jnp
import pytest

from auto_partition.workloads import resolve
from cost_model.hardware import load_hardware
from ir.sharding import MeshShape
from ir.trace import trace
from ir.workload import Workload
from search.evaluate import Evaluator
from search.ilp import Program, Solved
from search.ilp_model import Builder
from search.problem import SearchProblem
from search.space import build_space

MESH = MeshShape.parse("data=2,model=4")
GPT, LLAMA, BERT, SCANNED = (
    "builtin:gpt:tiny",
    "builtin:llama:tiny",
    "builtin:bert:tiny",
    "builtin:llama:tiny:scan",
)


@pytest.fixture(scope="module")
def hardware():
    return load_hardware("h100")


_BUILT: dict[tuple[str, MeshShape], tuple] = {}


def _built(src: str, mesh: MeshShape, hardware):
    """(space, evaluator, model, the baselines' names by assignment) of a built-in model, built once."""
    key = (src, mesh)
    if key not in _BUILT:
        g = trace(resolve(src))
        problem = SearchProblem(g, mesh, hardware)
        space = build_space(g, mesh)
        ev = Evaluator(problem, space)
        model = Builder(g, space, ev.topo, seeds=ev.seeds()).build()
        names = {space.empty: "replicated"}
        for name, plan in ev.baselines().items():
            a = space.assignment_of(plan)
            if a is not None:
                names.setdefault(a, name)
        _BUILT[key] = (space, ev, model, {n: a for a, n in names.items()})
    return _BUILT[key]


def _error(src: str, mesh: MeshShape, plan: str, hardware) -> float:
    """The model's memory of a baseline plan over the simulator's, minus 1."""
    space, ev, model, plans = _built(src, mesh, hardware)
    a = plans[plan]
    return model.evaluate(space, a).memory / ev.score(a).memory - 1


@pytest.mark.parametrize(
    ("src", "plan", "what"),
    [
        # Was -14%: XLA writes tanh/exp read by several ops once (and a value read through an
        # annotation), where the roofline's fusion had them recomputed in each reader.
        (GPT, "replicated", "fusion as XLA does it"),
        # Was -20%: weights gathered for the matmuls (forward and backward share the gather).
        (GPT, "fsdp_tp", "gathered weights"),
        # Was -21%: every gradient is held as written and as all-reduced at the combined all-reduce.
        (LLAMA, "dp", "gradients held twice"),
        # Was -26%: gathered weights, and a head split the mesh axis does not divide (no bitcast).
        (LLAMA, "fsdp_tp", "gathered weights, copied reshapes"),
        # Was -23%.
        (BERT, "dp", "gradients held twice"),
        # Was +15%: the loop body's outputs (the loop's own stacked outputs) counted again in its
        # peak, and loop constants made by broadcasts counted whole (XLA makes the slice read, or
        # nothing where the body does not read it).
        (SCANNED, "replicated", "loop bodies"),
        (SCANNED, "fsdp_tp", "loop bodies"),
    ],
)
def test_model_memory_of_a_baseline_is_the_simulators(hardware, src, plan, what):
    assert abs(_error(src, MESH, plan, hardware)) <= 0.05, what


def test_model_memory_tracks_the_simulator_over_random_plans(hardware):
    # Was: median -20%, worst -34% (GPT over data=2,model=4, the baselines and 8 random plans).
    space, ev, model, plans = _built(GPT, MESH, hardware)
    rng = random.Random(0)
    assignments = list(plans.values())
    while len(assignments) < len(plans) + 8:
        a = tuple(rng.choice(d.options) for d in space.decisions)
        if space.valid(a) and a not in assignments:
            assignments.append(a)
    errors = [model.evaluate(space, a).memory / ev.score(a).memory - 1 for a in assignments]
    assert abs(statistics.median(errors)) <= 0.03, errors
    assert min(errors) >= -0.10, errors
    assert max(errors) <= 0.15, errors


def test_model_memory_on_three_axes_is_the_simulators(hardware):
    # A sampled decision space (not enumerated); was -12%, -13%, -34%.
    mesh = MeshShape.parse("data=2,fsdp=2,model=2")
    for plan in ("tp", "dp_tp", "fsdp_tp"):
        assert abs(_error(GPT, mesh, plan, hardware)) <= 0.05, plan


def test_a_gathered_weight_is_a_copy_the_model_counts(hardware):
    # x [256, 1024] over data on its rows, w [1024, 2048] over data on its columns: the matmul
    # keeps the batch on data, so each device gathers w whole (8 MiB) next to its arguments.
    def step(params, batch):
        return jnp.sum(batch["x"] @ params["w"])

    args = (
        {"w": jax.ShapeDtypeStruct((1024, 2048), jnp.float32)},
        {"x": jax.ShapeDtypeStruct((256, 1024), jnp.float32)},
    )
    g = trace(Workload(step, args))
    mesh = MeshShape.parse("data=2,model=4")
    problem = SearchProblem(g, mesh, hardware)
    space = build_space(g, mesh)
    ev = Evaluator(problem, space)
    model = Builder(g, space, ev.topo).build()
    wanted = {"params/w:1": ("data",), "batch/x:0": ("data",)}
    a = tuple(wanted.get(d.name, ()) for d in space.decisions)
    assert space.valid(a) and sum(map(bool, a)) == 2
    sim = ev.score(a).memory
    predicted = model.evaluate(space, a).memory
    assert sim >= 1024 * 2048 * 4  # the gathered weight
    assert predicted == pytest.approx(sim, rel=0.02)


@pytest.mark.parametrize("plan", ["dp", "fsdp_tp", "replicated"])
def test_program_rows_price_memory_as_the_model_does(hardware, plan):
    # Copies are pair terms (the value's node and its reader's): the program's rows, linearised
    # over pair booleans, must give the model's bytes for a fixed plan.
    space, _, model, plans = _built(LLAMA, MESH, hardware)
    a = plans[plan]
    program = Program(model, math.inf)
    program.fix(space, a)
    solution = program.solve(20.0, 1, 0, True)
    assert solution.status is Solved.OPTIMAL
    assert solution.memory == pytest.approx(model.evaluate(space, a).memory, rel=1e-3)

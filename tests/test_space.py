"""The shared decision space: decisions from dimension groups, validity, plans, fixed decisions."""

from __future__ import annotations

import pytest

from ir.propagate import propagate_plan
from ir.sharding import MeshShape
from ir.trace import trace
from models import registry
from search.space import build_space
from search.tactics import apply_tactics, parse_tactics

MESH = MeshShape.parse("data=2,model=4")


@pytest.fixture(scope="module")
def gpt():
    return trace(registry.get("gpt", "tiny"))


def test_transformer_has_one_decision_per_kind_of_dim(gpt):
    space = build_space(gpt, MESH)
    # model dim, ff, heads, vocab, sequence, batch: the same however many layers.
    assert len(space.decisions) == 6
    deep = build_space(trace(registry.get("llama", "8b")), MESH)
    shallow = build_space(trace(registry.get("llama", "tiny")), MESH)
    scanned = build_space(trace(registry.get("llama", "8b", scan=True)), MESH)
    assert len(deep.decisions) == len(shallow.decisions) == len(scanned.decisions) == 7


def test_no_tensor_uses_an_axis_twice(gpt):
    space = build_space(gpt, MESH)
    n = 0
    for assignment in space.enumerate():
        n += 1
        assert space.valid(assignment)
    assert 0 < n < space.size  # interactions prune the plain product


def test_an_assignment_becomes_a_plan_that_propagates(gpt):
    space = build_space(gpt, MESH)
    batch = next(d.id for d in space.decisions if d.name.startswith("batch/targets:0"))
    ff = next(d.id for d in space.decisions if "mlp/b_in" in d.name)
    assignment = list(space.empty)
    assignment[batch] = ("data",)
    assignment[ff] = ("model",)
    plan = space.plan(tuple(assignment))
    shardings = plan.input_shardings(gpt)
    by_name = {gpt.values[i].name: s for i, s in shardings.items()}
    assert by_name["params/layers_0/mlp/w_in"].dims == ((), ("model",))
    assert by_name["params/layers_1/mlp/w_out"].dims == (("model",), ())
    assert by_name["opt_state/0/mu/layers_1/mlp/w_out"].dims == (("model",), ())
    assert by_name["batch/tokens"].dims == (("data",), ())
    propagate_plan(gpt, plan)


def test_fixed_tactics_leave_the_decision_space(gpt):
    fixed = apply_tactics(gpt, MESH, parse_tactics([{"batch": "data"}]))
    space = build_space(gpt, MESH, fixed=fixed)
    assert len(space.decisions) == 5
    assert all(not d.name.startswith("batch/targets:0") for d in space.decisions)
    # Every plan of the space keeps the batch on 'data'.
    plan = space.plan(space.empty)
    assert plan.input_shardings(gpt)[gpt.value("batch/tokens").id].dims[0] == ("data",)


@pytest.mark.parametrize("tactics", [[], [{"batch": "data"}]])
def test_input_layouts_made_from_the_last_are_those_made_afresh(gpt, tactics):
    """`InputLayouts`, which remakes only the values of the decisions that changed, gives what
    `shardings` (optimizer state following its parameter) and `valid` give, over a walk of one-
    and several-decision changes through valid and invalid assignments."""
    import itertools
    import random

    from search.space import InputLayouts

    fixed = apply_tactics(gpt, MESH, parse_tactics(tactics)) if tactics else None
    space = build_space(gpt, MESH, fixed=fixed)
    every = list(itertools.product(*(d.options for d in space.decisions)))
    layouts, rng = InputLayouts(space), random.Random(0)
    current = rng.choice(every)
    invalid = 0
    for _ in range(400):
        if rng.random() < 0.7:  # one decision changed
            i = rng.randrange(len(space.decisions))
            current = (*current[:i], rng.choice(space.decisions[i].options), *current[i + 1 :])
        else:
            current = rng.choice(every)
        want = space.shardings(current)
        for pid, states in space.opt_state.items():
            for o in states if pid in want else ():
                want[o] = want[pid]
        got = layouts(current)
        assert got == want  # an invalid assignment too: it is propagated as given
        assert layouts.valid(current) == space.valid(current)
        invalid += not space.valid(current)
    assert invalid > 0 and space.opt_state

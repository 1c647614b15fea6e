"""Factor rules print as golden strings; the shapes and params are those jaxprs carry."""

from __future__ import annotations

import pytest

from ir.rules import FactorKind, has_rule, rule_for

DOT = {"dimension_numbers": (((1,), (0,)), ((), ()))}

CASES = [
    # (primitive, operand shapes, result shapes, params, golden)
    (
        "dot_general",
        [(8, 32), (32, 16)],
        [(8, 16)],
        DOT,
        "([i, j], [j, k])->([i, k]) {i=8, j=32, k=16} reduction={j}",
    ),
    (
        "dot_general",
        [(2, 8, 32), (2, 32, 16)],
        [(2, 8, 16)],
        {"dimension_numbers": (((2,), (1,)), ((0,), (0,)))},
        "([i, j, k], [i, k, l])->([i, j, l]) {i=2, j=8, k=32, l=16} reduction={k}",
    ),
    (
        # The weight gradient of a dense layer: contract batch and sequence.
        "dot_general",
        [(8, 16, 256), (8, 16, 64)],
        [(256, 64)],
        {"dimension_numbers": (((0, 1), (0, 1)), ((), ()))},
        "([i, j, k], [i, j, l])->([k, l]) {i=8, j=16, k=256, l=64} reduction={i, j}",
    ),
    ("add", [(8, 64), (8, 64)], [(8, 64)], {}, "([i, j], [i, j])->([i, j]) {i=8, j=64}"),
    ("mul", [(), (8, 64)], [(8, 64)], {}, "([], [i, j])->([i, j]) {i=8, j=64}"),
    ("reduce_sum", [(8, 64)], [(8,)], {"axes": (1,)}, "([i, j])->([i]) {i=8, j=64} reduction={j}"),
    (
        "reduce_max",
        [(8, 4, 16)],
        [(8, 16)],
        {"axes": (1,)},
        "([i, j, k])->([i, k]) {i=8, j=4, k=16} reduction={j}",
    ),
    ("argmax", [(8, 64)], [(8,)], {"axes": (1,)}, "([i, j])->([i]) {i=8, j=64} local={j}"),
    (
        "transpose",
        [(8, 4, 16)],
        [(4, 16, 8)],
        {"permutation": (1, 2, 0)},
        "([i, j, k])->([j, k, i]) {i=8, j=4, k=16}",
    ),
    (
        "broadcast_in_dim",
        [(8,)],
        [(8, 1, 64)],
        {"broadcast_dimensions": (0,), "shape": (8, 1, 64)},
        "([i])->([i, 1, j]) {i=8, j=64}",
    ),
    # Split heads: the merged dim is compound, heads major.
    ("reshape", [(8, 16, 64)], [(8, 16, 4, 16)], {}, "([i, j, kl])->([i, j, k, l]) {i=8, j=16, k=4, l=16}"),
    # Merge back.
    ("reshape", [(8, 16, 4, 16)], [(8, 16, 64)], {}, "([i, j, k, l])->([i, j, kl]) {i=8, j=16, k=4, l=16}"),
    # No common refinement past the first factor: the rest is local.
    ("reshape", [(4, 6)], [(6, 4)], {}, "([ij, k])->([il, m]) {i=2, j=2, k=6, l=3, m=4} local={j, k, l, m}"),
    ("squeeze", [(8, 1, 16)], [(8, 16)], {"dimensions": (1,)}, "([i, 1, j])->([i, j]) {i=8, j=16}"),
    ("cumsum", [(8, 16)], [(8, 16)], {"axis": 1}, "([i, j])->([i, j]) {i=8, j=16} local={j}"),
    (
        "slice",
        [(8, 16)],
        [(8, 15)],
        {"start_indices": (0, 1), "limit_indices": (8, 16), "strides": None},
        "([i, j])->([i, k]) {i=8, j=16, k=15} local={j, k}",
    ),
    (
        "concatenate",
        [(8, 8), (8, 8)],
        [(8, 16)],
        {"dimension": 1},
        "([i, j], [i, k])->([i, l]) {i=8, j=8, k=8, l=16} local={j, k, l}",
    ),
    ("iota", [], [(16,)], {"dimension": 0}, "()->([i]) {i=16}"),
]


@pytest.mark.parametrize("prim,ins,outs,params,golden", CASES, ids=[c[0] for c in CASES])
def test_rule_golden(prim, ins, outs, params, golden):
    assert str(rule_for(prim, ins, outs, params)) == golden


def test_unknown_primitive_gets_conservative_rule():
    rule = rule_for("cholesky", [(8, 8)], [(8, 8)], {})
    assert not has_rule("cholesky")
    assert rule.conservative
    assert set(rule.kinds) == {FactorKind.LOCAL}
    assert str(rule).endswith("conservative")


def test_every_factor_appears_in_some_tensor():
    for prim, ins, outs, params, _ in CASES:
        rule = rule_for(prim, ins, outs, params)
        seen = {f for t in (*rule.operands, *rule.results) for d in t for f in d}
        assert seen == set(range(rule.num_factors)), prim


def test_embedding_gather_and_its_scatter_add():
    """The lookup keeps token dims and the feature dim; its transpose reduces over tokens."""
    import jax
    import jax.extend.core
    import jax.numpy as jnp

    def f(table, ids):
        return jnp.take(table, ids, axis=0).sum()

    jaxpr = jax.make_jaxpr(jax.grad(f))(jnp.zeros((256, 64)), jnp.zeros((8, 16), jnp.int32))
    eqns = {e.primitive.name: e for e in jaxpr.eqns}

    def rule(e):
        ins = [tuple(v.aval.shape) for v in e.invars]
        outs = [tuple(v.aval.shape) for v in e.outvars]
        return str(rule_for(e.primitive.name, ins, outs, e.params))

    # Gather lives inside a nested jit in some jax versions: find it anywhere.
    def find(j, name):
        for e in j.eqns:
            if e.primitive.name == name:
                return e
            for sub in jax.extend.core.jaxprs_in_params(e.params):
                hit = find(sub, name)
                if hit is not None:
                    return hit
        return None

    gather = eqns.get("gather") or find(jaxpr.jaxpr, "gather")
    scatter = eqns.get("scatter-add") or find(jaxpr.jaxpr, "scatter-add")
    assert rule(gather) == "([i, j], [k, l, 1])->([k, l, j]) {i=256, j=64, k=8, l=16} local={i}"
    assert rule(scatter) == (
        "([i, j], [k, l, 1], [k, l, j])->([i, j]) {i=256, j=64, k=8, l=16} reduction={k, l} local={i}"
    )


def test_batched_scatter_add_passes_its_batching_dims():
    """The transpose of take_along_axis (HF losses): batch dims pass through instead of summing."""
    from types import SimpleNamespace

    dn = SimpleNamespace(
        update_window_dims=(),
        inserted_window_dims=(2,),
        scatter_dims_to_operand_dims=(2,),
        operand_batching_dims=(0, 1),
        scatter_indices_batching_dims=(0, 1),
    )
    rule = rule_for(
        "scatter-add", [(8, 15, 256), (8, 15, 1, 1), (8, 15, 1)], [(8, 15, 256)], {"dimension_numbers": dn}
    )
    assert str(rule) == "([i, j, k], [i, j, 1, 1], [i, j, 1])->([i, j, k]) {i=8, j=15, k=256} local={k}"

"""Tracing: names, roles, inlining, loops and branches kept as structure, entry points."""

from __future__ import annotations

import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest
from jax.ad_checkpoint import checkpoint_name

from ir.graph import Role
from ir.trace import trace
from ir.workload import Workload, WorkloadError, load_entry_point


def _mlp_step(params, opt_state, batch):
    def loss(p):
        h = checkpoint_name(jax.nn.relu(batch["x"] @ p["w1"]), "hidden")
        return jnp.mean((h @ p["w2"] - batch["y"]) ** 2)

    value, grads = jax.value_and_grad(loss)(params)
    new = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    return new, opt_state + 1, value


def _args():
    f32 = jnp.float32
    params = {"w1": jax.ShapeDtypeStruct((16, 32), f32), "w2": jax.ShapeDtypeStruct((32, 8), f32)}
    batch = {"x": jax.ShapeDtypeStruct((8, 16), f32), "y": jax.ShapeDtypeStruct((8, 8), f32)}
    return params, jax.ShapeDtypeStruct((), jnp.int32), batch


def test_inputs_named_by_path_with_roles():
    g = trace(Workload(_mlp_step, _args()))
    got = [(g.values[i].name, g.values[i].role) for i in g.inputs]
    assert got == [
        ("params/w1", Role.PARAM),
        ("params/w2", Role.PARAM),
        ("opt_state", Role.OPT_STATE),
        ("batch/x", Role.BATCH),
        ("batch/y", Role.BATCH),
    ]


def test_outputs_alias_the_inputs_they_update():
    g = trace(Workload(_mlp_step, _args()))
    names = [g.values[o].name for o in g.outputs]
    assert names == ["out/params/w1", "out/params/w2", "out/opt_state", "out/2"]
    assert [g.values[a].name if a >= 0 else None for a in g.output_alias] == [
        "params/w1",
        "params/w2",
        "opt_state",
        None,
    ]


def test_calls_are_inlined_and_names_kept():
    g = trace(Workload(_mlp_step, _args()))
    prims = {op.primitive for op in g.ops}
    assert not prims & {"jit", "pjit", "custom_jvp_call", "custom_vjp_call"}
    assert "activations/hidden/0" in {v.name for v in g.values}
    assert g.unruled == ()
    assert all(op.rule is not None for op in g.ops)


def test_scan_is_a_loop_node_with_body_and_trip_count():
    def f(ws, x):
        def body(c, w):
            return jax.checkpoint(lambda c, w: jnp.tanh(c @ w))(c, w), None

        return jax.lax.scan(body, x, ws)[0].sum()

    args = (jax.ShapeDtypeStruct((3, 16, 16), jnp.float32), jax.ShapeDtypeStruct((4, 16), jnp.float32))
    g = trace(Workload(jax.grad(f), args, arg_names=("params", "batch")))
    scans = [op for op in g.ops if op.primitive == "scan"]
    assert [op.trip_count for op in scans] == [3, 3]
    backward = scans[1].body[0]
    # The backward body recomputes the forward (remat) and inlines it.
    assert any(op.remat for op in backward.ops)
    assert [v.name for v in backward.input_values()][-1] == "params"
    total = sum(m for _, op, m in g.walk() if op.primitive == "dot_general")
    # Per trip: one forward dot; backward recomputes it and takes two gradient dots.
    assert total == 3 * (1 + 3)
    assert g.num_ops == len(g.ops) + sum(len(op.body[0].ops) for op in scans)


def test_cond_keeps_both_branches():
    def f(p, x):
        return jax.lax.cond(x.sum() > 0, lambda a: a @ p, lambda a: -a @ p, x)

    args = (jax.ShapeDtypeStruct((8, 8), jnp.float32), jax.ShapeDtypeStruct((4, 8), jnp.float32))
    g = trace(Workload(f, args, arg_names=("params", "batch")))
    (cond,) = [op for op in g.ops if op.primitive == "cond"]
    assert len(cond.body) == 2
    assert all(any(o.primitive == "dot_general" for o in b.ops) for b in cond.body)


def test_closed_over_constants_become_const_values():
    table = jnp.arange(16.0).reshape(4, 4)

    def f(params, batch):
        return (batch @ params + table).sum()

    args = (jax.ShapeDtypeStruct((4, 4), jnp.float32), jax.ShapeDtypeStruct((4, 4), jnp.float32))
    g = trace(Workload(f, args))
    consts = [v for v in g.values if v.role is Role.CONST and v.shape == (4, 4)]
    assert len(consts) == 1
    assert float(g.consts[consts[0].id].sum()) == 120.0


def test_entry_point_returning_a_tuple(tmp_path, monkeypatch):
    (tmp_path / "ep_mod.py").write_text(
        textwrap.dedent(
            """
            import jax, jax.numpy as jnp
            def make():
                return (lambda params, batch: (batch @ params).sum(),
                        (jax.ShapeDtypeStruct((4, 4), jnp.float32), jax.ShapeDtypeStruct((2, 4), jnp.float32)))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    w = load_entry_point("ep_mod:make")
    assert w.source == "ep_mod:make"
    assert w.arg_names == ("params", "batch")
    assert len(trace(w).inputs) == 2
    sys.modules.pop("ep_mod", None)


@pytest.mark.parametrize(
    "spec,message",
    [
        (
            "no_such_pkg.mod:make",
            "entry point 'no_such_pkg.mod:make': module 'no_such_pkg.mod' does not import (No module named "
            "'no_such_pkg'). Check the module path and that its directory is on PYTHONPATH.",
        ),
        (
            "json:nothing_here",
            "entry point 'json:nothing_here': module 'json' has no callable 'nothing_here'; name a function "
            "that returns a Workload or a (fn, args) tuple.",
        ),
        (
            "justtext",
            "entry point 'justtext' is not of the form 'package.module:function'; write e.g. "
            "my_project.model:make_workload.",
        ),
    ],
)
def test_entry_point_errors(spec, message):
    with pytest.raises(WorkloadError) as e:
        load_entry_point(spec)
    assert str(e.value) == message

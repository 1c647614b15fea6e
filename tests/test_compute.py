"""FLOPs as XLA counts them: the per-primitive table, closed forms, and small programs against XLA's
`Compiled.cost_analysis()` on the fake 2x4 mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from auto_partition.workloads import resolve
from cost_model.compute import cumulative_flops, op_costs, op_flops
from cost_model.xla_accounting import xla_flops
from ir.propagate import propagate
from ir.sharding import MeshShape, Sharding
from ir.trace import trace
from ir.workload import Workload
from runners.execute import verify
from runners.program import Mode

MESH = MeshShape(("data", "model"), (2, 4))
F32 = jnp.float32


def S(*spec):
    return Sharding(tuple(() if a is None else (a,) if isinstance(a, str) else tuple(a) for a in spec))


def _inputs(g, specs):
    """Input shardings; a spec shorter than the rank is padded with replicated dims."""
    out = {}
    for vid, s in zip(g.inputs, specs, strict=True):
        rank = g.values[vid].rank
        out[vid] = Sharding(s.dims + ((),) * (rank - len(s.dims)))
    return out


def _graph(fn, shapes):
    args = tuple(jax.ShapeDtypeStruct(s, F32) for s in shapes)
    w = Workload(fn, args, arg_names=tuple(f"x{i}" for i in range(len(shapes))))
    return w, trace(w)


def _only(g, primitive):
    (op,) = [op for op in g.ops if op.primitive == primitive]
    return op


# --- the per-primitive table: one execution of the op as traced, unsharded ----------------------

TABLE = [
    # name, fn, shapes, primitive, (flops, transcendentals)
    (
        "dot: 2 per multiply-accumulate",
        lambda x, w: x @ w,
        [(8, 16), (16, 32)],
        "dot_general",
        (2 * 8 * 16 * 32, 0),
    ),
    (
        "batched dot",
        lambda q, k: jnp.einsum("bqd,bkd->bqk", q, k),
        [(4, 8, 16), (4, 8, 16)],
        "dot_general",
        (2 * 4 * 8 * 8 * 16, 0),
    ),
    ("add: 1 per element", lambda x, y: x + y, [(8, 16), (8, 16)], "add", (128, 0)),
    ("compare: 1 per element", lambda x, y: x < y, [(8, 16), (8, 16)], "lt", (128, 0)),
    ("exp: a transcendental, no flop", jnp.exp, [(8, 16)], "exp", (0, 128)),
    ("tanh: a transcendental", jnp.tanh, [(8, 16)], "tanh", (0, 128)),
    ("x**3: two multiplies", lambda x: x**3, [(8, 16)], "integer_pow", (2 * 128, 0)),
    ("x**-2: a multiply and a divide", lambda x: x**-2, [(8, 16)], "integer_pow", (2 * 128, 0)),
    ("reduce: input minus output elements", lambda x: x.sum(1), [(8, 16)], "reduce_sum", (8 * 16 - 8, 0)),
    ("max-reduce", lambda x: x.max(0), [(8, 16)], "reduce_max", (8 * 16 - 16, 0)),
    ("transpose moves data: free", lambda x: x.T, [(8, 16)], "transpose", (0, 0)),
    ("broadcast: free", lambda x: jnp.broadcast_to(x, (8, 16)), [(16,)], "broadcast_in_dim", (0, 0)),
    (
        "select: 1 per element",
        lambda x, y: jnp.where(x > 0, x, y),
        [(8, 16), (8, 16)],
        "select_n",
        (128, 0),
    ),
]


@pytest.mark.parametrize("name,fn,shapes,primitive,expected", TABLE, ids=[c[0] for c in TABLE])
def test_op_flops_table(name, fn, shapes, primitive, expected):
    _, g = _graph(fn, shapes)
    op = _only(g, primitive)
    assert op_flops(op, op.rule.sizes) == expected


# --- closed forms -------------------------------------------------------------------------------


def test_gpt_layer_training_flops_closed_form():
    """Matmul FLOPs of one pre-LN GPT layer's training step (Megatron-LM, arXiv 2104.04473):
    per layer forward 24 b s h^2 (q, k, v, o projections and the 4h MLP) + 4 b s^2 h (scores and
    their product with v), backward twice that: 72 b s h^2 + 12 b s^2 h. The scanned model holds
    one layer in each loop body (forward, backward)."""
    w = resolve("builtin:gpt:tiny:scan")
    g = trace(w)
    b, s = w.args[2]["tokens"].shape
    h = w.args[0]["embed"]["embedding"].shape[1]
    bodies = [op.body[0] for op in g.ops if op.primitive == "scan"]
    assert len(bodies) == 2
    traced = sum(
        op_flops(op, op.rule.sizes)[0] for body in bodies for op in body.ops if op.primitive == "dot_general"
    )
    expected = 72 * b * s * h**2 + 12 * b * s**2 * h
    assert traced == pytest.approx(expected, rel=0.01)
    assert traced == expected  # our layer has no other matmul


@pytest.mark.parametrize("n,rows", [(8, 4), (16, 8), (17, 8), (32, 32), (64, 8), (128, 8), (256, 1)])
def test_cumulative_sum_flops_match_xla(n, rows):
    """jnp.cumsum is a reduce-window; XLA:CPU scans blocks of 16, then the block totals."""
    compiled = jax.jit(lambda x: jnp.cumsum(x, axis=0)).lower(jax.ShapeDtypeStruct((n, rows), F32)).compile()
    assert cumulative_flops(n, rows) == compiled.cost_analysis()["flops"]


# --- what the compiled program computes, hand-counted and against XLA ---------------------------

N = 8 * 32 * 64  # elements of the [8, 32, 64] operands below, replicated on every device
PROGRAMS = [
    # name, fn, shapes, input shardings, expected per-device FLOPs (None: XLA's only)
    (
        # u = x + y reads twice what it writes, but every user can fuse it: XLA copies it into
        # the exp fusion and the multiply fusion, so it is computed twice. 2N (u twice) + N (mul).
        "a cheap producer with two fusible users is computed twice",
        lambda x, y: (jnp.exp(x + y), (x + y) * 3.0),
        [(8, 32, 64), (8, 32, 64)],
        [S(), S()],
        3 * N,
    ),
    (
        # Here one user is a dot, which cannot fuse it: u is written to memory once and read by
        # both. N (u) + N (mul) + the dot. (A [8, 32, 64] u would reach the dot through a bitcast
        # to [256, 64], which fuses: computed twice again.)
        "a producer that a dot reads is computed once",
        lambda x, y, w: ((x + y) @ w, (x + y) * 3.0),
        [(256, 64), (256, 64), (64, 16)],
        [S(), S(), S()],
        2 * N + 2 * 256 * 64 * 16,
    ),
    (
        "through a bitcast the dot's operand fuses: computed twice",
        lambda x, y, w: ((x + y) @ w, (x + y) * 3.0),
        [(8, 32, 64), (8, 32, 64), (64, 16)],
        [S(), S(), S()],
        3 * N + 2 * 256 * 64 * 16,
    ),
    (
        # The simplifier removes x * 1 and x + 0, and turns x / 4 into a multiply.
        "identities vanish",
        lambda x: (x * 1.0 + 0.0) / 4.0,
        [(8, 32, 64)],
        [S()],
        N,
    ),
    (
        # Contraction split over 'model': a local dot of a quarter of k, then an all-reduce that
        # HloCostAnalysis charges one add per element it returns.
        "contraction-sharded matmul: the all-reduce adds",
        lambda x, w: x @ w,
        [(8, 64), (64, 32)],
        [S(None, "model"), S("model", None)],
        2 * 8 * 16 * 32 + 8 * 32,
    ),
    ("layer norm, batch-sharded", lambda x: jax.nn.standardize(x, axis=-1), [(8, 32, 64)], [S("data")], None),
    (
        "gelu MLP, column- then row-parallel",
        lambda x, w1, w2: jax.nn.gelu(x @ w1) @ w2,
        [(8, 32, 64), (64, 256), (256, 64)],
        [S("data"), S(None, "model"), S("model", None)],
        None,
    ),
    (
        "softmax cross-entropy with an embedding lookup",
        lambda e, t: -jnp.mean(jax.nn.log_softmax(jnp.take(e, t.astype(jnp.int32), axis=0)).max(-1)),
        [(256, 64), (8, 32)],
        [S(), S("data")],
        None,
    ),
]


@pytest.mark.parametrize("name,fn,shapes,specs,expected", PROGRAMS, ids=[c[0] for c in PROGRAMS])
def test_small_programs_match_xla(name, fn, shapes, specs, expected):
    w, g = _graph(fn, shapes)
    prop = propagate(g, MESH, _inputs(g, specs))
    predicted = xla_flops(prop)
    compiled = verify(w, prop, Mode.CONSTRAINED, execute=False).flops
    if expected is not None:
        assert predicted == expected
    assert predicted == pytest.approx(compiled, rel=0.005)


def test_loop_body_counted_once_like_xla():
    """HloCostAnalysis counts a while loop's body once; op_costs rows carry the trip count."""

    def fn(x, w):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w) * 2.0, None), x, None, length=5)[0]

    w, g = _graph(fn, [(8, 64), (64, 64)])
    prop = propagate(g, MESH, _inputs(g, [S("data"), S()]))
    once = xla_flops(prop)
    assert once == pytest.approx(verify(w, prop, Mode.CONSTRAINED, execute=False).flops, rel=0.005)
    per_step = sum(r.flops * r.count for r in op_costs(prop))
    assert per_step == pytest.approx(5 * once, rel=0.01)


@pytest.mark.parametrize(
    "source,primitives",
    [
        ("builtin:gpt:tiny", {"integer_pow", "tanh", "reduce_max", "exp", "name"}),
        ("builtin:moe:tiny", {"cumsum", "logistic"}),
        ("builtin:vit:tiny", {"add_any"}),
        ("builtin:bert:tiny", {"rsqrt"}),
    ],
)
def test_cost_shapes_cost_every_op_as_op_cost(source, primitives):
    # The simulator costs ops through CostShapes (what a plan cannot change, worked out once per
    # op): every op of random plans, loop bodies included, must cost as op_cost to the bit.
    import random

    from cost_model.compute import CostShapes, fused_values, op_cost
    from search.space import build_space

    g = trace(resolve(source))
    mesh = MeshShape(("data", "model", "pipe"), (2, 2, 2))
    space = build_space(g, mesh)
    valid = list(space.enumerate())
    shapes: dict[int, CostShapes] = {}
    checked = set()
    for a in random.Random(0).sample(valid, min(8, len(valid))):
        stack = [propagate(g, mesh, space.shardings(a))]
        while stack:
            prop = stack.pop()
            sub = prop.graph
            fused = fused_values(sub)
            costs = shapes.setdefault(id(sub), CostShapes(sub, fused))
            for op in sub.ops:
                decided = prop.ops[op.id]
                if decided is not None and op.rule is not None:
                    assert costs.cost(op, decided.factors, mesh) == op_cost(
                        sub, op, decided.factors, mesh, fused
                    )
                    checked.add(op.primitive)
            for bodies in prop.bodies.values():
                stack.extend(bodies)
    assert {"dot_general", "reduce_sum", "add", *primitives} <= checked

"""Turn a propagated plan into the JAX program it describes: shardings, and a constrained step."""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from ir.graph import Graph
from ir.propagate import Propagation
from ir.sharding import MeshShape, Sharding


class Mode(enum.Enum):
    """How much of the plan the compiled program is held to."""

    CONSTRAINED = "constrained"  # every value constrained to its propagated sharding
    PORTABLE = "portable"  # only argument and result shardings; XLA propagates the rest


def make_mesh(shape: MeshShape, devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
    """A jax Mesh with Auto axes (so sharding constraints apply) over the first `shape.size` devices."""
    devices = list(devices if devices is not None else jax.devices())
    if len(devices) < shape.size:
        raise ValueError(
            f"mesh {shape} needs {shape.size} devices but {len(devices)} are available; use a mesh "
            f"whose sizes multiply to {len(devices)}, or set XLA_FLAGS=--xla_force_host_platform_"
            f"device_count={shape.size} before JAX starts."
        )
    grid = np.array(devices[: shape.size], dtype=object).reshape(shape.shape)
    return jax.sharding.Mesh(grid, shape.axes, axis_types=(AxisType.Auto,) * len(shape.axes))


def named(mesh: jax.sharding.Mesh, sharding: Sharding) -> NamedSharding:
    """The one place a Sharding becomes a NamedSharding."""
    return NamedSharding(mesh, PartitionSpec(*sharding.to_spec()))


def constrained_fn(prop: Propagation, mesh: jax.sharding.Mesh) -> Callable[..., list[Any]]:
    """A function of the flattened inputs that re-runs the graph with every live value constrained.

    XLA then has no freedom to place values differently from the propagation, so the compiled
    program is the one whose cost the simulator predicts. Scan bodies are constrained too.
    """

    def fn(*flat_args):
        return _interpret(prop, mesh, list(flat_args))

    return fn


def _constrain(x: Any, s: Sharding, mesh: jax.sharding.Mesh) -> Any:
    if not hasattr(x, "shape") or len(x.shape) != s.rank:
        return x
    return jax.lax.with_sharding_constraint(x, named(mesh, s))


def _interpret(prop: Propagation, mesh: jax.sharding.Mesh, args: list[Any]) -> list[Any]:
    g: Graph = prop.graph
    # Inputs too: a loop body's parameters are otherwise free, and XLA then picks the loop carry's
    # sharding from the constraints inside the body, not the one propagation gave it.
    env: dict[int, Any] = {
        vid: _constrain(x, prop.shardings[vid], mesh) for vid, x in zip(g.inputs, args, strict=True)
    }
    for vid, val in g.consts.items():
        env[vid] = val
    for op in g.ops:
        ins = [env[i] for i in op.inputs]
        decided = prop.ops[op.id]
        if decided is not None:
            # Reshard operands explicitly where the op reads them differently from how they are
            # stored, so the partitioner has one local way to compute the op.
            ins = [
                _constrain(x, want, mesh) if want != prop.shardings[vid] else x
                for x, vid, want in zip(ins, op.inputs, decided.operands, strict=True)
            ]
        if op.primitive == "scan":
            outs = _scan(op, prop.bodies[op.id][0], mesh, ins)
        elif op.primitive == "cond":
            outs = _cond(op, prop.bodies[op.id], mesh, ins)
        else:
            res = op.prim.bind(*ins, **op.bind_params)
            outs = list(res) if op.prim.multiple_results else [res]
        for vid, val in zip(op.outputs, outs, strict=True):
            env[vid] = _constrain(val, prop.shardings[vid], mesh) if prop.live[vid] else val
    return [_constrain(env[o], s, mesh) for o, s in zip(g.outputs, prop.outputs, strict=True)]


def _scan(op, body: Propagation, mesh, ins: list[Any]) -> list[Any]:
    nc, nk = op.params["num_consts"], op.params["num_carry"]
    consts, carry, xs = ins[:nc], ins[nc : nc + nk], ins[nc + nk :]

    def step(c, x):
        outs = _interpret(body, mesh, [*consts, *c, *x])
        return outs[:nk], outs[nk:]

    carry_out, ys = jax.lax.scan(
        step,
        carry,
        xs,
        length=op.params["length"],
        reverse=op.params.get("reverse", False),
        unroll=op.params.get("unroll", 1),
    )
    return [*carry_out, *ys]


def _cond(op, branches: Sequence[Propagation], mesh, ins: list[Any]) -> list[Any]:
    fns = [lambda *a, _b=b: _interpret(_b, mesh, list(a)) for b in branches]
    return list(jax.lax.switch(ins[0], fns, *ins[1:]))

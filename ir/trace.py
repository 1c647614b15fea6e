"""jaxpr -> Graph: trace a Workload abstractly, inline calls, keep loops and branches structured."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.extend.core as jcore

from ir.graph import Graph, Op, Role, Value
from ir.rules import conservative_rule, has_rule, rule_for
from ir.workload import Workload

# Call-like primitives whose body is inlined, and the param that holds the body.
_INLINE = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
}
_REMAT = ("remat2", "checkpoint")
STRUCTURAL = ("scan", "cond")


def trace(workload: Workload) -> Graph:
    """Traces `workload.fn` on abstract arguments into a Graph. Allocates no array.

    Inputs are named '<arg_name>/<pytree path>' and carry the argument's role; outputs that
    update an input (same pytree position and shape) are named 'out/<arg_name>/<path>'.
    """
    closed, out_shape = jax.make_jaxpr(workload.fn, return_shape=True)(*workload.abstract_args)
    b = _Builder()
    env: dict[Any, int] = {}
    inputs: list[int] = []
    input_by_path: dict[tuple[int, str], int] = {}
    donated: set[int] = set()
    leaves = []
    for i, (arg_name, role, arg) in enumerate(
        zip(workload.arg_names, workload.roles, workload.args, strict=True)
    ):
        for path, leaf in jax.tree_util.tree_flatten_with_path(arg)[0]:
            leaves.append((i, arg_name, role, path_str(path), leaf))
    if len(leaves) != len(closed.jaxpr.invars):
        raise AssertionError("flattened arguments and jaxpr inputs differ in number")
    for var, (i, arg_name, role, path, _) in zip(closed.jaxpr.invars, leaves, strict=True):
        vid = b.value(f"{arg_name}{'/' + path if path else ''}", var.aval, role)
        env[var] = vid
        inputs.append(vid)
        input_by_path[(i, path)] = vid
        if i in workload.donate_argnums:
            donated.add(vid)
    for var, const in zip(closed.jaxpr.constvars, closed.consts, strict=True):
        env[var] = b.const(var.aval, const)
    b.run(closed.jaxpr, env, remat=False)
    outputs = [b.read(env, v) for v in closed.jaxpr.outvars]

    # Name outputs by their pytree path; an output in the same position as an input updates it.
    alias = []
    out_leaves = jax.tree_util.tree_flatten_with_path(out_shape)[0]
    for vid, (path, leaf) in zip(outputs, out_leaves, strict=True):
        top, _, rest = path_str(path).partition("/")
        src = -1
        if top.isdigit() and int(top) < len(workload.args):
            cand = input_by_path.get((int(top), rest))
            if cand is not None and b.values[cand][1] == tuple(leaf.shape):
                src = cand
        alias.append(src)
        if b.values[vid][2] is Role.ACTIVATION:
            name = (
                "/".join(filter(None, ("out", workload.arg_names[int(top)], rest)))
                if src >= 0
                else f"out/{path_str(path)}"
            )
            b.values[vid] = (name, *b.values[vid][1:2], Role.OUTPUT, *b.values[vid][3:])
    return b.graph(inputs, outputs, donated=frozenset(donated), output_alias=tuple(alias))


def path_str(path: Sequence[Any]) -> str:
    """A pytree key path as a '/'-joined name: dict keys, sequence indices, attribute names."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    return "/".join(parts)


class _Builder:
    """Accumulates values and ops of one Graph (a scan body or branch gets its own builder)."""

    def __init__(self, counters: dict[str, int] | None = None, prefix: str = ""):
        # (name, shape, role, dtype) per value; frozen into Values by graph().
        self.values: list[tuple[str, tuple[int, ...], Role, str]] = []
        self.ops: list[Op] = []
        self.unruled: set[str] = set()
        self.consts: dict[int, Any] = {}
        self.counters = counters if counters is not None else {}
        # A loop or branch body is traced on its own: its name stacks are relative to the loop's.
        self.prefix = prefix

    def scope(self, eqn: Any) -> str:
        inner = str(eqn.source_info.name_stack)
        return "/".join(filter(None, (self.prefix, inner)))

    def value(self, name: str, aval: Any, role: Role) -> int:
        self.values.append((name, tuple(int(d) for d in aval.shape), role, str(aval.dtype)))
        return len(self.values) - 1

    def const(self, aval: Any, val: Any) -> int:
        vid = self.value(f"const/{len(self.values)}", aval, Role.CONST)
        self.consts[vid] = val
        return vid

    def read(self, env: dict[Any, int], atom: Any) -> int:
        if isinstance(atom, jcore.Literal):
            return self.const(atom.aval, atom.val)
        return env[atom]

    def graph(self, inputs, outputs, donated=frozenset(), output_alias=()) -> Graph:
        values = tuple(
            Value(i, name, shape, dtype, role) for i, (name, shape, role, dtype) in enumerate(self.values)
        )
        return Graph(
            values,
            tuple(self.ops),
            tuple(inputs),
            tuple(outputs),
            donated,
            tuple(output_alias),
            tuple(sorted(self.unruled)),
            self.consts,
        )

    def run(self, jaxpr: Any, env: dict[Any, int], remat: bool) -> None:
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name in _INLINE:
                self._inline(eqn, env, remat or name in _REMAT)
            elif name == "scan":
                self._scan(eqn, env, remat)
            elif name == "cond":
                self._cond(eqn, env, remat)
            else:
                self._primitive(eqn, env, remat)

    def _outvars(self, eqn: Any, env: dict[Any, int], scope: str) -> list[int]:
        out = []
        for var in eqn.outvars:
            if eqn.primitive.name == "name":
                label = eqn.params["name"]
                k = self.counters.get(label, 0)
                self.counters[label] = k + 1
                vname = f"activations/{label}/{k}"
            else:
                vname = f"{scope + '/' if scope else ''}%{len(self.values)}"
            vid = self.value(vname, var.aval, Role.ACTIVATION)
            if not isinstance(var, jcore.DropVar):
                env[var] = vid
            out.append(vid)
        return out

    def _primitive(self, eqn: Any, env: dict[Any, int], remat: bool) -> None:
        name = eqn.primitive.name
        scope = self.scope(eqn)
        ins = [self.read(env, a) for a in eqn.invars]
        outs = self._outvars(eqn, env, scope)
        in_shapes = [self.values[i][1] for i in ins]
        out_shapes = [self.values[o][1] for o in outs]
        params = {k: v for k, v in eqn.params.items() if not _is_jaxpr(v)}
        if has_rule(name):
            rule = rule_for(name, in_shapes, out_shapes, params)
        else:
            rule = conservative_rule(in_shapes, out_shapes)
            self.unruled.add(name)
        self.ops.append(
            Op(
                len(self.ops),
                name,
                tuple(ins),
                tuple(outs),
                params,
                remat=remat,
                scope=scope,
                rule=rule,
                prim=eqn.primitive,
                bind_params=eqn.params,
            )
        )

    def _inline(self, eqn: Any, env: dict[Any, int], remat: bool) -> None:
        body = eqn.params[_INLINE[eqn.primitive.name]]
        jaxpr, consts = (body.jaxpr, body.consts) if hasattr(body, "jaxpr") else (body, ())
        inner: dict[Any, int] = {}
        for var, val in zip(jaxpr.constvars, consts, strict=True):
            inner[var] = self.const(var.aval, val)
        for var, atom in zip(jaxpr.invars, eqn.invars, strict=True):
            inner[var] = self.read(env, atom)
        self.run(jaxpr, inner, remat)
        for var, res in zip(eqn.outvars, jaxpr.outvars, strict=True):
            if not isinstance(var, jcore.DropVar):
                env[var] = self.read(inner, res)

    def _sub_graph(
        self, closed: Any, in_names: Sequence[str], in_roles: Sequence[Role], remat: bool, scope: str
    ) -> Graph:
        sub = _Builder(self.counters, scope)
        env: dict[Any, int] = {}
        ids = []
        for var, name, role in zip(closed.jaxpr.invars, in_names, in_roles, strict=True):
            vid = sub.value(name, var.aval, role)
            env[var] = vid
            ids.append(vid)
        for var, val in zip(closed.jaxpr.constvars, closed.consts, strict=True):
            env[var] = sub.const(var.aval, val)
        sub.run(closed.jaxpr, env, remat)
        outs = [sub.read(env, v) for v in closed.jaxpr.outvars]
        self.unruled |= sub.unruled
        return sub.graph(ids, outs)

    def _scan(self, eqn: Any, env: dict[Any, int], remat: bool) -> None:
        p = eqn.params
        ins = [self.read(env, a) for a in eqn.invars]
        names = [self.values[i][0] for i in ins]
        roles = [self.values[i][2] for i in ins]
        body = self._sub_graph(p["jaxpr"], names, roles, remat, self.scope(eqn))
        scope = self.scope(eqn)
        outs = self._outvars(eqn, env, scope)
        params = {k: p[k] for k in ("num_consts", "num_carry", "length", "reverse", "unroll") if k in p}
        self.ops.append(
            Op(
                len(self.ops),
                "scan",
                tuple(ins),
                tuple(outs),
                params,
                body=(body,),
                trip_count=int(p["length"]),
                remat=remat,
                scope=scope,
                prim=eqn.primitive,
                bind_params=p,
            )
        )

    def _cond(self, eqn: Any, env: dict[Any, int], remat: bool) -> None:
        ins = [self.read(env, a) for a in eqn.invars]
        names = [self.values[i][0] for i in ins[1:]]
        roles = [self.values[i][2] for i in ins[1:]]
        branches = tuple(
            self._sub_graph(br, names, roles, remat, self.scope(eqn)) for br in eqn.params["branches"]
        )
        scope = self.scope(eqn)
        outs = self._outvars(eqn, env, scope)
        self.ops.append(
            Op(
                len(self.ops),
                "cond",
                tuple(ins),
                tuple(outs),
                {},
                body=branches,
                remat=remat,
                scope=scope,
                prim=eqn.primitive,
                bind_params=eqn.params,
            )
        )


def _is_jaxpr(v: Any) -> bool:
    return isinstance(v, (jcore.Jaxpr, jcore.ClosedJaxpr)) or (
        isinstance(v, tuple) and bool(v) and isinstance(v[0], (jcore.Jaxpr, jcore.ClosedJaxpr))
    )


def replace_inputs(graph: Graph, **changes: Any) -> Graph:
    """A copy of the graph with some fields changed (graphs are frozen)."""
    return dataclasses.replace(graph, **changes)

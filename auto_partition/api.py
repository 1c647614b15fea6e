"""What a training script calls: load a plan, then jit a step under it or get its shardings."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax

from ir.graph import Role, Value
from ir.plan import Plan, PlanError, param_index
from ir.plan_yaml import check_fingerprint, load_plan_file
from ir.propagate import propagate_plan
from ir.sharding import MeshShape, ShardingError
from ir.trace import path_str, trace
from ir.workload import Workload, role_for_arg
from runners.check import MeshMismatchError, check_mesh
from runners.execute import flat_donation
from runners.program import constrained_fn, make_mesh, named


@dataclasses.dataclass(frozen=True)
class LoadedPlan:
    """A plan ready to apply to the step it was made for.

    Attributes:
      plan: the validated Plan.
      path: where it was read from ('' when built in memory).
      allow_fingerprint_mismatch: apply it even to a model with other input shapes.
    """

    plan: Plan
    path: str = ""
    allow_fingerprint_mismatch: bool = False

    @property
    def mesh_shape(self) -> MeshShape:
        return self.plan.mesh

    def mesh(self, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
        """The plan's mesh over `devices` (default: all local devices, which must match its size)."""
        devices = list(devices if devices is not None else jax.devices())
        check_mesh(self.plan.mesh, devices)
        return make_mesh(self.plan.mesh, devices)

    def jit(
        self,
        step: Callable[..., Any],
        *,
        donate_argnums: Sequence[int] = (),
        devices=None,
        arg_names: Sequence[str] = (),
    ):
        """`step` compiled under the plan in the constrained mode.

        Every value the plan's propagation decides is pinned with a sharding constraint, so the
        program XLA runs is the one the plan was costed as. The first call traces `step` on its
        arguments' shapes (one compile per distinct shape set, cached); arguments are placed on the
        plan's shardings. Outputs keep `step`'s pytree structure.

        Args:
          step: e.g. `train_step(params, opt_state, batch)`; argument names give roles (see
            `ir.workload.role_for_arg`), so they should match the names the plan was made with.
          donate_argnums: arguments whose buffers the step may reuse (e.g. (0, 1)).
          devices: devices to lay the mesh over (default: all local devices).
          arg_names: the names the plan knows the arguments by, e.g. ('params', 'opt_state',
            'batch'), when `step`'s own parameter names differ (default: `step`'s names).
        """
        mesh = self.mesh(devices)
        cache: dict[Any, Any] = {}

        def run(*args):
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
            key = (jax.tree.structure(abstract), tuple((a.shape, a.dtype) for a in jax.tree.leaves(abstract)))
            if key not in cache:
                workload = Workload(
                    step, abstract, donate_argnums=tuple(donate_argnums), arg_names=tuple(arg_names)
                )
                graph = trace(workload)
                check_fingerprint(
                    self.plan,
                    workload.fingerprint(),
                    allow_mismatch=self.allow_fingerprint_mismatch,
                    source=self._source,
                    remedy="load it with load_plan(path, allow_fingerprint_mismatch=True)",
                )
                with self._naming_file():
                    prop = propagate_plan(graph, self.plan)
                in_sh = [named(mesh, prop.shardings[i]) for i in graph.inputs]
                out_sh = [named(mesh, s) for s in prop.outputs]
                fn = jax.jit(
                    constrained_fn(prop, mesh),
                    in_shardings=in_sh,
                    out_shardings=out_sh,
                    donate_argnums=flat_donation(workload),
                )
                out_tree = jax.tree.structure(jax.eval_shape(step, *abstract))
                cache[key] = (fn, in_sh, out_tree)
            fn, in_sh, out_tree = cache[key]
            flat = [jax.device_put(x, s) for x, s in zip(jax.tree.leaves(args), in_sh, strict=True)]
            return jax.tree.unflatten(out_tree, fn(*flat))

        return run

    def shardings(
        self,
        mesh_or_devices: Any,
        tree: Any,
        *,
        prefix: str | None = None,
        arg_names: Sequence[str] = ("params", "opt_state", "batch"),
    ) -> Any:
        """NamedShardings shaped like `tree`, for users who call `jax.jit` themselves.

        Args:
          mesh_or_devices: a `jax.sharding.Mesh` with the plan's axes, or a list of devices.
          tree: the step's arguments as a tuple `(params, opt_state, batch)` (named by
            `arg_names`), or one pytree named by `prefix` ('params', 'opt_state' or 'batch').
          prefix: the name of `tree` when it is a single argument.
          arg_names: the names of the arguments when `tree` is a tuple of them.
        """
        if isinstance(mesh_or_devices, jax.sharding.Mesh):
            mesh = mesh_or_devices
            got = MeshShape(tuple(mesh.axis_names), tuple(mesh.devices.shape))
            if (got.axes, got.shape) != (self.plan.mesh.axes, self.plan.mesh.shape):
                check_mesh(self.plan.mesh, list(mesh.devices.flat))
                raise MeshMismatchError(
                    f"mesh {got} differs from the plan's mesh {self.plan.mesh}; build the mesh with "
                    "LoadedPlan.mesh(devices) or give the same axis names and sizes."
                )
        else:
            mesh = self.mesh(mesh_or_devices)
        if prefix is not None:
            named_trees = [(prefix, tree)]
        else:
            if not isinstance(tree, (tuple, list)) or len(tree) != len(arg_names):
                raise ValueError(
                    f"shardings() got a {type(tree).__name__}; pass the step's arguments as a tuple of "
                    f"{len(arg_names)} ({', '.join(arg_names)}), or one pytree with prefix='params'."
                )
            named_trees = list(zip(arg_names, tree, strict=True))
        values: list[list[Value]] = []
        for name, sub in named_trees:
            leaves = jax.tree_util.tree_flatten_with_path(sub)[0]
            role = role_for_arg(name)
            values.append(
                [
                    Value(0, f"{name}/{path_str(p)}" if p else name, tuple(x.shape), str(x.dtype), role)
                    for p, x in leaves
                ]
            )
        index = param_index([v for vs in values for v in vs if v.role is Role.PARAM])
        out = []
        with self._naming_file():
            for (_, sub), vs in zip(named_trees, values, strict=True):
                flat = [named(mesh, self.plan.input_sharding(v, params=index)) for v in vs]
                out.append(jax.tree.unflatten(jax.tree.structure(sub), flat))
        return out[0] if prefix is not None else tuple(out)

    @property
    def _source(self) -> str:
        return os.path.basename(self.path) if self.path else "plan"

    @contextlib.contextmanager
    def _naming_file(self) -> Iterator[None]:
        """Re-raises a plan that does not fit the step's tensors with the plan file's name in front."""
        try:
            yield
        except (PlanError, ShardingError) as e:
            raise PlanError(f"{self._source}: {e}", tensor=getattr(e, "tensor", "")) from None


def load_plan(path: str, *, allow_fingerprint_mismatch: bool = False) -> LoadedPlan:
    """Reads and validates a plan file (apiVersion auto-partition/v1)."""
    return LoadedPlan(load_plan_file(path), path, allow_fingerprint_mismatch)

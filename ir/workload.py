"""What a user hands in: a jittable step and abstract example arguments."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import re
import traceback
from collections.abc import Callable
from typing import Any

import jax

from ir.graph import Role


class WorkloadError(ValueError):
    """A workload or entry point that cannot be used; the message names it and the fix."""


_ROLE_PATTERNS = (
    (re.compile(r"^(params|parameters|weights|variables|model)$"), Role.PARAM),
    (re.compile(r"^(opt_state|optimizer_state|opt|optimizer)$"), Role.OPT_STATE),
    (re.compile(r"^(batch|inputs|data|x|tokens|images|examples)$"), Role.BATCH),
)


def role_for_arg(arg_name: str) -> Role:
    for pattern, role in _ROLE_PATTERNS:
        if pattern.match(arg_name):
            return role
    return Role.INPUT


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class Workload:
    """A step function and the abstract arguments to trace it with.

    Attributes:
      fn: a jittable function, typically `train_step(params, opt_state, batch)`.
      args: positional arguments, a tuple of pytrees of arrays or `jax.ShapeDtypeStruct`s.
        Tracing never allocates, so shapes of any size can be searched.
      donate_argnums: positional arguments whose buffers the step may reuse.
      init: optional `init(seed) -> args` that makes real arrays for verification.
      arg_names: a name per positional argument (default: the parameter names of `fn`),
        the first component of every value path ('params/...', 'batch/...').
      roles: role per positional argument (default: inferred from `arg_names`).
      source: how to rebuild this workload ('builtin:gpt:tiny' or 'pkg.mod:fn'), recorded in plans.
    """

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    donate_argnums: tuple[int, ...] = ()
    init: Callable[[int], tuple[Any, ...]] | None = None
    arg_names: tuple[str, ...] = ()
    roles: tuple[Role, ...] = ()
    source: str = ""

    def __post_init__(self):
        if not isinstance(self.args, tuple):
            object.__setattr__(self, "args", tuple(self.args))
        if not self.arg_names:
            object.__setattr__(self, "arg_names", _param_names(self.fn, len(self.args)))
        if len(self.arg_names) != len(self.args):
            raise WorkloadError(
                f"workload has {len(self.args)} arguments but {len(self.arg_names)} arg_names; "
                "give one name per positional argument."
            )
        if not self.roles:
            object.__setattr__(self, "roles", tuple(role_for_arg(n) for n in self.arg_names))

    @property
    def abstract_args(self) -> tuple[Any, ...]:
        """The arguments as ShapeDtypeStructs (no allocation)."""
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.args)

    def fingerprint(self) -> str:
        """A hash of the input paths, shapes and dtypes: identifies the model a plan was made for."""
        h = hashlib.sha256()
        for name, arg in zip(self.arg_names, self.args, strict=True):
            for path, leaf in jax.tree_util.tree_flatten_with_path(arg)[0]:
                h.update(f"{name}{jax.tree_util.keystr(path)}:{tuple(leaf.shape)}:{leaf.dtype};".encode())
        return h.hexdigest()[:16]


def _param_names(fn: Callable[..., Any], n: int) -> tuple[str, ...]:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:n]
    return tuple(names) + tuple(f"arg{i}" for i in range(len(names), n))


def load_entry_point(spec: str) -> Workload:
    """Imports 'package.module:function' and calls it; it must return a Workload or (fn, args)."""
    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name or not attr:
        raise WorkloadError(
            f"entry point {spec!r} is not of the form 'package.module:function'; "
            "write e.g. my_project.model:make_workload."
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise WorkloadError(
                f"entry point {spec!r}: module {module_name!r} does not import ({e}). Check the module "
                "path and that its directory is on PYTHONPATH."
            ) from None
        raise WorkloadError(
            f"entry point {spec!r}: module {module_name!r} does not import: {_raised(e)}; install the "
            "missing package or fix the import."
        ) from None
    except Exception as e:  # the user's module failed while importing: report where, not a traceback
        raise WorkloadError(
            f"entry point {spec!r}: module {module_name!r} does not import: {_raised(e)}; fix the error there."
        ) from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise WorkloadError(
            f"entry point {spec!r}: module {module_name!r} has no callable {attr!r}; name a function "
            "that returns a Workload or a (fn, args) tuple."
        )
    try:
        made = factory()
    except Exception as e:  # the user's factory failed: report where, not a traceback
        raise WorkloadError(
            f"entry point {spec!r} failed when called: {_raised(e)}; fix the function so it returns a "
            "Workload or a (fn, args) tuple."
        ) from None
    if isinstance(made, Workload):
        return dataclasses.replace(made, source=made.source or spec)
    if isinstance(made, tuple) and len(made) == 2 and callable(made[0]):
        fn, args = made
        return Workload(fn, tuple(args) if isinstance(args, (tuple, list)) else (args,), source=spec)
    raise WorkloadError(
        f"entry point {spec!r} returned {type(made).__name__}; it must return a Workload or a "
        "(fn, args) tuple."
    )


def _raised(e: BaseException) -> str:
    """'ErrorType: message (at file:line)', the innermost frame of `e` (one line, for error messages)."""
    where = ""
    if isinstance(e, SyntaxError) and e.filename:
        where = f" (at {e.filename}:{e.lineno})"
    else:
        frames = [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith("<frozen")]
        if frames:
            where = f" (at {frames[-1].filename}:{frames[-1].lineno})"
    text = " ".join(str(e.msg if isinstance(e, SyntaxError) else e).split())
    return f"{type(e).__name__}: {text}{where}" if text else f"{type(e).__name__}{where}"

"""The traced program as frozen values: tensors (Value), primitive applications (Op), and Graph."""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from collections.abc import Callable, Hashable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ir.rules import OpRule


class Role(enum.Enum):
    """What a tensor is to the training step; drives memory accounting and plan sections."""

    PARAM = "param"
    OPT_STATE = "optimizer_state"
    BATCH = "batch"
    INPUT = "input"  # any other argument (step counter, rng key, ...)
    ACTIVATION = "activation"
    CONST = "const"  # literals and closed-over constants
    OUTPUT = "output"

    # Members are singletons compared by identity: hashed by identity too (Enum hashes the
    # name in Python on every dict lookup, and these key hot tables).
    __hash__ = object.__hash__


@dataclasses.dataclass(frozen=True, slots=True)
class Value:
    """One tensor of the program.

    Attributes:
      id: index in `Graph.values`.
      name: '/'-joined pytree path for arguments and outputs, a generated name otherwise.
      shape: global shape.
      dtype: numpy dtype name, e.g. 'float32', 'bfloat16'.
      role: what the tensor is to the step.
    """

    id: int
    name: str
    shape: tuple[int, ...]
    dtype: str
    role: Role

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def itemsize(self) -> int:
        return _itemsize(self.dtype)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize


@functools.cache
def _itemsize(dtype: str) -> int:
    if dtype in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        return {"bfloat16": 2}.get(dtype, 1)
    if dtype.startswith("key<"):
        return 8
    return np.dtype(dtype).itemsize


@dataclasses.dataclass(frozen=True, slots=True)
class Op:
    """One primitive application.

    Attributes:
      id: index in `Graph.ops`.
      primitive: the jaxpr primitive name ('dot_general', 'scan', ...).
      inputs: operand value ids (literals become CONST values).
      outputs: result value ids.
      params: the primitive's parameters that rules and costs need, hashable.
      body: for 'scan' the loop body, for 'cond' the branches; empty otherwise.
      trip_count: iterations of a 'scan' (1 otherwise).
      remat: True when the op sits inside a rematerialised (checkpointed) region.
      scope: the JAX name stack where the op was traced ('' when none).
      rule: the op's factor rule (None for the structural ops 'scan' and 'cond').
      prim: the JAX primitive, and bind_params its full parameters, to re-execute the op.
    """

    id: int
    primitive: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    params: Mapping[str, Any]
    body: tuple[Graph, ...] = ()
    trip_count: int = 1
    remat: bool = False
    scope: str = ""
    rule: OpRule | None = None
    prim: Any = dataclasses.field(default=None, compare=False, repr=False)
    bind_params: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __hash__(self) -> int:
        return hash((self.id, self.primitive, self.inputs, self.outputs))


@dataclasses.dataclass(frozen=True, eq=False)  # not slotted: caches derived maps
class Graph:
    """A program in topological order.

    Attributes:
      values: all tensors; `values[i].id == i`.
      ops: primitive applications in program order.
      inputs: ids of the arguments, in flattened argument order.
      outputs: ids of the results, in flattened result order (may repeat or be inputs).
      donated: ids of inputs whose buffers the step may reuse for outputs.
      output_alias: per output, the id of the input it updates (same pytree position and
        shape, e.g. new params for params), or -1. Plans shard such outputs like their input.
      unruled: primitives that fell back to the conservative rule (see ir.rules).
      consts: value id -> the concrete value of literals and closed-over constants.
    """

    values: tuple[Value, ...]
    ops: tuple[Op, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    donated: frozenset[int] = frozenset()
    output_alias: tuple[int, ...] = ()
    unruled: tuple[str, ...] = ()
    consts: Mapping[int, Any] = dataclasses.field(default_factory=dict, repr=False)

    def value(self, name: str) -> Value:
        for v in self.values:
            if v.name == name:
                return v
        raise KeyError(name)

    @functools.cached_property
    def producer(self) -> dict[int, int]:
        """value id -> id of the op that produces it."""
        return {vid: op.id for op in self.ops for vid in op.outputs}

    @functools.cached_property
    def consumers(self) -> dict[int, tuple[int, ...]]:
        """value id -> ids of the ops that read it, in program order."""
        out: dict[int, list[int]] = {}
        for op in self.ops:
            for vid in dict.fromkeys(op.inputs):
                out.setdefault(vid, []).append(op.id)
        return {k: tuple(v) for k, v in out.items()}

    @functools.cached_property
    def live_ops(self) -> frozenset[int]:
        """Ids of the ops the outputs depend on; the rest is dead code XLA removes."""
        needed = set(self.outputs)
        live = set()
        for op in reversed(self.ops):
            if any(o in needed for o in op.outputs):
                live.add(op.id)
                needed.update(op.inputs)
        return frozenset(live)

    def derived(self, key: Hashable, make: Callable[[Graph], Any]) -> Any:
        """`make(self)`, computed once per key: analyses that depend on the graph alone (a cost
        model's fusible values, propagation's spans) kept with it, so every plan, search and
        mesh of the graph shares them."""
        memo = self.__dict__.setdefault("_derived", {})
        if key not in memo:
            memo[key] = make(self)
        return memo[key]

    @functools.cached_property
    def op_kinds(self) -> tuple[int, ...]:
        """Per op id, a small int naming its kind: ops of one kind do the same computation on
        alike values (primitive, parameters, rule, operand and result shapes and dtypes, remat,
        autodiff phase), as the layers of an unrolled model do. Loops and branches are each of
        a kind of their own. Caches of per-op results that depend on nothing else key by kind."""
        kinds: dict[tuple, int] = {}
        out = []
        for op in self.ops:
            try:
                key = (
                    op.primitive,
                    tuple(sorted(op.params.items())),
                    op.rule,
                    tuple((self.values[v].shape, self.values[v].dtype) for v in op.inputs),
                    tuple((self.values[v].shape, self.values[v].dtype) for v in op.outputs),
                    op.remat,
                    "transpose(" in op.scope,
                    "jvp(" in op.scope,
                    op.id if op.body else -1,
                )
                hash(key)
            except TypeError:  # a parameter that cannot be compared: a kind of its own
                key = ("op", op.id)
            out.append(kinds.setdefault(key, len(kinds)))
        return tuple(out)

    def walk(self):
        """Yields (graph, op, multiplier) over this graph and every nested body.

        The multiplier is how many times the op runs per step (scan trip counts multiply).
        """
        yield from _walk(self, 1)

    @property
    def num_ops(self) -> int:
        return sum(1 for _ in self.walk())

    def input_values(self) -> tuple[Value, ...]:
        return tuple(self.values[i] for i in self.inputs)


def _walk(graph: Graph, mult: int):
    for op in graph.ops:
        yield graph, op, mult
        if op.primitive == "scan":
            yield from _walk(op.body[0], mult * op.trip_count)
        else:
            for body in op.body:
                yield from _walk(body, mult)

"""Tactics: ordered, model-independent sharding decisions (manual or automatic) and their compilation to a Plan."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from ir.graph import Graph, Role, Value
from ir.plan import (
    Plan,
    PlanError,
    Spec,
    Unmatched,
    activation_values,
    axis_hint,
    compile_pattern,
    format_spec,
    normalize_spec,
    param_index,
    quote,
    spec_entries,
)
from ir.sharding import DimSharding, MeshShape, Sharding, ShardingError


class TacticError(ValueError):
    """A tactic that cannot be read or applied; the message names the tactic, the tensor and the fix.

    Attributes:
      tactic: the offending tactic (None when it could not be parsed).
      tensor: the tensor concerned ('' when none).
    """

    def __init__(self, message: str, *, tactic: Tactic | None = None, tensor: str = ""):
        super().__init__(message)
        self.tactic = tactic
        self.tensor = tensor


def _axes(value: str | Sequence[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def _flow_axes(axes: tuple[str, ...]) -> str:
    return axes[0] if len(axes) == 1 else "[" + ", ".join(axes) + "]"


@dataclasses.dataclass(frozen=True, slots=True)
class Shard:
    """`{shard: REGEX, dim: D, axis: A}`: append mesh axis A (or axes [A, B]) to dim D of every match.

    Matches params, and batch or optimizer-state inputs whose names the regex matches (whole names,
    `re.fullmatch`). Optimizer state a tactic does not match follows its param.
    """

    pattern: str
    dim: int
    axes: tuple[str, ...]

    def __post_init__(self):
        object.__setattr__(self, "axes", _axes(self.axes))

    def to_dict(self) -> dict[str, Any]:
        return {
            "shard": self.pattern,
            "dim": self.dim,
            "axis": self.axes[0] if len(self.axes) == 1 else list(self.axes),
        }

    def __str__(self) -> str:
        return f"{{shard: {quote(self.pattern)}, dim: {self.dim}, axis: {_flow_axes(self.axes)}}}"


@dataclasses.dataclass(frozen=True, slots=True)
class Batch:
    """`{batch: data}` or `{batch: [data, model]}`: dim 0 of every BATCH input over these axes."""

    axes: tuple[str, ...]

    def __post_init__(self):
        object.__setattr__(self, "axes", _axes(self.axes))

    def to_dict(self) -> dict[str, Any]:
        return {"batch": self.axes[0] if len(self.axes) == 1 else list(self.axes)}

    def __str__(self) -> str:
        return f"{{batch: {_flow_axes(self.axes)}}}"


@dataclasses.dataclass(frozen=True, slots=True)
class Constrain:
    """`{constrain: REGEX, spec: [...]}`: constrain matching named activations to this spec."""

    pattern: str
    spec: Spec

    def __post_init__(self):
        object.__setattr__(self, "spec", normalize_spec(self.spec))

    def to_dict(self) -> dict[str, Any]:
        return {"constrain": self.pattern, "spec": spec_entries(self.spec)}

    def __str__(self) -> str:
        return f"{{constrain: {quote(self.pattern)}, spec: {format_spec(self.spec)}}}"


@dataclasses.dataclass(frozen=True, slots=True)
class Replicate:
    """`{replicate: REGEX}`: pin matching inputs replicated (a later shard of them is a contradiction)."""

    pattern: str

    def to_dict(self) -> dict[str, Any]:
        return {"replicate": self.pattern}

    def __str__(self) -> str:
        return f"{{replicate: {quote(self.pattern)}}}"


@dataclasses.dataclass(frozen=True, slots=True)
class Auto:
    """`{auto: {searcher: mcts, axes: [model]}}`: leave the rest to a searcher, over these axes (all if empty)."""

    searcher: str
    axes: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "axes", _axes(self.axes))

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"searcher": self.searcher}
        if self.axes:
            body["axes"] = list(self.axes)
        return {"auto": body}

    def __str__(self) -> str:
        axes = f", axes: [{', '.join(self.axes)}]" if self.axes else ""
        return f"{{auto: {{searcher: {self.searcher}{axes}}}}}"


Tactic = Shard | Batch | Constrain | Replicate | Auto

# Tactic kind → (required fields, optional fields).
_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "shard": (("dim", "axis"), ()),
    "batch": ((), ()),
    "constrain": (("spec",), ()),
    "replicate": ((), ()),
    "auto": ((), ()),
}
_EXAMPLES = {
    "shard": "{shard: 'params/.*/kernel', dim: -1, axis: model}",
    "batch": "{batch: data}",
    "constrain": "{constrain: 'activations/resid/\\d+', spec: [data, model]}",
    "replicate": "{replicate: 'params/.*/scale'}",
    "auto": "{auto: {searcher: mcts, axes: [model]}}",
}


# ------------------------------------------------------------------------------------------ parsing


def parse_tactics(obj: Any) -> tuple[Tactic, ...]:
    """Tactics from YAML text, a list of mappings (the YAML form) and/or Tactic values.

    Raises:
      TacticError: an item that is not a mapping, an unknown tactic key, a missing or unknown field,
        a field of the wrong type, or a bad regex; the message names the tactic (1-based) and the fix.
    """
    if isinstance(obj, str):
        try:
            obj = yaml.safe_load(obj)
        except yaml.YAMLError as e:
            raise TacticError(f"tactics are not valid YAML ({e}); fix the syntax.") from None
    if obj is None:
        return ()
    if isinstance(obj, Mapping) or isinstance(obj, Tactic):
        obj = [obj]
    return tuple(_parse_one(i, item) for i, item in enumerate(obj, start=1))


def _parse_one(i: int, item: Any) -> Tactic:
    if isinstance(item, Tactic):
        _check_pattern(i, item)
        return item
    if not isinstance(item, Mapping) or not item:
        raise TacticError(f"tactic {i} is {item!r}; write a mapping such as {_EXAMPLES['shard']}.")
    kinds = [k for k in item if k in _FIELDS]
    if len(kinds) != 1:
        if kinds:
            raise TacticError(
                f"tactic {i} {_show(item)} has several kinds {kinds}; write one tactic per item."
            )
        key = str(next(iter(item)))
        close = difflib.get_close_matches(key, list(_FIELDS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise TacticError(
            f"unknown tactic key {key!r} in tactic {i} {_show(item)}; {hint}known kinds are "
            f"{', '.join(_FIELDS)}."
        )
    kind = kinds[0]
    required, optional = _FIELDS[kind]
    for field in item:
        if field != kind and field not in required + optional:
            close = difflib.get_close_matches(str(field), list(required + optional), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"write e.g. {_EXAMPLES[kind]}."
            raise TacticError(f"tactic {i} {_show(item)} has unknown field {field!r}; {hint}")
    for field in required:
        if field not in item:
            raise TacticError(f"tactic {i} {_show(item)} is missing {field!r}; write e.g. {_EXAMPLES[kind]}.")
    value = item[kind]
    try:
        if kind == "shard":
            dim = item["dim"]
            if not isinstance(dim, int) or isinstance(dim, bool):
                raise TacticError(f"tactic {i} {_show(item)}: dim must be an integer, got {dim!r}.")
            tactic: Tactic = Shard(_text(i, item, kind), dim, _axis_list(i, item, item["axis"]))
        elif kind == "batch":
            tactic = Batch(_axis_list(i, item, value))
        elif kind == "constrain":
            tactic = Constrain(_text(i, item, kind), item["spec"] if item["spec"] is not None else ())
        elif kind == "replicate":
            tactic = Replicate(_text(i, item, kind))
        else:
            tactic = _parse_auto(i, item, value)
    except PlanError as e:
        raise TacticError(f"tactic {i} {_show(item)}: {e.detail}") from None
    _check_pattern(i, tactic)
    return tactic


def _parse_auto(i: int, item: Mapping[str, Any], value: Any) -> Auto:
    if isinstance(value, str):
        return Auto(value)
    if not isinstance(value, Mapping) or "searcher" not in value:
        raise TacticError(f"tactic {i} {_show(item)} needs a searcher; write e.g. {_EXAMPLES['auto']}.")
    for field in value:
        if field not in ("searcher", "axes"):
            close = difflib.get_close_matches(str(field), ["searcher", "axes"], n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"write e.g. {_EXAMPLES['auto']}."
            raise TacticError(f"tactic {i} {_show(item)} has unknown field {field!r}; {hint}")
    return Auto(str(value["searcher"]), _axis_list(i, item, value.get("axes") or ()))


def _text(i: int, item: Mapping[str, Any], kind: str) -> str:
    if not isinstance(item[kind], str):
        raise TacticError(
            f"tactic {i} {_show(item)}: {kind} must be a regex string; write e.g. {_EXAMPLES[kind]}."
        )
    return item[kind]


def _axis_list(i: int, item: Mapping[str, Any], value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and all(isinstance(a, str) for a in value):
        return tuple(value)
    raise TacticError(f"tactic {i} {_show(item)}: {value!r} is not a mesh axis or a list of mesh axes.")


def _check_pattern(i: int, tactic: Tactic) -> None:
    pattern = getattr(tactic, "pattern", None)
    if pattern is not None:
        try:
            compile_pattern(pattern)
        except PlanError as e:
            raise TacticError(f"tactic {i} {tactic} has a {e.detail}", tactic=tactic) from None


def _show(item: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(item), default_flow_style=True, width=1 << 20, sort_keys=False).strip()


def tactics_to_yaml(tactics: Sequence[Tactic]) -> str:
    """The YAML list form of tactics, one flow mapping per line."""
    return "".join(
        "- " + yaml.safe_dump(t.to_dict(), default_flow_style=True, width=1 << 20, sort_keys=False)
        for t in tactics
    )


# -------------------------------------------------------------------------------------- compilation


@dataclasses.dataclass(slots=True)
class _State:
    """Shardings as tactics build them, and which tactic fixed what (to name contradictions)."""

    mesh: MeshShape
    dims: dict[str, list[DimSharding]]
    owner: dict[tuple[str, int], Tactic]  # (tensor, dim) → the tactic that sharded it
    pinned: dict[str, Tactic]  # tensor → the Replicate that pinned it
    touched: set[str]  # inputs some tactic matched (optimizer state among them does not follow)
    acts: dict[str, Spec]
    act_owner: dict[str, Tactic]


def apply_tactics(
    graph: Graph, mesh: MeshShape, tactics: Sequence[Tactic | Mapping[str, Any]], *, base: Plan | None = None
) -> Plan:
    """Compiles tactics, in order, into a Plan (through `Plan.from_shardings`).

    Starting from `base` (or everything replicated), each Shard/Batch appends mesh axes to a dim,
    Replicate pins inputs replicated, Constrain sets activation constraints. Optimizer state that no
    tactic names follows its param. Auto tactics are recorded in `plan.tactics` for a searcher.

    Args:
      graph: the traced step.
      mesh: the mesh.
      tactics: Tactic values or their YAML/dict form.
      base: a plan whose shardings the tactics refine; its provenance and tactics are kept.

    Raises:
      TacticError: a regex that matches no tensor, an unknown mesh axis, an axis that does not divide
        the dim, an axis used twice on one tensor, a dim out of range, or two tactics that contradict.
    """
    tactics = parse_tactics(tactics if isinstance(tactics, str) else list(tactics))
    if base is not None and base.mesh != mesh:
        raise TacticError(
            f"base plan is for mesh {base.mesh} but the tactics are for mesh {mesh}; use one mesh."
        )
    inputs = graph.input_values()
    acts = activation_values(graph)
    start = base.input_shardings(graph) if base is not None else {}
    state = _State(
        mesh,
        dims={v.name: list(start[v.id].dims) if v.id in start else [()] * v.rank for v in inputs},
        owner={},
        pinned={},
        touched=set(),
        acts={},
        act_owner={},
    )
    if base is not None:
        for name, v in acts.items():
            s = base.activation_sharding(name, v.shape)
            if s is not None:
                state.acts[name] = s.dims
    for tactic in tactics:
        for axis in _tactic_axes(tactic):
            if axis not in mesh.axes:
                raise TacticError(
                    f"tactic {tactic} names mesh axis {axis!r}, but the mesh has axes "
                    f"{list(mesh.axes)}; {axis_hint(axis, mesh)}",
                    tactic=tactic,
                )
        if isinstance(tactic, Shard):
            for v in _matching(tactic, tactic.pattern, inputs):
                _shard(state, tactic, v, tactic.dim, tactic.axes)
        elif isinstance(tactic, Batch):
            batch = [v for v in inputs if v.role is Role.BATCH and v.rank >= 1]
            if not batch:
                raise TacticError(
                    f"tactic {tactic} matches no tensor; this step has no batch input of rank "
                    ">= 1 (batch inputs are arguments named batch, inputs, data, x, tokens, ...).",
                    tactic=tactic,
                )
            for v in batch:
                _shard(state, tactic, v, 0, tactic.axes)
        elif isinstance(tactic, Replicate):
            for v in _matching(tactic, tactic.pattern, inputs):
                _replicate(state, tactic, v)
        elif isinstance(tactic, Constrain):
            for v in _matching(tactic, tactic.pattern, acts.values()):
                _constrain(state, tactic, v)
    _follow_params(graph, state)
    recorded = (tuple(base.tactics) if base is not None else ()) + tuple(t.to_dict() for t in tactics)
    shardings = {name: Sharding(tuple(dims)) for name, dims in state.dims.items()}
    activations = {name: Sharding(spec) for name, spec in state.acts.items()}
    try:
        return Plan.from_shardings(
            mesh,
            graph,
            shardings,
            activations,
            unmatched=base.unmatched if base else Unmatched.REPLICATE,
            tactics=recorded,
            predicted=base.predicted if base else None,
            measured=base.measured if base else None,
            provenance=base.provenance if base else None,
        )
    except PlanError as e:
        raise TacticError(f"tactics give a plan that cannot hold: {e}") from None


def _tactic_axes(tactic: Tactic) -> tuple[str, ...]:
    if isinstance(tactic, Constrain):
        return tuple(a for d in tactic.spec for a in d)
    return getattr(tactic, "axes", ())


def _matching(tactic: Tactic, pattern: str, values: Any) -> list[Value]:
    regex = compile_pattern(pattern)
    values = list(values)
    hits = [v for v in values if regex.fullmatch(v.name)]
    if not hits:
        names = [v.name for v in values]
        close = difflib.get_close_matches(pattern, names, n=1)
        near = (
            f"; the nearest name is {close[0]!r}"
            if close
            else f"; names look like {names[0]!r}"
            if names
            else ""
        )
        raise TacticError(
            f"tactic {tactic} matches no tensor; the regex must match whole names (re.fullmatch){near}. "
            "Fix the regex or drop the tactic.",
            tactic=tactic,
        )
    return hits


def _shard(state: _State, tactic: Tactic, v: Value, dim: int, axes: tuple[str, ...]) -> None:
    if not -v.rank <= dim < v.rank:
        raise TacticError(
            f"tactic {tactic}: {v.name} has rank {v.rank} (shape {v.shape}), so dim {dim} "
            f"does not exist; use a dim in [{-v.rank}, {v.rank - 1}] or narrow the regex.",
            tactic=tactic,
            tensor=v.name,
        )
    dim %= v.rank
    if v.name in state.pinned:
        raise TacticError(
            f"tactics {state.pinned[v.name]} and {tactic} contradict: the first pins {v.name} "
            "replicated and the second shards it; drop one or narrow a regex.",
            tactic=tactic,
            tensor=v.name,
        )
    dims = state.dims[v.name]
    earlier = state.owner.get((v.name, dim))
    if earlier is not None:
        if dims[dim][-len(axes) :] == axes:
            return  # two tactics agree; nothing to add
        raise TacticError(
            f"tactics {earlier} and {tactic} contradict: both fix dim {dim} of {v.name}, to "
            f"{_flow_axes(dims[dim])} and to {_flow_axes(axes)}; drop one, narrow a regex, or write one "
            f"tactic with axis: [{', '.join(dims[dim] + axes)}].",
            tactic=tactic,
            tensor=v.name,
        )
    for axis in axes:
        used = [d for d, ax in enumerate(dims) if axis in ax] + ([dim] if axes.count(axis) > 1 else [])
        if used:
            raise TacticError(
                f"tactic {tactic} shards {v.name} dim {dim} over mesh axis {axis!r}, which already shards "
                f"its dim {used[0]}; a mesh axis can split one dim of a tensor only. Use another axis or "
                "narrow the regex.",
                tactic=tactic,
                tensor=v.name,
            )
    new = dims[dim] + axes
    n = state.mesh.axes_size(new)
    if v.shape[dim] % n:
        sizes = " x ".join(str(state.mesh.axis_size(a)) for a in axes)
        what = (
            f"mesh axis {axes[0]!r} (size {sizes})"
            if len(axes) == 1
            else f"mesh axes {list(axes)} (size {sizes})"
        )
        on_top = f" together with {_flow_axes(dims[dim])} already on that dim" if dims[dim] else ""
        raise TacticError(
            f"tactic {tactic} cannot shard {v.name}: dim {dim} has size {v.shape[dim]}, and {what}{on_top} "
            f"splits it {n} ways, which does not divide {v.shape[dim]}; narrow the regex, pick another dim, "
            "or use a mesh axis size that divides it.",
            tactic=tactic,
            tensor=v.name,
        )
    dims[dim] = new
    state.owner[(v.name, dim)] = tactic
    state.touched.add(v.name)


def _replicate(state: _State, tactic: Replicate, v: Value) -> None:
    for dim in range(v.rank):
        earlier = state.owner.get((v.name, dim))
        if earlier is not None:
            raise TacticError(
                f"tactics {earlier} and {tactic} contradict: the first shards {v.name} dim {dim} "
                "and the second pins it replicated; drop one or narrow a regex.",
                tactic=tactic,
                tensor=v.name,
            )
    state.dims[v.name] = [()] * v.rank
    state.pinned[v.name] = tactic
    state.touched.add(v.name)


def _constrain(state: _State, tactic: Constrain, v: Value) -> None:
    spec = tactic.spec + ((),) * max(0, v.rank - len(tactic.spec))
    try:
        Sharding(spec).check(v.shape, state.mesh, v.name)
    except ShardingError as e:
        raise TacticError(f"tactic {tactic} cannot constrain {e}", tactic=tactic, tensor=v.name) from None
    earlier = state.act_owner.get(v.name)
    if earlier is not None and state.acts[v.name] != spec:
        raise TacticError(
            f"tactics {earlier} and {tactic} contradict: they constrain {v.name} to "
            f"{format_spec(_trim(state.acts[v.name]))} and {format_spec(_trim(spec))}; drop one or narrow "
            "a regex.",
            tactic=tactic,
            tensor=v.name,
        )
    state.acts[v.name] = spec
    state.act_owner[v.name] = tactic


def _trim(spec: Spec) -> Spec:
    while spec and not spec[-1]:
        spec = spec[:-1]
    return spec


def _follow_params(graph: Graph, state: _State) -> None:
    """Optimizer state that no tactic named takes its param's sharding (same path suffix and shape)."""
    index = param_index(graph)
    for v in graph.input_values():
        if v.role is not Role.OPT_STATE or v.name in state.touched:
            continue
        parts = v.name.split("/")
        for k in range(1, len(parts)):
            suffix = "/".join(parts[k:])
            if suffix in index:
                param = index[suffix]
                if param is not None and param.shape == v.shape:
                    state.dims[v.name] = list(state.dims[param.name])
                break

"""The Plan: ordered regex rules that give every input and named intermediate of a step its sharding."""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ir.graph import Graph, Role, Value
from ir.patterns import compact_patterns
from ir.sharding import DimSharding, MeshShape, Sharding, ShardingError

# Per tensor dim, the mesh axes; shorter than the rank = trailing dims replicated.
Spec = tuple[DimSharding, ...]


class PlanError(ValueError):
    """A plan that cannot be read or cannot apply; the message names the thing and the fix.

    Attributes:
      tensor: the tensor concerned ('' when none).
      detail: the message without its 'where' prefix, so a loader can prefix its own file name.
    """

    def __init__(self, message: str, *, tensor: str = "", detail: str = ""):
        super().__init__(message)
        self.tensor = tensor
        self.detail = detail or message


class Unmatched(enum.Enum):
    """What a param that no rule matches gets."""

    REPLICATE = "replicate"
    ERROR = "error"


class OptimizerState(enum.Enum):
    """How optimizer-state leaves get their sharding."""

    # A leaf '.../<param path>' of the param's shape takes the param's sharding.
    FOLLOW_PARAMS = "follow_params"
    EXPLICIT = "explicit"  # `Plan.opt_state_rules`, unmatched leaves replicated


# --------------------------------------------------------------------------------------------- specs


def normalize_spec(entries: Sequence[Any]) -> Spec:
    """PartitionSpec-like entries (None, 'axis' or a sequence of axes per dim) as a Spec.

    Raises:
      PlanError: an entry is neither None, a string nor a sequence of strings.
    """
    if isinstance(entries, str) or not isinstance(entries, Sequence):
        raise PlanError(f"spec {entries!r} is not a list; write one entry per dim, e.g. [null, model].")
    out = []
    for i, entry in enumerate(entries):
        if entry is None:
            out.append(())
        elif isinstance(entry, str):
            out.append((entry,))
        elif isinstance(entry, Sequence) and all(isinstance(a, str) for a in entry):
            out.append(tuple(entry))
        else:
            raise PlanError(
                f"spec entry for dim {i} is {entry!r}; write null, a mesh axis name, or a list of mesh axis names."
            )
    return tuple(out)


def spec_entries(spec: Spec) -> list[Any]:
    """A Spec in its written form: null, 'axis' or [a, b] per dim (the YAML and PartitionSpec form)."""
    return [None if not d else d[0] if len(d) == 1 else list(d) for d in spec]


def quote(text: str) -> str:
    """A YAML single-quoted scalar: backslashes stay single, so regexes read as written."""
    return "'" + text.replace("'", "''") + "'"


def format_spec(spec: Spec) -> str:
    """A Spec as flow YAML, e.g. '[null, model]' or '[[data, fsdp], model]'."""

    def one(d: DimSharding) -> str:
        return "null" if not d else d[0] if len(d) == 1 else "[" + ", ".join(d) + "]"

    return "[" + ", ".join(one(d) for d in spec) + "]"


def trimmed(sharding: Sharding) -> Spec:
    """The sharding's dims without trailing replicated dims (the shortest Spec that gives it)."""
    dims = list(sharding.dims)
    while dims and not dims[-1]:
        dims.pop()
    return tuple(dims)


def axis_hint(axis: str, mesh: MeshShape) -> str:
    """'did you mean ...?' for a misspelt mesh axis, else the list to choose from."""
    close = difflib.get_close_matches(axis, mesh.axes, n=1)
    return f"did you mean {close[0]!r}?" if close else f"use one of {list(mesh.axes)}."


@functools.lru_cache(maxsize=4096)
def compile_pattern(pattern: str) -> re.Pattern[str]:
    """The compiled regex of a rule or tactic; a bad one raises PlanError naming it and the fix."""
    try:
        return re.compile(pattern)
    except re.error as e:
        raise PlanError(
            f"bad regex {quote(pattern)} ({e}); fix the pattern, escaping literal characters such as "
            "'(' or '.' with a backslash."
        ) from None


@dataclasses.dataclass(frozen=True, slots=True)
class Rule:
    """A regex over full value names and the sharding it gives, like one Flax partition rule.

    The regex must match the whole name (`re.fullmatch`), so 'params/.*/kernel' never catches
    'opt_state/...'. Specs shorter than a tensor's rank leave the trailing dims replicated.

    Attributes:
      pattern: the regex.
      spec: per dim, the mesh axes (major to minor); () = replicated.
    """

    pattern: str
    spec: Spec = ()

    def __post_init__(self):
        object.__setattr__(self, "spec", normalize_spec(self.spec))
        compile_pattern(self.pattern)
        seen: set[str] = set()
        for axis in (a for d in self.spec for a in d):
            if axis in seen:
                detail = f"{self} uses mesh axis {axis!r} twice; shard each mesh axis over at most one dim."
                raise PlanError(f"rule {detail}", detail=detail)
            seen.add(axis)

    def matches(self, name: str) -> bool:
        return compile_pattern(self.pattern).fullmatch(name) is not None

    def sharding(self, rank: int) -> Sharding:
        """The sharding for a tensor of `rank` (a spec longer than the rank fails `Sharding.check`)."""
        return Sharding(self.spec + ((),) * max(0, rank - len(self.spec)))

    def __str__(self) -> str:
        return f"{{match: {quote(self.pattern)}, spec: {format_spec(self.spec)}}}"


def first_match(rules: Sequence[Rule], name: str) -> tuple[int, Rule] | None:
    for i, rule in enumerate(rules):
        if rule.matches(name):
            return i, rule
    return None


# ------------------------------------------------------------------------------------ frozen mappings


class FrozenMap(Mapping[str, Any]):
    """An immutable, hashable, insertion-ordered mapping (for the free-form sections of a Plan)."""

    __slots__ = ("_d",)

    def __init__(self, items: Mapping[str, Any] | Sequence[tuple[str, Any]] = ()):
        object.__setattr__(self, "_d", dict(items))

    def __getitem__(self, key: str) -> Any:
        return self._d[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __hash__(self) -> int:
        return hash(frozenset(self._d.items()))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("FrozenMap is immutable")

    def __repr__(self) -> str:
        return f"FrozenMap({self._d!r})"


def freeze(obj: Any) -> Any:
    """Mappings → FrozenMap, lists/tuples → tuples, numpy scalars → Python scalars, recursively."""
    if isinstance(obj, Mapping):
        return FrozenMap((str(k), freeze(v)) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return tuple(freeze(v) for v in obj)
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "shape", None) == ():
        return obj.item()
    return obj


def thaw(obj: Any) -> Any:
    """The inverse of `freeze` into plain dicts and lists (what YAML writes)."""
    if isinstance(obj, Mapping):
        return {k: thaw(v) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return [thaw(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------------------ the plan


@functools.cache
def tool_version() -> str:
    """The installed auto-partition version ('0+unknown' when run from a source tree)."""
    from importlib import metadata

    try:
        return metadata.version("auto-partition")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@dataclasses.dataclass(frozen=True, slots=True)
class Provenance:
    """Where a plan came from.

    Attributes:
      tool_version: auto-partition version that wrote it.
      fingerprint: `Workload.fingerprint()` of the model (hash of input paths, shapes, dtypes).
      workload: how to rebuild the model: 'builtin:gpt:tiny', 'hf:hf-gpt2:tiny' or 'pkg.mod:fn'.
      hardware: hardware preset name, e.g. 'h100'.
      searcher: searcher or strategy, e.g. 'mcts' or 'baseline:fsdp_tp'.
      seed: the searcher's seed, None when not seeded.
      solver_status: 'optimal', 'feasible', ... ('' when not from a solver).
      unruled_primitives: primitives that fell back to the conservative rule.
    """

    tool_version: str = dataclasses.field(default_factory=tool_version)
    fingerprint: str = ""
    workload: str = ""
    hardware: str = ""
    searcher: str = ""
    seed: int | None = None
    solver_status: str = ""
    unruled_primitives: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "unruled_primitives", tuple(self.unruled_primitives))


_SECTIONS = ("params", "data", "opt_state_rules", "activations")
_SECTION_TITLES = {"opt_state_rules": "optimizer_state"}


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """How every input and named intermediate of a step is sharded over a mesh.

    Rules are ordered, first match wins, and match whole value names ('params/layers_3/attn/q/kernel').

    Attributes:
      mesh: axis names, sizes and link kinds.
      params: rules for PARAM inputs.
      unmatched: what a param that no rule matches gets.
      data: rules for BATCH inputs (unmatched → replicated).
      optimizer_state: follow the params, or use `opt_state_rules`.
      opt_state_rules: rules for OPT_STATE inputs when explicit (unmatched → replicated).
      activations: constraints on named intermediates ('activations/<name>/<occurrence>').
      logical_axis_rules: MaxText/Flax `(logical axis, mesh axes)` pairs, for users of those frameworks.
      tactics: the tactics that produced the plan, as written (provenance only).
      predicted: free-form predicted costs (seconds, bytes, ...).
      measured: free-form measurements filled by verification.
      provenance: where the plan came from.
    """

    mesh: MeshShape
    params: tuple[Rule, ...] = ()
    unmatched: Unmatched = Unmatched.REPLICATE
    data: tuple[Rule, ...] = ()
    optimizer_state: OptimizerState = OptimizerState.FOLLOW_PARAMS
    opt_state_rules: tuple[Rule, ...] = ()
    activations: tuple[Rule, ...] = ()
    logical_axis_rules: tuple[tuple[str, DimSharding], ...] = ()
    tactics: tuple[Mapping[str, Any], ...] = ()
    predicted: Mapping[str, Any] = FrozenMap()
    measured: Mapping[str, Any] = FrozenMap()
    provenance: Provenance = Provenance(tool_version="")

    def __post_init__(self):
        for section in _SECTIONS:
            object.__setattr__(self, section, tuple(getattr(self, section)))
        object.__setattr__(
            self,
            "logical_axis_rules",
            tuple((name, normalize_spec([axes])[0]) for name, axes in self.logical_axis_rules),
        )
        for field in ("tactics", "predicted", "measured"):
            object.__setattr__(self, field, freeze(getattr(self, field)))
        if self.optimizer_state is OptimizerState.FOLLOW_PARAMS and self.opt_state_rules:
            _fail(
                "optimizer_state is follow_params but opt_state_rules are given; drop the rules or "
                "make optimizer_state explicit."
            )
        for section in _SECTIONS:
            for i, rule in enumerate(getattr(self, section)):
                for axis in (a for d in rule.spec for a in d):
                    if axis not in self.mesh.axes:
                        title = _SECTION_TITLES.get(section, section)
                        _fail(
                            f"{title} rule {i + 1} {rule} names mesh axis {axis!r}, but the mesh has "
                            f"axes {list(self.mesh.axes)}; {axis_hint(axis, self.mesh)}"
                        )
        for name, axes in self.logical_axis_rules:
            for axis in axes:
                if axis not in self.mesh.axes:
                    _fail(
                        f"logical_axis_rules entry {name!r} names mesh axis {axis!r}, but the mesh has "
                        f"axes {list(self.mesh.axes)}; {axis_hint(axis, self.mesh)}"
                    )

    # ------------------------------------------------------------------------------------ lookups

    def input_sharding(self, value: Value, *, params: Mapping[str, Value | None] | None = None) -> Sharding:
        """The sharding of one input, by its role.

        PARAM → `params` rules; OPT_STATE → the followed param or `opt_state_rules`; BATCH → `data`
        rules; anything else replicated.

        Args:
          value: the input.
          params: `param_index(graph)`, which makes follow_params exact (a leaf follows the param whose
            path ends its name and whose shape equals its own). Without it, a leaf follows the first
            params rule that matches 'params/<a suffix of its name>', longest suffix first.

        Raises:
          PlanError: no rule matches a param and `unmatched` is ERROR, or the sharding does not fit
            the tensor (the message names the tensor, dim, axis and the rule).
        """
        return self._input_sharding(value, params, {})

    def input_shardings(self, graph: Graph) -> dict[int, Sharding]:
        """The sharding of every input of `graph`, by value id (O(inputs × rules))."""
        index = param_index(graph)
        cache: dict[str, Sharding] = {}
        return {vid: self._input_sharding(graph.values[vid], index, cache) for vid in graph.inputs}

    def activation_sharding(self, name: str, shape: Sequence[int]) -> Sharding | None:
        """The constraint on a named intermediate, or None when the plan leaves it to propagation."""
        hit = first_match(self.activations, name)
        if hit is None:
            return None
        return self._checked("activations", hit, name, tuple(shape))

    def _input_sharding(
        self, value: Value, index: Mapping[str, Value | None] | None, cache: dict[str, Sharding]
    ) -> Sharding:
        if value.role is Role.PARAM:
            return self._param_sharding(value.name, value.shape, cache)
        if value.role is Role.OPT_STATE:
            if self.optimizer_state is OptimizerState.EXPLICIT:
                return self._ruled("optimizer_state", self.opt_state_rules, value)
            followed = self._follow(value, index, cache)
            return followed if followed is not None else Sharding.replicated(value.rank)
        if value.role is Role.BATCH:
            return self._ruled("data", self.data, value)
        return Sharding.replicated(value.rank)

    def _param_sharding(self, name: str, shape: tuple[int, ...], cache: dict[str, Sharding]) -> Sharding:
        if name in cache:
            return cache[name]
        hit = first_match(self.params, name)
        if hit is None:
            if self.unmatched is Unmatched.ERROR:
                _fail(
                    f"{name}: no params rule matches this tensor and the plan says unmatched: error; "
                    f"add a rule such as {Rule(re.escape(name), ())} or set params.unmatched: replicate.",
                    tensor=name,
                )
            out = Sharding.replicated(len(shape))
        else:
            out = self._checked("params", hit, name, shape)
        cache[name] = out
        return out

    def _ruled(self, section: str, rules: tuple[Rule, ...], value: Value) -> Sharding:
        hit = first_match(rules, value.name)
        if hit is None:
            return Sharding.replicated(value.rank)
        return self._checked(section, hit, value.name, value.shape)

    def _checked(self, section: str, hit: tuple[int, Rule], name: str, shape: tuple[int, ...]) -> Sharding:
        i, rule = hit
        sharding = rule.sharding(len(shape))
        try:
            sharding.check(shape, self.mesh, name)
        except ShardingError as e:
            origin = f"set by {section} rule {i + 1} {rule}"
            _fail(f"{e.problem} ({origin}). {e.fix}" if e.fix else f"{e} ({origin})", tensor=name)
        return sharding

    def _follow(
        self, value: Value, index: Mapping[str, Value | None] | None, cache: dict[str, Sharding]
    ) -> Sharding | None:
        parts = value.name.split("/")
        suffixes = ("/".join(parts[k:]) for k in range(1, len(parts)))
        if index is None:
            for suffix in suffixes:
                hit = first_match(self.params, f"params/{suffix}")
                if hit is not None and len(hit[1].spec) <= value.rank:
                    return self._checked("params", hit, value.name, value.shape)
            return None
        param = followed_param(value, index)
        return None if param is None else self._param_sharding(param.name, param.shape, cache)

    # ---------------------------------------------------------------------------------- building

    @classmethod
    def from_shardings(
        cls,
        mesh: MeshShape,
        graph: Graph,
        shardings: Mapping[str, Sharding],
        activations: Mapping[str, Sharding] | None = None,
        *,
        unmatched: Unmatched = Unmatched.REPLICATE,
        tactics: Sequence[Mapping[str, Any]] = (),
        predicted: Mapping[str, Any] | None = None,
        measured: Mapping[str, Any] | None = None,
        provenance: Provenance | None = None,
    ) -> Plan:
        """A compact, readable Plan that gives each input exactly the given sharding.

        Layer indices in names ('layers_12', '/h/3/', '/layer/7/') are generalised to '\\d+', tensors
        that then share a pattern and a sharding share one rule, sibling rules with equal specs merge
        into alternations ('attn/(q|k|v)/kernel'), and a few exceptions keep exact-name rules ahead
        of the general ones. `plan.input_shardings(graph)` reproduces every sharding exactly.

        Args:
          mesh: the mesh.
          graph: the traced step; its inputs are the tensors the plan covers.
          shardings: input name → sharding; inputs not named are replicated.
          activations: 'activations/<name>/<occurrence>' → constraint; others stay unconstrained.
          unmatched: REPLICATE (replicated params need no rule) or ERROR (every param gets a rule).
          tactics, predicted, measured, provenance: copied into the plan.

        Raises:
          PlanError: a name that is not an input, a sharding that does not fit its tensor, a
            non-replicated input of role INPUT, or a pending partial sum.
        """
        inputs = {v.name: v for v in graph.input_values()}
        acts = activation_values(graph)
        for name, sharding in shardings.items():
            if name not in inputs:
                close = difflib.get_close_matches(name, list(inputs), n=1)
                hint = f"did you mean {close[0]!r}?" if close else "name graph inputs only."
                _fail(f"{name!r} is not an input of this graph; {hint}", tensor=name)
            _check_given(sharding, inputs[name].shape, mesh, name)
            if inputs[name].role not in (Role.PARAM, Role.OPT_STATE, Role.BATCH) and sharding.used_axes:
                _fail(
                    f"{name} has role {inputs[name].role.value!r}, which a plan always replicates; "
                    "leave it out or give it a params, optimizer-state or batch name.",
                    tensor=name,
                )
        act_targets: dict[str, Spec | None] = dict.fromkeys(acts)
        for name, sharding in (activations or {}).items():
            if name in acts:
                _check_given(sharding, acts[name].shape, mesh, name)
            act_targets[name] = trimmed(sharding)

        def targets(role: Role) -> dict[str, Spec | None]:
            return {
                n: trimmed(shardings[n]) if n in shardings else ()
                for n, v in inputs.items()
                if v.role is role
            }

        replicate = unmatched is Unmatched.REPLICATE
        plan = cls(
            mesh,
            params=_rules(compact_patterns(targets(Role.PARAM), fallback=() if replicate else None)),
            unmatched=unmatched,
            data=_rules(compact_patterns(targets(Role.BATCH), fallback=())),
            activations=_rules(compact_patterns(act_targets, fallback=None)),
            tactics=tuple(tactics),
            predicted=predicted or {},
            measured=measured or {},
            provenance=provenance or Provenance(),
        )
        opt = targets(Role.OPT_STATE)
        index = param_index(graph)
        cache: dict[str, Sharding] = {}
        if any(trimmed(plan._input_sharding(inputs[n], index, cache)) != t for n, t in opt.items()):
            plan = dataclasses.replace(
                plan,
                optimizer_state=OptimizerState.EXPLICIT,
                opt_state_rules=_rules(compact_patterns(opt, fallback=())),
            )
        return plan


def _rules(pairs: list[tuple[str, Spec]]) -> tuple[Rule, ...]:
    return tuple(Rule(p, s) for p, s in pairs)


def _check_given(sharding: Sharding, shape: tuple[int, ...], mesh: MeshShape, name: str) -> None:
    if sharding.partial:
        _fail(
            f"{name}: a plan cannot hold a pending partial sum (over {sorted(sharding.partial)}); "
            "reduce it before it becomes an input or a named constraint.",
            tensor=name,
        )
    try:
        sharding.check(shape, mesh, name)
    except ShardingError as e:
        raise PlanError(str(e), tensor=name) from None


def _fail(detail: str, *, tensor: str = "") -> None:
    raise PlanError(f"plan: {detail}" if not tensor else detail, tensor=tensor, detail=detail)


# --------------------------------------------------------------------------------- graph helpers


def param_index(graph: Graph | Sequence[Value]) -> dict[str, Value | None]:
    """Every proper '/'-suffix of every PARAM input's name → that param (None when several share it).

    'params/layers_3/attn/q/kernel' is found under 'layers_3/attn/q/kernel', 'attn/q/kernel', ...,
    so an optimizer leaf 'opt_state/0/mu/layers_3/attn/q/kernel' finds it by its longest suffix.
    """
    values = graph.input_values() if isinstance(graph, Graph) else graph
    index: dict[str, Value | None] = {}
    for v in values:
        if v.role is not Role.PARAM:
            continue
        parts = v.name.split("/")
        for k in range(1, len(parts)):
            suffix = "/".join(parts[k:])
            index[suffix] = v if suffix not in index else None
    return index


def followed_param(value: Value, index: Mapping[str, Value | None]) -> Value | None:
    """The param an optimizer-state leaf follows under follow_params: the one `param_index` finds
    by the leaf's longest name suffix, if that suffix is unambiguous and the shapes are equal
    (a factored statistic of another shape follows nothing)."""
    parts = value.name.split("/")
    for k in range(1, len(parts)):
        suffix = "/".join(parts[k:])
        if suffix in index:
            param = index[suffix]
            return param if param is not None and param.shape == value.shape else None
    return None


def activation_values(graph: Graph) -> dict[str, Value]:
    """Named intermediates ('activations/...') of the graph and its nested bodies, first occurrence."""
    out: dict[str, Value] = {}

    def visit(g: Graph) -> None:
        for v in g.values:
            if v.name.startswith("activations/"):
                out.setdefault(v.name, v)
        for op in g.ops:
            for body in op.body:
                visit(body)

    visit(graph)
    return out

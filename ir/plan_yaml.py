"""The plan file: Plan ⇄ YAML (`apiVersion: auto-partition/v1`), validated on load with one-line errors."""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Mapping
from typing import Any

import yaml

from ir.plan import (
    FrozenMap,
    OptimizerState,
    Plan,
    PlanError,
    Provenance,
    Rule,
    Spec,
    Unmatched,
    compile_pattern,
    normalize_spec,
    quote,
    spec_entries,
    thaw,
)
from ir.sharding import LinkKind, MeshShape, ShardingError

API_VERSION = "auto-partition/v1"
KIND = "Plan"

# Top-level keys in the order a person reads them: what, where, how, why.
_TOP_KEYS = (
    "apiVersion",
    "kind",
    "mesh",
    "params",
    "data",
    "optimizer_state",
    "activations",
    "logical_axis_rules",
    "tactics",
    "predicted",
    "measured",
    "provenance",
)
_REQUIRED_TOP = ("apiVersion", "kind", "mesh")
_MESH_KEYS = ("axes", "shape", "links")
_MESH_EXAMPLES = {"axes": "axes: [data, model]", "shape": "shape: [2, 4]"}
_RULE_KEYS = ("match", "spec")
_PROVENANCE_KEYS = (
    "tool_version",
    "fingerprint",
    "workload",
    "hardware",
    "searcher",
    "seed",
    "solver_status",
    "unruled_primitives",
)


# ------------------------------------------------------------------------------------------- writing


class _Flow(list):
    """A list written in flow style: `[data, model]`."""


class _FlowMap(dict):
    """A mapping written in flow style: `{batch: data}`."""


class _Dumper(yaml.SafeDumper):
    """Block style with indented sequences; `_Flow`/`_FlowMap` inline; no line folding."""

    def increase_indent(self, flow: bool = False, indentless: bool = False):
        return super().increase_indent(flow, False)


_Dumper.add_representer(_Flow, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))
_Dumper.add_representer(
    _FlowMap, lambda d, v: d.represent_mapping("tag:yaml.org,2002:map", v.items(), flow_style=True)
)
_Dumper.add_representer(
    dict, lambda d, v: d.represent_mapping("tag:yaml.org,2002:map", v.items(), flow_style=False)
)


def _flow(obj: Any) -> Any:
    """Lists of scalars (and mappings inside them) inline; block style for the rest."""
    if isinstance(obj, dict):
        return {k: _flow(v) for k, v in obj.items()}
    if isinstance(obj, list):
        if all(not isinstance(v, dict | list) or (isinstance(v, list) and not _has_dict(v)) for v in obj):
            return _Flow(_flow_all(v) for v in obj)
        return [_flow(v) for v in obj]
    return obj


def _has_dict(obj: Any) -> bool:
    return isinstance(obj, dict) or (isinstance(obj, list) and any(_has_dict(v) for v in obj))


def _flow_all(obj: Any) -> Any:
    if isinstance(obj, dict):
        return _FlowMap((k, _flow_all(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return _Flow(_flow_all(v) for v in obj)
    return obj


def _rules_doc(rules: tuple[Rule, ...]) -> list[dict[str, Any]]:
    return [{"match": r.pattern, "spec": _Flow(_flow_all(spec_entries(r.spec)))} for r in rules]


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """The plan as plain YAML-ready data, keys in reading order."""
    mesh = plan.mesh
    prov = plan.provenance
    doc: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "mesh": {"axes": list(mesh.axes), "shape": list(mesh.shape), "links": [k.value for k in mesh.links]},
        "params": {"rules": _rules_doc(plan.params), "unmatched": plan.unmatched.value},
        "data": {"rules": _rules_doc(plan.data)},
        "optimizer_state": (
            OptimizerState.FOLLOW_PARAMS.value
            if plan.optimizer_state is OptimizerState.FOLLOW_PARAMS
            else {"rules": _rules_doc(plan.opt_state_rules)}
        ),
        "activations": {"rules": _rules_doc(plan.activations)},
        "logical_axis_rules": [_Flow([n, *spec_entries((axes,))]) for n, axes in plan.logical_axis_rules],
        "tactics": [_flow_all(thaw(t)) for t in plan.tactics],
        "predicted": thaw(plan.predicted),
        "measured": thaw(plan.measured),
        "provenance": {
            "tool_version": prov.tool_version,
            "fingerprint": prov.fingerprint,
            "workload": prov.workload,
            "hardware": prov.hardware,
            "searcher": prov.searcher,
            "seed": prov.seed,
            "solver_status": prov.solver_status,
            "unruled_primitives": list(prov.unruled_primitives),
        },
    }
    return doc


def plan_to_yaml(plan: Plan) -> str:
    """The plan file text: block style, human reading order, specs inline (`spec: [null, model]`)."""
    doc = {
        k: (
            _flow(v)
            if k not in ("params", "data", "optimizer_state", "activations", "logical_axis_rules", "tactics")
            else v
        )
        for k, v in plan_to_dict(plan).items()
    }
    return yaml.dump(
        doc, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1 << 20, default_flow_style=False
    )


def save_plan_file(plan: Plan, path: str | os.PathLike[str]) -> None:
    """Writes `plan_to_yaml(plan)` to `path`."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(plan_to_yaml(plan))


# ------------------------------------------------------------------------------------------- reading


def load_plan_file(path: str | os.PathLike[str]) -> Plan:
    """Reads and validates a plan file; errors name the file (by its base name)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise PlanError(
            f"plan file {os.fspath(path)!r} does not exist; check the path, or write a plan with "
            "auto-partition baselines MODEL --mesh data=2,model=4 --save DIR."
        ) from None
    except IsADirectoryError:
        raise PlanError(
            f"plan file {os.fspath(path)!r} is a directory; name a .yaml file inside it."
        ) from None
    return plan_from_yaml(text, source=os.path.basename(os.fspath(path)))


def plan_from_yaml(text: str, *, source: str = "plan.yaml") -> Plan:
    """Parses and validates plan text.

    Args:
      text: the YAML.
      source: the file name used in error messages.

    Raises:
      PlanError: one line naming the key, rule or axis at fault and the fix.
    """
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "syntax error"
        raise PlanError(f"{source} is not valid YAML{where} ({problem}); fix the syntax there.") from None
    return plan_from_dict(doc, source=source)


def plan_from_dict(doc: Any, *, source: str = "plan.yaml") -> Plan:
    """Builds a Plan from the parsed YAML document (see `plan_from_yaml`)."""
    if not isinstance(doc, Mapping):
        raise PlanError(
            f"{source} must hold a mapping with apiVersion, kind and mesh; it holds "
            f"{type(doc).__name__}. Start the file with apiVersion: {API_VERSION}"
        )
    _known_keys(doc, _TOP_KEYS, source, "")
    for key in _REQUIRED_TOP:
        if key not in doc:
            example = {
                "apiVersion": f"apiVersion: {API_VERSION}",
                "kind": f"kind: {KIND}",
                "mesh": "mesh: {axes: [data, model], shape: [2, 4]}",
            }[key]
            raise PlanError(f"{source} is missing key {key!r}; add e.g. {example}")
    if doc["apiVersion"] != API_VERSION:
        raise PlanError(
            f"{source} has apiVersion {doc['apiVersion']!r}, but this tool reads "
            f"{API_VERSION}; write apiVersion: {API_VERSION} or re-export the plan."
        )
    if doc["kind"] != KIND:
        raise PlanError(f"{source} has kind {doc['kind']!r}; a plan file has kind: {KIND}.")
    mesh = _mesh(doc["mesh"], source)

    params = _section(doc, "params", ("rules", "unmatched"), source)
    unmatched_text = params.get("unmatched", Unmatched.REPLICATE.value)
    unmatched = _enum(Unmatched, unmatched_text, source, "params.unmatched")
    data = _section(doc, "data", ("rules",), source)
    acts = _section(doc, "activations", ("rules",), source)

    opt = doc.get("optimizer_state", OptimizerState.FOLLOW_PARAMS.value)
    if opt == OptimizerState.FOLLOW_PARAMS.value:
        opt_mode, opt_rules = OptimizerState.FOLLOW_PARAMS, ()
    elif isinstance(opt, Mapping):
        _known_keys(opt, ("rules",), source, "optimizer_state")
        opt_mode, opt_rules = OptimizerState.EXPLICIT, _rules(opt.get("rules"), source, "optimizer_state")
    else:
        raise PlanError(
            f"{source}: optimizer_state is {opt!r}; write optimizer_state: follow_params or "
            "optimizer_state: {rules: [...]}."
        )

    fields = {
        "params": _rules(params.get("rules"), source, "params"),
        "unmatched": unmatched,
        "data": _rules(data.get("rules"), source, "data"),
        "optimizer_state": opt_mode,
        "opt_state_rules": opt_rules,
        "activations": _rules(acts.get("rules"), source, "activations"),
        "logical_axis_rules": _logical(doc.get("logical_axis_rules"), source),
        "tactics": _list(doc.get("tactics"), source, "tactics"),
        "predicted": _mapping(doc.get("predicted"), source, "predicted"),
        "measured": _mapping(doc.get("measured"), source, "measured"),
        "provenance": _provenance(doc.get("provenance"), source),
    }
    try:
        return Plan(mesh, **fields)
    except PlanError as e:
        raise PlanError(f"{source}: {e.detail}", tensor=e.tensor, detail=e.detail) from None


def check_fingerprint(
    plan: Plan,
    fingerprint: str,
    allow_mismatch: bool = False,
    *,
    source: str = "plan.yaml",
    model: str = "",
    remedy: str = "pass --allow-fingerprint-mismatch",
) -> None:
    """Raises PlanError when the plan was made for a model with other input names, shapes or dtypes.

    A plan without a recorded fingerprint (hand-written) passes.

    Args:
      plan: the plan.
      fingerprint: `Workload.fingerprint()` of the model it is about to apply to.
      allow_mismatch: apply it anyway.
      source: the plan's file name, for the message.
      model: the model's source ('builtin:gpt:tiny', ...), for the message.
      remedy: how the caller allows a mismatch (a CLI flag or a keyword argument).
    """
    made_for = plan.provenance.fingerprint
    if made_for and made_for != fingerprint and not allow_mismatch:
        plan_model = plan.provenance.workload
        made = (
            f"{plan_model} (fingerprint {made_for})" if plan_model else f"a model with fingerprint {made_for}"
        )
        given = f"the model given ({model})" if model else "the model given"
        raise PlanError(
            f"{source} was made for {made}, but {given} has fingerprint {fingerprint} (its input names, "
            f"shapes or dtypes differ); re-run the search for this model, or {remedy} to apply it anyway."
        )


# --------------------------------------------------------------------------------- section readers


def _known_keys(doc: Mapping[str, Any], valid: tuple[str, ...], source: str, section: str) -> None:
    where = f"{source} section {section!r}" if section else source
    for key in doc:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys are {', '.join(valid)}."
            raise PlanError(f"unknown key {key!r} in {where}; {hint}")


def _section(doc: Mapping[str, Any], name: str, keys: tuple[str, ...], source: str) -> Mapping[str, Any]:
    section = doc.get(name)
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise PlanError(
            f"{source}: section {name!r} must be a mapping such as {{rules: [...]}}; "
            f"it is {type(section).__name__}."
        )
    _known_keys(section, keys, source, name)
    return section


def _mesh(doc: Any, source: str) -> MeshShape:
    if not isinstance(doc, Mapping):
        raise PlanError(
            f"{source}: section 'mesh' must be a mapping; write e.g. "
            "mesh: {axes: [data, model], shape: [2, 4]}"
        )
    _known_keys(doc, _MESH_KEYS, source, "mesh")
    for key in ("axes", "shape"):
        if key not in doc:
            raise PlanError(
                f"{source}: section 'mesh' is missing key {key!r}; add e.g. {_MESH_EXAMPLES[key]}"
            )
    axes, shape = doc["axes"], doc["shape"]
    if not isinstance(axes, list) or not all(isinstance(a, str) for a in axes):
        raise PlanError(f"{source}: mesh.axes is {axes!r}; write a list of names, e.g. axes: [data, model]")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        raise PlanError(f"{source}: mesh.shape is {shape!r}; write a list of sizes, e.g. shape: [2, 4]")
    links_text = doc.get("links", [LinkKind.INTRA_NODE.value] * len(axes))
    if not isinstance(links_text, list):
        raise PlanError(
            f"{source}: mesh.links is {links_text!r}; write one of intra_node or inter_node "
            "per axis, e.g. links: [inter_node, intra_node]"
        )
    links = tuple(_enum(LinkKind, t, source, "mesh.links") for t in links_text)
    if len(links) != len(axes):
        raise PlanError(
            f"{source}: mesh has {len(axes)} axes but {len(links)} links; give one link kind per axis."
        )
    try:
        return MeshShape(tuple(axes), tuple(shape), links)
    except ShardingError as e:
        raise PlanError(f"{source}: section 'mesh': {e}") from None


def _enum(cls: type, text: Any, source: str, where: str) -> Any:
    for member in cls:
        if member.value == text:
            return member
    values = " or ".join(m.value for m in cls)
    raise PlanError(f"{source}: {where} is {text!r}; use {values}.")


def _rules(doc: Any, source: str, section: str) -> tuple[Rule, ...]:
    if doc is None:
        return ()
    if not isinstance(doc, list):
        raise PlanError(
            f"{source}: {section}.rules must be a list of {{match: REGEX, spec: [...]}}; it is "
            f"{type(doc).__name__}."
        )
    out = []
    for i, item in enumerate(doc, start=1):
        where = f"{section} rule {i}"
        if not isinstance(item, Mapping):
            raise PlanError(f"{source}: {where} is {item!r}; write {{match: REGEX, spec: [null, model]}}.")
        _known_keys(item, _RULE_KEYS, source, where)
        for key in _RULE_KEYS:
            if key not in item:
                example = "match: 'params/.*/kernel'" if key == "match" else "spec: [null, model]"
                raise PlanError(f"{source}: {where} is missing key {key!r}; add e.g. {example}")
        if not isinstance(item["match"], str):
            raise PlanError(f"{source}: {where} match is {item['match']!r}; write a regex string.")
        try:
            compile_pattern(item["match"])
        except PlanError as e:
            raise PlanError(f"{source}: {where} has a {e.detail}") from None
        try:
            spec: Spec = normalize_spec(item["spec"] if item["spec"] is not None else [])
        except PlanError as e:
            raise PlanError(f"{source}: {where} {{match: {quote(item['match'])}}}: {e.detail}") from None
        try:
            out.append(Rule(item["match"], spec))
        except PlanError as e:
            raise PlanError(f"{source}: {where} {e.detail}") from None
    return tuple(out)


def _logical(doc: Any, source: str) -> tuple[tuple[str, Any], ...]:
    if doc is None:
        return ()
    hint = "write pairs such as [[batch, data], [embed, null], [mlp, model]]"
    if not isinstance(doc, list):
        raise PlanError(f"{source}: logical_axis_rules must be a list; {hint}.")
    out = []
    for i, pair in enumerate(doc, start=1):
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
            raise PlanError(f"{source}: logical_axis_rules entry {i} is {pair!r}; {hint}.")
        try:
            out.append((pair[0], normalize_spec([pair[1]])[0]))
        except PlanError:
            raise PlanError(f"{source}: logical_axis_rules entry {i} is {pair!r}; {hint}.") from None
    return tuple(out)


def _list(doc: Any, source: str, name: str) -> tuple[Any, ...]:
    if doc is None:
        return ()
    if not isinstance(doc, list):
        raise PlanError(f"{source}: {name} must be a list; it is {type(doc).__name__}.")
    return tuple(doc)


def _mapping(doc: Any, source: str, name: str) -> Mapping[str, Any]:
    if doc is None:
        return FrozenMap()
    if not isinstance(doc, Mapping):
        raise PlanError(
            f"{source}: {name} must be a mapping of names to numbers; it is {type(doc).__name__}."
        )
    return doc


def _provenance(doc: Any, source: str) -> Provenance:
    doc = doc or {}
    if not isinstance(doc, Mapping):
        raise PlanError(f"{source}: provenance must be a mapping; it is {type(doc).__name__}.")
    _known_keys(doc, _PROVENANCE_KEYS, source, "provenance")
    text: Callable[[str], str] = lambda k: "" if doc.get(k) is None else str(doc[k])  # noqa: E731
    seed = doc.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise PlanError(f"{source}: provenance.seed is {seed!r}; write an integer or null.")
    unruled = doc.get("unruled_primitives") or []
    if not isinstance(unruled, list):
        raise PlanError(f"{source}: provenance.unruled_primitives must be a list of primitive names.")
    return Provenance(
        tool_version=text("tool_version"),
        fingerprint=text("fingerprint"),
        workload=text("workload"),
        hardware=text("hardware"),
        searcher=text("searcher"),
        seed=seed,
        solver_status=text("solver_status"),
        unruled_primitives=tuple(str(p) for p in unruled),
    )

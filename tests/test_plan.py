"""Plan lookups, compaction from per-tensor shardings, and the plan file (round trips, pinned errors)."""

from __future__ import annotations

import re

import pytest

from ir.graph import Graph, Role, Value
from ir.patterns import compact_patterns, name_pattern
from ir.plan import (
    OptimizerState,
    Plan,
    PlanError,
    Provenance,
    Rule,
    Unmatched,
    param_index,
)
from ir.plan_yaml import check_fingerprint, load_plan_file, plan_from_yaml, plan_to_yaml, save_plan_file
from ir.sharding import LinkKind, MeshShape, Sharding

MESH = MeshShape.parse("data=2,model=4")

LAYER_PARAMS = (
    ("attn/q/kernel", ("d", "hd")),
    ("attn/k/kernel", ("d", "hd")),
    ("attn/v/kernel", ("d", "hd")),
    ("attn/o/kernel", ("hd", "d")),
    ("mlp/w_in", ("d", "ff")),
    ("mlp/w_gate", ("d", "ff")),
    ("mlp/w_out", ("ff", "d")),
    ("ln1/scale", ("d",)),
    ("ln2/scale", ("d",)),
)
MOE_PARAMS = (
    ("moe/w_in", ("E", "d", "ff")),
    ("moe/w_out", ("E", "ff", "d")),
    ("moe/router/kernel", ("d", "E")),
)


def llama_graph(
    n_layers: int = 2,
    *,
    d: int = 64,
    hd: int = 64,
    ff: int = 128,
    vocab: int = 256,
    b: int = 8,
    s: int = 16,
    scanned: bool = False,
    experts: int = 0,
) -> Graph:
    """A hand-built Graph with a llama's inputs (params, Adam state, batch, step) and named activations."""
    sizes = {"d": d, "hd": hd, "ff": ff, "E": experts}
    layer = LAYER_PARAMS if not experts else LAYER_PARAMS[:4] + MOE_PARAMS + LAYER_PARAMS[7:]
    params = [("embed/embedding", (vocab, d))]
    for path, dims in layer:
        shape = tuple(sizes[x] for x in dims)
        if scanned:
            params.append((f"layers/{path}", (n_layers, *shape)))
        else:
            params += [(f"layers_{i}/{path}", shape) for i in range(n_layers)]
    if not scanned:  # graph order: layer by layer, like a flattened params tree
        params = params[:1] + sorted(params[1:], key=lambda p: int(p[0].split("/")[0][7:]))
    params += [("final_norm/scale", (d,)), ("lm_head/kernel", (d, vocab))]
    values: list[Value] = []

    def add(name: str, shape: tuple[int, ...], role: Role, dtype: str = "float32") -> None:
        values.append(Value(len(values), name, shape, dtype, role))

    for path, shape in params:
        add(f"params/{path}", shape, Role.PARAM)
    add("opt_state/0/count", (), Role.OPT_STATE, "int32")
    for moment in ("mu", "nu"):
        for path, shape in params:
            add(f"opt_state/0/{moment}/{path}", shape, Role.OPT_STATE)
    add("batch/tokens", (b, s), Role.BATCH, "int32")
    add("batch/targets", (b, s), Role.BATCH, "int32")
    add("step", (), Role.INPUT, "int32")
    add("rng", (2,), Role.INPUT, "uint32")
    n_inputs = len(values)
    for i in range(n_layers):
        for name in ("resid", "attn_in", "attn_out", "mlp_in", "mlp_out"):
            add(f"activations/{name}/{i}", (b, s, d), Role.ACTIVATION)
    return Graph(tuple(values), (), tuple(range(n_inputs)), ())


def by_name(graph: Graph, plan: Plan) -> dict[str, Sharding]:
    return {graph.values[i].name: s for i, s in plan.input_shardings(graph).items()}


def S(*entries) -> Sharding:
    return Sharding.from_spec(entries)


FSDP_TP_RULES = (
    Rule(r"params/layers_\d+/attn/(q|k|v)/kernel", ("data", "model")),
    Rule(r"params/layers_\d+/attn/o/kernel", ("model", "data")),
    Rule(r"params/layers_\d+/mlp/(w_in|w_gate)", ("data", "model")),
    Rule(r"params/layers_\d+/mlp/w_out", ("model", "data")),
    Rule(r"params/(embed/embedding|lm_head/kernel)", (("data", "model"),)),
)
FSDP_TP = Plan(MESH, params=FSDP_TP_RULES, data=(Rule(r"batch/.*", ("data",)),))


# ------------------------------------------------------------------------------------------ rules


def test_rule_normalises_and_prints_its_spec():
    rule = Rule(r"params/.*/kernel", (None, "model", ["data", "fsdp"]))
    assert rule.spec == ((), ("model",), ("data", "fsdp"))
    assert str(rule) == r"{match: 'params/.*/kernel', spec: [null, model, [data, fsdp]]}"
    assert rule.matches("params/layers_0/attn/q/kernel")
    assert not rule.matches("opt_state/0/mu/params/x/kernel")  # whole-name match
    assert rule.sharding(4).dims == ((), ("model",), ("data", "fsdp"), ())


@pytest.mark.parametrize(
    ("name", "role", "expected"),
    [
        ("params/layers_1/attn/q/kernel", Role.PARAM, S("data", "model")),
        ("params/layers_0/attn/o/kernel", Role.PARAM, S("model", "data")),
        ("params/embed/embedding", Role.PARAM, S(("data", "model"), None)),
        ("params/layers_0/ln1/scale", Role.PARAM, S(None)),
        ("opt_state/0/mu/layers_1/mlp/w_out", Role.OPT_STATE, S("model", "data")),
        ("opt_state/0/nu/lm_head/kernel", Role.OPT_STATE, S(("data", "model"), None)),
        ("opt_state/0/count", Role.OPT_STATE, Sharding(())),
        ("batch/tokens", Role.BATCH, S("data", None)),
        ("rng", Role.INPUT, S(None)),
    ],
)
def test_input_sharding_by_role(name, role, expected):
    graph = llama_graph()
    assert graph.value(name).role is role
    assert by_name(graph, FSDP_TP)[name] == expected
    assert FSDP_TP.input_sharding(graph.value(name), params=param_index(graph)) == expected


def test_follow_params_without_the_graph_matches_params_rules_by_suffix():
    graph = llama_graph()
    value = graph.value("opt_state/0/mu/layers_1/attn/q/kernel")
    assert FSDP_TP.input_sharding(value) == S("data", "model")
    assert FSDP_TP.input_sharding(graph.value("opt_state/0/count")) == Sharding(())


def test_follow_params_replicates_a_leaf_of_another_shape():
    graph = llama_graph()
    factored = Value(999, "opt_state/0/v_row/layers_0/attn/q/kernel", (64,), "float32", Role.OPT_STATE)
    assert FSDP_TP.input_sharding(factored, params=param_index(graph)) == S(None)
    assert graph.value("opt_state/0/mu/layers_0/attn/q/kernel").shape == (64, 64)


def test_explicit_optimizer_state_rules():
    plan = Plan(
        MESH,
        params=FSDP_TP_RULES,
        optimizer_state=OptimizerState.EXPLICIT,
        opt_state_rules=(Rule(r"opt_state/0/mu/.*kernel", ("data",)),),
    )
    got = by_name(llama_graph(), plan)
    assert got["opt_state/0/mu/layers_0/attn/q/kernel"] == S("data", None)
    assert got["opt_state/0/nu/layers_0/attn/q/kernel"] == S(None, None)


def test_activation_sharding():
    plan = Plan(MESH, activations=(Rule(r"activations/resid/\d+", ("data", "model")),))
    assert plan.activation_sharding("activations/resid/3", (8, 16, 64)) == S("data", "model", None)
    assert plan.activation_sharding("activations/mlp_in/3", (8, 16, 64)) is None


def test_unmatched_error_names_the_tensor_and_the_fix():
    plan = Plan(MESH, params=FSDP_TP_RULES, unmatched=Unmatched.ERROR)
    with pytest.raises(PlanError) as e:
        plan.input_shardings(llama_graph())
    assert str(e.value) == (
        "params/layers_0/ln1/scale: no params rule matches this tensor and the plan says unmatched: "
        "error; add a rule such as {match: 'params/layers_0/ln1/scale', spec: []} or set "
        "params.unmatched: replicate."
    )
    assert e.value.tensor == "params/layers_0/ln1/scale"


def test_indivisible_rule_names_tensor_dim_axis_and_rule():
    plan = Plan(MESH, params=(Rule(r"params/.*/w_in", (None, "model")),))
    with pytest.raises(PlanError) as e:
        plan.input_shardings(llama_graph(ff=126))
    assert str(e.value) == (
        "params/layers_0/mlp/w_in: dim 1 (size 126) is sharded over mesh axis 'model' (size 4), and 4 "
        "does not divide 126 (set by params rule 1 {match: 'params/.*/w_in', spec: [null, model]}). Use "
        "a mesh axis size that divides it, or leave this dim unsharded."
    )


def test_plan_rejects_an_axis_the_mesh_lacks():
    with pytest.raises(
        PlanError,
        match=re.escape(
            "plan: data rule 1 {match: 'batch/.*', spec: [dta]} names mesh axis 'dta', but the mesh has "
            "axes ['data', 'model']; did you mean 'data'?"
        ),
    ):
        Plan(MESH, data=(Rule("batch/.*", ("dta",)),))


def test_plan_is_hashable_and_freezes_free_form_sections():
    plan = Plan(MESH, tactics=({"batch": ["data"]},), predicted={"step_s": 1.5, "mem": {"peak": 3}})
    assert hash(plan) == hash(
        Plan(MESH, tactics=({"batch": ["data"]},), predicted={"step_s": 1.5, "mem": {"peak": 3}})
    )
    assert plan.tactics[0]["batch"] == ("data",)


# ------------------------------------------------------------------------------------- compaction


@pytest.mark.parametrize(
    ("name", "pattern"),
    [
        ("params/layers_12/attn/q/kernel", r"params/layers_\d+/attn/q/kernel"),
        ("params/transformer/h/11/mlp/c_fc/kernel", r"params/transformer/h/\d+/mlp/c_fc/kernel"),
        (
            "params/bert/encoder/layer/7/output/dense/kernel",
            r"params/bert/encoder/layer/\d+/output/dense/kernel",
        ),
        ("params/model/layers/3/self_attn/q_proj/kernel", r"params/model/layers/\d+/self_attn/q_proj/kernel"),
        ("activations/resid/4", r"activations/resid/\d+"),
        ("params/ln_f.scale", r"params/ln_f\.scale"),
        ("params/layers/mlp/w_in", "params/layers/mlp/w_in"),
    ],
)
def test_name_pattern(name, pattern):
    assert name_pattern(name) == pattern
    assert re.fullmatch(pattern, name)


def test_compact_patterns_golden():
    targets = {f"p/layers_{i}/{t}": ("x" if t != "o" or i == 0 else "y") for i in range(3) for t in "qko"}
    targets["p/head"] = None
    assert compact_patterns(targets) == [
        ("p/layers_0/o", "x"),
        (r"p/layers_\d+/(q|k)", "x"),
        (r"p/layers_\d+/o", "y"),
    ]


def _shardings_80_layers(graph: Graph) -> dict[str, Sharding]:
    return by_name(graph, FSDP_TP)


def test_from_shardings_compacts_80_layers_to_a_few_rules_and_round_trips():
    graph = llama_graph(80)
    assert sum(v.role is Role.PARAM for v in graph.input_values()) == 80 * 9 + 3
    shardings = _shardings_80_layers(graph)
    plan = Plan.from_shardings(MESH, graph, shardings)
    assert [str(r) for r in plan.params] == [
        r"{match: 'params/embed/embedding', spec: [[data, model]]}",
        r"{match: 'params/layers_\d+/attn/(q|k|v)/kernel', spec: [data, model]}",
        r"{match: 'params/layers_\d+/attn/o/kernel', spec: [model, data]}",
        r"{match: 'params/layers_\d+/mlp/(w_in|w_gate)', spec: [data, model]}",
        r"{match: 'params/layers_\d+/mlp/w_out', spec: [model, data]}",
        r"{match: 'params/lm_head/kernel', spec: [[data, model]]}",
    ]
    assert [str(r) for r in plan.data] == [r"{match: 'batch/(tokens|targets)', spec: [data]}"]
    assert plan.optimizer_state is OptimizerState.FOLLOW_PARAMS
    assert by_name(graph, plan) == shardings


def test_from_shardings_keeps_exceptions_ahead_of_the_general_rule():
    graph = llama_graph(80)
    shardings = _shardings_80_layers(graph)
    shardings["params/layers_7/attn/q/kernel"] = S("model", "data")
    shardings["params/layers_9/mlp/w_out"] = S(None, None)
    shardings["opt_state/0/mu/layers_9/mlp/w_out"] = S(None, None)
    shardings["opt_state/0/nu/layers_9/mlp/w_out"] = S(None, None)
    shardings["opt_state/0/mu/layers_7/attn/q/kernel"] = S("model", "data")
    shardings["opt_state/0/nu/layers_7/attn/q/kernel"] = S("model", "data")
    plan = Plan.from_shardings(MESH, graph, shardings)
    assert [str(r) for r in plan.params[:2]] == [
        "{match: 'params/layers_7/attn/q/kernel', spec: [model, data]}",
        "{match: 'params/layers_9/mlp/w_out', spec: []}",
    ]
    assert len(plan.params) == 8
    assert plan.optimizer_state is OptimizerState.FOLLOW_PARAMS
    assert by_name(graph, plan) == shardings


def test_from_shardings_goes_explicit_when_optimizer_state_differs_from_params():
    graph = llama_graph(4)
    shardings = _shardings_80_layers(graph)
    for name in list(shardings):
        if name.startswith("opt_state/0/nu/"):
            shardings[name] = Sharding.replicated(len(shardings[name].dims))
    plan = Plan.from_shardings(MESH, graph, shardings)
    assert plan.optimizer_state is OptimizerState.EXPLICIT
    assert all(r.pattern.startswith("opt_state/0/mu/") for r in plan.opt_state_rules)
    assert by_name(graph, plan) == shardings


def test_from_shardings_with_unmatched_error_gives_every_param_a_rule():
    graph = llama_graph(3)
    shardings = _shardings_80_layers(graph)
    plan = Plan.from_shardings(MESH, graph, shardings, unmatched=Unmatched.ERROR)
    assert r"{match: 'params/layers_\d+/(ln1|ln2)/scale', spec: []}" in [str(r) for r in plan.params]
    assert by_name(graph, plan) == shardings


def test_from_shardings_activations_leave_unnamed_occurrences_unconstrained():
    graph = llama_graph(4)
    acts = {f"activations/resid/{i}": S("data", "model", None) for i in range(4)}
    acts["activations/mlp_out/0"] = S("data", "model", None)
    plan = Plan.from_shardings(MESH, graph, {}, acts)
    assert [str(r) for r in plan.activations] == [
        "{match: 'activations/mlp_out/0', spec: [data, model]}",
        r"{match: 'activations/resid/\d+', spec: [data, model]}",
    ]
    for v in graph.values:
        if v.name.startswith("activations/"):
            expected = acts.get(v.name)
            got = plan.activation_sharding(v.name, v.shape)
            assert got == expected


@pytest.mark.parametrize(
    ("shardings", "message"),
    [
        (
            {"params/embed/embeding": S(None, None)},
            "'params/embed/embeding' is not an input of this graph; did you mean 'params/embed/embedding'?",
        ),
        (
            {"rng": S("data")},
            "rng has role 'input', which a plan always replicates; leave it out or give it a params, "
            "optimizer-state or batch name.",
        ),
        (
            {"params/lm_head/kernel": Sharding(((), ()), frozenset({"data"}))},
            "params/lm_head/kernel: a plan cannot hold a pending partial sum (over ['data']); reduce it "
            "before it becomes an input or a named constraint.",
        ),
        (
            {"params/lm_head/kernel": S(None, "modle")},
            "params/lm_head/kernel: dim 1 names unknown mesh axis 'modle'; the mesh has axes "
            "('data', 'model').",
        ),
    ],
)
def test_from_shardings_errors(shardings, message):
    with pytest.raises(PlanError) as e:
        Plan.from_shardings(MESH, llama_graph(), shardings)
    assert str(e.value) == message


# ------------------------------------------------------------------------------------------- YAML

GOLDEN = r"""apiVersion: auto-partition/v1
kind: Plan
mesh:
  axes: [data, model]
  shape: [2, 4]
  links: [inter_node, intra_node]
params:
  rules:
    - match: params/layers_\d+/attn/(q|k|v)/kernel
      spec: [data, model]
    - match: params/embed/embedding
      spec: [[data, model], null]
  unmatched: replicate
data:
  rules:
    - match: batch/.*
      spec: [data]
optimizer_state: follow_params
activations:
  rules:
    - match: activations/resid/\d+
      spec: [data, model]
logical_axis_rules:
  - [batch, data]
  - [embed, null]
  - [mlp, [data, model]]
tactics:
  - {batch: data}
  - {shard: params/.*attn.*/kernel, dim: -1, axis: model}
  - {auto: {searcher: mcts, axes: [model]}}
predicted:
  step_time_s: 0.0123
  peak_bytes: 1048576
  by_axis: [1.5, 2.0]
measured: {}
provenance:
  tool_version: 0.1.0
  fingerprint: 3f2a9c0d1e4b5a67
  workload: builtin:llama:tiny
  hardware: h100
  searcher: baseline:fsdp_tp
  seed: 0
  solver_status: feasible
  unruled_primitives: [custom_call]
"""

GOLDEN_PLAN = Plan(
    MeshShape(("data", "model"), (2, 4), (LinkKind.INTER_NODE, LinkKind.INTRA_NODE)),
    params=(
        Rule(r"params/layers_\d+/attn/(q|k|v)/kernel", ("data", "model")),
        Rule("params/embed/embedding", (("data", "model"), None)),
    ),
    data=(Rule("batch/.*", ("data",)),),
    activations=(Rule(r"activations/resid/\d+", ("data", "model")),),
    logical_axis_rules=(("batch", "data"), ("embed", None), ("mlp", ("data", "model"))),
    tactics=(
        {"batch": "data"},
        {"shard": "params/.*attn.*/kernel", "dim": -1, "axis": "model"},
        {"auto": {"searcher": "mcts", "axes": ["model"]}},
    ),
    predicted={"step_time_s": 0.0123, "peak_bytes": 1048576, "by_axis": [1.5, 2.0]},
    provenance=Provenance(
        tool_version="0.1.0",
        fingerprint="3f2a9c0d1e4b5a67",
        workload="builtin:llama:tiny",
        hardware="h100",
        searcher="baseline:fsdp_tp",
        seed=0,
        solver_status="feasible",
        unruled_primitives=("custom_call",),
    ),
)


def test_yaml_golden():
    assert plan_to_yaml(GOLDEN_PLAN) == GOLDEN
    assert plan_from_yaml(GOLDEN) == GOLDEN_PLAN


EXPLICIT_OPT = Plan(
    MESH,
    params=FSDP_TP_RULES,
    unmatched=Unmatched.ERROR,
    optimizer_state=OptimizerState.EXPLICIT,
    opt_state_rules=(Rule(r"opt_state/0/(mu|nu)/.*", ("data",)), Rule("opt_state/0/count", ())),
    measured={"step_time_s": float("inf"), "note": "yes", "n": None},
    provenance=Provenance(tool_version="", fingerprint="1234", seed=None),
)


@pytest.mark.parametrize("plan", [GOLDEN_PLAN, FSDP_TP, EXPLICIT_OPT, Plan(MESH)], ids=range(4))
def test_yaml_round_trips_exactly(plan):
    text = plan_to_yaml(plan)
    assert plan_from_yaml(text) == plan
    assert plan_to_yaml(plan_from_yaml(text)) == text


def test_plan_file_save_and_load(tmp_path):
    path = tmp_path / "plan.yaml"
    save_plan_file(EXPLICIT_OPT, path)
    assert load_plan_file(path) == EXPLICIT_OPT
    path2 = tmp_path / "mine.yaml"
    path2.write_text(GOLDEN.replace("apiVersion", "apiVersoin"))
    with pytest.raises(
        PlanError, match=re.escape("unknown key 'apiVersoin' in mine.yaml; did you mean 'apiVersion'?")
    ):
        load_plan_file(path2)


HEAD = "apiVersion: auto-partition/v1\nkind: Plan\nmesh:\n  axes: [data, model]\n  shape: [2, 4]\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            HEAD.replace("  shape: [2, 4]\n", ""),
            "plan.yaml: section 'mesh' is missing key 'shape'; add e.g. shape: [2, 4]",
        ),
        (HEAD + "parms: {}\n", "unknown key 'parms' in plan.yaml; did you mean 'params'?"),
        (
            HEAD + "params:\n  rulez: []\n",
            "unknown key 'rulez' in plan.yaml section 'params'; did you mean 'rules'?",
        ),
        (
            HEAD.replace("v1", "v2"),
            "plan.yaml has apiVersion 'auto-partition/v2', but this tool reads auto-partition/v1; write "
            "apiVersion: auto-partition/v1 or re-export the plan.",
        ),
        (
            HEAD.replace("apiVersion: auto-partition/v1\n", ""),
            "plan.yaml is missing key 'apiVersion'; add e.g. apiVersion: auto-partition/v1",
        ),
        (HEAD.replace("Plan", "Sweep"), "plan.yaml has kind 'Sweep'; a plan file has kind: Plan."),
        (
            HEAD + "params:\n  rules:\n    - {match: 'params/.*', spec: [modle]}\n",
            "plan.yaml: params rule 1 {match: 'params/.*', spec: [modle]} names mesh axis 'modle', but the "
            "mesh has axes ['data', 'model']; did you mean 'model'?",
        ),
        (
            HEAD + "params:\n  rules:\n    - {match: 'params/.*', spec: [data, data]}\n",
            "plan.yaml: params rule 1 {match: 'params/.*', spec: [data, data]} uses mesh axis 'data' twice; "
            "shard each mesh axis over at most one dim.",
        ),
        (
            HEAD + "data:\n  rules:\n    - {match: 'batch/(', spec: [data]}\n",
            "plan.yaml: data rule 1 has a bad regex 'batch/(' (missing ), unterminated subpattern at "
            "position 6); fix the pattern, escaping literal characters such as '(' or '.' with a backslash.",
        ),
        (
            HEAD + "params:\n  rules:\n    - {match: 'params/x', spec: [3]}\n",
            "plan.yaml: params rule 1 {match: 'params/x'}: spec entry for dim 0 is 3; write null, a mesh "
            "axis name, or a list of mesh axis names.",
        ),
        (
            HEAD + "params:\n  rules:\n    - {match: 'params/x'}\n",
            "plan.yaml: params rule 1 is missing key 'spec'; add e.g. spec: [null, model]",
        ),
        (
            HEAD + "params:\n  rules:\n    - {match: 'params/x', spce: []}\n",
            "unknown key 'spce' in plan.yaml section 'params rule 1'; did you mean 'spec'?",
        ),
        (
            HEAD + "params:\n  unmatched: fail\n",
            "plan.yaml: params.unmatched is 'fail'; use replicate or error.",
        ),
        (
            HEAD + "optimizer_state: follow\n",
            "plan.yaml: optimizer_state is 'follow'; write optimizer_state: follow_params or "
            "optimizer_state: {rules: [...]}.",
        ),
        (
            HEAD + "activations:\n  rules:\n    - {match: 'activations/resid/0', spec: [tensor]}\n",
            "plan.yaml: activations rule 1 {match: 'activations/resid/0', spec: [tensor]} names mesh axis "
            "'tensor', but the mesh has axes ['data', 'model']; use one of ['data', 'model'].",
        ),
        (
            HEAD.replace("[2, 4]", "[2, 4, 1]"),
            "plan.yaml: section 'mesh': mesh has 2 axis names but 3 sizes; give one size per axis, e.g. "
            "data=2,model=4.",
        ),
        (
            HEAD + "  links: [intra_node, nvlink]\n",
            "plan.yaml: mesh.links is 'nvlink'; use intra_node or inter_node.",
        ),
        (
            HEAD + "logical_axis_rules: [[batch, data, model]]\n",
            "plan.yaml: logical_axis_rules entry 1 is ['batch', 'data', 'model']; write pairs such as "
            "[[batch, data], [embed, null], [mlp, model]].",
        ),
        (
            HEAD + "logical_axis_rules: [[batch, dat]]\n",
            "plan.yaml: logical_axis_rules entry 'batch' names mesh axis 'dat', but the mesh has axes "
            "['data', 'model']; did you mean 'data'?",
        ),
        (
            HEAD + "provenance: {seed: abc}\n",
            "plan.yaml: provenance.seed is 'abc'; write an integer or null.",
        ),
        (
            "mesh: [\n",
            "plan.yaml is not valid YAML at line 2 (expected the node content, but found "
            "'<stream end>'); fix the syntax there.",
        ),
        (
            "- 1\n",
            "plan.yaml must hold a mapping with apiVersion, kind and mesh; it holds list. Start the "
            "file with apiVersion: auto-partition/v1",
        ),
    ],
)
def test_yaml_errors_are_pinned(text, message):
    with pytest.raises(PlanError) as e:
        plan_from_yaml(text)
    assert str(e.value) == message


def test_a_minimal_hand_written_plan_loads_with_defaults():
    plan = plan_from_yaml(
        HEAD + "params:\n  rules:\n    - {match: 'params/.*/kernel', spec: [null, model]}\n"
    )
    assert plan.unmatched is Unmatched.REPLICATE
    assert plan.optimizer_state is OptimizerState.FOLLOW_PARAMS
    assert plan.mesh.links == (LinkKind.INTRA_NODE,) * 2
    assert plan.provenance.tool_version == ""


def test_check_fingerprint():
    plan = Plan(MESH, provenance=Provenance(fingerprint="aaaa"))
    check_fingerprint(plan, "aaaa")
    check_fingerprint(plan, "bbbb", allow_mismatch=True)
    check_fingerprint(Plan(MESH), "bbbb")  # hand-written plans carry none
    with pytest.raises(PlanError) as e:
        check_fingerprint(plan, "bbbb")
    assert str(e.value) == (
        "plan.yaml was made for a model with fingerprint aaaa, but the model given has fingerprint bbbb "
        "(its input names, shapes or dtypes differ); re-run the search for this model, or pass "
        "--allow-fingerprint-mismatch to apply it anyway."
    )

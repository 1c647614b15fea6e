"""Tactics: parsing, composition into plans, pinned errors; the expert baselines built from them."""

from __future__ import annotations

import pytest

from ir.graph import Graph, Role, Value
from ir.plan import OptimizerState, Plan, Rule
from ir.plan_yaml import plan_from_yaml, plan_to_yaml
from ir.sharding import MeshShape, Sharding
from search.baselines import STRATEGIES, baseline_plans, mesh_roles
from search.tactics import (
    Auto,
    Batch,
    Constrain,
    Replicate,
    Shard,
    TacticError,
    apply_tactics,
    parse_tactics,
    tactics_to_yaml,
)
from tests.test_plan import by_name, llama_graph

MESH = MeshShape.parse("data=2,model=4")


def S(*entries) -> Sharding:
    return Sharding.from_spec(entries)


# ------------------------------------------------------------------------------------------ parsing

TACTICS_YAML = r"""
- {batch: data}
- {batch: [data, model]}
- {shard: 'params/.*attn.*/kernel', dim: -1, axis: model}
- {shard: 'params/embed/embedding', dim: 0, axis: [data, model]}
- {constrain: 'activations/resid/\d+', spec: [data, model]}
- {replicate: 'params/.*/scale'}
- {auto: {searcher: mcts, axes: [model]}}
- {auto: ilp}
"""
TACTICS = (
    Batch("data"),
    Batch(("data", "model")),
    Shard("params/.*attn.*/kernel", -1, "model"),
    Shard("params/embed/embedding", 0, ("data", "model")),
    Constrain(r"activations/resid/\d+", ("data", "model")),
    Replicate("params/.*/scale"),
    Auto("mcts", ("model",)),
    Auto("ilp"),
)


def test_parse_tactics_from_yaml_and_dicts():
    assert parse_tactics(TACTICS_YAML) == TACTICS
    assert parse_tactics([t.to_dict() for t in TACTICS]) == TACTICS
    assert parse_tactics(list(TACTICS)) == TACTICS
    assert parse_tactics(tactics_to_yaml(TACTICS)) == TACTICS


def test_tactics_print_as_flow_yaml():
    assert [str(t) for t in TACTICS] == [
        "{batch: data}",
        "{batch: [data, model]}",
        "{shard: 'params/.*attn.*/kernel', dim: -1, axis: model}",
        "{shard: 'params/embed/embedding', dim: 0, axis: [data, model]}",
        r"{constrain: 'activations/resid/\d+', spec: [data, model]}",
        "{replicate: 'params/.*/scale'}",
        "{auto: {searcher: mcts, axes: [model]}}",
        "{auto: {searcher: ilp}}",
    ]


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (
            [{"shrad": "x", "dim": 0, "axis": "model"}],
            "unknown tactic key 'shrad' in tactic 1 {shrad: x, dim: 0, axis: model}; did you mean 'shard'? "
            "known kinds are shard, batch, constrain, replicate, auto.",
        ),
        (
            [{"batch": "data"}, {"shard": "x", "dim": 0}],
            "tactic 2 {shard: x, dim: 0} is missing 'axis'; write e.g. {shard: 'params/.*/kernel', dim: -1, "
            "axis: model}.",
        ),
        (
            [{"shard": "x", "dims": 0, "axis": "model"}],
            "tactic 1 {shard: x, dims: 0, axis: model} has unknown field 'dims'; did you mean 'dim'?",
        ),
        (
            [{"shard": "x", "dim": "a", "axis": "model"}],
            "tactic 1 {shard: x, dim: a, axis: model}: dim must be an integer, got 'a'.",
        ),
        (
            [{"shard": "(", "dim": 0, "axis": "model"}],
            "tactic 1 {shard: '(', dim: 0, axis: model} has a bad regex '(' (missing ), unterminated "
            "subpattern at position 0); fix the pattern, escaping literal characters such as '(' or '.' "
            "with a backslash.",
        ),
        (
            ["x"],
            "tactic 1 is 'x'; write a mapping such as {shard: 'params/.*/kernel', dim: -1, axis: model}.",
        ),
        (
            [{"constrain": "x"}],
            r"tactic 1 {constrain: x} is missing 'spec'; write e.g. {constrain: 'activations/resid/\d+', "
            "spec: [data, model]}.",
        ),
        (
            [{"auto": {"searcher": "mcts", "axis": ["model"]}}],
            "tactic 1 {auto: {searcher: mcts, axis: [model]}} has unknown field 'axis'; did you mean 'axes'?",
        ),
        (
            [{"auto": {"axes": ["model"]}}],
            "tactic 1 {auto: {axes: [model]}} needs a searcher; write e.g. {auto: {searcher: mcts, axes: "
            "[model]}}.",
        ),
        (
            [{"batch": "data", "shard": "x"}],
            "tactic 1 {batch: data, shard: x} has several kinds ['batch', 'shard']; write one tactic per item.",
        ),
        ([{"batch": 3}], "tactic 1 {batch: 3}: 3 is not a mesh axis or a list of mesh axes."),
        (
            [{"constrain": "x", "spec": [1]}],
            "tactic 1 {constrain: x, spec: [1]}: spec entry for dim 0 is 1; write null, a mesh axis name, or "
            "a list of mesh axis names.",
        ),
    ],
)
def test_parse_errors_are_pinned(obj, message):
    with pytest.raises(TacticError) as e:
        parse_tactics(obj)
    assert str(e.value) == message


# -------------------------------------------------------------------------------------- composition


def test_fsdp_times_tp_composes_to_data_model_on_the_q_kernel():
    graph = llama_graph(4)
    plan = apply_tactics(
        graph,
        MESH,
        parse_tactics(r"""
        - {batch: data}
        - {shard: 'params/layers_\d+/attn/(q|k|v)/kernel', dim: 1, axis: model}
        - {shard: 'params/layers_\d+/attn/.*/kernel', dim: 0, axis: data}
    """),
    )
    got = by_name(graph, plan)
    assert got["params/layers_2/attn/q/kernel"] == S("data", "model")
    assert got["params/layers_2/attn/o/kernel"] == S("data", None)
    assert got["opt_state/0/mu/layers_2/attn/q/kernel"] == S("data", "model")
    assert got["opt_state/0/count"] == Sharding(())
    assert got["batch/tokens"] == S("data", None)
    assert got["params/layers_2/mlp/w_in"] == S(None, None)
    assert plan.optimizer_state is OptimizerState.FOLLOW_PARAMS
    assert plan.tactics[1] == {"shard": r"params/layers_\d+/attn/(q|k|v)/kernel", "dim": 1, "axis": "model"}


def test_shard_appends_to_a_base_plan_and_keeps_its_provenance():
    graph = llama_graph()
    base = apply_tactics(graph, MESH, [Shard(r"params/layers_\d+/mlp/w_in", 0, "data")])
    plan = apply_tactics(graph, MESH, [Shard(r"params/layers_\d+/mlp/w_in", 0, "model")], base=base)
    assert by_name(graph, plan)["params/layers_0/mlp/w_in"] == S(("data", "model"), None)
    assert len(plan.tactics) == 2


def test_two_tactics_that_agree_on_a_dim_are_fine():
    graph = llama_graph()
    plan = apply_tactics(
        graph, MESH, [Shard("params/.*/w_in", 1, "model"), Shard("params/.*mlp/w_.*", 1, "model")]
    )
    assert by_name(graph, plan)["params/layers_0/mlp/w_gate"] == S(None, "model")


def test_explicitly_matched_optimizer_state_does_not_follow():
    graph = llama_graph()
    plan = apply_tactics(graph, MESH, [Shard(r"opt_state/0/nu/.*/kernel", 0, "data")])
    got = by_name(graph, plan)
    assert got["opt_state/0/nu/layers_0/attn/q/kernel"] == S("data", None)
    assert got["opt_state/0/mu/layers_0/attn/q/kernel"] == S(None, None)
    assert plan.optimizer_state is OptimizerState.EXPLICIT


def test_constrain_and_replicate_and_auto():
    graph = llama_graph()
    base = Plan(MESH, params=(Rule("params/lm_head/kernel", (None, "model")),))
    plan = apply_tactics(
        graph,
        MESH,
        [
            Replicate("params/lm_head/kernel"),
            Constrain(r"activations/(resid|mlp_out)/\d+", ("data", "model")),
            Auto("mcts", ("model",)),
        ],
        base=base,
    )
    assert by_name(graph, plan)["params/lm_head/kernel"] == S(None, None)
    assert plan.activation_sharding("activations/mlp_out/1", (8, 16, 64)) == S("data", "model", None)
    assert plan.activation_sharding("activations/attn_out/1", (8, 16, 64)) is None
    assert plan.tactics[-1] == {"auto": {"searcher": "mcts", "axes": ("model",)}}


@pytest.mark.parametrize(
    ("tactics", "message"),
    [
        (
            [Shard("foo", 0, "model")],
            "tactic {shard: 'foo', dim: 0, axis: model} matches no tensor; the regex must match whole names "
            "(re.fullmatch); names look like 'params/embed/embedding'. Fix the regex or drop the tactic.",
        ),
        (
            [Shard("params/layers_0/attn/q", 0, "model")],
            "tactic {shard: 'params/layers_0/attn/q', dim: 0, axis: model} matches no tensor; the regex must "
            "match whole names (re.fullmatch); the nearest name is 'params/layers_0/attn/q/kernel'. Fix the "
            "regex or drop the tactic.",
        ),
        (
            [Shard(r"params/layers_\d+/mlp/w_in", 1, "modle")],
            r"tactic {shard: 'params/layers_\d+/mlp/w_in', dim: 1, axis: modle} names mesh axis 'modle', but "
            "the mesh has axes ['data', 'model']; did you mean 'model'?",
        ),
        (
            [Shard("params/lm_head/kernel", 1, "model")],
            "tactic {shard: 'params/lm_head/kernel', dim: 1, axis: model} cannot shard params/lm_head/kernel: "
            "dim 1 has size 250, and mesh axis 'model' (size 4) splits it 4 ways, which does not divide 250; "
            "narrow the regex, pick another dim, or use a mesh axis size that divides it.",
        ),
        (
            [Shard("params/lm_head/kernel", 1, ("data", "model"))],
            "tactic {shard: 'params/lm_head/kernel', dim: 1, axis: [data, model]} cannot shard "
            "params/lm_head/kernel: dim 1 has size 250, and mesh axes ['data', 'model'] (size 2 x 4) splits "
            "it 8 ways, which does not divide 250; narrow the regex, pick another dim, or use a mesh axis "
            "size that divides it.",
        ),
        (
            [
                Shard("params/layers_0/attn/q/kernel", 1, "model"),
                Shard("params/layers_0/attn/q/kernel", 0, "model"),
            ],
            "tactic {shard: 'params/layers_0/attn/q/kernel', dim: 0, axis: model} shards "
            "params/layers_0/attn/q/kernel dim 0 over mesh axis 'model', which already shards its dim 1; a "
            "mesh axis can split one dim of a tensor only. Use another axis or narrow the regex.",
        ),
        (
            [
                Shard("params/layers_0/attn/q/kernel", 1, "model"),
                Shard(r"params/layers_\d+/attn/.*", 1, "data"),
            ],
            "tactics {shard: 'params/layers_0/attn/q/kernel', dim: 1, axis: model} and "
            r"{shard: 'params/layers_\d+/attn/.*', dim: 1, axis: data} contradict: both fix dim 1 of "
            "params/layers_0/attn/q/kernel, to model and to data; drop one, narrow a regex, or write one "
            "tactic with axis: [model, data].",
        ),
        (
            [Replicate("params/.*"), Shard("params/lm_head/kernel", 0, "model")],
            "tactics {replicate: 'params/.*'} and {shard: 'params/lm_head/kernel', dim: 0, axis: model} "
            "contradict: the first pins params/lm_head/kernel replicated and the second shards it; drop one "
            "or narrow a regex.",
        ),
        (
            [Shard("params/lm_head/kernel", 0, "model"), Replicate("params/.*")],
            "tactics {shard: 'params/lm_head/kernel', dim: 0, axis: model} and {replicate: 'params/.*'} "
            "contradict: the first shards params/lm_head/kernel dim 0 and the second pins it replicated; drop "
            "one or narrow a regex.",
        ),
        (
            [Shard("params/layers_0/ln1/scale", 1, "model")],
            "tactic {shard: 'params/layers_0/ln1/scale', dim: 1, axis: model}: params/layers_0/ln1/scale has "
            "rank 1 (shape (64,)), so dim 1 does not exist; use a dim in [-1, 0] or narrow the regex.",
        ),
        (
            [
                Constrain(r"activations/resid/\d+", ("data", "model")),
                Constrain("activations/resid/0", ("data",)),
            ],
            r"tactics {constrain: 'activations/resid/\d+', spec: [data, model]} and {constrain: "
            "'activations/resid/0', spec: [data]} contradict: they constrain activations/resid/0 to "
            "[data, model] and [data]; drop one or narrow a regex.",
        ),
        (
            [Constrain(r"activations/resid/\d+", (None, None, None, "data"))],
            r"tactic {constrain: 'activations/resid/\d+', spec: [null, null, null, data]} cannot constrain "
            "activations/resid/0: sharding has 4 dims but the tensor has rank 3 (shape (8, 16, 64)); give "
            "one entry per dim.",
        ),
        (
            [Batch("model"), Shard("batch/tokens", 0, "data")],
            "tactics {batch: model} and {shard: 'batch/tokens', dim: 0, axis: data} contradict: both fix dim 0 "
            "of batch/tokens, to model and to data; drop one, narrow a regex, or write one tactic with axis: "
            "[model, data].",
        ),
        ([Batch(("data", "model")), Shard("params/lm_head/kernel", 0, "data")], None),
    ],
)
def test_apply_errors_are_pinned(tactics, message):
    graph = llama_graph(vocab=250)
    if message is None:  # a sanity row: these compose without error
        apply_tactics(graph, MESH, tactics)
        return
    with pytest.raises(TacticError) as e:
        apply_tactics(graph, MESH, tactics)
    assert str(e.value) == message


def test_batch_with_an_indivisible_batch_is_an_error():
    with pytest.raises(TacticError) as e:
        apply_tactics(llama_graph(b=6), MESH, [Batch("model")])
    assert str(e.value) == (
        "tactic {batch: model} cannot shard batch/tokens: dim 0 has size 6, and mesh axis 'model' (size 4) "
        "splits it 4 ways, which does not divide 6; narrow the regex, pick another dim, or use a mesh axis "
        "size that divides it."
    )


# ---------------------------------------------------------------------------------------- baselines

Q, O_PROJ, W_IN, W_OUT = (
    f"params/layers_1/{p}" for p in ("attn/q/kernel", "attn/o/kernel", "mlp/w_in", "mlp/w_out")
)
EMBED, HEAD, LN = "params/embed/embedding", "params/lm_head/kernel", "params/layers_1/ln1/scale"
DM = ("data", "model")


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        ("dp", {Q: S(None, None), "batch/tokens": S(DM, None)}),
        (
            "fsdp",
            {
                Q: S(DM, None),
                O_PROJ: S(DM, None),
                LN: S(DM),
                EMBED: S(DM, None),
                "batch/tokens": S(DM, None),
                "opt_state/0/mu/layers_1/attn/q/kernel": S(DM, None),
            },
        ),
        (
            "tp",
            {
                Q: S(None, "model"),
                O_PROJ: S("model", None),
                W_IN: S(None, "model"),
                W_OUT: S("model", None),
                EMBED: S("model", None),
                HEAD: S(None, "model"),
                LN: S(None),
                "batch/tokens": S(None, None),
            },
        ),
        ("dp_tp", {Q: S(None, "model"), O_PROJ: S("model", None), "batch/tokens": S("data", None)}),
        (
            "fsdp_tp",
            {
                Q: S("data", "model"),
                O_PROJ: S("model", "data"),
                W_IN: S("data", "model"),
                W_OUT: S("model", "data"),
                EMBED: S("model", "data"),
                HEAD: S("data", "model"),
                LN: S("data"),
                "opt_state/0/nu/layers_1/attn/o/kernel": S("model", "data"),
                "batch/tokens": S("data", None),
            },
        ),
        ("sp", {Q: S(None, "model"), "batch/tokens": S("data", None)}),
    ],
)
def test_baselines_on_a_dense_llama(strategy, expected):
    graph = llama_graph()
    plan = baseline_plans(graph, MESH)[strategy]
    got = by_name(graph, plan)
    assert {k: got[k] for k in expected} == expected
    assert plan.provenance.searcher == f"baseline:{strategy}"
    assert plan_from_yaml(plan_to_yaml(plan)) == plan


def test_baseline_plans_order_and_applicability():
    assert list(STRATEGIES) == ["dp", "fsdp", "tp", "dp_tp", "fsdp_tp", "sp", "ep"]
    graph = llama_graph()
    assert list(baseline_plans(graph, MESH)) == ["dp", "fsdp", "tp", "dp_tp", "fsdp_tp", "sp"]
    assert list(baseline_plans(graph, MeshShape.parse("data=8"))) == ["dp", "fsdp"]
    assert list(baseline_plans(graph, MeshShape.parse("model=8"))) == ["dp", "fsdp", "tp", "sp"]
    # 6 rows do not split 8 ways (dp, fsdp use every axis) but do split 2 ways over data.
    assert list(baseline_plans(llama_graph(b=6), MESH)) == ["tp", "dp_tp", "fsdp_tp", "sp"]
    assert mesh_roles(MeshShape.parse("pod=2,data=2,tensor=2")) == ("tensor", ("pod", "data"))
    assert mesh_roles(MeshShape.parse("data=8,model=1")) == (None, ("data",))


def test_sp_constrains_the_residual_stream_on_sequence():
    graph = llama_graph()
    plan = baseline_plans(graph, MESH)["sp"]
    assert [str(r) for r in plan.activations] == [
        r"{match: 'activations/(resid|attn_out|mlp_out)/\d+', spec: [data, model]}"
    ]
    assert plan.activation_sharding("activations/attn_out/1", (8, 16, 64)) == S("data", "model", None)
    assert plan.activation_sharding("activations/attn_in/1", (8, 16, 64)) is None
    assert STRATEGIES["sp"](llama_graph(s=6), MESH) is None  # sequence 6 does not split 4 ways


def test_baselines_on_the_scanned_layout_shift_dims_by_one():
    graph = llama_graph(4, scanned=True)
    plans = baseline_plans(graph, MESH)
    assert by_name(graph, plans["tp"])["params/layers/attn/q/kernel"] == S(None, None, "model")
    assert by_name(graph, plans["tp"])["params/layers/mlp/w_out"] == S(None, "model", None)
    assert by_name(graph, plans["fsdp_tp"])["params/layers/attn/o/kernel"] == S(None, "model", "data")
    # FSDP never splits the stacked layer dim a scan slices.
    assert by_name(graph, plans["fsdp"])["params/layers/ln1/scale"] == S(None, DM)


def test_expert_parallel():
    graph = llama_graph(experts=8)
    plans = baseline_plans(graph, MESH)
    got = by_name(graph, plans["ep"])
    assert got["params/layers_1/moe/w_in"] == S("model", None, None)
    assert got["params/layers_1/moe/w_out"] == S("model", None, None)
    assert got["params/layers_1/moe/router/kernel"] == S(None, None)
    assert got["batch/tokens"] == S("data", None)
    got = by_name(graph, baseline_plans(graph, MeshShape.parse("data=8"))["ep"])
    assert got["params/layers_1/moe/w_in"] == S("data", None, None)
    assert got["batch/tokens"] == S("data", None)
    assert STRATEGIES["ep"](llama_graph(experts=6), MESH) is None
    assert by_name(graph, plans["tp"])["params/layers_1/moe/w_in"] == S(None, None, "model")


def hf_gpt2_graph(n_layers: int = 2, d: int = 64, vocab: int = 50257) -> Graph:
    shapes = {
        "attn/c_attn/kernel": (d, 3 * d),
        "attn/c_proj/kernel": (d, d),
        "mlp/c_fc/kernel": (d, 4 * d),
        "mlp/c_proj/kernel": (4 * d, d),
        "ln_1/scale": (d,),
    }
    names = [("params/transformer/wte/embedding", (vocab, d))]
    names += [(f"params/transformer/h/{i}/{p}", s) for i in range(n_layers) for p, s in shapes.items()]
    values = [Value(i, n, s, "float32", Role.PARAM) for i, (n, s) in enumerate(names)]
    values.append(Value(len(values), "batch/input_ids", (8, 16), "int32", Role.BATCH))
    return Graph(tuple(values), (), tuple(range(len(values))), ())


def test_tp_with_a_model_specific_rule_table():
    rules = (
        (r"attn/c_attn/kernel$", 1),
        (r"attn/c_proj/kernel$", 0),
        (r"mlp/c_fc/kernel$", 1),
        (r"mlp/c_proj/kernel$", 0),
        (r"wte/embedding$", 0),
    )
    graph = hf_gpt2_graph()
    assert STRATEGIES["tp"](graph, MESH) is None  # the built-in names match nothing here
    plan = baseline_plans(graph, MESH, tp_rules=rules)["dp_tp"]
    got = by_name(graph, plan)
    assert got["params/transformer/h/1/attn/c_attn/kernel"] == S(None, "model")
    assert got["params/transformer/h/1/mlp/c_proj/kernel"] == S("model", None)
    assert got["params/transformer/wte/embedding"] == S(None, None)  # 50257 rows do not split 4 ways
    assert (
        str(plan.params[0]) == r"{match: 'params/transformer/h/\d+/attn/c_attn/kernel', spec: [null, model]}"
    )

"""Dimension groups: dims tied by factor rules across ops, loops and the optimizer."""

from __future__ import annotations

import pytest

from ir.dims import dim_groups
from ir.trace import trace
from models import registry


@pytest.fixture(scope="module")
def gpt():
    g = trace(registry.get("gpt", "tiny"))
    return g, dim_groups(g)


def _group(g, dg, name, dim, graph=0):
    return dg.group_of(g.value(name).id, dim, graph).id


def test_mlp_hidden_dim_ties_weights_and_their_optimizer_state(gpt):
    g, dg = gpt
    hidden = _group(g, dg, "params/layers_0/mlp/w_in", 1)
    for name, dim in [
        ("params/layers_0/mlp/w_out", 0),
        ("params/layers_0/mlp/b_in", 0),
        ("opt_state/0/mu/layers_0/mlp/w_in", 1),
        ("opt_state/0/nu/layers_0/mlp/w_out", 0),
    ]:
        assert _group(g, dg, name, dim) == hidden, name
    assert _group(g, dg, "params/layers_1/mlp/w_in", 1) != hidden  # layers are independent


def test_heads_group_spans_q_k_v_and_o(gpt):
    g, dg = gpt
    heads = _group(g, dg, "params/layers_0/attn/q/kernel", 1)
    assert {_group(g, dg, f"params/layers_0/attn/{p}/kernel", 1) for p in "kv"} == {heads}
    assert _group(g, dg, "params/layers_0/attn/o/kernel", 0) == heads
    assert dg.groups[heads].size == 4  # the compound [heads * head_dim] dim is grouped by its heads


def test_batch_and_model_dims(gpt):
    g, dg = gpt
    batch = _group(g, dg, "batch/tokens", 0)
    assert _group(g, dg, "batch/targets", 0) == batch
    model = _group(g, dg, "params/embed/embedding", 1)
    assert _group(g, dg, "params/layers_0/attn/q/kernel", 0) == model
    assert len({batch, model}) == 2


def test_attention_scores_are_conflicts(gpt):
    g, dg = gpt
    seq = _group(g, dg, "params/pos_embed/embedding", 0)
    assert any(gid == seq for _, _, gid in dg.conflicts)


def test_scan_ties_stacked_params_to_the_body():
    g = trace(registry.get("llama", "tiny", scan=True))
    dg = dim_groups(g)
    q = g.value("params/layers/attn/q/kernel")
    # Outer [L, d, h] dim 1 is the model dim, tied to the embedding's feature dim.
    assert dg.group_of(q.id, 1).id == dg.group_of(g.value("params/embed/embedding").id, 1).id
    assert dg.group_of(q.id, 0).id not in {dg.group_of(q.id, d).id for d in (1, 2)}

"""Tests for models.hf: Hugging Face Flax training steps as workloads."""

from __future__ import annotations

import math
import re
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("flax")

from ir.workload import Workload, WorkloadError
from models import hf

TP_SIZE = 4


@pytest.fixture(scope="module", params=hf.names())
def workload(request) -> Workload:
    return hf.get(request.param)


def _param_paths(params) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {"/".join(k.key for k in path): tuple(leaf.shape) for path, leaf in leaves}


def test_names():
    assert hf.names() == ("hf-gpt2", "hf-llama", "hf-bert", "hf-vit")
    assert set(hf.TP_RULES) == set(hf.names())
    for name in hf.names():
        assert hf.sizes(name) == ("tiny", "base")


def test_workload_fields(workload):
    name = workload.source.split(":")[1]
    assert workload.source == f"hf:{name}:tiny"
    assert workload.arg_names == ("params", "opt_state", "batch")
    assert workload.donate_argnums == (0, 1)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(workload.args))
    assert all(x.dtype in (np.float32, np.int32, np.uint32) for x in jax.tree.leaves(workload.args))
    assert all(x.shape[0] == 8 for x in jax.tree.leaves(workload.args[2]))


def test_step_runs_and_loss_is_finite(workload):
    args = workload.init(0)
    assert jax.tree.structure(args) == jax.tree.structure(workload.args)
    for real, abstract in zip(jax.tree.leaves(args), jax.tree.leaves(workload.args), strict=True):
        assert (real.shape, real.dtype) == (abstract.shape, abstract.dtype)
    batch = args[2]
    step = jax.jit(workload.fn, donate_argnums=workload.donate_argnums)
    params, opt_state, loss = step(*args)
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert jax.tree.structure((params, opt_state)) == jax.tree.structure(workload.args[:2])
    _, _, loss2 = step(params, opt_state, batch)
    assert float(loss2) < float(loss)  # one AdamW step on the same batch lowers its loss


def test_make_jaxpr(workload):
    closed = jax.make_jaxpr(workload.fn)(*workload.args)
    assert len(closed.jaxpr.invars) == len(jax.tree.leaves(workload.args))
    out_params, _, loss = jax.tree.unflatten(
        jax.tree.structure(jax.eval_shape(workload.fn, *workload.args)), closed.out_avals
    )
    assert loss.shape == ()
    assert jax.tree.map(lambda x: x.shape, out_params) == jax.tree.map(lambda x: x.shape, workload.args[0])


@pytest.mark.parametrize("name", hf.names())
def test_tp_rules_match_divisible_dims(name):
    paths = _param_paths(hf.get(name).args[0])
    matched: dict[str, str] = {}
    for pattern, dim in hf.TP_RULES[name]:
        hits = [p for p in paths if re.search(pattern, "params/" + p)]
        assert hits, f"{name}: TP rule {pattern!r} matches no param"
        for path in hits:
            assert path not in matched, f"{path} matched by {matched[path]!r} and {pattern!r}"
            matched[path] = pattern
            assert paths[path][dim] % TP_SIZE == 0, f"{path} {paths[path]} dim {dim}"
    # Every layer's attention and MLP weights are covered: 4 kernel roles x 2 layers at least.
    assert sum(p.endswith("kernel") for p in matched) >= 8


def test_gpt2_tp_rules_follow_flax_conv1d_layout():
    # Flax Conv1D kernels are [out, in]; column parallel must shard the output features.
    paths = _param_paths(hf.get("hf-gpt2").args[0])
    assert paths["transformer/h/0/attn/c_attn/kernel"] == (192, 64)
    assert paths["transformer/h/0/mlp/c_proj/kernel"] == (64, 256)
    rules = dict(hf.TP_RULES["hf-gpt2"])
    assert rules[r"attn/c_attn/(kernel|bias)$"] == 0
    assert rules[r"mlp/c_proj/kernel$"] == 1


@pytest.mark.parametrize(
    ("name", "millions"),
    [("hf-gpt2", 124.44), ("hf-llama", 1100.05), ("hf-bert", 109.51), ("hf-vit", 86.57)],
)
def test_base_sizes_have_published_param_counts(name, millions):
    params = hf.get(name, "base").args[0]
    assert math.isclose(sum(x.size for x in jax.tree.leaves(params)) / 1e6, millions, abs_tol=0.01)


def test_unknown_name_and_size():
    with pytest.raises(WorkloadError, match=r"unknown Hugging Face model 'hf-t5'; available: hf-gpt2, "):
        hf.get("hf-t5")
    with pytest.raises(WorkloadError, match=r"hf-gpt2: unknown size 'xl'; available sizes are tiny, base\."):
        hf.get("hf-gpt2", "xl")


def test_missing_transformers_names_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(WorkloadError, match=r"pip install 'auto-partition\[test\]'"):
        hf.get("hf-gpt2")

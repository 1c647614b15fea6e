"""Tests for the built-in models: registry, parameter layout, named activations, routing and tiny training."""

from __future__ import annotations

import collections
import functools
import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from ir.workload import WorkloadError
from models import common, moe, registry

TRANSFORMERS = ("bert", "gpt", "llama", "moe", "vit")
ACTIVATION_NAMES = ("resid", "attn_in", "attn_out", "mlp_in", "mlp_out")


def _paths(tree) -> dict[str, tuple[int, ...]]:
    """'/'-joined dict-key paths of a params pytree -> shapes."""
    return {
        "/".join(str(k.key) for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


@functools.cache
def _train(name: str, scan: bool, steps: int = 3) -> tuple[tuple[float, ...], object]:
    """Runs `steps` jitted train steps of the tiny model on one batch; cached across tests."""
    workload = registry.get(name, "tiny", scan=scan)
    params, opt_state, batch = workload.init(0)
    step = jax.jit(workload.fn)
    losses = []
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(float(loss))
    return tuple(losses), params


def _count_names(jaxpr, counts: collections.Counter) -> None:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "name":
            counts[eqn.params["name"]] += 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            _count_names(sub, counts)


# --------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------


def test_names_and_sizes():
    assert registry.names() == ("bert", "gpt", "llama", "mlp", "moe", "vit")
    assert registry.sizes("gpt") == ("tiny", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
    assert registry.sizes("llama") == ("tiny", "1b", "8b", "70b")
    assert registry.sizes("bert") == ("tiny", "bert-base", "bert-large")
    assert registry.sizes("vit") == ("tiny", "vit-base", "vit-large")
    assert registry.sizes("mlp") == ("tiny", "small", "large")
    assert registry.sizes("moe") == ("tiny", "medium", "mixtral-8x7b")
    assert registry.config("llama", "8b").n_layers == 32


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: registry.get("gpt3", "tiny"),
            "unknown model 'gpt3'; choose one of: bert, gpt, llama, mlp, moe, vit.",
        ),
        (
            lambda: registry.sizes("resnet"),
            "unknown model 'resnet'; choose one of: bert, gpt, llama, mlp, moe, vit.",
        ),
        (
            lambda: registry.get("llama", "13b"),
            "unknown size '13b' for model 'llama'; choose one of: tiny, 1b, 8b, 70b.",
        ),
        (
            lambda: registry.get("bert", "tiny", scan=True),
            "model 'bert' does not support scan=True; only gpt, llama stack their layers for "
            "jax.lax.scan. Call get('bert', 'tiny') without scan.",
        ),
        (
            lambda: registry.get("vit", "tiny", seq_len=64),
            "model 'vit' has no seq_len; leave seq_len unset for it.",
        ),
        (
            lambda: registry.get("gpt", "tiny", batch_size=0),
            "batch_size must be a positive integer, got 0.",
        ),
        (
            lambda: registry.get("mlp", "tiny", n_layers=3),
            "model 'mlp' has no n_layers; leave n_layers unset for it.",
        ),
        (
            lambda: registry.get("llama", "tiny", n_layers=-1),
            "n_layers must be a positive integer, got -1.",
        ),
        (
            lambda: registry.get("moe", "tiny", seq_len=1500),
            "moe: seq_len (1500) must be a multiple of the routing group size (1024); "
            "choose a seq_len that is.",
        ),
    ],
)
def test_errors_pin_their_message(call, message):
    with pytest.raises(WorkloadError) as info:
        call()
    assert str(info.value) == message


def test_workload_fields():
    workload = registry.get("llama", "tiny", scan=True)
    assert workload.source == "builtin:llama:tiny:scan"
    assert registry.get("gpt", "gpt2").source == "builtin:gpt:gpt2"
    assert workload.donate_argnums == (0, 1)
    assert workload.arg_names == ("params", "opt_state", "batch")
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(workload.args))


@pytest.mark.parametrize(
    ("name", "size", "batch"),
    [
        ("gpt", "tiny", {"tokens": ((8, 32), "int32"), "targets": ((8, 32), "int32")}),
        ("llama", "70b", {"tokens": ((8, 4096), "int32"), "targets": ((8, 4096), "int32")}),
        (
            "bert",
            "tiny",
            {"tokens": ((8, 32), "int32"), "targets": ((8, 32), "int32"), "mask": ((8, 32), "float32")},
        ),
        ("vit", "tiny", {"images": ((8, 32, 32, 3), "float32"), "labels": ((8,), "int32")}),
        ("mlp", "tiny", {"x": ((8, 64), "float32"), "y": ((8, 64), "float32")}),
    ],
)
def test_batch_spec(name, size, batch):
    got = registry.get(name, size).args[2]
    assert {k: (v.shape, str(v.dtype)) for k, v in got.items()} == batch


def test_overrides_change_batch_and_positions():
    workload = registry.get("gpt", "tiny", batch_size=4, seq_len=64)
    params, _, batch = workload.args
    assert batch["tokens"].shape == (4, 64)
    # GPT's learned position table grows to a longer sequence.
    assert params["pos_embed"]["embedding"].shape == (64, 64)
    assert registry.get("vit", "tiny", batch_size=2).args[2]["images"].shape == (2, 32, 32, 3)


# --------------------------------------------------------------------------------------------------------
# Parameter layout
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "size", "scan", "path", "shape"),
    [
        ("llama", "70b", False, "embed/embedding", (128256, 8192)),
        ("llama", "70b", False, "layers_79/attn/q/kernel", (8192, 8192)),
        ("llama", "70b", False, "layers_79/attn/k/kernel", (8192, 1024)),
        ("llama", "70b", False, "layers_79/attn/v/kernel", (8192, 1024)),
        ("llama", "70b", False, "layers_79/attn/o/kernel", (8192, 8192)),
        ("llama", "70b", False, "layers_0/mlp/w_in", (8192, 28672)),
        ("llama", "70b", False, "layers_0/mlp/w_gate", (8192, 28672)),
        ("llama", "70b", False, "layers_0/mlp/w_out", (28672, 8192)),
        ("llama", "70b", False, "layers_0/ln1/scale", (8192,)),
        ("llama", "70b", False, "ln_f/scale", (8192,)),
        ("llama", "70b", False, "lm_head/kernel", (8192, 128256)),
        ("llama", "tiny", True, "layers/attn/k/kernel", (2, 64, 32)),
        ("llama", "tiny", True, "layers/mlp/w_out", (2, 128, 64)),
        ("gpt", "gpt2", False, "pos_embed/embedding", (1024, 768)),
        ("gpt", "gpt2", False, "layers_11/attn/q/bias", (768,)),
        ("gpt", "gpt2", False, "layers_11/ln2/bias", (768,)),
        ("gpt", "gpt2", False, "layers_0/mlp/b_in", (3072,)),
        ("gpt", "gpt2", True, "layers/mlp/w_in", (12, 768, 3072)),
        ("bert", "bert-base", False, "layers_0/attn/o/kernel", (768, 768)),
        ("bert", "bert-base", False, "mlm_head/bias", (30528,)),
        ("vit", "vit-base", False, "patch_embed/kernel", (768, 768)),
        ("vit", "vit-base", False, "pos_embed/embedding", (197, 768)),
        ("vit", "vit-base", False, "cls/embedding", (1, 768)),
        ("vit", "vit-base", False, "head/kernel", (768, 1000)),
        ("moe", "tiny", False, "layers_1/moe/router/kernel", (64, 4)),
        ("moe", "tiny", False, "layers_1/moe/w_in", (4, 64, 128)),
        ("moe", "tiny", False, "layers_1/moe/w_gate", (4, 64, 128)),
        ("moe", "tiny", False, "layers_1/moe/w_out", (4, 128, 64)),
        ("mlp", "tiny", False, "layers_2/kernel", (128, 64)),
    ],
)
def test_param_paths(name, size, scan, path, shape):
    assert _paths(registry.get(name, size, scan=scan).args[0])[path] == shape


def test_tiny_llama_param_layout_golden():
    assert sorted(_paths(registry.get("llama", "tiny").args[0])) == sorted(
        ["embed/embedding", "ln_f/scale", "lm_head/kernel"]
        + [
            f"layers_{i}/{leaf}"
            for i in range(2)
            for leaf in (
                "ln1/scale",
                "ln2/scale",
                "attn/q/kernel",
                "attn/k/kernel",
                "attn/v/kernel",
                "attn/o/kernel",
                "mlp/w_in",
                "mlp/w_gate",
                "mlp/w_out",
            )
        ]
    )


def _llama_params(layers, d, heads, kv, ff, vocab):
    head_dim = d // heads
    attn = 2 * d * heads * head_dim + 2 * d * kv * head_dim
    return 2 * vocab * d + layers * (attn + 3 * d * ff + 2 * d) + d


def _gpt_params(layers, d, vocab, positions):
    block = 4 * (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + 4 * d
    return vocab * d + positions * d + layers * block + 2 * d


@pytest.mark.parametrize(
    ("name", "size", "expected"),
    [
        ("llama", "8b", _llama_params(32, 4096, 32, 8, 14336, 128256)),
        ("llama", "70b", _llama_params(80, 8192, 64, 8, 28672, 128256)),
        ("gpt", "gpt2", _gpt_params(12, 768, 50304, 1024)),
        ("gpt", "gpt2-xl", _gpt_params(48, 1600, 50304, 1024)),
    ],
)
def test_param_count_matches_hand_formula(name, size, expected):
    count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(registry.get(name, size).args[0]))
    assert count == expected


def test_big_llama_is_bf16_tiny_is_f32():
    assert {leaf.dtype for leaf in jax.tree.leaves(registry.get("llama", "8b").args[0])} == {
        jnp.dtype("bfloat16")
    }
    assert {leaf.dtype for leaf in jax.tree.leaves(registry.get("llama", "tiny").args[0])} == {
        jnp.dtype("float32")
    }


def test_scanned_init_stacks_the_unrolled_layers():
    unrolled = registry.get("llama", "tiny").init(3)[0]
    scanned = registry.get("llama", "tiny", scan=True).init(3)[0]
    stacked = jax.tree.map(lambda *xs: np.stack(xs), unrolled["layers_0"], unrolled["layers_1"])
    jax.tree.map(np.testing.assert_array_equal, scanned["layers"], stacked)


# --------------------------------------------------------------------------------------------------------
# Tracing
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "scan"), [(n, False) for n in TRANSFORMERS] + [("llama", True)])
def test_named_activations(name, scan):
    workload = registry.get(name, "tiny", scan=scan)
    counts = collections.Counter()
    _count_names(jax.make_jaxpr(workload.fn)(*workload.args).jaxpr, counts)
    # Two unrolled layers name each point twice; a scan body names it once.
    assert counts == {n: 1 if scan else 2 for n in ACTIVATION_NAMES}


def test_llama_70b_traces_without_allocating():
    workload = registry.get("llama", "70b")
    jaxpr = jax.make_jaxpr(workload.fn)(*workload.args)
    first, loss = jaxpr.out_avals[0], jaxpr.out_avals[-1]
    assert (first.shape, first.dtype) == ((128256, 8192), jnp.bfloat16)  # new embed/embedding
    assert (loss.shape, loss.dtype) == ((), jnp.float32)


# --------------------------------------------------------------------------------------------------------
# Numerics
# --------------------------------------------------------------------------------------------------------


def test_gqa_attention_matches_numpy_reference():
    d, heads, kv, head_dim, s = 16, 4, 2, 4, 5
    p = common.attention_init(common.HostKey((0,)), d, heads, kv, head_dim, np.float32, bias=False)
    x = np.random.default_rng(1).standard_normal((1, s, d), dtype=np.float32)
    got = common.attention(p, jnp.asarray(x), n_heads=heads, n_kv_heads=kv, causal=True)

    q = (x @ p["q"]["kernel"]).reshape(1, s, heads, head_dim)
    k = np.repeat((x @ p["k"]["kernel"]).reshape(1, s, kv, head_dim), heads // kv, axis=2)
    v = np.repeat((x @ p["v"]["kernel"]).reshape(1, s, kv, head_dim), heads // kv, axis=2)
    scores = np.einsum("bshd,bthd->bhst", q, k) / np.sqrt(head_dim)
    scores = np.where(np.tril(np.ones((s, s), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = np.einsum("bhst,bthd->bshd", probs, v).reshape(1, s, heads * head_dim) @ p["o"]["kernel"]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_rope_keeps_position_zero_and_norms():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 6, 2, 8), dtype=np.float32))
    y = common.apply_rope(x, 10_000.0)
    np.testing.assert_allclose(y[:, 0], x[:, 0], rtol=1e-6)
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)


def test_moe_routing_by_hand():
    # 4 tokens in one group, 4 experts, top-2, capacity 1: everyone prefers expert 0, then expert 1.
    cfg = moe.MoEConfig(1, 8, 2, 2, 8, n_experts=4, vocab=8, batch_size=1, seq_len=4, capacity_factor=0.5)
    assert cfg.capacity == 1
    logits = jnp.tile(jnp.log(jnp.asarray([0.5, 0.3, 0.1, 0.1])), (1, 1, 4, 1))
    dispatch, combine, aux = moe.route(logits, cfg)
    want = np.zeros((1, 1, 4, 4, 1), np.float32)
    want[0, 0, 0, 0, 0] = 1.0  # token 0 takes expert 0's only slot with its first choice
    want[0, 0, 0, 1, 0] = 1.0  # and expert 1's only slot with its second; tokens 1-3 are dropped
    np.testing.assert_array_equal(dispatch, want)
    np.testing.assert_allclose(combine[0, 0, 0, :2, 0], [0.5 / 0.8, 0.3 / 0.8], rtol=1e-6)
    # All tokens pick expert 0 first (fraction 1) and its mean probability is 0.5: aux = 4 * 0.5.
    np.testing.assert_allclose(aux, 2.0, rtol=1e-6)


def test_moe_routing_without_drops_combines_to_one():
    cfg = moe.MoEConfig(1, 8, 2, 2, 8, n_experts=4, vocab=8, batch_size=2, seq_len=8, capacity_factor=2.0)
    logits = jax.random.normal(jax.random.key(0), (2, 1, 8, 4))
    dispatch, combine, _ = moe.route(logits, cfg)
    np.testing.assert_array_equal(dispatch.sum(axis=(3, 4)), np.full((2, 1, 8), 2.0))
    np.testing.assert_allclose(combine.sum(axis=(3, 4)), np.ones((2, 1, 8)), rtol=1e-6)
    assert float(dispatch.sum(axis=2).max()) == 1.0  # no slot holds two tokens


# --------------------------------------------------------------------------------------------------------
# Training the tiny sizes
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", registry.names())
def test_tiny_trains(name):
    workload = registry.get(name, "tiny")
    real = workload.init(0)
    assert jax.tree.structure(real) == jax.tree.structure(workload.args)
    for got, want in zip(jax.tree.leaves(real), jax.tree.leaves(workload.args), strict=True):
        assert (got.shape, got.dtype) == (want.shape, want.dtype)
    losses, _ = _train(name, False)
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[0] > losses[1] > losses[2]


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_scan_matches_unrolled(name):
    scanned_losses, scanned = _train(name, True)
    unrolled_losses, unrolled = _train(name, False)
    np.testing.assert_allclose(scanned_losses, unrolled_losses, rtol=1e-5)
    stacked = jax.tree.map(lambda *xs: np.stack(xs), unrolled["layers_0"], unrolled["layers_1"])
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), scanned["layers"], stacked
    )


def test_source_records_shape_overrides_and_rebuilds_the_same_model():
    from auto_partition.workloads import resolve

    w = registry.get("llama", "tiny", scan=True, batch_size=16, seq_len=64)
    assert w.source == "builtin:llama:tiny:scan:batch_size=16:seq_len=64"
    assert resolve(w.source).fingerprint() == w.fingerprint()
    deeper = resolve("builtin:llama:tiny:scan:n_layers=5")
    assert deeper.source == "builtin:llama:tiny:scan:n_layers=5"
    assert deeper.fingerprint() != resolve("builtin:llama:tiny:scan").fingerprint()


def test_n_layers_override_repeats_the_same_layer():
    """Fewer or more of the same layer: the stacked parameters' leading dim (scanned), or the
    count of per-layer parameter groups (unrolled), follows n_layers; each layer's shapes stay."""
    scanned = registry.get("llama", "tiny", scan=True, n_layers=5).args[0]["layers"]
    base = registry.get("llama", "tiny", scan=True).args[0]["layers"]
    for got, want in zip(jax.tree.leaves(scanned), jax.tree.leaves(base), strict=True):
        assert got.shape == (5, *want.shape[1:])
    for name in ("gpt", "bert", "vit", "moe"):
        one = registry.get(name, "tiny", n_layers=1).args[0]
        three = registry.get(name, "tiny", n_layers=3).args[0]
        per_layer = len(jax.tree.leaves(three)) - len(jax.tree.leaves(one))
        assert per_layer > 0 and per_layer % 2 == 0, name  # two more layers' worth


def test_remat_recomputes_the_forward_and_saves_memory():
    """Per-layer activation checkpointing: the traced step recomputes each layer in the backward
    pass (more FLOPs) and keeps less alive (less memory), under the same plan."""
    from auto_partition.workloads import resolve
    from cost_model.hardware import load_hardware
    from cost_model.simulate import simulate
    from ir.sharding import MeshShape
    from ir.trace import trace
    from search.baselines import baseline_plans

    mesh = MeshShape.parse("data=2,model=4")
    hw = load_hardware("h100")
    reports = {}
    for src in ("builtin:llama:tiny:batch_size=16", "builtin:llama:tiny:remat:batch_size=16"):
        w = resolve(src)
        assert w.source == src
        g = trace(w)
        reports[src] = simulate(g, baseline_plans(g, mesh)["dp_tp"], hw)
    plain, remat = reports.values()
    assert remat.flops > 1.1 * plain.flops
    assert remat.memory.temp < plain.memory.temp


def test_remat_on_a_model_without_it_is_an_error():
    from auto_partition.workloads import resolve
    from ir.workload import WorkloadError

    with pytest.raises(WorkloadError, match="model 'moe' has no remat option; only"):
        resolve("builtin:moe:tiny:remat")
    with pytest.raises(WorkloadError, match="unknown flags"):
        resolve("builtin:llama:tiny:rematt")

"""The public API a training script uses: `load_plan(path).jit(step)` and `.shardings(...)`, and the example script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import auto_partition as ap
from ir.plan import PlanError
from ir.plan_yaml import save_plan_file
from ir.sharding import MeshShape
from ir.trace import trace
from models import registry
from runners.check import provenance_for
from runners.execute import TOLERANCE
from search.baselines import baseline_plans

ROOT = Path(__file__).resolve().parents[1]
FSDP = PartitionSpec(("data", "model"))  # FSDP over every axis of data=2,model=4: dim 0 split 8 ways


def save_baselines(name: str, mesh: str, strategies: tuple[str, ...], out: Path) -> dict[str, Path]:
    """Plan files of the given baselines for the built-in model `name` (tiny), as `baselines --save` writes."""
    w = registry.get(name, "tiny")
    g = trace(w)
    paths = {}
    for strategy, plan in baseline_plans(g, MeshShape.parse(mesh), provenance=provenance_for(w, g)).items():
        if strategy in strategies:
            paths[strategy] = out / f"{strategy}.yaml"
            save_plan_file(plan, paths[strategy])
    return paths


@pytest.fixture(scope="module")
def mlp_plans(tmp_path_factory) -> dict[str, Path]:
    return save_baselines("mlp", "data=2,model=4", ("dp", "fsdp"), tmp_path_factory.mktemp("mlp"))


@pytest.fixture(scope="module")
def mlp():
    """The tiny MLP workload, its real inputs, and the unsharded step's outputs on them."""
    w = registry.get("mlp", "tiny")
    args = w.init(0)
    reference = jax.jit(w.fn)(*args)
    return w, args, reference


def assert_close(out, ref) -> None:
    """Every leaf within runners.execute.TOLERANCE of the unsharded step, relative to its scale."""
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
        b = np.asarray(b)
        scale = max(1.0, float(np.max(np.abs(b))))
        err = float(np.max(np.abs(np.asarray(a, np.float64) - b))) / scale
        assert err <= TOLERANCE.get(str(b.dtype), 0.0), (err, b.dtype, b.shape)  # integers: exact


def specs(tree) -> list[PartitionSpec]:
    return [s.spec for s in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, NamedSharding))]


@pytest.mark.parametrize("strategy", ["dp", "fsdp"])
def test_jit_matches_the_unsharded_step_and_keeps_the_plans_shardings(mlp_plans, mlp, strategy):
    w, args, reference = mlp
    loaded = ap.load_plan(str(mlp_plans[strategy]))
    step = loaded.jit(w.fn)
    params, opt_state, loss = step(*args)
    assert jax.tree.structure((params, opt_state, loss)) == jax.tree.structure(reference)
    assert_close((params, opt_state, loss), reference)
    assert abs(float(loss) - float(reference[2])) <= 1e-6 * max(1.0, abs(float(reference[2])))
    want = PartitionSpec() if strategy == "dp" else FSDP
    assert {leaf.sharding.spec for leaf in jax.tree.leaves(params)} == {want}
    # Outputs come back where the plan puts the inputs, so the next step needs no resharding.
    expected = loaded.shardings(jax.devices(), args)
    assert specs(expected[0]) == [leaf.sharding.spec for leaf in jax.tree.leaves(params)]
    # A second step reuses the compiled program (same shapes) and keeps training.
    _, _, loss2 = step(params, opt_state, args[2])
    assert float(loss2) < float(loss)


def test_jit_with_donation(mlp_plans, mlp):
    w, args, reference = mlp
    step = ap.load_plan(str(mlp_plans["fsdp"])).jit(w.fn, donate_argnums=(0, 1))
    placed = jax.tree.map(np.asarray, args)  # host copies: what a script loads from a checkpoint
    params, opt_state, loss = step(*placed)
    assert_close((params, opt_state, loss), reference)
    params, opt_state, _ = step(params, opt_state, placed[2])  # donated buffers feed the next step
    assert params["layers_0"]["kernel"].sharding.spec == FSDP


def test_jit_of_a_step_with_other_argument_names(mlp_plans, mlp):
    w, args, reference = mlp

    def step(p, o, b):  # names the plan does not know: roles come from arg_names instead
        return w.fn(p, o, b)

    loaded = ap.load_plan(str(mlp_plans["fsdp"]))
    with pytest.raises(PlanError, match=r"^fsdp\.yaml was made for builtin:mlp:tiny .*input names"):
        loaded.jit(step)(*args)
    params, _, loss = loaded.jit(step, arg_names=("params", "opt_state", "batch"))(*args)
    assert_close(loss, reference[2])
    assert params["layers_0"]["kernel"].sharding.spec == FSDP


def test_shardings_of_an_fsdp_plan(mlp_plans, mlp):
    w, args, _ = mlp
    loaded = ap.load_plan(str(mlp_plans["fsdp"]))
    params_sh, opt_sh, batch_sh = loaded.shardings(jax.devices(), args)
    mesh = loaded.mesh()
    for sh in jax.tree.leaves((params_sh, opt_sh, batch_sh), is_leaf=lambda x: isinstance(x, NamedSharding)):
        assert isinstance(sh, NamedSharding)
        assert sh.mesh.axis_names == ("data", "model") and sh.mesh.devices.shape == (2, 4)
    # Params: dim 0 on the data axes.
    assert set(specs(params_sh)) == {FSDP}
    assert jax.tree.structure(params_sh) == jax.tree.structure(args[0])
    # Optimizer state: Adam's mu and nu follow their params; the step count is replicated.
    adam = opt_sh[0]
    assert specs(adam.mu) == specs(params_sh) and specs(adam.nu) == specs(params_sh)
    assert adam.count.spec == PartitionSpec()
    assert jax.tree.structure(opt_sh) == jax.tree.structure(args[1])
    # Batch: dim 0.
    assert batch_sh == {"x": NamedSharding(mesh, FSDP), "y": NamedSharding(mesh, FSDP)}

    # One pytree at a time, named by prefix, and a Mesh instead of devices: the same answer.
    assert specs(loaded.shardings(mesh, args[0], prefix="params")) == specs(params_sh)
    assert loaded.shardings(mesh, args[2], prefix="batch") == batch_sh
    # Abstract shapes do as well as arrays, and the shardings feed jax.jit directly.
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
    assert specs(loaded.shardings(jax.devices(), abstract)) == specs((params_sh, opt_sh, batch_sh))
    jitted = jax.jit(
        w.fn, in_shardings=(params_sh, opt_sh, batch_sh), out_shardings=(params_sh, opt_sh, None)
    )
    params, _, _ = jitted(*args)
    assert params["layers_2"]["bias"].sharding.spec == FSDP


def test_shardings_of_a_dp_plan(mlp_plans, mlp):
    _, args, _ = mlp
    params_sh, opt_sh, batch_sh = ap.load_plan(str(mlp_plans["dp"])).shardings(jax.devices(), args)
    assert set(specs(params_sh)) == set(specs(opt_sh)) == {PartitionSpec()}
    assert set(specs(batch_sh)) == {FSDP}


def test_shardings_wants_three_arguments_or_a_prefix(mlp_plans, mlp):
    _, args, _ = mlp
    with pytest.raises(ValueError) as e:
        ap.load_plan(str(mlp_plans["dp"])).shardings(jax.devices(), args[0])
    assert str(e.value) == (
        "shardings() got a dict; pass the step's arguments as a tuple of 3 (params, opt_state, batch), "
        "or one pytree with prefix='params'."
    )


def test_example_training_script(tmp_path):
    # A 4-device plan: the script, not the test's 8 devices, decides how many CPU devices JAX makes.
    plan = save_baselines("gpt", "data=2,model=2", ("fsdp_tp",), tmp_path)["fsdp_tp"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_with_plan.py"), str(plan)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == f"plan {plan}: mesh data=2,model=2 over 4 cpu devices"
    losses = [float(line.split("loss ")[1]) for line in lines[1:4]]
    assert [line.split(":")[0] for line in lines[1:4]] == ["step 0", "step 1", "step 2"]
    assert losses[0] > losses[1] > losses[2]  # the same batch three times: the loss must fall
    assert lines[4] == "params/layers_0/mlp/w_in (64, 256) is laid out as P('data', 'model')"

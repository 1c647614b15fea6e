"""The `auto-partition` command line: pinned one-line errors for bad input (also through the API), and the happy path."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

import auto_partition as ap
from auto_partition import cli
from ir.plan import PlanError
from ir.plan_yaml import save_plan_file
from ir.sharding import MeshShape
from ir.trace import trace
from ir.workload import WorkloadError
from models import registry
from runners.check import MeshMismatchError, provenance_for
from search.baselines import baseline_plans

MESH = "data=2,model=4"
FIX_DEVICES = "before JAX starts."


@pytest.fixture(scope="module")
def plans(tmp_path_factory) -> Path:
    """dp.yaml and fsdp.yaml for the tiny MLP on data=2,model=4, as `baselines --save` writes them."""
    out = tmp_path_factory.mktemp("plans")
    w = registry.get("mlp", "tiny")
    g = trace(w)
    for name, plan in baseline_plans(g, MeshShape.parse(MESH), provenance=provenance_for(w, g)).items():
        if name in ("dp", "fsdp"):
            save_plan_file(plan, out / f"{name}.yaml")
    return out


def edited(src: Path, dest: Path, edit: Callable[[dict], None]) -> str:
    """`src` with `edit` applied to its parsed YAML, written to `dest`; returns the path."""
    doc = yaml.safe_load(src.read_text())
    edit(doc)
    dest.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(dest)


def cli_error(capsys, *argv: str) -> str:
    """Runs the CLI in-process; asserts exit code 2, one stderr line `error: ...`, no traceback."""
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0].removeprefix("error: ")


@pytest.fixture
def entry_module(tmp_path, monkeypatch):
    """Writes a module `name` with `source` on a temporary sys.path entry; returns its file path."""
    made = []

    def write(name: str, source: str) -> Path:
        path = tmp_path / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        made.append(name)
        return path

    monkeypatch.syspath_prepend(str(tmp_path))
    yield write
    for name in made:
        sys.modules.pop(name, None)


# ------------------------------------------------------------------------- mesh size vs devices


def test_mesh_larger_than_the_devices_is_refused_not_faked(capsys):
    # JAX is already running with 8 devices here; the CLI must not pretend it can make 16.
    assert cli_error(capsys, "baselines", "mlp", "--mesh", "data=16", "--compile-only") == (
        "mesh data=16 needs 16 devices but 8 are available; use a mesh whose axis sizes multiply to 8, "
        f"or on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=16 {FIX_DEVICES}"
    )
    assert len(jax.devices()) == 8


@pytest.mark.parametrize("shape,needs", [([2, 2], 4), ([4, 4], 16)])
def test_plan_mesh_of_another_size(capsys, plans, tmp_path, shape, needs):
    path = edited(plans / "dp.yaml", tmp_path / "small.yaml", lambda d: d["mesh"].update(shape=shape))
    message = (
        f"mesh data={shape[0]},model={shape[1]} needs {needs} devices but 8 are available; use a mesh whose "
        f"axis sizes multiply to 8, or on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={needs} "
        f"{FIX_DEVICES}"
    )
    assert cli_error(capsys, "verify", path, "--compile-only") == message
    loaded = ap.load_plan(path)
    with pytest.raises(MeshMismatchError) as e:
        loaded.jit(registry.get("mlp", "tiny").fn)
    assert str(e.value) == message
    with pytest.raises(MeshMismatchError) as e:
        loaded.shardings(jax.devices(), registry.get("mlp", "tiny").args)
    assert str(e.value) == message


def test_shardings_on_a_mesh_that_is_not_the_plans(plans):
    loaded = ap.load_plan(str(plans / "dp.yaml"))
    args = registry.get("mlp", "tiny").args
    with pytest.raises(MeshMismatchError) as e:
        loaded.shardings(jax.devices()[:4], args)
    assert str(e.value) == (
        "mesh data=2,model=4 needs 8 devices but 4 are available; use a mesh whose axis sizes multiply to "
        f"4, or on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=8 {FIX_DEVICES}"
    )
    other = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("x", "y"))
    with pytest.raises(MeshMismatchError) as e:
        loaded.shardings(other, args)
    assert str(e.value) == (
        "mesh x=2,y=4 differs from the plan's mesh data=2,model=4; build the mesh with "
        "LoadedPlan.mesh(devices) or give the same axis names and sizes."
    )


# ------------------------------------------------------------------------------ sharded dims


def test_dim_the_axes_do_not_divide_names_tensor_dim_axes_and_sizes(capsys, plans, entry_module):
    # The plan was made for batch 8; the same MLP with batch 12 cannot split its batch 8 ways.
    entry_module(
        "ep_batch12",
        "from models import registry\ndef make():\n    return registry.get('mlp', 'tiny', batch_size=12)\n",
    )
    detail = (
        "batch/x: dim 0 (size 12) is sharded over mesh axes 'data' × 'model' (size 2 × 4 = 8), and 8 does "
        "not divide 12 (set by data rule 1 {match: 'batch/(x|y)', spec: [[data, model]]}). Use a mesh "
        "axis size that divides it, or leave this dim unsharded."
    )
    argv = ("verify", str(plans / "dp.yaml"), "--model", "ep_batch12:make", "--compile-only")
    assert cli_error(capsys, *argv, "--allow-fingerprint-mismatch") == f"dp.yaml: {detail}"

    loaded = ap.load_plan(str(plans / "dp.yaml"), allow_fingerprint_mismatch=True)
    w = registry.get("mlp", "tiny", batch_size=12)
    with pytest.raises(PlanError) as e:
        loaded.shardings(jax.devices(), w.args[2], prefix="batch")
    assert str(e.value) == f"dp.yaml: {detail}"
    assert e.value.tensor == "batch/x"
    with pytest.raises(PlanError) as e:
        loaded.jit(w.fn)(*w.init(0))
    assert str(e.value) == f"dp.yaml: {detail}"


def test_param_dim_over_one_axis(plans):
    loaded = ap.load_plan(str(plans / "fsdp.yaml"))
    params = {"layers_0": {"kernel": jax.ShapeDtypeStruct((12, 64), np.float32)}}
    with pytest.raises(PlanError) as e:
        loaded.shardings(jax.devices(), params, prefix="params")
    assert str(e.value) == (
        "fsdp.yaml: params/layers_0/kernel: dim 0 (size 12) is sharded over mesh axes 'data' × 'model' "
        "(size 2 × 4 = 8), and 8 does not divide 12 (set by params rule 1 {match: "
        "'params/layers_\\d+/(bias|kernel)', spec: [[data, model]]}). Use a mesh axis size that divides it, "
        "or leave this dim unsharded."
    )


# ------------------------------------------------------------------------ plan file contents


def _set_data_spec(spec):
    def edit(doc):
        doc["data"]["rules"][0]["spec"] = spec

    return edit


def _rename(section: str | None, old: str, new: str):
    def edit(doc):
        where = doc if section is None else doc[section]
        where[new] = where.pop(old)

    return edit


def _rename_in_rule(old: str, new: str):
    def edit(doc):
        rule = doc["data"]["rules"][0]
        rule[new] = rule.pop(old)

    return edit


PLAN_FILE_CASES = [
    pytest.param(
        _set_data_spec([["data", "modle"]]),
        "bad.yaml: data rule 1 {match: 'batch/(x|y)', spec: [[data, modle]]} names mesh axis 'modle', but "
        "the mesh has axes ['data', 'model']; did you mean 'model'?",
        id="unknown-axis",
    ),
    pytest.param(
        _set_data_spec(["data", "data"]),
        "bad.yaml: data rule 1 {match: 'batch/(x|y)', spec: [data, data]} uses mesh axis 'data' twice; "
        "shard each mesh axis over at most one dim.",
        id="axis-twice-across-dims",
    ),
    pytest.param(
        _set_data_spec([["model", "model"]]),
        "bad.yaml: data rule 1 {match: 'batch/(x|y)', spec: [[model, model]]} uses mesh axis 'model' "
        "twice; shard each mesh axis over at most one dim.",
        id="axis-twice-in-one-dim",
    ),
    pytest.param(
        lambda d: d["mesh"].pop("shape"),
        "bad.yaml: section 'mesh' is missing key 'shape'; add e.g. shape: [2, 4]",
        id="missing-mesh-shape",
    ),
    pytest.param(
        lambda d: d.pop("apiVersion"),
        "bad.yaml is missing key 'apiVersion'; add e.g. apiVersion: auto-partition/v1",
        id="missing-apiVersion",
    ),
    pytest.param(
        _rename(None, "params", "parms"),
        "unknown key 'parms' in bad.yaml; did you mean 'params'?",
        id="misspelt-section",
    ),
    pytest.param(
        _rename("mesh", "axes", "axis"),
        "unknown key 'axis' in bad.yaml section 'mesh'; did you mean 'axes'?",
        id="misspelt-mesh-key",
    ),
    pytest.param(
        _rename_in_rule("match", "mach"),
        "unknown key 'mach' in bad.yaml section 'data rule 1'; did you mean 'match'?",
        id="misspelt-rule-key",
    ),
    pytest.param(
        lambda d: d["data"]["rules"][0].pop("spec"),
        "bad.yaml: data rule 1 is missing key 'spec'; add e.g. spec: [null, model]",
        id="missing-rule-key",
    ),
]


@pytest.mark.parametrize("edit,message", PLAN_FILE_CASES)
def test_bad_plan_file(capsys, plans, tmp_path, edit, message):
    path = edited(plans / "dp.yaml", tmp_path / "bad.yaml", edit)
    assert cli_error(capsys, "verify", path, "--compile-only") == message
    with pytest.raises(PlanError) as e:
        ap.load_plan(path)
    assert str(e.value) == message


def test_missing_plan_file(capsys, tmp_path):
    path = str(tmp_path / "nope.yaml")
    message = (
        f"plan file {path!r} does not exist; check the path, or write a plan with auto-partition "
        "baselines MODEL --mesh data=2,model=4 --save DIR."
    )
    assert cli_error(capsys, "verify", path) == message
    with pytest.raises(PlanError) as e:
        ap.load_plan(path)
    assert str(e.value) == message


# ---------------------------------------------------------------------------- fingerprints


def test_plan_for_another_model(capsys, plans):
    fp_mlp = registry.get("mlp", "tiny").fingerprint()
    fp_gpt = registry.get("gpt", "tiny").fingerprint()
    assert cli_error(capsys, "verify", str(plans / "dp.yaml"), "--model", "gpt", "--compile-only") == (
        f"dp.yaml was made for builtin:mlp:tiny (fingerprint {fp_mlp}), but the model given "
        f"(builtin:gpt:tiny) has fingerprint {fp_gpt} (its input names, shapes or dtypes differ); re-run "
        "the search for this model, or pass --allow-fingerprint-mismatch to apply it anyway."
    )
    w = registry.get("mlp", "tiny", batch_size=16)
    with pytest.raises(PlanError) as e:
        ap.load_plan(str(plans / "dp.yaml")).jit(w.fn)(*w.abstract_args)
    assert str(e.value) == (
        f"dp.yaml was made for builtin:mlp:tiny (fingerprint {fp_mlp}), but the model given has "
        f"fingerprint {w.fingerprint()} (its input names, shapes or dtypes differ); re-run the search for "
        "this model, or load it with load_plan(path, allow_fingerprint_mismatch=True) to apply it anyway."
    )


# ---------------------------------------------------------------------------- entry points


def test_entry_point_module_not_found(capsys):
    message = (
        "entry point 'no_such_pkg.mod:make': module 'no_such_pkg.mod' does not import (No module named "
        "'no_such_pkg'). Check the module path and that its directory is on PYTHONPATH."
    )
    assert cli_error(capsys, "trace", "no_such_pkg.mod:make") == message
    assert cli_error(capsys, "baselines", "no_such_pkg.mod:make", "--mesh", MESH) == message


def test_entry_point_whose_import_fails(capsys, entry_module):
    path = entry_module("ep_needs_dep", "import numpy\nimport no_such_dependency\n")
    assert cli_error(capsys, "trace", "ep_needs_dep:make") == (
        "entry point 'ep_needs_dep:make': module 'ep_needs_dep' does not import: ModuleNotFoundError: No "
        f"module named 'no_such_dependency' (at {path}:2); install the missing package or fix the import."
    )
    path = entry_module("ep_raises", "X = 1\nY = 1 / 0\n")
    assert cli_error(capsys, "trace", "ep_raises:make") == (
        "entry point 'ep_raises:make': module 'ep_raises' does not import: ZeroDivisionError: division by "
        f"zero (at {path}:2); fix the error there."
    )
    path = entry_module("ep_syntax", "def make(:\n    pass\n")
    message = cli_error(capsys, "trace", "ep_syntax:make")
    assert message.startswith(
        "entry point 'ep_syntax:make': module 'ep_syntax' does not import: SyntaxError: "
    )
    assert message.endswith(f"(at {path}:1); fix the error there.")


def test_entry_point_that_fails_or_is_missing(capsys, plans, entry_module):
    path = entry_module("ep_fails", "def make():\n    raise RuntimeError('no weights here')\n")
    assert cli_error(capsys, "verify", str(plans / "dp.yaml"), "--model", "ep_fails:make") == (
        f"entry point 'ep_fails:make' failed when called: RuntimeError: no weights here (at {path}:2); fix "
        "the function so it returns a Workload or a (fn, args) tuple."
    )
    assert cli_error(capsys, "trace", "ep_fails:mkae") == (
        "entry point 'ep_fails:mkae': module 'ep_fails' has no callable 'mkae'; name a function that "
        "returns a Workload or a (fn, args) tuple."
    )
    with pytest.raises(WorkloadError):
        ap.resolve_model("ep_fails:make")


def test_entry_point_without_init_can_only_be_compiled(capsys, entry_module):
    entry_module(
        "ep_shapes",
        """
        import jax, jax.numpy as jnp
        def make():
            args = (jax.ShapeDtypeStruct((8, 8), jnp.float32), jax.ShapeDtypeStruct((8, 8), jnp.float32))
            return (lambda params, batch: (batch @ params).sum(), args)
        """,
    )
    assert cli_error(capsys, "baselines", "ep_shapes:make", "--mesh", "data=8", "--strategies", "dp") == (
        "workload 'ep_shapes:make' has no init(seed) to make real inputs, so it can only be compiled; pass "
        "--compile-only (execute=False), or return a Workload with an init(seed)."
    )


# ------------------------------------------------------------------------------- other input


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ("baselines", "mlp", "--mesh", "data2"),
            "mesh 'data2': 'data2' is not NAME=SIZE; write e.g. --mesh data=2,model=4.",
        ),
        (
            ("baselines", "mlp", "--mesh", "data=2,data=4"),
            "mesh axis names ('data', 'data') repeat; name each axis once.",
        ),
        (
            ("baselines", "mlp", "--mesh", "data=8", "--strategies", "dp,fdsp"),
            "unknown strategy 'fdsp' (did you mean 'fsdp'?); the strategies are dp, fsdp, tp, dp_tp, "
            "fsdp_tp, sp, ep.",
        ),
        (
            ("baselines", "mlp", "--mesh", "data=8", "--strategies", "dp,tp"),
            "strategies ['tp'] do not apply to this model and mesh; applicable: ['dp', 'fsdp'].",
        ),
        (
            ("trace", "mpl"),
            "unknown model 'mpl' (did you mean 'mlp'?); use a built-in model (bert, gpt, llama, mlp, moe, "
            "vit, hf-gpt2, hf-llama, hf-bert, hf-vit), NAME-SIZE such as llama-8b, or an entry point "
            "'package.module:function'.",
        ),
    ],
    ids=["mesh-syntax", "mesh-axis-repeated", "unknown-strategy", "inapplicable-strategy", "unknown-model"],
)
def test_other_bad_arguments(capsys, argv, message):
    assert cli_error(capsys, *argv) == message


def test_no_strategy_fits_the_mesh(capsys, entry_module):
    entry_module(
        "ep_batch12_b",
        "from models import registry\ndef make():\n    return registry.get('mlp', 'tiny', batch_size=12)\n",
    )
    assert cli_error(capsys, "baselines", "ep_batch12_b:make", "--mesh", "data=8", "--compile-only") == (
        "no strategy applies to builtin:mlp:tiny:batch_size=12 on mesh data=8: each needs its mesh axes to divide the dims "
        "it shards (batch dim 0 is 12); use smaller mesh axes."
    )


# --------------------------------------------------------------------------------- happy path


def test_baselines_json_then_verify_the_saved_plan(capsys, tmp_path):
    argv = ["baselines", "mlp", "--mesh", MESH, "--strategies", "dp,fsdp", "--mode", "constrained"]
    assert cli.main([*argv, "--json", "--save", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["title"] == "builtin:mlp:tiny on mesh data=2,model=4"
    assert [(r["plan"], r["mode"]) for r in report["rows"]] == [
        ("dp", "constrained"),
        ("fsdp", "constrained"),
    ]
    for row in report["rows"]:
        assert row["agreement"] == 1.0
        assert row["within_tolerance"] is True
        assert row["fits"] is True
        assert row["collectives"]
    assert sorted(os.listdir(tmp_path)) == ["dp.yaml", "fsdp.yaml"]

    # The saved plan records its workload, so verify needs no --model.
    assert cli.main(["verify", str(tmp_path / "fsdp.yaml"), "--mode", "constrained", "--json"]) == 0
    out, err = capsys.readouterr()
    verified = json.loads(out)
    assert verified["title"].endswith("(builtin:mlp:tiny) on mesh data=2,model=4")
    [row] = verified["rows"]
    assert (row["plan"], row["agreement"], row["within_tolerance"]) == ("fsdp.yaml", 1.0, True)
    assert "Traceback" not in err

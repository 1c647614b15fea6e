"""`auto-partition search` end to end, found plans executed under JAX, and the pinned bad-input errors."""

from __future__ import annotations

import json

import pytest

from auto_partition.cli import main
from auto_partition.workloads import resolve
from cost_model.hardware import load_hardware
from ir.plan_yaml import load_plan_file
from ir.sharding import MeshShape
from ir.trace import trace
from runners.check import check_plans
from runners.program import Mode
from search.evaluate import Evaluator
from search.problem import Budget, SearchProblem
from search.registry import make_searcher
from search.space import build_space

MESH = MeshShape.parse("data=2,model=2")


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_search_writes_a_plan_and_compares_every_baseline(capsys, tmp_path):
    path = tmp_path / "plan.yaml"
    code, out, _ = _run(
        capsys,
        "search", "mlp", "--mesh", "data=2,model=2", "--searcher", "exhaustive",
        "--budget", "30s", "-o", str(path), "--json",
    )  # fmt: skip
    assert code == 0
    info = json.loads(out)
    names = [r["name"] for r in info["plans"]]
    assert names[0] == "found (exhaustive)" and {"dp", "fsdp"} <= set(names)
    assert info["status"] == "optimal"
    found = info["plans"][0]
    # Exhaustive over a space holding every baseline's decisions: none is faster.
    assert all(found["step_time"] <= r["step_time"] * (1 + 1e-9) for r in info["plans"][1:] if r["fits"])
    plan = load_plan_file(path)
    assert plan.provenance.searcher == "exhaustive" and plan.provenance.workload == "builtin:mlp:tiny"


def test_search_table_names_the_best_baseline(capsys):
    code, out, _ = _run(
        capsys, "search", "mlp", "--mesh", "data=2,model=2", "--searcher", "exhaustive", "--budget", "30s"
    )
    assert code == 0
    assert "best fitting baseline:" in out and "found (exhaustive)" in out and "fsdp" in out


def _forced_problem(source: str, fraction: float) -> tuple:
    """A problem whose memory budget the replicated plan misses, so the found plan must shard."""
    w = resolve(source)
    g = trace(w)
    hw = load_hardware("h100")
    probe = SearchProblem(g, MESH, hw)
    space = build_space(g, MESH)
    replicated = Evaluator(probe, space).score(space.empty).memory
    problem = SearchProblem(
        g, MESH, hw, memory_budget=int(replicated * fraction), source=(w.source, w.fingerprint())
    )
    return w, g, problem, replicated


@pytest.mark.parametrize(
    "source,searcher",
    [
        ("builtin:mlp:tiny", "exhaustive"),
        ("builtin:mlp:tiny", "portfolio"),
        ("builtin:gpt:tiny", "exhaustive"),
        ("builtin:gpt:tiny", "ilp"),
    ],
)
def test_found_plans_execute_and_match_the_unsharded_step(source, searcher):
    w, g, problem, replicated = _forced_problem(source, 0.6)
    result = make_searcher(searcher).search(problem, Budget(seconds=20))
    assert result.report.fits and result.report.memory.peak < replicated
    assert any(any(s.dims) for s in result.plan.input_shardings(g).values())  # it shards something
    checks = check_plans(w, [("found", result.plan)], modes=(Mode.CONSTRAINED, Mode.PORTABLE), graph=g)
    assert len(checks) == 2
    for c in checks:
        assert c.verification.within_tolerance, (c.verification.mode, c.verification.max_error)


def test_infeasible_memory_budget_says_by_how_much_and_saves_the_closest(capsys, tmp_path):
    path = tmp_path / "closest.yaml"
    code, _, err = _run(
        capsys,
        "search", "mlp", "--mesh", "data=2,model=2", "--searcher", "exhaustive",
        "--budget", "30s", "--memory-budget", "1KB", "-o", str(path), "--quiet",
    )  # fmt: skip
    assert code == 3
    assert "no plan found fits the memory budget of 1.00 KB per device: the closest (exhaustive) needs" in err
    assert " over. Use more devices" in err and f"saved to {path}" in err
    assert load_plan_file(path).provenance.solver_status == "infeasible"


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["--searcher", "anneal"],
            "error: unknown searcher 'anneal'; choose one of: mcts, ilp, optuna, exhaustive, portfolio.",
        ),
        (["--budget", "0s"], "error: budget"),
        (["--budget", "soon"], "error: budget 'soon'"),
    ],
)
def test_bad_search_arguments(capsys, argv, message):
    code, _, err = _run(capsys, "search", "mlp", "--mesh", "data=2,model=2", "--quiet", *argv)
    assert code == 2
    assert err.startswith(message) and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "tactics,message",
    [
        (
            "- {shard: 'params/nothing', dim: 0, axis: model}\n",
            "error: tactic {shard: 'params/nothing', dim: 0, axis: model} matches no tensor",
        ),
        (
            "- {batch: model}\n- {shard: 'batch/x', dim: 0, axis: data}\n",
            "error: tactics {batch: model} and {shard: 'batch/x', dim: 0, axis: data} contradict",
        ),
        ("[]\n", "error: "),
    ],
)
def test_bad_tactics(capsys, tmp_path, tactics, message):
    path = tmp_path / "t.yaml"
    path.write_text(tactics)
    code, _, err = _run(
        capsys,
        "search",
        "mlp",
        "--mesh",
        "data=2,model=2",
        "--quiet",
        "--tactics",
        str(path),
        "--budget",
        "5",
    )
    assert code == 2, err
    assert err.startswith(message), err


def test_tactics_fix_decisions_and_the_search_does_the_rest(capsys, tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("- {batch: data}\n")
    out_plan = tmp_path / "p.yaml"
    code, out, _ = _run(
        capsys,
        "search", "mlp", "--mesh", "data=2,model=2", "--searcher", "exhaustive", "--budget", "30s",
        "--tactics", str(path), "-o", str(out_plan), "--json",
    )  # fmt: skip
    assert code == 0, out
    w = resolve("builtin:mlp:tiny")
    g = trace(w)
    plan = load_plan_file(out_plan)
    batch = [vid for vid in g.inputs if g.values[vid].name.startswith("batch/")]
    shardings = plan.input_shardings(g)
    assert all(shardings[vid].dims[0][:1] == ("data",) for vid in batch)


def test_portfolio_is_never_slower_than_the_best_fitting_baseline():
    """With no member searcher at all, the portfolio returns the best of the expert plans as
    written and the space's seeds (here the replicated plan, fastest on a tiny model)."""
    from cost_model.simulate import simulate
    from search.baselines import baseline_plans
    from search.portfolio import Portfolio

    w = resolve("builtin:gpt:tiny")
    g = trace(w)
    hw = load_hardware("h100")
    problem = SearchProblem(g, MESH, hw)
    result = Portfolio(members=()).search(problem, Budget(seconds=30))
    best = min(simulate(g, p, hw).step_time for p in baseline_plans(g, MESH).values())
    assert result.report.step_time <= best * (1 + 1e-9)
    assert result.stats["winner"] in ("baseline", *(f"baseline:{n}" for n in baseline_plans(g, MESH)))


def test_a_mesh_larger_than_one_node_spans_as_few_nodes_as_hold_it(capsys):
    code, out, err = _run(
        capsys, "search", "mlp", "--mesh", "data=16", "--searcher", "exhaustive", "--budget", "5s", "--json"
    )
    assert code == 0, err
    assert json.loads(out)["nodes"] == 2


def test_a_reader_that_stops_reading_loses_no_work(tmp_path):
    """`auto-partition search ... | head`: the plan file is written, no error or traceback, and
    the exit status is a Unix tool's killed by SIGPIPE (128 + 13), which a pipeline ignores."""
    import subprocess
    import sys

    path = tmp_path / "plan.yaml"
    argv = [sys.executable, "-m", "auto_partition.cli", "search", "mlp", "--mesh", "data=2,model=2",
            "--searcher", "exhaustive", "--budget", "30s", "-o", str(path)]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141, err
    assert "Traceback" not in err and "error" not in err.lower() and "Exception ignored" not in err
    assert load_plan_file(path).provenance.searcher == "exhaustive"

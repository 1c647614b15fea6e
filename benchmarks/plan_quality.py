"""Plan quality: each searcher's plan against the best expert baseline that fits, on h100 clusters.

For every model x mesh cell: trace the train step (the global batch grows with the data axis),
simulate every expert baseline (search.baselines) and take the fastest that fits in memory, then
run each searcher for each budget and simulate its plan on the same hardware. Per cell the table
shows the best baseline and its step time, each searcher's step time at each budget, the
speed-up over the best baseline, search time, and the ILP's status and gap. All step times are
the simulator's (cost_model.simulate), on h100 links with 8 GPUs per node. The global batch
grows with the data axis (weak scaling, see MODELS).

    python benchmarks/plan_quality.py [--models gpt2-xl,llama-8b] [--meshes 8,64] [--budgets 10,60]
                                      [--searchers ilp,mcts,optuna,portfolio]

Writes benchmarks/results/plan_quality.json (rows are appended as cells finish, so a long run
that is stopped keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# model -> (source, examples per slice of the data axis): the global batch is that times the
# data axis size (one 4096-token sequence per slice for Llama, as in weak-scaling runs). The
# decoder LMs checkpoint activations per layer (':remat'), as they are trained at these sizes.
MODELS = {
    "gpt2-xl": ("builtin:gpt:gpt2-xl:scan:remat", 2),
    "llama-8b": ("builtin:llama:8b:scan:remat", 1),
    "llama-70b": ("builtin:llama:70b:scan:remat", 1),
    "bert-large": ("builtin:bert:bert-large", 8),
    "vit-large": ("builtin:vit:vit-large", 32),
    "moe": ("builtin:moe:medium", 1),
}
# devices -> (mesh, nodes): 8 GPUs per node, the model axis inside a node.
MESHES = {8: ("data=2,model=4", 1), 64: ("data=8,model=8", 8), 256: ("data=32,model=8", 32)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--meshes", default="8,64,256")
    p.add_argument("--budgets", default="10,60", help="seconds per search")
    p.add_argument("--searchers", default="ilp,mcts,optuna,portfolio")
    p.add_argument(
        "--portfolio-only-budgets",
        default="60",
        help="budgets at which only the portfolio runs (saves time; '' for none)",
    )
    p.add_argument("--hardware", default="h100")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "plan_quality.json"))
    p.add_argument("--resume", action="store_true", help="keep the cells already in --out and skip them")
    args = p.parse_args()

    from auto_partition.workloads import resolve
    from cost_model.gc_pause import long_lived
    from cost_model.hardware import load_hardware
    from cost_model.simulate import simulate
    from ir.sharding import MeshShape
    from ir.trace import trace
    from search.baselines import baseline_plans
    from search.evaluate import clear_shared
    from search.problem import Budget, SearchProblem
    from search.registry import make_searcher

    hw = load_hardware(args.hardware)
    budgets = [float(b) for b in args.budgets.split(",")]
    only_portfolio = {float(b) for b in args.portfolio_only_budgets.split(",") if b}
    searchers = args.searchers.split(",")
    rows: list[dict] = []
    if args.resume and os.path.exists(args.out):
        with open(args.out) as f:
            rows = json.load(f)["rows"]
    done = {(r["model"], r["devices"]) for r in rows}
    for model in args.models.split(","):
        source, batch = MODELS[model]
        for devices in (int(m) for m in args.meshes.split(",")):
            if (model, devices) in done:
                continue
            mesh_text, nodes = MESHES[devices]
            mesh = MeshShape.parse(mesh_text)
            data = mesh.axis_size("data")
            t0 = time.perf_counter()
            g = trace(resolve(f"{source}:batch_size={batch * data}"))
            trace_s = time.perf_counter() - t0
            cap = hw.device.hbm_capacity
            base = {}
            for name, plan in baseline_plans(g, mesh).items():
                r = simulate(g, plan, hw, nodes=nodes)
                base[name] = {"step_time": r.step_time, "memory": r.memory.peak, "fits": r.memory.peak <= cap}
            fitting = {n: b for n, b in base.items() if b["fits"]}
            best_name = min(fitting, key=lambda n: fitting[n]["step_time"]) if fitting else None
            best_time = fitting[best_name]["step_time"] if best_name else None
            row = {
                "model": model,
                "source": source,
                "devices": devices,
                "mesh": mesh_text,
                "nodes": nodes,
                "trace_s": round(trace_s, 2),
                "baselines": base,
                "best_baseline": best_name,
                "best_baseline_step_time": best_time,
                "searches": [],
            }
            print(
                f"{model} x {devices}: trace {trace_s:.1f}s, best baseline {best_name} {_ms(best_time)}",
                flush=True,
            )
            for budget in budgets:
                for name in searchers:
                    if budget in only_portfolio and name != "portfolio":
                        continue
                    clear_shared()  # every search starts cold: no scores left by the previous one
                    problem = SearchProblem(g, mesh, hw, nodes=nodes, source=(source, ""))
                    t = time.perf_counter()
                    with long_lived():  # as the CLI runs a search (auto_partition.search_cmd)
                        result = make_searcher(name, seed=args.seed).search(problem, Budget(seconds=budget))
                    took = time.perf_counter() - t
                    rep = result.report
                    st = result.stats
                    entry = {
                        "searcher": name,
                        "budget_s": budget,
                        "seconds": round(took, 2),
                        "step_time": rep.step_time,
                        "memory": rep.memory.peak,
                        "fits": rep.fits and rep.memory.peak <= cap,
                        "status": result.status.value,
                        "speedup": (best_time / rep.step_time) if best_time and rep.fits else None,
                        "evaluations": st.get("evaluations"),
                        "ilp_status": st.get("ilp_status", st.get("ilp_ilp_status")),
                        "ilp_gap": st.get("gap", st.get("ilp_gap")),
                    }
                    row["searches"].append(entry)
                    sp = f"{entry['speedup']:.2f}x" if entry["speedup"] else "-"
                    print(
                        f"  {name:10s} {budget:4.0f}s: {_ms(rep.step_time):>10s} fits={entry['fits']} "
                        f"speed-up {sp:>6s} in {took:5.1f}s ({entry['evaluations']} plans) "
                        + (
                            f"ilp {entry['ilp_status']} gap {entry['ilp_gap']}" if entry["ilp_status"] else ""
                        ),
                        flush=True,
                    )
            rows.append(row)
            _save(args, rows)
    _table(rows)
    _save(args, rows)
    return 0


def _ms(t) -> str:
    return f"{t * 1e3:.1f}ms" if t is not None else "none fits"


def _save(args, rows) -> None:
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"hardware": args.hardware, "seed": args.seed, "rows": rows}, f, indent=1)


def _table(rows: list[dict]) -> None:
    print()
    print(
        f"{'model':11s} {'GPUs':>4s} {'best baseline':>22s} {'searcher':>10s} {'budget':>6s} "
        f"{'step time':>10s} {'speed-up':>8s} {'search s':>8s} {'ILP':>18s}"
    )
    faster = cells = slower = 0
    for r in rows:
        b = f"{r['best_baseline']} {_ms(r['best_baseline_step_time'])}" if r["best_baseline"] else "none fits"
        for s in r["searches"]:
            sp = f"{s['speedup']:.2f}x" if s["speedup"] else ("no fit" if not s["fits"] else "-")
            ilp = (
                f"{s['ilp_status']} gap {s['ilp_gap']:.2g}"
                if s["ilp_status"] and s["ilp_gap"] is not None
                else (s["ilp_status"] or "")
            )
            print(
                f"{r['model']:11s} {r['devices']:4d} {b:>22s} {s['searcher']:>10s} {s['budget_s']:5.0f}s "
                f"{_ms(s['step_time']) if s['fits'] else 'no fit':>10s} {sp:>8s} {s['seconds']:8.1f} {ilp:>18s}"
            )
        port = [s for s in r["searches"] if s["searcher"] == "portfolio"]
        if port:
            best = max(port, key=lambda s: s["budget_s"])
            cells += 1
            if best["speedup"] is not None and best["speedup"] >= 1.05:
                faster += 1
            if r["best_baseline"] and (best["speedup"] is None or best["speedup"] < 0.9999):
                slower += 1
    if cells:
        print(
            f"\nportfolio (largest budget): faster than the best fitting baseline by >=5% in {faster}/{cells} "
            f"cells; slower in {slower}/{cells}."
        )


if __name__ == "__main__":
    sys.exit(main())

"""Simulator against XLA: predicted per-device FLOPs vs `Compiled.cost_analysis()`, every baseline plan.

For each model (tiny size) x expert strategy x mesh, compiles the plan in the constrained mode
(every value pinned to its propagated sharding, so XLA has no freedom to differ), and sets the
simulator's per-device FLOPs beside XLA's. Both count as HloCostAnalysis does, a loop body once
(`cost_model.compute.xla_flops`); the step column is what a step executes (`op_costs` rows times
their trip counts), which differs only for scanned models. Prints one row per case, misses
included, and writes benchmarks/results/sim_fidelity.json.

    python benchmarks/sim_fidelity.py [--models gpt,llama] [--meshes data=8 data=2,model=4] [--tol 0.02]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

MODELS = "mlp,gpt,llama,bert,vit,moe,builtin:llama:tiny:scan"
MESHES = ("data=8", "data=2,model=4", "data=2,fsdp=2,model=2")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=MODELS)
    p.add_argument("--meshes", nargs="+", default=list(MESHES))
    p.add_argument("--strategies", default="", help="comma-separated subset (default: every applicable)")
    p.add_argument("--tol", type=float, default=0.02, help="relative FLOPs tolerance")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "sim_fidelity.json"))
    args = p.parse_args()
    n = max(_mesh_size(m) for m in args.meshes)
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"
    import warnings

    warnings.filterwarnings("ignore")
    from auto_partition.workloads import resolve
    from cost_model.compute import op_costs, xla_flops
    from ir.propagate import propagate_plan
    from ir.sharding import MeshShape
    from ir.trace import trace
    from runners.execute import verify
    from runners.program import Mode
    from search.baselines import baseline_plans

    wanted = set(filter(None, args.strategies.split(",")))
    rows = []
    head = f"{'model':<24} {'strategy':<8} {'mesh':<22} {'step':>12} {'predicted':>12} {'xla':>12} {'ratio':>7}  ok"
    print(head + "\n" + "-" * len(head), flush=True)
    t0 = time.time()
    for spec in args.models.split(","):
        workload = resolve(spec)
        graph = trace(workload)
        for mesh_text in args.meshes:
            mesh = MeshShape.parse(mesh_text)
            for name, plan in baseline_plans(graph, mesh).items():
                if wanted and name not in wanted:
                    continue
                prop = propagate_plan(graph, plan)
                t_sim = time.perf_counter()
                predicted = xla_flops(prop)
                t_sim = time.perf_counter() - t_sim
                step = sum(r.flops * r.count for r in op_costs(prop))
                compiled = verify(workload, prop, Mode.CONSTRAINED, execute=False).flops
                ratio = predicted / compiled if compiled else float("nan")
                ok = abs(ratio - 1.0) <= args.tol
                print(
                    f"{spec:<24} {name:<8} {mesh_text:<22} {step:>12.0f} {predicted:>12.0f} {compiled:>12.0f} "
                    f"{ratio:>7.4f}  {'yes' if ok else 'NO'}",
                    flush=True,
                )
                rows.append(
                    {
                        "model": spec,
                        "strategy": name,
                        "mesh": mesh_text,
                        "mode": Mode.CONSTRAINED.value,
                        "step_flops": step,
                        "predicted_flops": predicted,
                        "xla_flops": compiled,
                        "flops_ratio": ratio,
                        "flops_ok": ok,
                        "simulator_seconds": round(t_sim, 3),
                    }
                )
    hits = sum(r["flops_ok"] for r in rows)
    print(f"\nFLOPs within {args.tol:.0%}: {hits}/{len(rows)} cases ({time.time() - t0:.0f} s)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {"tolerance": args.tol, "seconds": round(time.time() - t0, 1), "rows": rows},
            f,
            indent=1,
        )
    print(f"wrote {args.out}")
    return 0 if hits == len(rows) else 1


def _mesh_size(text: str) -> int:
    n = 1
    for part in text.split(","):
        n *= int(part.split("=")[1])
    return n


if __name__ == "__main__":
    sys.exit(main())

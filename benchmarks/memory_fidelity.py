"""Simulator against XLA: predicted per-device memory vs `Compiled.memory_analysis()`, every baseline plan.

For each model (tiny size) x expert strategy x mesh, compiles the plan in the constrained mode
(every value pinned to its propagated sharding, so XLA has no freedom to differ) and sets the
simulator's per-device footprint (`cost_model.memory.memory(prop).peak`: arguments + outputs -
aliased + temporaries) beside XLA's (argument + output - alias + temp), with each part. Prints one
row per case, misses included, and writes benchmarks/results/memory_fidelity.json.

    python benchmarks/memory_fidelity.py [--models gpt,llama] [--meshes data=8 data=2,model=4] [--tol 0.1]
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
    p.add_argument("--tol", type=float, default=0.10, help="relative tolerance on the total")
    p.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "memory_fidelity.json")
    )
    args = p.parse_args()
    n = max(_mesh_size(m) for m in args.meshes)
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"
    import warnings

    warnings.filterwarnings("ignore")
    from auto_partition.workloads import resolve
    from cost_model.memory import memory
    from ir.propagate import propagate_plan
    from ir.sharding import MeshShape
    from ir.trace import trace
    from runners.execute import verify
    from runners.program import Mode
    from search.baselines import baseline_plans

    wanted = set(filter(None, args.strategies.split(",")))
    rows = []
    head = (
        f"{'model':<26} {'strategy':<8} {'mesh':<22} {'predicted':>10} {'xla':>10} {'ratio':>6} "
        f"{'temp pred':>10} {'temp xla':>10}  ok"
    )
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
                report = memory(prop)
                xla = verify(workload, prop, Mode.CONSTRAINED, execute=False).memory
                total = xla["argument"] + xla["output"] - xla["alias"] + xla["temp"]
                ratio = report.peak / total if total else float("nan")
                ok = abs(ratio - 1.0) <= args.tol
                print(
                    f"{spec:<26} {name:<8} {mesh_text:<22} {report.peak:>10} {total:>10} {ratio:>6.3f} "
                    f"{report.temp:>10} {xla['temp']:>10}  {'yes' if ok else 'NO'}",
                    flush=True,
                )
                rows.append(
                    {
                        "model": spec,
                        "strategy": name,
                        "mesh": mesh_text,
                        "mode": Mode.CONSTRAINED.value,
                        "predicted": {
                            "argument": report.arguments,
                            "output": report.outputs,
                            "alias": report.aliased,
                            "temp": report.temp,
                            "total": report.peak,
                        },
                        "xla": {**xla, "total": total},
                        "ratio": ratio,
                        "ok": ok,
                    }
                )
    hits = sum(r["ok"] for r in rows)
    print(f"\nmemory within {args.tol:.0%}: {hits}/{len(rows)} cases ({time.time() - t0:.0f} s)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"tolerance": args.tol, "seconds": round(time.time() - t0, 1), "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")
    return 0 if hits == len(rows) else 1


def _mesh_size(text: str) -> int:
    n = 1
    for part in text.split(","):
        n *= int(part.split("=")[1])
    return n


if __name__ == "__main__":
    sys.exit(main())

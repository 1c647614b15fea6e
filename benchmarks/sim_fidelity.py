"""Simulator against XLA: per-device memory, FLOPs and collective bytes of every baseline plan.

For each model (tiny size) x expert strategy x mesh, compiles the plan once in the constrained mode
(every value pinned to its propagated sharding, so XLA has no freedom to differ; compile only) and
sets three predictions beside what XLA reports:

- memory: `cost_model.memory.memory(prop, compiler=XLA_CPU).peak` against `memory_analysis()`
  (argument + temp + output - alias), within --memory-tol;
- FLOPs: `cost_model.xla_accounting.xla_flops` against `cost_analysis()`, within --flops-tol. Both
  count a loop body once, as HloCostAnalysis does; the JSON's `step` is what a step executes
  (`op_costs` rows times their trip counts), which differs only for scanned models;
- collectives: the propagation's bytes per (kind, mesh axes) against those of the compiled HLO,
  which must be equal; the worst (kind, axes) row is shown when they are not.

Prints one row per case, misses included, a summary line per column, and writes every row to
benchmarks/results/sim_fidelity.json.

    python benchmarks/sim_fidelity.py [--models gpt,llama] [--meshes data=8 data=2,model=4]
        [--strategies dp,fsdp] [--memory-tol 0.1] [--flops-tol 0.02]
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
    p.add_argument("--memory-tol", type=float, default=0.10, help="relative tolerance on per-device memory")
    p.add_argument("--flops-tol", "--tol", type=float, default=0.02, help="relative FLOPs tolerance")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "sim_fidelity.json"))
    args = p.parse_args()
    n = max(_mesh_size(m) for m in args.meshes)
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"
    import warnings

    warnings.filterwarnings("ignore")
    from auto_partition.workloads import resolve
    from cost_model.compute import op_costs
    from cost_model.memory import XLA_CPU, memory
    from cost_model.xla_accounting import xla_flops
    from ir.propagate import propagate_plan
    from ir.sharding import MeshShape
    from ir.trace import trace
    from runners.execute import verify
    from runners.program import Mode
    from search.baselines import baseline_plans

    wanted = set(filter(None, args.strategies.split(",")))
    rows = []
    head = (
        f"{'model':<24} {'strategy':<8} {'mesh':<22} {'mem pred':>10} {'mem xla':>10} {'ratio':>6} "
        f"{'flops pred':>12} {'flops xla':>12} {'ratio':>7} {'coll':>5}  {'ok':<15} "
        "worst (kind, axes): predicted / compiled"
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
                t_sim = time.perf_counter()
                report = memory(prop, compiler=XLA_CPU)
                predicted_flops = xla_flops(prop)
                t_sim = time.perf_counter() - t_sim
                step = sum(r.flops * r.count for r in op_costs(prop))
                v = verify(workload, prop, Mode.CONSTRAINED, execute=False)

                xla_mem = v.memory
                mem_total = xla_mem["argument"] + xla_mem["output"] - xla_mem["alias"] + xla_mem["temp"]
                mem_ratio = report.peak / mem_total if mem_total else float("nan")
                mem_ok = abs(mem_ratio - 1.0) <= args.memory_tol
                flops_ratio = predicted_flops / v.flops if v.flops else float("nan")
                flops_ok = abs(flops_ratio - 1.0) <= args.flops_tol
                mismatched = [r for r in v.rows if r.predicted != r.compiled]
                coll_ok = not mismatched
                worst = min(
                    mismatched, key=lambda r: (r.agreement, -abs(r.predicted - r.compiled)), default=None
                )
                missed = [
                    c for c, hit in (("mem", mem_ok), ("flops", flops_ok), ("coll", coll_ok)) if not hit
                ]
                ok = not missed
                verdict = "yes" if ok else "NO " + ",".join(missed)
                wtext = f"{_key(worst)} {worst.predicted} / {worst.compiled}" if worst else ""
                print(
                    f"{spec:<24} {name:<8} {mesh_text:<22} "
                    f"{report.peak:>10} {mem_total:>10} {mem_ratio:>6.3f} "
                    f"{predicted_flops:>12.0f} {v.flops:>12.0f} {flops_ratio:>7.4f} "
                    f"{'equal' if coll_ok else 'DIFF':>5}  {verdict:<15} {wtext}".rstrip(),
                    flush=True,
                )
                rows.append(
                    {
                        "model": spec,
                        "strategy": name,
                        "mesh": mesh_text,
                        "mode": Mode.CONSTRAINED.value,
                        "memory": {
                            "predicted": {
                                "argument": report.arguments,
                                "output": report.outputs,
                                "alias": report.aliased,
                                "temp": report.temp,
                                "total": report.peak,
                            },
                            "xla": {**xla_mem, "total": mem_total},
                            "ratio": mem_ratio,
                            "ok": mem_ok,
                        },
                        "flops": {
                            "step": step,
                            "predicted": predicted_flops,
                            "xla": v.flops,
                            "ratio": flops_ratio,
                            "ok": flops_ok,
                        },
                        "collectives": {
                            "rows": [
                                {
                                    "kind": r.kind.value,
                                    "axes": list(r.axes),
                                    "predicted": r.predicted,
                                    "compiled": r.compiled,
                                }
                                for r in v.rows
                            ],
                            "equal": coll_ok,
                            "worst": _key(worst) if worst else None,
                        },
                        "ok": ok,
                        "missed": missed,
                        "simulator_seconds": round(t_sim, 3),
                    }
                )
    seconds = round(time.time() - t0, 1)
    summary = {
        "cases": len(rows),
        "memory_hits": sum(r["memory"]["ok"] for r in rows),
        "flops_hits": sum(r["flops"]["ok"] for r in rows),
        "collectives_equal": sum(r["collectives"]["equal"] for r in rows),
        "all_hits": sum(r["ok"] for r in rows),
        "memory_ratio_range": _range(r["memory"]["ratio"] for r in rows),
        "flops_ratio_range": _range(r["flops"]["ratio"] for r in rows),
    }
    total = len(rows)
    mem_lo, mem_hi = summary["memory_ratio_range"]
    fl_lo, fl_hi = summary["flops_ratio_range"]
    print(
        f"\nmemory within {args.memory_tol:.0%}: {summary['memory_hits']}/{total} cases "
        f"(ratios {mem_lo:.3f}-{mem_hi:.3f})\n"
        f"FLOPs within {args.flops_tol:.0%}: {summary['flops_hits']}/{total} cases "
        f"(ratios {fl_lo:.4f}-{fl_hi:.4f})\n"
        f"collective bytes per (kind, axes) equal: {summary['collectives_equal']}/{total} cases\n"
        f"all three: {summary['all_hits']}/{total} cases ({seconds:.0f} s)"
    )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {
                "memory_tolerance": args.memory_tol,
                "flops_tolerance": args.flops_tol,
                "seconds": seconds,
                "summary": summary,
                "rows": rows,
            },
            f,
            indent=1,
        )
    print(f"wrote {args.out}")
    return 0 if summary["all_hits"] == total else 1


def _key(row) -> str:
    """A collective row's (kind, axes) as 'all-reduce{data,model}'."""
    return f"{row.kind.value}{{{','.join(row.axes)}}}"


def _range(values) -> list[float]:
    finite = [x for x in values if x == x]
    return [min(finite), max(finite)] if finite else [float("nan"), float("nan")]


def _mesh_size(text: str) -> int:
    n = 1
    for part in text.split(","):
        n *= int(part.split("=")[1])
    return n


if __name__ == "__main__":
    sys.exit(main())

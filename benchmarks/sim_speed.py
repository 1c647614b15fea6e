"""Simulator speed: plan evaluations per second as a searcher sees them.

Two workloads (Llama-8B, 32 layers, scanned and unrolled) on one mesh and hardware, each in the
decision space the searchers share (search.space). Three ways of evaluating:

- one-decision: a random walk; every evaluation changes one decision of the previous plan (a
  plan already scored is skipped, so every evaluation is new). Caches are shared, as in a
  searcher's inner loop. The rate is given over the whole walk and over its second half (warm).
- random-shared: independent random plans, caches shared.
- full-cold: independent random plans, each with fresh caches: nothing worked out for an earlier
  plan is reused. Analyses of the graph alone (spans, op kinds, fusible values: `Graph.derived`)
  are made once per graph, as the trace is.

Each evaluation is what `search.evaluate.Evaluator.score` does: input shardings -> propagation ->
step time and per-device peak memory. Evaluations run as the CLI runs a search: inside
`cost_model.gc_pause.long_lived` (the objects alive before it are left out of the garbage
collector's full collections; `score` itself pauses the collector). One process, one core. Prints a
table and writes benchmarks/results/sim_speed.json.

    python benchmarks/sim_speed.py [--seconds 20] [--mesh data=8,model=8] [--nodes 8]

How a cold evaluation's cost grows with depth (the same layer, fewer of it):

    python benchmarks/sim_speed.py --modes full-cold \
        --workloads builtin:llama:8b:n_layers=2,builtin:llama:8b:n_layers=8,builtin:llama:8b
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

WORKLOADS = ("builtin:llama:8b:scan", "builtin:llama:8b")
MODES = ("one-decision", "random-shared", "full-cold")
# Issue 3's targets, evaluations/s: one-decision changes on the scanned graph, full (cold)
# evaluations of the unrolled one.
TARGETS = {("builtin:llama:8b:scan", "one-decision"): 2000.0, ("builtin:llama:8b", "full-cold"): 50.0}


def _count_ops(g) -> int:
    return sum(1 + sum(_count_ops(b) for b in op.body) if op.body else 1 for op in g.ops)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--modes", default=",".join(MODES), help=f"some of {', '.join(MODES)}")
    p.add_argument("--mesh", default="data=8,model=8")
    p.add_argument("--hardware", default="h100")
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20.0, help="wall time per (workload, mode)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "sim_speed.json"))
    args = p.parse_args()
    modes = args.modes.split(",")
    width = max(24, *map(len, args.workloads.split(",")))  # the workload column
    if set(modes) - set(MODES):
        p.error(f"unknown modes {sorted(set(modes) - set(MODES))}; choose from {', '.join(MODES)}.")

    from auto_partition.workloads import resolve
    from cost_model.gc_pause import long_lived
    from cost_model.hardware import load_hardware
    from ir.sharding import MeshShape
    from ir.trace import trace
    from search.evaluate import clear_shared
    from search.problem import SearchProblem
    from search.space import build_space

    mesh = MeshShape.parse(args.mesh)
    hw = load_hardware(args.hardware)
    rows = []
    for source in args.workloads.split(","):
        t0 = time.perf_counter()
        g = trace(resolve(source))
        trace_s = time.perf_counter() - t0
        problem = SearchProblem(g, mesh, hw, nodes=args.nodes)
        space = build_space(g, mesh)
        valid = list(space.enumerate())
        size = {"ops": _count_ops(g), "top_level_ops": len(g.ops), "values": len(g.values)}
        for mode in modes:
            clear_shared()  # scores and caches are shared per problem in a process: start cold
            with long_lived():  # as the CLI runs a search (auto_partition.search_cmd)
                times = _evaluations(mode, problem, space, valid, args.seconds, random.Random(args.seed))
            n = len(times)
            total = sum(times)
            half = times[n // 2 :]
            row = {
                "workload": source,
                "mode": mode,
                **size,
                "decisions": len(space.decisions),
                "valid_plans": len(valid),
                "evaluations": n,
                "seconds": round(total, 3),
                "evals_per_s": round(n / total, 1) if total else 0.0,
                "warm_evals_per_s": round(len(half) / sum(half), 1) if half and sum(half) else 0.0,
                "trace_s": round(trace_s, 2),
            }
            target = TARGETS.get((source, mode))
            row["target"] = target
            rows.append(row)
            print(
                f"{source:{width}s} {mode:14s} ops={row['ops']:6d} evals={n:6d} "
                f"{row['evals_per_s']:8.1f}/s warm {row['warm_evals_per_s']:8.1f}/s"
                + (f"  target {target:.0f}/s" if target else ""),
                flush=True,
            )
    print()
    print(
        f"{'workload':{width}s} {'mode':14s} {'ops':>6s} {'decisions':>9s} {'evals':>6s} "
        f"{'evals/s':>9s} {'warm/s':>9s} {'target':>7s}"
    )
    for r in rows:
        t = f"{r['target']:.0f}" if r["target"] else "-"
        print(
            f"{r['workload']:{width}s} {r['mode']:14s} {r['ops']:6d} {r['decisions']:9d} {r['evaluations']:6d} "
            f"{r['evals_per_s']:9.1f} {r['warm_evals_per_s']:9.1f} {t:>7s}"
        )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {
                "mesh": args.mesh,
                "hardware": args.hardware,
                "nodes": args.nodes,
                "seconds_per_mode": args.seconds,
                "rows": rows,
            },
            f,
            indent=1,
        )
    print(f"wrote {args.out}")
    return 0


def _evaluations(mode, problem, space, valid, seconds, rng) -> list[float]:
    """Seconds of each evaluation of one mode's walk (see the module docstring)."""
    from search.evaluate import Evaluator, clear_shared

    ev = Evaluator(problem, space)
    seen: set = set()
    times: list[float] = []
    current = rng.choice(valid)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds and len(seen) < len(valid):
        if mode == "one-decision":
            a = _neighbour(space, current, seen, rng) or rng.choice(valid)
        else:
            a = rng.choice(valid)
        if a in seen:
            continue
        seen.add(a)
        if mode == "full-cold":
            clear_shared()
            ev = Evaluator(problem, space)
        t = time.perf_counter()
        ev.score(a)
        times.append(time.perf_counter() - t)
        current = a
    return times


def _neighbour(space, current, seen, rng):
    """A valid, not yet scored assignment that differs from `current` in one decision."""
    order = list(range(len(space.decisions)))
    rng.shuffle(order)
    for i in order:
        opts = [o for o in space.options(current, i) if o != current[i]]
        rng.shuffle(opts)
        for o in opts:
            a = (*current[:i], o, *current[i + 1 :])
            if a not in seen and space.valid(a):
                return a
    return None


if __name__ == "__main__":
    sys.exit(main())

"""`auto-partition search`: find a plan within a budget, show it against every expert baseline, save it."""

from __future__ import annotations

import math
import sys
import time

from auto_partition.cli import _fmt_bytes, emit_json
from auto_partition.workloads import resolve
from cost_model.gc_pause import long_lived
from cost_model.hardware import load_hardware
from cost_model.simulate import CostReport, simulate
from ir.plan_yaml import save_plan_file
from ir.sharding import MeshShape
from ir.trace import trace
from search.baselines import baseline_plans
from search.problem import Budget, Progress, SearchProblem
from search.registry import make_searcher
from search.tactics import TacticError, apply_tactics, parse_tactics

DEFAULT_MODEL = "llama"
DEFAULT_SIZE = "8b"
DEFAULT_MESH = "data=8,model=8"
DEFAULT_BUDGET = "60s"


class _Display:
    """Progress on stderr: one line rewritten in place on a terminal, else a line per new best."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.started = time.perf_counter()
        self.best: dict[str, float] = {}

    def __call__(self, p: Progress) -> None:
        if self.quiet:
            return
        if math.isfinite(p.best_step_time):
            self.best[p.searcher] = min(self.best.get(p.searcher, math.inf), p.best_step_time)
        rate = p.evaluations / p.seconds if p.seconds > 0 else 0.0
        overall = min(self.best.values(), default=math.inf)
        per = "  ".join(f"{n} {_ms(t)}" for n, t in self.best.items())
        line = (
            f"[{time.perf_counter() - self.started:6.1f}s] {p.searcher:9s} {p.evaluations:6d} plans "
            f"({rate:6.1f}/s)  best {_ms(overall)}  | {per}"
        )
        try:
            if self.tty:
                sys.stderr.write("\r" + line[:160].ljust(160))
                sys.stderr.flush()
            elif p.new_best:
                print(line, file=sys.stderr, flush=True)
        except BrokenPipeError:  # whoever read the progress stopped reading: the search goes on
            self.quiet = True

    def done(self) -> None:
        if self.tty and not self.quiet:
            try:
                sys.stderr.write("\n")
            except BrokenPipeError:
                self.quiet = True


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if math.isfinite(seconds) else "none fits"


def cmd_search(args) -> int:
    t0 = time.perf_counter()
    budget = Budget.parse(args.budget)
    mesh = MeshShape.parse(args.mesh)
    hw = load_hardware(args.hardware)
    if (
        args.nodes is None
        and mesh.size > hw.devices_per_node * hw.nodes
        and mesh.size % hw.devices_per_node == 0
    ):
        args.nodes = mesh.size // hw.devices_per_node  # as few whole nodes as hold the mesh
    model = args.model or DEFAULT_MODEL
    size = args.size or (DEFAULT_SIZE if model == DEFAULT_MODEL else None)
    scan = args.scan if args.scan is not None else model in ("llama", "gpt")
    w = resolve(model, size, scan=scan, remat=args.remat)
    g = trace(w)
    trace_s = time.perf_counter() - t0
    fixed = None
    if args.tactics:
        with open(args.tactics, encoding="utf-8") as f:
            tactics = parse_tactics(f.read())
        if not tactics:
            raise TacticError(f"{args.tactics} holds no tactics; list some or leave out --tactics.")
        fixed = apply_tactics(g, mesh, tactics)
    display = _Display(args.quiet or args.json)
    problem = SearchProblem(
        g,
        mesh,
        hw,
        nodes=args.nodes,
        memory_budget=args.memory_budget,
        fixed=fixed,
        source=(w.source, w.fingerprint()),
        progress=display,
    )
    searcher = make_searcher(args.searcher, seed=args.seed)
    with long_lived():  # the graph and JAX live through the search: out of its collections
        result = searcher.search(problem, budget)
    display.done()
    search_s = time.perf_counter() - t0 - trace_s

    rows = _comparison(problem, result.report, args)
    fitting = [r for r in rows[1:] if r["fits"]]
    best_baseline = min(fitting, key=lambda r: r["step_time"]) if fitting else None
    found = rows[0]
    if args.output:
        save_plan_file(result.plan, args.output)
    info = {
        "model": w.source,
        "mesh": str(mesh),
        "hardware": hw.name,
        "nodes": args.nodes,
        "searcher": args.searcher,
        "seed": args.seed,
        "budget": args.budget,
        "status": result.status.value,
        "trace_seconds": round(trace_s, 2),
        "search_seconds": round(search_s, 2),
        "stats": dict(result.stats),
        "plans": rows,
        "best_baseline": best_baseline["name"] if best_baseline else None,
        "speedup_over_best_baseline": (
            best_baseline["step_time"] / found["step_time"] if best_baseline and found["fits"] else None
        ),
        "output": args.output,
    }
    if args.json:
        emit_json(info)
    else:
        _print(info, rows, result, problem)
    cap = problem.capacity
    if result.report.memory.peak > cap:
        print(
            f"error: no plan found fits the memory budget of {_fmt_bytes(cap)} per device: the closest "
            f"({args.searcher}) needs {_fmt_bytes(result.report.memory.peak)}, "
            f"{_fmt_bytes(result.report.memory.peak - cap)} over. Use more devices (a larger mesh or "
            "--nodes), a smaller batch, or raise --memory-budget"
            + (f"; the closest plan was saved to {args.output}." if args.output else "."),
            file=sys.stderr,
        )
        return 3
    return 0


def _comparison(problem: SearchProblem, found: CostReport, args) -> list[dict]:
    """The found plan, then every expert baseline, simulated on the same hardware and nodes."""
    cap = problem.capacity
    rows = [_row(f"found ({args.searcher})", found, cap)]
    for name, plan in baseline_plans(problem.graph, problem.mesh).items():
        r = simulate(problem.graph, plan, problem.hardware, nodes=problem.nodes)
        rows.append(_row(name, r, cap))
    for r in rows:  # how many times faster the found plan is
        r["found_speedup"] = r["step_time"] / found.step_time if found.step_time else None
    return rows


def _row(name: str, r: CostReport, cap: int) -> dict:
    return {
        "name": name,
        "step_time": r.step_time,
        "compute_time": r.compute_time,
        "exposed_comm_time": r.exposed_comm_time,
        "memory": r.memory.peak,
        "fits": r.memory.peak <= cap,
    }


def _print(info: dict, rows: list[dict], result, problem: SearchProblem) -> None:
    st = result.stats
    print(
        f"{info['model']} on mesh {info['mesh']} ({info['hardware']}"
        + (f", {info['nodes']} nodes" if info["nodes"] else "")
        + f"): {info['searcher']} searched {st.get('evaluations', 0)} plans in {info['search_seconds']:.1f} s "
        f"(trace {info['trace_seconds']:.1f} s); status {info['status']}"
    )
    extra = {k: v for k, v in st.items() if k not in ("evaluations", "seconds")}
    if extra:
        print("  " + ", ".join(f"{k}={_fmt(v)}" for k, v in extra.items()))
    print()
    print(
        f"{'plan':22s} {'step time':>11s} {'compute':>11s} {'exposed comm':>13s} {'memory':>11s} {'fits':>5s} {'found is':>9s}"
    )
    found = rows[0]
    for r in rows:
        ratio = r["found_speedup"] or math.nan
        print(
            f"{r['name']:22s} {r['step_time'] * 1e3:9.2f}ms {r['compute_time'] * 1e3:9.2f}ms "
            f"{r['exposed_comm_time'] * 1e3:11.2f}ms {_fmt_bytes(r['memory']):>11s} {'yes' if r['fits'] else 'NO':>5s} "
            + (f"{ratio:8.2f}x" if r is not found else f"{'':9s}")
        )
    if info["best_baseline"]:
        print(
            f"\nbest fitting baseline: {info['best_baseline']}; the found plan is "
            f"{info['speedup_over_best_baseline']:.2f}x its speed."
            if info["speedup_over_best_baseline"]
            else f"\nbest fitting baseline: {info['best_baseline']}."
        )
    else:
        print(f"\nno expert baseline fits in {_fmt_bytes(problem.capacity)} per device.")
    print("\nplan (parameters and batch):")
    for line in _plan_lines(result.plan):
        print("  " + line)
    if info["output"]:
        print(f"\nwrote {info['output']}")


def _plan_lines(plan) -> list[str]:
    from ir.plan_yaml import plan_to_yaml

    text = plan_to_yaml(plan)
    out, keep = [], False
    for line in text.splitlines():
        if line.startswith(("params:", "data:")):
            keep = True
        elif line and not line.startswith((" ", "-")):
            keep = False
        if keep:
            out.append(line)
    return out[:40]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)

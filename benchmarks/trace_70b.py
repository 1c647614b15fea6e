"""Tracing speed and memory of big Llama train steps (target: 70B in under a minute and under 4 GB).

Each case runs in a fresh subprocess, so its peak RSS is its own: the subprocess imports JAX and the
package, records its RSS, builds the Workload (ShapeDtypeStructs only, nothing allocated), traces it
with `ir.trace.trace`, and reports the wall time, the graph size and `ru_maxrss`. It then builds the
FSDP×TP baseline plan for a mesh (default data=8,model=8: 64 devices, which propagation does not
need) and times `ir.propagate.propagate_plan` on it.

    python benchmarks/trace_70b.py                    # 8b and 70b, unrolled and scanned
    python benchmarks/trace_70b.py --cases llama:70b  # one case

Prints a table and writes benchmarks/results/trace_70b.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "trace_70b.json"
DEFAULT_CASES = ("llama:8b", "llama:8b:scan", "llama:70b", "llama:70b:scan")
TARGET_SECONDS = 60.0
TARGET_BYTES = 4 * 2**30
MB = 2**20


@dataclasses.dataclass(frozen=True, slots=True)
class CaseResult:
    """What one subprocess measured. Times in seconds, memory in bytes.

    Attributes:
      case: 'llama:70b' or 'llama:70b:scan'.
      build_s: building the Workload (`models.registry.get`, abstract shapes only).
      trace_s: `ir.trace.trace(workload)`.
      ops: ops in the graph, scan bodies included once each (`Graph.num_ops` counts an op inside a
        scan body once, not per trip).
      top_ops: ops at the top level (a scan is one op).
      values: values in the graph and its bodies.
      inputs: graph inputs (params, optimizer state, batch leaves).
      rss_before: RSS after importing JAX and the package, before building the workload.
      peak_rss_trace: `ru_maxrss` once tracing is done (the process's peak so far).
      plan_s: building the FSDP×TP baseline plan (tactics → Plan).
      propagate_s: `ir.propagate.propagate_plan(graph, plan)`.
      collectives: collectives the propagation found (bodies included).
      peak_rss_propagate: `ru_maxrss` after propagation.
      mesh: the mesh propagation used.
      error: why propagation failed ('' when it ran).
    """

    case: str
    build_s: float
    trace_s: float
    ops: int
    top_ops: int
    values: int
    inputs: int
    rss_before: int
    peak_rss_trace: int
    plan_s: float = float("nan")
    propagate_s: float = float("nan")
    collectives: int = 0
    peak_rss_propagate: int = 0
    mesh: str = ""
    error: str = ""

    @property
    def total_s(self) -> float:
        return self.build_s + self.trace_s

    @property
    def meets_target(self) -> bool:
        return self.total_s < TARGET_SECONDS and self.peak_rss_trace < TARGET_BYTES


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    # Linux reports ru_maxrss in KiB (macOS in bytes).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _count_values(graph) -> int:
    seen = {id(graph)}
    total = len(graph.values)
    for _, op, _ in graph.walk():
        for body in op.body:
            if id(body) not in seen:
                seen.add(id(body))
                total += len(body.values)
    return total


def measure(case: str, mesh_text: str | None) -> CaseResult:
    """Runs one case in this process (call it in a fresh one, so the peak RSS is the case's)."""
    import jax  # noqa: F401  (counted in rss_before, like any training script's imports)

    from ir.propagate import propagate_plan
    from ir.sharding import MeshShape
    from ir.trace import trace
    from models import registry
    from search.baselines import fsdp_tp
    from search.tactics import apply_tactics

    name, size, *rest = case.split(":")
    rss_before = _current_rss()
    t0 = time.perf_counter()
    workload = registry.get(name, size, scan="scan" in rest)
    t1 = time.perf_counter()
    graph = trace(workload)
    t2 = time.perf_counter()
    result = CaseResult(
        case=case,
        build_s=t1 - t0,
        trace_s=t2 - t1,
        ops=graph.num_ops,
        top_ops=len(graph.ops),
        values=_count_values(graph),
        inputs=len(graph.inputs),
        rss_before=rss_before,
        peak_rss_trace=_peak_rss(),
    )
    if mesh_text is None:
        return result
    mesh = MeshShape.parse(mesh_text)
    t3 = time.perf_counter()
    tactics = fsdp_tp(graph, mesh)
    if tactics is None:
        return dataclasses.replace(result, mesh=mesh_text, error="fsdp_tp does not apply")
    plan = apply_tactics(graph, mesh, tactics)
    t4 = time.perf_counter()
    prop = propagate_plan(graph, plan)
    t5 = time.perf_counter()
    return dataclasses.replace(
        result,
        plan_s=t4 - t3,
        propagate_s=t5 - t4,
        collectives=len(prop.collectives),
        peak_rss_propagate=_peak_rss(),
        mesh=mesh_text,
    )


def run_case(case: str, mesh_text: str | None, timeout: float) -> CaseResult | str:
    """The case measured in a fresh interpreter; a string says why it failed."""
    cmd = [sys.executable, __file__, "--one", case]
    if mesh_text:
        cmd += ["--mesh", mesh_text]
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        return tail[0]
    return CaseResult(**json.loads(done.stdout.strip().splitlines()[-1]))


def _mb(n: int) -> str:
    return f"{n / MB:,.0f}" if n else "-"


def table(results: list[CaseResult]) -> str:
    head = (
        f"{'case':<16} {'build s':>8} {'trace s':>8} {'total s':>8} {'ops':>7} {'top ops':>8} {'values':>8} "
        f"{'RSS0 MB':>8} {'peak MB':>8} {'Δ MB':>7} {'target':>7} {'plan s':>7} {'prop s':>7} {'colls':>6} "
        f"{'peak+prop MB':>12}"
    )
    rows = [head, "-" * len(head)]
    for r in results:
        rows.append(
            f"{r.case:<16} {r.build_s:>8.2f} {r.trace_s:>8.2f} {r.total_s:>8.2f} {r.ops:>7,} {r.top_ops:>8,} {r.values:>8,} "
            f"{_mb(r.rss_before):>8} {_mb(r.peak_rss_trace):>8} {_mb(r.peak_rss_trace - r.rss_before):>7} "
            f"{'ok' if r.meets_target else 'MISSED':>7} {r.plan_s:>7.2f} {r.propagate_s:>7.2f} "
            f"{r.collectives:>6,} {_mb(r.peak_rss_propagate):>12}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Runs every case in its own subprocess, prints the table and writes the JSON."""
    p = argparse.ArgumentParser(description="Trace time and memory of big Llama train steps.")
    p.add_argument("--cases", default=",".join(DEFAULT_CASES), help="comma-separated NAME:SIZE[:scan]")
    p.add_argument("--mesh", default="data=8,model=8", help="mesh for the FSDP×TP propagation ('' to skip)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per case")
    p.add_argument("--out", default=str(RESULTS), help="JSON output path")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child mode: measure one case
    args = p.parse_args(argv)

    if args.one:
        result = measure(args.one, args.mesh or None)
        print(json.dumps(dataclasses.asdict(result)))
        return 0

    results, failures = [], {}
    for case in args.cases.split(","):
        got = run_case(case, args.mesh or None, args.timeout)
        if isinstance(got, str):
            failures[case] = got
            print(f"{case}: failed: {got}", file=sys.stderr)
        else:
            results.append(got)
    print(
        f"target: trace (build + trace) < {TARGET_SECONDS:.0f} s and peak RSS < {TARGET_BYTES / MB:,.0f} MB"
    )
    print(table(results))

    import jax

    out = {
        "benchmark": "trace_70b",
        "target": {"seconds": TARGET_SECONDS, "peak_rss_bytes": TARGET_BYTES},
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "jax": jax.__version__,
        },
        "cases": [
            {**dataclasses.asdict(r), "total_s": r.total_s, "meets_target": r.meets_target} for r in results
        ],
        "failures": failures,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""`auto-partition explain`: a plan's predicted cost as tables a person can read."""

from __future__ import annotations

import os

from auto_partition.cli import _fmt_bytes, emit_json
from cost_model.hardware import load_hardware
from cost_model.memory import local_bytes
from cost_model.simulate import CostReport, Overlap, simulate
from ir.graph import Role
from ir.patterns import name_pattern
from ir.propagate import propagate_plan
from ir.trace import trace


def cmd_explain(args) -> int:
    from auto_partition.commands import plan_and_workload

    plan, w = plan_and_workload(args)
    hw = load_hardware(args.hardware)
    g = trace(w)
    prop = propagate_plan(g, plan)
    overlap = Overlap.NONE if args.no_overlap else Overlap.BACKWARD_AND_PREFETCH
    report = simulate(g, plan, hw, nodes=args.nodes, overlap=overlap, prop=prop)
    # One row per tensor, or per family of tensors that differ only in their layer index.
    families: dict[tuple, list[int]] = {}
    for vid in g.inputs:
        v = g.values[vid]
        if v.role in (Role.PARAM, Role.BATCH) or args.all_tensors:
            s = prop.shardings[vid]
            key = (name_pattern(v.name).replace("\\d+", "*").replace("\\", ""), v.shape, str(s))
            families.setdefault(key, []).append(local_bytes(v.shape, v.itemsize, s, plan.mesh))
    tensors = [
        (f"{pattern} (x{len(bs)})" if len(bs) > 1 else pattern, shape, s, bs[0])
        for (pattern, shape, s), bs in families.items()
    ]
    if args.json:
        emit_json(_as_json(args.plan, w.source, hw.name, report, tensors))
        return 0
    name = os.path.basename(args.plan)
    print(f"{name}: {w.source} on mesh {plan.mesh}, hardware {hw.name}")
    fit = "fits" if report.fits else "DOES NOT FIT"
    print(
        f"step {report.step_time * 1e3:.2f} ms = compute {report.compute_time * 1e3:.2f} ms + exposed "
        f"communication {report.exposed_comm_time * 1e3:.2f} ms (of {report.comm_time * 1e3:.2f} ms); "
        f"{report.flops / 1e12:.3f} TFLOP per device; memory {_fmt_bytes(report.memory.peak)} of "
        f"{_fmt_bytes(report.capacity)}: {fit}"
    )
    print("\nper tensor (params and batch; --all-tensors for optimizer state; bytes per device each):")
    print(f"  {'tensor':<48} {'shape':<22} {'sharding':<26} {'bytes/device':>12}")
    for tname, shape, s, b in tensors:
        print(f"  {tname:<48} {shape!s:<22} {s:<26} {_fmt_bytes(b):>12}")
    print("\ncollectives per step:")
    print(f"  {'kind':<20} {'axes':<16} {'bytes/device':>14} {'time':>10}")
    for (kind, axes), (b, t) in sorted(report.collectives.items(), key=lambda kv: -kv[1][1]):
        print(f"  {kind.value:<20} {','.join(axes):<16} {_fmt_bytes(b):>14} {t * 1e3:>8.3f}ms")
    if not report.collectives:
        print("  none")
    m = report.memory
    print("\nmemory per device:")
    print(
        f"  arguments {_fmt_bytes(m.arguments)} + outputs {_fmt_bytes(m.outputs)} - donated "
        f"{_fmt_bytes(m.aliased)} + temporaries at peak {_fmt_bytes(m.temp)} = {_fmt_bytes(m.peak)}"
    )
    for kind, b in sorted(m.by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<20} {_fmt_bytes(b):>12}")
    if m.largest:
        print("  largest live at the peak: " + ", ".join(f"{n} ({_fmt_bytes(b)})" for n, b in m.largest[:5]))
    print("\ncostliest ops:")
    print(f"  {'op':<44} {'primitive':<20} {'GFLOP':>10} {'MB moved':>10} {'time':>10}")
    for r in report.ops:
        print(
            f"  {r.name[-44:]:<44} {r.primitive:<20} {r.flops / 1e9:>10.3f} {r.bytes / 1e6:>10.2f} "
            f"{r.seconds * 1e3:>8.3f}ms"
        )
    return 0


def _as_json(path, source, hardware, r: CostReport, tensors) -> dict:
    return {
        "plan": path,
        "model": source,
        "hardware": hardware,
        "step_time_s": r.step_time,
        "compute_time_s": r.compute_time,
        "comm_time_s": r.comm_time,
        "exposed_comm_time_s": r.exposed_comm_time,
        "flops": r.flops,
        "fits": r.fits,
        "capacity_bytes": r.capacity,
        "memory": {
            "peak": r.memory.peak,
            "arguments": r.memory.arguments,
            "outputs": r.memory.outputs,
            "aliased": r.memory.aliased,
            "temp": r.memory.temp,
            "by_kind": dict(r.memory.by_kind),
            "largest": [list(t) for t in r.memory.largest],
        },
        "collectives": [
            {"kind": k.value, "axes": list(a), "bytes": b, "seconds": t}
            for (k, a), (b, t) in r.collectives.items()
        ],
        "tensors": [{"name": n, "shape": list(s), "sharding": sh, "bytes": b} for n, s, sh, b in tensors],
        "ops": [
            {
                "name": o.name,
                "primitive": o.primitive,
                "flops": o.flops,
                "bytes": o.bytes,
                "seconds": o.seconds,
            }
            for o in r.ops
        ],
    }

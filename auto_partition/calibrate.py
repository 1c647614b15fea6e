"""`auto-partition calibrate`: microbenchmarks on the local devices fitted into a new hardware preset."""

from __future__ import annotations

import dataclasses
import os

import jax

from auto_partition.cli import emit_json
from cost_model.calibrate import Benchmarks, Calibration, comparison, fit, measure, save_calibration
from cost_model.hardware import hardware_to_dict, load_hardware
from ir.sharding import MeshShape


def cmd_calibrate(args) -> int:
    base = load_hardware(args.hardware)
    mesh = MeshShape.parse(args.mesh) if args.mesh else None
    plan = Benchmarks.for_platform(jax.default_backend(), quick=args.quick)
    if args.dtypes:
        plan = dataclasses.replace(plan, matmul_dtypes=tuple(d.strip() for d in args.dtypes.split(",")))
    output = args.output or f"{base.name}-calibrated.yaml"
    name = os.path.splitext(os.path.basename(output))[0]
    cal = fit(base, measure(mesh, plan), name=name)
    save_calibration(cal, output)
    if args.json:
        emit_json(_json(cal, output))
        return 0
    _print(cal, output)
    return 0


def _json(cal: Calibration, output: str) -> dict:
    m = cal.measurements
    return {
        "output": output,
        "hardware": hardware_to_dict(cal.hardware),
        "rows": [dataclasses.asdict(r) for r in comparison(cal)],
        "notes": list(cal.notes),
        "measurements": {
            "host": m.host,
            "when": m.when,
            "jax": m.jax_version,
            "platform": m.platform,
            "device_kind": m.device_kind,
            "devices": m.device_count,
            "mesh": str(cal.mesh),
            "matmul": [{**dataclasses.asdict(s), "flops_per_s": s.flops_per_s} for s in m.matmul],
            "copy": [{**dataclasses.asdict(s), "bytes_per_s": s.bandwidth} for s in m.copy],
            "collectives": [{**dataclasses.asdict(s), "kind": s.kind.value} for s in m.collectives],
        },
    }


def _print(cal: Calibration, output: str) -> None:
    m = cal.measurements
    print(
        f"calibrated {cal.base.name} on {m.device_count} x {m.device_kind} ({m.platform}), host {m.host}, "
        f"{m.when}; mesh {cal.mesh}"
    )
    head = f"{'quantity':<42} {'unit':<7} {'measured':>10} {'preset':>10} {'calibrated':>10}  note"
    print(head)
    print("-" * len(head))
    for r in comparison(cal):
        preset = "-" if r.preset is None else f"{r.preset:.3g}"
        print(
            f"{r.quantity:<42} {r.unit:<7} {r.measured:>10.3g} {preset:>10} {r.calibrated:>10.3g}  {r.note}"
        )
    if cal.notes:
        print("\nnotes:")
        for note in cal.notes:
            print(f"  {note}")
    print(f"\nwrote {output} (load it with --hardware {output})")

"""What each CLI command does, and how its results print (imported after XLA_FLAGS is set)."""

from __future__ import annotations

import argparse
import collections
import math
import os
from collections.abc import Sequence

from auto_partition.cli import _fmt_bytes, emit_json
from auto_partition.workloads import resolve
from cost_model.hardware import HardwareError
from cost_model.microbench import CalibrationError
from ir.plan import PlanError
from ir.plan_yaml import check_fingerprint, load_plan_file, save_plan_file
from ir.sharding import MeshShape, ShardingError
from ir.trace import trace
from ir.workload import Workload, WorkloadError
from models import hf
from runners.check import MeshMismatchError, PlanCheck, check_baselines, check_mesh, check_plans
from runners.program import Mode
from search.problem import SearchError
from search.tactics import TacticError

USER_ERRORS = (
    ShardingError,
    PlanError,
    TacticError,
    WorkloadError,
    MeshMismatchError,
    HardwareError,
    CalibrationError,
    SearchError,
    OSError,
)


def run(args: argparse.Namespace) -> int:
    if args.command == "explain":
        from auto_partition.explain import cmd_explain

        return cmd_explain(args)
    if args.command == "search":
        from auto_partition.search_cmd import cmd_search

        return cmd_search(args)
    if args.command == "calibrate":
        from auto_partition.calibrate import cmd_calibrate

        return cmd_calibrate(args)
    return {"trace": cmd_trace, "baselines": cmd_baselines, "verify": cmd_verify}[args.command](args)


def _modes(text: str) -> tuple[Mode, ...]:
    return (Mode.CONSTRAINED, Mode.PORTABLE) if text == "both" else (Mode(text),)


def _tp_rules(workload: Workload):
    name = workload.source.split(":")[1] if workload.source.startswith("hf:") else ""
    return hf.TP_RULES.get(name)


def cmd_trace(args) -> int:
    w = resolve(args.model, args.size, scan=args.scan)
    g = trace(w)
    prims = collections.Counter(op.primitive for _, op, _ in g.walk())
    params = [g.values[i] for i in g.inputs if g.values[i].role.value == "param"]
    info = {
        "model": w.source,
        "fingerprint": w.fingerprint(),
        "values": len(g.values),
        "ops": g.num_ops,
        "inputs": len(g.inputs),
        "param_count": sum(math.prod(v.shape) for v in params),
        "param_bytes": sum(v.nbytes for v in params),
        "unruled_primitives": list(g.unruled),
        "primitives": dict(prims.most_common()),
    }
    if args.json:
        emit_json(info)
        return 0
    print(
        f"{w.source}: {info['ops']} ops, {info['values']} values, {len(g.inputs)} inputs, "
        f"{info['param_count']:,} parameters ({_fmt_bytes(info['param_bytes'])})"
    )
    print(f"fingerprint {info['fingerprint']}")
    print("unruled primitives (conservative rule): " + (", ".join(g.unruled) or "none"))
    shown = set()
    print("\nfactor rules (first op of each primitive):")
    for _, op, _ in g.walk():
        if op.rule is not None and op.primitive not in shown:
            shown.add(op.primitive)
            print(f"  {op.primitive:22s} x{prims[op.primitive]:<5d} {op.rule}")
    return 0


def cmd_baselines(args) -> int:
    mesh = MeshShape.parse(args.mesh)
    w = resolve(args.model, args.size, scan=args.scan)
    strategies = args.strategies.split(",") if args.strategies else None
    checks = check_baselines(
        w,
        mesh,
        tp_rules=_tp_rules(w),
        strategies=strategies,
        modes=_modes(args.mode),
        execute=not args.compile_only,
        memory_limit=args.memory_limit,
    )
    if args.save:
        os.makedirs(args.save, exist_ok=True)
        for c in checks:
            save_plan_file(c.plan, os.path.join(args.save, f"{c.name}.yaml"))
    _report(f"{w.source} on mesh {mesh}", checks, args)
    return 0


def plan_and_workload(args):
    """The plan file `args.plan` and the workload it records (or `--model`), fingerprint-checked."""
    plan = load_plan_file(args.plan)
    source = args.model or plan.provenance.workload
    if not source:
        raise PlanError(
            f"{args.plan} does not record its workload (provenance.workload); pass --model NAME or "
            "--model package.module:function."
        )
    w = resolve(source)
    check_fingerprint(
        plan,
        w.fingerprint(),
        allow_mismatch=args.allow_fingerprint_mismatch,
        source=os.path.basename(args.plan),
        model=w.source,
    )
    return plan, w


def cmd_verify(args) -> int:
    plan, w = plan_and_workload(args)
    name = os.path.basename(args.plan)
    check_mesh(plan.mesh)
    try:
        checks = check_plans(
            w,
            [(name, plan)],
            modes=_modes(args.mode),
            execute=not args.compile_only,
            memory_limit=args.memory_limit,
        )
    except (PlanError, ShardingError) as e:
        # The plan read fine but does not fit this model's tensors: say which file.
        raise PlanError(f"{name}: {e}", tensor=getattr(e, "tensor", "")) from None
    _report(f"{args.plan} ({w.source}) on mesh {plan.mesh}", checks, args)
    return 0


def check_rows(checks: Sequence[PlanCheck]) -> list[dict]:
    rows = []
    for c in checks:
        v = c.verification
        rows.append(
            {
                "plan": c.name,
                "mode": v.mode.value,
                "fits": c.fits,
                "device_bytes": c.device_bytes,
                "max_error": None if math.isnan(v.max_error) else v.max_error,
                "within_tolerance": v.within_tolerance if v.executed else None,
                "agreement": v.agreement,
                "flops": v.flops,
                "step_time_s": None if math.isnan(v.step_time_s) else v.step_time_s,
                "memory": dict(v.memory),
                "collectives": [
                    {
                        "kind": r.kind.value,
                        "axes": list(r.axes),
                        "predicted_bytes": r.predicted,
                        "compiled_bytes": r.compiled,
                    }
                    for r in v.rows
                ],
            }
        )
    return rows


def _report(title: str, checks: Sequence[PlanCheck], args) -> None:
    rows = check_rows(checks)
    if args.json:
        unruled = list(checks[0].plan.provenance.unruled_primitives) if checks else []
        emit_json({"title": title, "unruled_primitives": unruled, "rows": rows})
        return
    print(title)
    unruled = checks[0].plan.provenance.unruled_primitives if checks else ()
    print("primitives without a factor rule (conservative rule used): " + (", ".join(unruled) or "none"))
    head = (
        f"{'plan':<10} {'mode':<12} {'fits':<5} {'mem/device':>11} {'max err':>9} {'agree':>7}  "
        f"collectives per device: predicted / compiled"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        err = "-" if r["max_error"] is None else f"{r['max_error']:.1e}"
        if r["within_tolerance"] is False:
            err += "!"
        colls = r["collectives"] or [None]
        for i, col in enumerate(colls):
            lead = (
                f"{r['plan']:<10} {r['mode']:<12} {'yes' if r['fits'] else 'NO':<5} "
                f"{_fmt_bytes(r['device_bytes']):>11} {err:>9} {r['agreement']:>6.1%}  "
                if i == 0
                else " " * (len(head) - 44)
            )
            if col is None:
                print(lead + "none")
            else:
                kind = f"{col['kind']}{{{','.join(col['axes'])}}}"
                print(
                    f"{lead}{kind:<28} {_fmt_bytes(col['predicted_bytes']):>10} / "
                    f"{_fmt_bytes(col['compiled_bytes']):<10}"
                )
    bad = [r for r in rows if r["within_tolerance"] is False]
    if bad:
        print(f"\n{len(bad)} run(s) marked ! differ from the unsharded step beyond tolerance.")


__all__ = ["USER_ERRORS", "run"]

"""Propagation against XLA: collective bytes predicted vs compiled, both execution modes, all baselines.

For each model (tiny size) x expert strategy x mode on a fake-device mesh, prints the agreement
(matched collective bytes over the larger total), the worst (kind, axes) row, numerics against
the unsharded step, and writes everything to benchmarks/results/xla_agreement.json.

    python benchmarks/xla_agreement.py [--mesh data=2,model=4] [--models gpt,llama] [--compile-only]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mesh", default="data=2,model=4")
    p.add_argument(
        "--models",
        default="mlp,gpt,llama,bert,vit,moe,builtin:llama:tiny:scan,hf-gpt2,hf-llama,hf-bert,hf-vit",
    )
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "xla_agreement.json"))
    args = p.parse_args()
    n = 1
    for part in args.mesh.split(","):
        n *= int(part.split("=")[1])
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"
    import warnings

    warnings.filterwarnings("ignore")
    from auto_partition.commands import check_rows
    from auto_partition.workloads import resolve
    from ir.sharding import MeshShape
    from models import hf
    from runners.check import check_baselines

    mesh = MeshShape.parse(args.mesh)
    rows = []
    head = f"{'model':<24} {'strategy':<8} {'mode':<11} {'agree':>7} {'worst row':>9}  {'max err':>8}  worst (kind, axes): predicted / compiled bytes"
    print(f"mesh {mesh}\n{head}\n{'-' * len(head)}")
    t0 = time.time()
    for spec in args.models.split(","):
        w = resolve(spec)
        strategies = ("dp", "fsdp", "tp") if spec.startswith("hf-") else None
        checks = check_baselines(w, mesh, tp_rules=hf.TP_RULES.get(spec), repeats=1, strategies=strategies)
        for c, row in zip(checks, check_rows(checks), strict=True):
            v = c.verification
            worst = min(v.rows, key=lambda r: r.agreement, default=None)
            wtext = (
                f"{worst.kind.value}{{{','.join(worst.axes)}}} {worst.predicted} / {worst.compiled}"
                if worst
                else "-"
            )
            print(
                f"{spec:<24} {c.name:<8} {v.mode.value:<11} {v.agreement:>6.1%} {v.min_row_agreement:>8.1%}  "
                f"{v.max_error:>8.1e}  {wtext}",
                flush=True,
            )
            rows.append({"model": spec, **row, "min_row_agreement": v.min_row_agreement})
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"mesh": str(mesh), "seconds": round(time.time() - t0, 1), "rows": rows}, f, indent=1)
    print(f"\nwrote {args.out} ({len(rows)} rows, {time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `auto-partition` command line: trace, baselines, search, verify, explain and calibrate."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import yaml


def _parse_bytes(text: str) -> int:
    units = {
        "": 1,
        "B": 1,
        "KB": 1e3,
        "MB": 1e6,
        "GB": 1e9,
        "TB": 1e12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
    }
    t = text.strip().upper()
    num = t.rstrip("KMGTIB")
    unit = t[len(num) :]
    if unit not in units or not num.replace(".", "", 1).isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 80GB or 512MiB.")
    return int(float(num) * units[unit])


def _fmt_bytes(n: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="auto-partition",
        description="Automatic sharding plans for JAX training steps: trace, cost, verify, export.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp):
        sp.add_argument("model", help="built-in model (gpt, llama-8b, ...), hf-gpt2, or pkg.module:function")
        sp.add_argument("--size", default=None, help="model size for a built-in name (default: tiny)")
        sp.add_argument("--scan", action="store_true", help="layers stacked and run with lax.scan")

    def run_args(sp):
        sp.add_argument(
            "--mode",
            choices=("constrained", "portable", "both"),
            default="both",
            help="constrained pins every value; portable sets only argument/result shardings",
        )
        sp.add_argument(
            "--compile-only",
            action="store_true",
            help="compile from shapes only (no numerics, no time); works for any model size",
        )
        sp.add_argument(
            "--memory-limit",
            type=_parse_bytes,
            default=_parse_bytes("80GB"),
            help="per-device memory a plan must fit in (default 80GB)",
        )
        sp.add_argument("--json", action="store_true", help="print JSON instead of tables")

    t = sub.add_parser("trace", help="trace a model and summarise its graph and factor rules")
    model_args(t)
    t.add_argument("--json", action="store_true")

    b = sub.add_parser("baselines", help="cost and verify the expert strategies (DP, FSDP, TP, ...)")
    model_args(b)
    b.add_argument("--mesh", required=True, help="mesh axes and sizes, e.g. data=2,model=4")
    b.add_argument("--strategies", default=None, help="comma-separated subset, e.g. dp,fsdp_tp")
    b.add_argument("--save", default=None, metavar="DIR", help="write each strategy's plan to DIR/NAME.yaml")
    run_args(b)

    v = sub.add_parser("verify", help="verify one plan file against XLA on the local devices")
    v.add_argument("plan", help="plan.yaml")
    v.add_argument("--model", default=None, help="override the workload recorded in the plan")
    v.add_argument(
        "--allow-fingerprint-mismatch",
        action="store_true",
        help="verify even if the plan was made for a model with other input shapes",
    )
    run_args(v)

    e = sub.add_parser("explain", help="a plan's predicted step time, communication and memory as tables")
    e.add_argument("plan", help="plan.yaml")
    e.add_argument("--hardware", default="h100", help="hardware preset or YAML file (default h100)")
    e.add_argument("--nodes", type=int, default=None, help="nodes the mesh spans (default: fewest)")
    e.add_argument("--model", default=None, help="override the workload recorded in the plan")
    e.add_argument("--allow-fingerprint-mismatch", action="store_true")
    e.add_argument("--no-overlap", action="store_true", help="expose all communication (pessimistic)")
    e.add_argument("--all-tensors", action="store_true", help="list optimizer state and other inputs too")
    e.add_argument("--json", action="store_true")

    s = sub.add_parser(
        "search",
        help="search for the fastest plan that fits, compare it with the expert baselines, save it",
    )
    s.add_argument(
        "model",
        nargs="?",
        default=None,
        help="built-in model (llama, gpt, ...), hf-gpt2, or pkg.module:function (default: llama 8b)",
    )
    s.add_argument(
        "--size", default=None, help="model size for a built-in name (default: 8b for llama, else tiny)"
    )
    s.add_argument(
        "--scan",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="layers stacked and run with lax.scan (default: on for llama and gpt)",
    )
    s.add_argument(
        "--remat", action="store_true", help="activation checkpointing per layer (built-in models)"
    )
    s.add_argument("--mesh", default="data=8,model=8", help="mesh axes and sizes (default data=8,model=8)")
    s.add_argument("--hardware", default="h100", help="hardware preset or YAML file (default h100)")
    s.add_argument("--nodes", type=int, default=None, help="nodes the mesh spans (default: fewest)")
    s.add_argument(
        "--searcher",
        default="portfolio",
        help="portfolio (default), ilp, mcts, optuna or exhaustive",
    )
    s.add_argument("--budget", default="60s", help="wall time (60s, 2m) and/or plan evaluations (500)")
    s.add_argument(
        "--memory-budget",
        type=_parse_bytes,
        default=None,
        help="per-device bytes a plan must fit in (default: the device's memory)",
    )
    s.add_argument("--tactics", default=None, metavar="FILE", help="YAML tactics that fix decisions")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("-o", "--output", default=None, metavar="FILE", help="write the plan here (plan.yaml)")
    s.add_argument("--quiet", action="store_true", help="no progress display")
    s.add_argument("--json", action="store_true", help="print JSON instead of tables")

    c = sub.add_parser("calibrate", help="measure the local devices and fit a hardware preset to them")
    c.add_argument(
        "--hardware", required=True, help="preset or YAML file to start from (h100, h200, cpu, ...)"
    )
    c.add_argument(
        "--mesh",
        default=None,
        help="mesh for the collectives, e.g. data=2,model=4 (default: all local devices on one axis)",
    )
    c.add_argument("--quick", action="store_true", help="fewer and smaller benchmarks (seconds on CPU)")
    c.add_argument("--dtypes", default=None, help="matmul dtypes, e.g. bfloat16,tf32 (default: per platform)")
    c.add_argument(
        "-o",
        "--output",
        default=None,
        metavar="FILE",
        help="the preset file to write (default: ./HARDWARE-calibrated.yaml)",
    )
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def _device_count_hint(args: argparse.Namespace) -> int | None:
    """Devices the command needs, read before JAX starts (so fake CPU devices can be made)."""
    if args.command == "calibrate" and not args.mesh:
        from cost_model.hardware import HardwareError, load_hardware  # imports no JAX

        try:
            return load_hardware(args.hardware).devices_per_node  # one node's worth
        except HardwareError:
            return None  # the command reports it
    if args.command == "search":
        return None  # searching costs plans on the simulator; no devices needed
    if getattr(args, "mesh", None):
        try:
            return _mesh_size(args.mesh)
        except ValueError:
            return None
    if getattr(args, "plan", None) and os.path.exists(args.plan):
        try:
            with open(args.plan) as f:
                shape = (yaml.safe_load(f) or {}).get("mesh", {}).get("shape", [])
            size = 1
            for s in shape:
                size *= int(s)
            return size
        except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError):
            return None
    return None


def _mesh_size(text: str) -> int:
    size = 1
    for part in text.split(","):
        size *= int(part.partition("=")[2].partition(":")[0])
    return size


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    n = _device_count_hint(args)
    flags = os.environ.get("XLA_FLAGS", "")
    if n and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    from auto_partition import commands

    try:
        code = commands.run(args)
        sys.stdout.flush()  # a closed pipe shows here, not as a traceback at exit
        return code
    except BrokenPipeError:
        # The reader of the output stopped reading (`auto-partition search ... | head`): what
        # the command writes to files is written; exit as a Unix tool killed by SIGPIPE does,
        # and never flush into the closed pipe again.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # not a file descriptor (output captured in-process)
            pass
        return 141  # 128 + SIGPIPE
    except commands.USER_ERRORS as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, whatever the cause
        return 2


def emit_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


if __name__ == "__main__":
    sys.exit(main())

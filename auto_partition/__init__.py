"""auto-partition: automatic sharding plans for JAX training steps.

The public face. Names load lazily, so `import auto_partition` is cheap and the CLI can set
XLA_FLAGS (fake CPU devices) before JAX starts.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "load_plan": "auto_partition.api",
    "LoadedPlan": "auto_partition.api",
    "resolve_model": ("auto_partition.workloads", "resolve"),
    "Workload": "ir.workload",
    "trace": "ir.trace",
    "Graph": "ir.graph",
    "MeshShape": "ir.sharding",
    "Sharding": "ir.sharding",
    "Plan": "ir.plan",
    "load_plan_file": "ir.plan_yaml",
    "save_plan_file": "ir.plan_yaml",
    "propagate": "ir.propagate",
    "propagate_plan": "ir.propagate",
    "parse_tactics": "search.tactics",
    "apply_tactics": "search.tactics",
    "baseline_plans": "search.baselines",
    "check_baselines": "runners.check",
    "check_plans": "runners.check",
    "verify": "runners.execute",
    "Mode": "runners.program",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'auto_partition' has no attribute {name!r}")
    module, attr = target if isinstance(target, tuple) else (target, name)
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value

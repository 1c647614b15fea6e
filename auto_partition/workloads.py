"""Turn what a user names (a built-in model, an HF Flax model, or module:function) into a Workload."""

from __future__ import annotations

import difflib

from ir.workload import Workload, WorkloadError, load_entry_point
from models import hf, registry


def resolve(spec: str, size: str | None = None, *, scan: bool = False, remat: bool = False) -> Workload:
    """Resolves a model spec.

    Accepted forms: a built-in name ('gpt', with `size`, default 'tiny'); name-size ('llama-8b',
    'gpt2-xl'); a recorded source ('builtin:llama:8b:scan', 'hf:hf-gpt2:tiny'); an HF Flax model
    ('hf-gpt2'); or an entry point 'package.module:function' returning a Workload or (fn, args).
    """
    if spec.startswith("builtin:"):
        parts = spec.split(":")
        if len(parts) < 3:
            raise WorkloadError(f"model source {spec!r} is not 'builtin:NAME:SIZE[:scan][:remat]'.")
        extra = dict(p.split("=", 1) for p in parts[3:] if "=" in p)
        unknown = sorted(set(extra) - {"batch_size", "seq_len", "n_layers"})
        if unknown or not all(v.isdigit() for v in extra.values()):
            raise WorkloadError(
                f"model source {spec!r} has unknown or non-integer options {sorted(extra)}; "
                "write e.g. builtin:llama:8b:scan:batch_size=16:seq_len=4096:n_layers=4."
            )
        flags = {p for p in parts[3:] if "=" not in p}
        if flags - {"scan", "remat"}:
            raise WorkloadError(
                f"model source {spec!r} has unknown flags {sorted(flags - {'scan', 'remat'})}; "
                "the flags are scan and remat, e.g. builtin:llama:8b:scan:remat."
            )
        return registry.get(
            parts[1],
            parts[2],
            scan="scan" in flags,
            remat="remat" in flags,
            **{k: int(v) for k, v in extra.items()},
        )
    if spec.startswith("hf:"):
        parts = spec.split(":")
        return hf.get(parts[1], parts[2] if len(parts) > 2 else "tiny")
    if spec in hf.names():
        return hf.get(spec, size or "tiny")
    if ":" in spec:
        return load_entry_point(spec)
    if spec in registry.names():
        return registry.get(spec, size or "tiny", scan=scan, remat=remat)
    for name in registry.names():
        if spec.startswith(name + "-") and spec[len(name) + 1 :] in registry.sizes(name):
            return registry.get(name, spec[len(name) + 1 :], scan=scan, remat=remat)
    for name in registry.names():  # sizes that carry their family's name, e.g. 'gpt2-xl'
        if spec in registry.sizes(name):
            return registry.get(name, spec, scan=scan, remat=remat)
    names = (*registry.names(), *hf.names())
    spelled = [*names, *(f"{n}-{s}" for n in registry.names() for s in registry.sizes(n))]
    close = difflib.get_close_matches(spec, spelled, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise WorkloadError(
        f"unknown model {spec!r}{hint}; use a built-in model ({', '.join(names)}), NAME-SIZE such as "
        "llama-8b, or an entry point 'package.module:function'."
    )

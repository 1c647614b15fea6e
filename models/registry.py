"""The built-in model registry: `get(name, size)` turns a model name and size into a training-step Workload."""

from __future__ import annotations

import dataclasses
import types
from typing import Any

from ir.workload import Workload, WorkloadError
from models import bert, gpt, llama, mlp, moe, vit

_MODELS: dict[str, types.ModuleType] = {
    "bert": bert,
    "gpt": gpt,
    "llama": llama,
    "mlp": mlp,
    "moe": moe,
    "vit": vit,
}


def names() -> tuple[str, ...]:
    """The built-in model names, sorted."""
    return tuple(sorted(_MODELS))


def sizes(name: str) -> tuple[str, ...]:
    """The sizes of model `name`, smallest first.

    Raises:
      WorkloadError: `name` is not a built-in model.
    """
    return tuple(_module(name).SIZES)


def config(name: str, size: str) -> Any:
    """The frozen config dataclass (layer counts, widths, batch shape, dtype) of `name` at `size`.

    Raises:
      WorkloadError: unknown name or size.
    """
    sizes_of = _module(name).SIZES
    if size not in sizes_of:
        raise WorkloadError(
            f"unknown size {size!r} for model {name!r}; choose one of: {', '.join(sizes_of)}."
        )
    return sizes_of[size]


def get(
    name: str,
    size: str,
    *,
    scan: bool = False,
    batch_size: int | None = None,
    seq_len: int | None = None,
    remat: bool = False,
    n_layers: int | None = None,
) -> Workload:
    """Builds the training-step Workload of a built-in model without allocating any array.

    Args:
      name: one of `names()`.
      size: one of `sizes(name)`.
      scan: stack the layers on a leading [n_layers] dim under `params/layers` and run them with
        `jax.lax.scan` (gpt and llama only).
      batch_size: override the global batch size.
      seq_len: override the sequence length (language models only).
      remat: activation checkpointing per layer (gpt, llama, bert, vit).
      n_layers: override the number of layers (every model but mlp, whose widths are its layers):
        the same layer, fewer or more of it.

    Returns:
      A Workload with `fn = train_step(params, opt_state, batch) -> (params, opt_state, loss)`,
      ShapeDtypeStruct `args`, `donate_argnums=(0, 1)`, `init(seed)` for real random inputs and
      `source = 'builtin:{name}:{size}'` (plus ':scan', ':remat', ':batch_size=N', ':seq_len=N',
      ':n_layers=N').

    Raises:
      WorkloadError: unknown name or size, scan for a model without it, or an invalid override.
    """
    module = _module(name)
    cfg = config(name, size)
    if scan and not module.SUPPORTS_SCAN:
        scannable = ", ".join(n for n in names() if _MODELS[n].SUPPORTS_SCAN)
        raise WorkloadError(
            f"model {name!r} does not support scan=True; only {scannable} stack their layers for "
            f"jax.lax.scan. Call get({name!r}, {size!r}) without scan."
        )
    overrides = {}
    sized = (("batch_size", batch_size), ("seq_len", seq_len), ("n_layers", n_layers))
    fields = {f.name for f in dataclasses.fields(cfg)}
    for field, value in sized:
        if value is None:
            continue
        if field not in fields:
            raise WorkloadError(f"model {name!r} has no {field}; leave {field} unset for it.")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise WorkloadError(f"{field} must be a positive integer, got {value!r}.")
        overrides[field] = value
    if remat:
        if not hasattr(cfg, "remat"):
            with_remat = ", ".join(n for n in names() if hasattr(config(n, sizes(n)[0]), "remat"))
            raise WorkloadError(f"model {name!r} has no remat option; only {with_remat} have one.")
        overrides["remat"] = True
    cfg = dataclasses.replace(cfg, **overrides)
    source = f"builtin:{name}:{size}" + (":scan" if scan else "") + (":remat" if remat else "")
    # Overrides travel in the source so a plan's workload rebuilds with the same shapes.
    source += "".join(f":{k}={v}" for k, v in sized if v)
    return module.build(cfg, scan=scan, source=source)


def _module(name: str) -> types.ModuleType:
    if name not in _MODELS:
        raise WorkloadError(f"unknown model {name!r}; choose one of: {', '.join(names())}.")
    return _MODELS[name]

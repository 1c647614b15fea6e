"""Expert sharding strategies (DP, FSDP, Megatron TP and their products, SP, EP), written as tactics."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

from ir.graph import Graph, Role, Value
from ir.patterns import compact_patterns
from ir.plan import Plan, Provenance, activation_values
from ir.sharding import MeshShape
from search.tactics import Batch, Constrain, Shard, Tactic, apply_tactics

# A mesh axis with one of these names is the tensor-parallel axis; every other axis is a data axis.
TP_AXIS_NAMES = ("model", "tensor")

# Megatron-LM tensor parallelism for the built-in models, as (regex searched in param names, dim).
# Column-parallel (output features split): q/k/v, w_in, w_gate, and the column biases.
# Row-parallel (input features split): o, w_out; their biases stay replicated.
# Embedding: vocab-parallel like Megatron's VocabParallelEmbedding (dim 0 of [vocab, d]), and the
# lm_head [d, vocab] column-parallel over vocab, so logits stay split over vocab into the loss; a
# vocab size the axis does not divide (GPT-2's 50257) leaves that tensor replicated.
# MoE expert weights [E, d, ff] / [E, ff, d] split their ff dim, as Megatron does inside each expert.
# The scanned layout ('params/layers/...', leading [n_layers] dim) uses the same dims shifted by one.
DEFAULT_TP_RULES: tuple[tuple[str, int], ...] = (
    (r"^params/layers_\d+/attn/(q|k|v)/kernel$", 1),
    (r"^params/layers_\d+/attn/(q|k|v)/bias$", 0),
    (r"^params/layers_\d+/attn/o/kernel$", 0),
    (r"^params/layers_\d+/mlp/(w_in|w_gate)$", 1),
    (r"^params/layers_\d+/mlp/(b_in|b_gate)$", 0),
    (r"^params/layers_\d+/mlp/w_out$", 0),
    (r"^params/layers_\d+/moe/(w_in|w_gate)$", 2),
    (r"^params/layers_\d+/moe/w_out$", 1),
    (r"^params/layers/attn/(q|k|v)/kernel$", 2),
    (r"^params/layers/attn/(q|k|v)/bias$", 1),
    (r"^params/layers/attn/o/kernel$", 1),
    (r"^params/layers/mlp/(w_in|w_gate)$", 2),
    (r"^params/layers/mlp/(b_in|b_gate)$", 1),
    (r"^params/layers/mlp/w_out$", 1),
    (r"^params/layers/moe/(w_in|w_gate)$", 3),
    (r"^params/layers/moe/w_out$", 2),
    (r"^params/embed/embedding$", 0),
    (r"^params/lm_head/kernel$", 1),
)

# The experts dim of MoE weights: dim 0 unrolled ([E, d, ff]), dim 1 scanned ([n_layers, E, d, ff]).
EXPERT_RULES: tuple[tuple[str, int], ...] = (
    (r"^params/layers_\d+/moe/(w_in|w_gate|w_out)$", 0),
    (r"^params/layers/moe/(w_in|w_gate|w_out)$", 1),
)

# Sequence parallelism constrains the residual stream between blocks to [batch/data, seq/model, d].
SP_ACTIVATIONS = r"activations/(resid|attn_out|mlp_out)/\d+"

# A stacked-layers param ('params/layers/...', not 'layers/3/...'): its dim 0 is the scanned layer dim.
_SCANNED = re.compile(r"(^|/)layers/(?!\d+(/|$))")

Strategy = Callable[..., tuple[Tactic, ...] | None]


def mesh_roles(mesh: MeshShape) -> tuple[str | None, tuple[str, ...]]:
    """(the tensor-parallel axis or None, the data axes), ignoring axes of size 1."""
    live = [a for a, n in zip(mesh.axes, mesh.shape, strict=True) if n > 1]
    tp = next((a for a in live if a in TP_AXIS_NAMES), None)
    return tp, tuple(a for a in live if a != tp)


def _all_axes(mesh: MeshShape) -> tuple[str, ...]:
    return tuple(a for a, n in zip(mesh.axes, mesh.shape, strict=True) if n > 1)


def _params(graph: Graph) -> list[Value]:
    return [v for v in graph.input_values() if v.role is Role.PARAM]


def _batch(graph: Graph, mesh: MeshShape, axes: tuple[str, ...]) -> Batch | None:
    """Batch over `axes`, or None when there is no batch input or the axes do not divide dim 0."""
    batch = [v for v in graph.input_values() if v.role is Role.BATCH and v.rank >= 1]
    if not axes or not batch or any(v.shape[0] % mesh.axes_size(axes) for v in batch):
        return None
    return Batch(axes)


def _shards(graph: Graph, decisions: dict[str, tuple[int, tuple[str, ...]]]) -> tuple[Shard, ...]:
    """One Shard per group of params that share a name pattern and a decision (dim, axes)."""
    targets = {v.name: decisions.get(v.name) for v in _params(graph)}
    return tuple(Shard(pattern, dim, axes) for pattern, (dim, axes) in compact_patterns(targets))


def _tp_decisions(
    graph: Graph, mesh: MeshShape, axis: str, tp_rules: Sequence[tuple[str, int]] | None
) -> dict[str, tuple[int, tuple[str, ...]]]:
    rules = [(re.compile(p), d) for p, d in (DEFAULT_TP_RULES if tp_rules is None else tp_rules)]
    out = {}
    for v in _params(graph):
        dim = next((d for regex, d in rules if regex.search(v.name)), None)
        if dim is not None and -v.rank <= dim < v.rank and v.shape[dim] % mesh.axis_size(axis) == 0:
            out[v.name] = (dim % v.rank, (axis,))
    return out


def _fsdp_decisions(
    graph: Graph, mesh: MeshShape, axes: tuple[str, ...], taken: dict[str, tuple[int, tuple[str, ...]]]
) -> dict[str, tuple[int, tuple[str, ...]]]:
    """ZeRO-3: each param on its first dim that `axes` divide, skipping a TP-split dim and a scan dim."""
    n = mesh.axes_size(axes)
    out = {}
    for v in _params(graph):
        skip = {taken[v.name][0]} if v.name in taken else set()
        if _SCANNED.search(v.name):
            skip.add(0)
        dim = next((d for d in range(v.rank) if d not in skip and v.shape[d] % n == 0), None)
        if dim is not None:
            out[v.name] = (dim, axes)
    return out


# --------------------------------------------------------------------------------------- strategies


def dp(graph: Graph, mesh: MeshShape, *, tp_rules: Sequence[tuple[str, int]] | None = None):
    """Data parallel: batch dim 0 over every mesh axis; params replicated."""
    batch = _batch(graph, mesh, _all_axes(mesh))
    return (batch,) if batch else None


def fsdp(graph: Graph, mesh: MeshShape, *, tp_rules: Sequence[tuple[str, int]] | None = None):
    """FSDP / ZeRO-3 over every mesh axis: batch and each param's first divisible dim."""
    axes = _all_axes(mesh)
    batch = _batch(graph, mesh, axes)
    shards = _shards(graph, _fsdp_decisions(graph, mesh, axes, {})) if batch else ()
    return (batch, *shards) if shards else None


def tp(graph: Graph, mesh: MeshShape, *, tp_rules: Sequence[tuple[str, int]] | None = None):
    """Megatron tensor parallel over the TP axis (see DEFAULT_TP_RULES); batch replicated."""
    axis, _ = mesh_roles(mesh)
    if axis is None:
        return None
    return _shards(graph, _tp_decisions(graph, mesh, axis, tp_rules)) or None


def dp_tp(graph: Graph, mesh: MeshShape, *, tp_rules: Sequence[tuple[str, int]] | None = None):
    """Batch over the data axes × Megatron over the TP axis."""
    axis, data = mesh_roles(mesh)
    batch = _batch(graph, mesh, data)
    if axis is None or batch is None:
        return None
    shards = _shards(graph, _tp_decisions(graph, mesh, axis, tp_rules))
    return (batch, *shards) if shards else None


def fsdp_tp(graph: Graph, mesh: MeshShape, *, tp_rules: Sequence[tuple[str, int]] | None = None):
    """Megatron over the TP axis, then FSDP over the data axes on each param's first other dim."""
    axis, data = mesh_roles(mesh)
    batch = _batch(graph, mesh, data)
    if axis is None or batch is None:
        return None
    tp_dims = _tp_decisions(graph, mesh, axis, tp_rules)
    if not tp_dims:
        return None
    fsdp_dims = _fsdp_decisions(graph, mesh, data, tp_dims)
    return (batch, *_shards(graph, tp_dims), *_shards(graph, fsdp_dims))


def sp(graph: Graph, mesh: MeshShape, *, tp_rules: Sequence[tuple[str, int]] | None = None):
    """dp_tp (or tp without data axes) plus the residual stream split over sequence on the TP axis."""
    axis, data = mesh_roles(mesh)
    if axis is None:
        return None
    batch = _batch(graph, mesh, data)
    if data and batch is None:
        return None
    shards = _shards(graph, _tp_decisions(graph, mesh, axis, tp_rules))
    regex = re.compile(SP_ACTIVATIONS)
    acts = [v for name, v in activation_values(graph).items() if regex.fullmatch(name)]
    n_data, n_tp = mesh.axes_size(data), mesh.axis_size(axis)
    if not shards or not acts or any(v.rank < 2 or v.shape[0] % n_data or v.shape[1] % n_tp for v in acts):
        return None
    constrain = Constrain(SP_ACTIVATIONS, (data, (axis,)))
    return (*((batch,) if batch else ()), *shards, constrain)


def ep(graph: Graph, mesh: MeshShape, *, tp_rules: Sequence[tuple[str, int]] | None = None):
    """Expert parallel: MoE experts over the TP axis (the data axes without one), batch over data."""
    axis, data = mesh_roles(mesh)
    expert_axes = (axis,) if axis is not None else data
    if not expert_axes:
        return None
    rules = [(re.compile(p), d) for p, d in EXPERT_RULES]
    decisions = {}
    for v in _params(graph):
        dim = next((d for regex, d in rules if regex.search(v.name)), None)
        if dim is None:
            continue
        if dim >= v.rank or v.shape[dim] % mesh.axes_size(expert_axes):
            return None
        decisions[v.name] = (dim, expert_axes)
    batch = _batch(graph, mesh, data)
    if not decisions or (data and batch is None):
        return None
    return (*((batch,) if batch else ()), *_shards(graph, decisions))


STRATEGIES: dict[str, Strategy] = {
    "dp": dp,
    "fsdp": fsdp,
    "tp": tp,
    "dp_tp": dp_tp,
    "fsdp_tp": fsdp_tp,
    "sp": sp,
    "ep": ep,
}


def baseline_plans(
    graph: Graph,
    mesh: MeshShape,
    tp_rules: Sequence[tuple[str, int]] | None = None,
    *,
    provenance: Provenance | None = None,
) -> dict[str, Plan]:
    """The plan of every strategy that applies to this graph and mesh, by strategy name.

    Args:
      graph: the traced step.
      mesh: the mesh.
      tp_rules: (regex searched in param names, dim) pairs for Megatron (default DEFAULT_TP_RULES);
        HF models pass their own table.
      provenance: copied into each plan, with `searcher` set to 'baseline:<name>'.
    """
    out = {}
    for name, strategy in STRATEGIES.items():
        tactics = strategy(graph, mesh, tp_rules=tp_rules)
        if tactics is None:
            continue
        plan = apply_tactics(graph, mesh, tactics)
        prov = dataclasses.replace(provenance or plan.provenance, searcher=f"baseline:{name}")
        out[name] = dataclasses.replace(plan, provenance=prov)
    return out

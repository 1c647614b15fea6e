"""Per-device memory of a propagated plan: arguments, outputs, donation, and peak temporaries by liveness.

The model mirrors how XLA accounts a compiled step (`memory_analysis()`): argument buffers (each
input's local shard), output buffers, minus outputs aliased onto donated inputs, plus the peak of
temporaries. Temporaries are found by liveness over program order: a value that leaves a fusion
(see cost_model.compute) occupies its local shard from the op that makes it until its last reader;
an operand resharded for an op (a gathered weight, say) occupies its new layout while the op runs;
a scan holds its stacked outputs and the peak of its body. Remat needs no special case: the
recomputation is explicit in the differentiated program, so saved residuals are exactly the values
that live from the forward pass into the backward pass.

The breakdown follows JAX's name stacks: values made under 'transpose(' are gradients, under
'jvp(' activations, the rest (optimizer update, loss) temporaries.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from ir.graph import Graph, Role
from ir.propagate import Propagation
from ir.sharding import Sharding

_INPUT_KINDS = {Role.PARAM: "params", Role.OPT_STATE: "optimizer_state", Role.BATCH: "batch"}


@dataclasses.dataclass(frozen=True, slots=True)
class MemoryReport:
    """Per-device bytes.

    Attributes:
      arguments: every input's local shard.
      outputs: every output's local shard.
      aliased: output bytes written into donated input buffers.
      temp: peak of live temporaries.
      by_kind: arguments by role and temporaries at the peak by kind (params, optimizer_state,
        batch, inputs, activations, gradients, temporaries).
      largest: the largest values live at the peak, (name, bytes), largest first.
    """

    arguments: int
    outputs: int
    aliased: int
    temp: int
    by_kind: Mapping[str, int]
    largest: tuple[tuple[str, int], ...]

    @property
    def peak(self) -> int:
        """Arguments + outputs - aliased + temporaries: XLA's accounting of a step's footprint."""
        return self.arguments + self.outputs - self.aliased + self.temp


def local_bytes(shape, itemsize: int, sharding: Sharding, mesh) -> int:
    return itemsize * math.prod(
        n // mesh.axes_size(axes) for n, axes in zip(shape, sharding.dims, strict=True)
    )


def memory(prop: Propagation, donated: frozenset[int] | None = None) -> MemoryReport:
    """The memory report of a propagated top-level graph."""
    g = prop.graph
    mesh = prop.mesh
    donated = g.donated if donated is None else donated
    by_kind: dict[str, int] = {}
    args = 0
    for vid in g.inputs:
        v = g.values[vid]
        b = local_bytes(v.shape, v.itemsize, prop.shardings[vid], mesh)
        args += b
        kind = _INPUT_KINDS.get(v.role, "inputs")
        by_kind[kind] = by_kind.get(kind, 0) + b
    outs = 0
    aliased = 0
    used_donors: set[int] = set()
    for k, (vid, s) in enumerate(zip(g.outputs, prop.outputs, strict=True)):
        v = g.values[vid]
        b = local_bytes(v.shape, v.itemsize, s, mesh)
        outs += b
        src = g.output_alias[k] if k < len(g.output_alias) else -1
        if src in donated and src not in used_donors:
            sv = g.values[src]
            if local_bytes(sv.shape, sv.itemsize, prop.shardings[src], mesh) == b:
                aliased += b
                used_donors.add(src)
    temp, live_at_peak = _peak(prop)
    for name, b in live_at_peak:
        kind = _kind_of(name)
        by_kind[kind] = by_kind.get(kind, 0) + b
    largest = tuple(sorted(live_at_peak, key=lambda t: -t[1])[:10])
    return MemoryReport(args, outs, aliased, temp, by_kind, largest)


def _kind_of(name: str) -> str:
    if "transpose(" in name:
        return "gradients"
    if "jvp(" in name or name.startswith("activations/"):
        return "activations"
    return "temporaries"


def _peak(prop: Propagation) -> tuple[int, list[tuple[str, int]]]:
    """Peak bytes of temporaries over program order, and what is live at the peak."""
    from cost_model.compute import fused_values

    g: Graph = prop.graph
    mesh = prop.mesh
    fused = fused_values(g)
    pinned = set(g.inputs) | set(g.outputs)
    last_read: dict[int, int] = {}
    for op in g.ops:
        for vid in op.inputs:
            last_read[vid] = op.id
    size: dict[int, int] = {}
    live: dict[int, int] = {}
    current = peak = 0
    at_peak: list[tuple[str, int]] = []
    for op in g.ops:
        # Operands read in another layout are copied into it for the op.
        extra = 0
        decided = prop.ops[op.id]
        if decided is not None:
            for vid, want in zip(op.inputs, decided.operands, strict=True):
                if want != prop.shardings[vid] and vid not in fused:
                    v = g.values[vid]
                    extra += local_bytes(v.shape, v.itemsize, want, mesh)
        inner = 0
        for sub in prop.bodies.get(op.id, ()):
            inner = max(inner, _peak(sub)[0])
        made = 0
        for vid in op.outputs:
            if vid in fused or vid in pinned or vid not in last_read:
                continue
            v = g.values[vid]
            b = local_bytes(v.shape, v.itemsize, prop.shardings[vid], mesh)
            size[vid] = b
            live[vid] = b
            made += b
        current += made
        here = current + extra + inner
        if here > peak:
            peak = here
            at_peak = [(g.values[v].name, b) for v, b in live.items()]
        for vid in set(op.inputs):
            if last_read.get(vid) == op.id and vid in live:
                current -= live.pop(vid)
    return peak, at_peak

"""Per-device memory of a propagated plan: arguments, outputs, donation, and peak temporaries by liveness.

The model mirrors how XLA accounts a compiled step (`memory_analysis()`): argument buffers (each
input's local shard), output buffers (plus the output tuple's table of pointers), minus outputs
aliased onto donated inputs, plus the peak of temporaries, found by liveness over the per-device
program (cost_model.liveness). What the backend compiler does that changes memory (combining
collectives, lowering, copy insertion, scheduling) is a `Compiler`: `XLA_CPU`, `XLA_GPU`, or
`compiler_for(hardware.name)`.

The breakdown follows JAX's name stacks: values made under 'transpose(' are gradients, under
'jvp(' activations, the rest (optimizer update, loss, copies, loop bodies) temporaries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from cost_model.compiler import XLA_CPU, XLA_GPU, Compiler, compiler_for, local_bytes
from cost_model.liveness import Buffer, TimelineCache, peak, temp_peak, timeline
from cost_model.op_walk import shard_bytes, table_sizes
from ir.graph import Graph, Role
from ir.propagate import Propagation
from ir.sharding import Sharding
from ir.spans import entries_getter

_INPUT_KINDS = {Role.PARAM: "params", Role.OPT_STATE: "optimizer_state", Role.BATCH: "batch"}


@dataclasses.dataclass(frozen=True, slots=True)
class MemoryReport:
    """Per-device bytes.

    Attributes:
      arguments: every input's local shard.
      outputs: every output's local shard, and the output tuple's pointer table.
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


def memory(
    prop: Propagation,
    donated: frozenset[int] | None = None,
    *,
    compiler: Compiler = XLA_CPU,
    cache: TimelineCache | None = None,
) -> MemoryReport:
    """The memory report of a propagated top-level graph.

    Args:
      prop: the propagated step.
      donated: input ids whose buffers outputs may reuse (default: the graph's donated inputs).
      compiler: the backend's combiner and lowering choices; `compiler_for(hardware.name)`.
      cache: memo tables to reuse across calls with one compiler (see `TimelineCache`).
    """
    args, by_kind, outs, aliased = _footprint(prop, donated, compiler, cache)
    temp, live_at_peak = peak(timeline(prop, compiler, cache))
    for name, b in live_at_peak:
        kind = _kind_of(name)
        by_kind[kind] = by_kind.get(kind, 0) + b
    largest = tuple(sorted(live_at_peak, key=lambda t: -t[1])[:10])
    return MemoryReport(args, outs, aliased, temp, by_kind, largest)


def memory_peak(
    prop: Propagation,
    donated: frozenset[int] | None = None,
    *,
    compiler: Compiler = XLA_CPU,
    cache: TimelineCache | None = None,
) -> int:
    """`memory(...).peak` without the breakdown (what a searcher compares)."""
    fixed = _fixed_bytes(prop, donated, compiler, cache) if cache is not None else None
    if fixed is None:
        args, _, outs, aliased = _footprint(prop, donated, compiler, cache)
        fixed = args + outs - aliased
    return fixed + temp_peak(prop, compiler, cache)


def _fixed_bytes(
    prop: Propagation, donated: frozenset[int] | None, compiler: Compiler, cache: TimelineCache
) -> int | None:
    """Arguments + outputs - aliased, as `_footprint` counts them, looked up at C speed in the
    cache's local sizes (those not known yet are worked out first); None when two outputs may
    alias one donated input (`_footprint` decides which)."""
    g = prop.graph
    pairs = g.derived(("memory.alias_pairs", donated), lambda g: _alias_pairs(g, donated))
    if pairs is None:
        return None
    inputs, outputs, pairs = pairs
    sizes = cache.value_sizes(g, prop.mesh)
    layouts, tables = inputs(prop.shardings), inputs(sizes)
    out_tables = outputs(sizes)

    # (values of one shape and item size share a table: each layout missing is worked out once)
    def make(vid: int, s: Sharding) -> int:
        return shard_bytes(sizes, prop, vid, s, cache)

    ins = table_sizes(tables, layouts, g.inputs, make)
    outs = table_sizes(out_tables, prop.outputs, g.outputs, make)
    pointers = compiler.pointer_bytes * len(outs) if len(outs) > 1 else 0
    return sum(ins) + sum(outs) + pointers - sum([outs[k] for k, j in pairs if outs[k] == ins[j]])


def _alias_pairs(g: Graph, donated: frozenset[int] | None) -> tuple | None:
    """(inputs' getter, outputs' getter, per output that may alias a donated input (position,
    the input's position)), or None when two outputs name one donated input (or one that is not
    an input)."""
    donated = g.donated if donated is None else donated
    if not g.inputs or not g.outputs:
        return None
    position = {vid: j for j, vid in enumerate(g.inputs)}
    pairs = []
    for k, src in enumerate(g.output_alias[: len(g.outputs)]):
        if src in donated:
            if src not in position:
                return None
            pairs.append((k, position[src]))
    if len({j for _, j in pairs}) < len(pairs):
        return None
    return entries_getter(g.inputs), entries_getter(g.outputs), tuple(pairs)


def _footprint(
    prop: Propagation, donated: frozenset[int] | None, compiler: Compiler, cache: TimelineCache | None = None
) -> tuple[int, dict[str, int], int, int]:
    """(argument bytes, arguments by kind, output bytes, output bytes aliased onto donated inputs).

    `cache`: its memo of local bytes per value and sharding is used and added to."""
    g = prop.graph
    donated = g.donated if donated is None else donated
    sizes = cache.value_sizes(g, prop.mesh) if cache is not None else [None] * len(g.values)

    def size(vid: int, s) -> int:
        return shard_bytes(sizes, prop, vid, s, cache)

    by_kind: dict[str, int] = {}
    args = 0
    shardings = prop.shardings
    for vid, kind in zip(g.inputs, g.derived("memory.input_kinds", _input_kinds), strict=True):
        s = shardings[vid]
        known = sizes[vid]
        b = known.get(s) if known is not None else None
        if b is None:
            b = size(vid, s)
        args += b
        by_kind[kind] = by_kind.get(kind, 0) + b
    # A step with several results returns a tuple: a buffer of one pointer per result.
    outs = compiler.pointer_bytes * len(g.outputs) if len(g.outputs) > 1 else 0
    aliased = 0
    used_donors: set[int] = set()
    for k, (vid, s) in enumerate(zip(g.outputs, prop.outputs, strict=True)):
        known = sizes[vid]
        b = known.get(s) if known is not None else None
        if b is None:
            b = size(vid, s)
        outs += b
        src = g.output_alias[k] if k < len(g.output_alias) else -1
        if src in donated and src not in used_donors:
            if size(src, shardings[src]) == b:
                aliased += b
                used_donors.add(src)
    return args, by_kind, outs, aliased


def _input_kinds(g: Graph) -> tuple[str, ...]:
    """Per input of `g`, the kind of argument it is (for the breakdown)."""
    return tuple(_INPUT_KINDS.get(g.values[vid].role, "inputs") for vid in g.inputs)


def _kind_of(name: str) -> str:
    if "transpose(" in name:
        return "gradients"
    if "jvp(" in name or name.startswith("activations/"):
        return "activations"
    return "temporaries"


__all__ = [
    "XLA_CPU",
    "XLA_GPU",
    "Buffer",
    "Compiler",
    "MemoryReport",
    "TimelineCache",
    "compiler_for",
    "local_bytes",
    "memory",
    "memory_peak",
    "peak",
    "timeline",
]

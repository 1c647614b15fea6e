"""Collectives of a compiled XLA HLO module, attributed to mesh axes and canonicalised for comparison."""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Sequence

import numpy as np

from ir.comm import Collective, CollectiveKind
from ir.sharding import MeshShape
from runners.hlo_text import (
    Computation,
    HloParseError,
    Instr,
    Module,
    array_nbytes,
    arrays,
    callees,
    parse_module,
    replica_groups,
)

# Per-step byte totals per (kind, axes) are `ir.comm.bytes_by_kind_axes(collectives)`; not repeated here.

_KINDS = {
    "all-reduce": CollectiveKind.ALL_REDUCE,
    "all-gather": CollectiveKind.ALL_GATHER,
    "reduce-scatter": CollectiveKind.REDUCE_SCATTER,
    "all-to-all": CollectiveKind.ALL_TO_ALL,
    "ragged-all-to-all": CollectiveKind.ALL_TO_ALL,
    "collective-permute": CollectiveKind.COLLECTIVE_PERMUTE,
}
# Ops between an all-reduce and the dynamic-slice that keeps this device's shard: they move or retype
# every element but neither drop nor combine any, so the slice still keeps 1/n of the reduced value.
_PASS_THROUGH = frozenset({"bitcast", "reshape", "copy", "convert", "transpose"})
# A while's body and condition run once per trip; other callers run their callee once per call. The
# callees of async-update/-done are those of their async-start, so they are not calls of their own;
# nor are those of a collective's own -start/-done, as the pair is counted where it completes.
_LOOP_ROLES = frozenset({"body", "condition"})
_NOT_CALLS = frozenset({"async-update", "async-done"} | {f"{k}-start" for k in _KINDS})

_DIMENSIONS_RE = re.compile(r"\bdimensions=\{")
_KNOWN_TRIP_RE = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_INIT_STEP_RE = re.compile(r'"known_init_step":\{"init":"(-?\d+)","step":"(-?\d+)"\}')
_DIRECTION_RE = re.compile(r"\bdirection=([A-Z]+)")
_INDEX_RE = re.compile(r"\bindex=(\d+)")
_INT_RE = re.compile(r"^\s*(-?\d+)\s*$")
_SLICE_SIZES_RE = re.compile(r"\bdynamic_slice_sizes=\{([^}]*)\}")


class UnknownTripCountWarning(UserWarning):
    """A collective sits in a while loop whose trip count could not be read; it is counted once."""


@dataclasses.dataclass(frozen=True, slots=True)
class HloCollective:
    """One collective found in HLO text, before it is attributed to mesh axes.

    Attributes:
      name: the HLO instruction name (for async pairs, the -done), with '#i' for tuple element i.
      computation: the HLO computation it sits in.
      kind: the collective, after canonicalisation when that was asked for.
      groups: partition ids per replica group; for collective-permute, the (source, target) pairs.
      bytes: per-device buffer size in bytes, the larger of input and output.
      count: how many times it runs per execution of the module (product of enclosing trip counts).
      trip_count_known: False if an enclosing while loop's trip count was unknown (then counted as 1).
    """

    name: str
    computation: str
    kind: CollectiveKind
    groups: tuple[tuple[int, ...], ...]
    bytes: int
    count: int = 1
    trip_count_known: bool = True


def collectives_from_hlo(
    hlo_text: str,
    mesh: MeshShape,
    device_ids: Sequence[int] | None = None,
    *,
    device_assignment: Sequence[int] | None = None,
    canonical: bool = True,
) -> tuple[Collective, ...]:
    """Reads the collectives of a compiled SPMD module and attributes each to mesh axes.

    Replica groups in SPMD HLO name partition ids, i.e. positions in the executable's device
    assignment, never global device ids. For `jax.jit` with NamedShardings on a mesh, the device
    assignment is the mesh's row-major device order, so partition p is mesh position p whatever the
    device ids are (checked with a mesh built from a permuted device list: its replica groups are those
    of the unpermuted mesh). Only when the device assignment differs from the mesh order do the two
    id lists below matter; partition p then sits at the mesh position of device `device_assignment[p]`
    in `device_ids`.

    The axes of a collective are the mesh axes along which the mesh coordinates of the members of any
    one group differ, in mesh order. Groups that are not a clean product of mesh axes still report the
    axes they vary along. A collective with no such axis (groups of one device, permutes onto oneself)
    moves nothing and is dropped. Collectives in while bodies get count = the trip count (XLA's
    `known_trip_count`, else a constant loop bound with `known_init_step`); when neither can be read
    they get count 1 and an `UnknownTripCountWarning` names them. Each branch of a conditional is
    counted as if it ran.

    Args:
      hlo_text: `jax.jit(f, in_shardings=..., out_shardings=...).lower(*args).compile().as_text()`.
      mesh: the mesh the module was compiled for.
      device_ids: global device id at each mesh position in row-major order (`jax_mesh.devices.flat`
        ids); None = 0..n-1. Has an effect only together with `device_assignment`.
      device_assignment: global device id of each partition id, e.g. `[d.id for d in
        compiled.runtime_executable().local_devices()]` in one process; None = the mesh order.
      canonical: rewrite the CPU backend's reduce-scatter (all-reduce + dynamic-slice) as
        REDUCE_SCATTER; see `find_collectives` for the exact rule.

    Returns:
      One Collective per collective instruction, and per element of a tuple-shaped one (except a tuple
      all-to-all, whose elements are the pieces of one exchange), in text order. `value` is ''; `bytes`
      is per device: the full buffer for all-gather and reduce-scatter, the buffer for the others.

    Raises:
      HloParseError: a replica group syntax this module does not know, or a partition id outside the
        mesh.
    """
    module = parse_module(hlo_text)
    num_partitions = module.num_partitions or mesh.size
    found = _find(module, canonical=canonical, num_partitions=num_partitions)
    positions = _positions(mesh, device_ids, device_assignment)
    unknown = [c.name for c in found if not c.trip_count_known]
    if unknown:
        warnings.warn(
            f"could not read the trip count of the while loop around {', '.join(unknown)}; counted once. "
            "Compile with a static loop bound (lax.scan, fori_loop with Python ints) to get a count.",
            UnknownTripCountWarning,
            stacklevel=2,
        )
    out = []
    for c in found:
        axes = _varying_axes(c, mesh, positions)
        if axes:
            out.append(Collective(c.kind, axes, c.bytes, count=c.count))
    return tuple(out)


def find_collectives(
    hlo_text: str, *, canonical: bool = True, num_partitions: int | None = None
) -> tuple[HloCollective, ...]:
    """Lists the collectives of an HLO module with their replica groups, sizes and counts.

    Canonicalisation rule (`canonical=True`): an all-reduce (or one element of a tuple all-reduce,
    reached through its get-tuple-element) whose value is used only as the sliced operand of
    dynamic-slices, each keeping exactly 1/n of its elements where n is the replica group size, becomes
    a REDUCE_SCATTER with the all-reduce's (full) byte size. Between the all-reduce and each slice
    there may be bitcast, reshape, copy, convert and transpose, and fusion boundaries (the slice may sit
    inside a fused computation). Any other use (arithmetic, a static slice, the value leaving the
    computation) keeps it an ALL_REDUCE. The slice offsets are not checked to depend on the partition
    id; the 1/n fraction is what makes the pattern a reduce-scatter's result.

    Args:
      hlo_text: the module text, as printed by `Compiled.as_text()`.
      canonical: apply the rule above.
      num_partitions: devices in the module, for `replica_groups={}` (all devices in one group);
        None = the module header's `num_partitions`.

    Returns:
      The collectives in text order; no-ops (groups of one device) included.
    """
    module = parse_module(hlo_text)
    return _find(module, canonical=canonical, num_partitions=num_partitions or module.num_partitions)


# --- Finding collectives, counting them and canonicalising ---
def _find(module: Module, *, canonical: bool, num_partitions: int | None) -> tuple[HloCollective, ...]:
    counts = _counts(module)
    out = []
    for comp in module.computations.values():
        count, known = counts[comp.name]
        if count == 0:  # never run: not reachable from the entry
            continue
        for instr in comp.instrs:
            found = _collective_at(instr, comp)
            if found is None:
                continue
            kind, start = found
            groups = replica_groups(start, num_partitions)
            sizes = {len(g) for g in groups}
            group_size = sizes.pop() if len(sizes) == 1 else 0
            results = arrays(instr.shape)
            inputs = [arrays(comp.by_name[o].shape) for o in start.operands if o in comp.by_name]
            inputs = [a[0] for a in inputs if len(a) == 1]
            # A tuple all-to-all sends operand i to peer i: its elements are one exchange.
            tuple_a2a = kind is CollectiveKind.ALL_TO_ALL and not _DIMENSIONS_RE.search(start.attrs)
            if tuple_a2a and len(results) > 1:
                elements = [sum(array_nbytes(a) for a in results)]
            elif len(inputs) == len(results):
                elements = [
                    max(array_nbytes(r), array_nbytes(i)) for r, i in zip(results, inputs, strict=True)
                ]
            else:
                scale = max(group_size, 1) if kind is CollectiveKind.REDUCE_SCATTER else 1
                elements = [array_nbytes(r) * scale for r in results]
            for k, nbytes in enumerate(elements):
                element_kind = kind
                if (
                    canonical
                    and kind is CollectiveKind.ALL_REDUCE
                    and group_size > 1
                    and _only_shards_taken(module, comp, instr, k if len(results) > 1 else None, group_size)
                ):
                    element_kind = CollectiveKind.REDUCE_SCATTER
                name = f"{instr.name}#{k}" if len(elements) > 1 else instr.name
                out.append(HloCollective(name, comp.name, element_kind, groups, nbytes, count, known))
    return tuple(out)


def _collective_at(instr: Instr, comp: Computation) -> tuple[CollectiveKind, Instr] | None:
    """(kind, the instruction holding its groups) if `instr` completes a collective.

    A synchronous collective completes where it stands; an async one at its -done, whose operand is
    the -start that holds the groups and operands. A -start is skipped, so each pair counts once.
    """
    if instr.opcode in _KINDS:
        return _KINDS[instr.opcode], instr
    base = instr.opcode.removesuffix("-done")
    if base != instr.opcode and base in _KINDS and instr.operands:
        start = comp.by_name.get(instr.operands[0])
        if start is not None:
            return _KINDS[base], start
    return None


def _counts(module: Module) -> dict[str, tuple[int, bool]]:
    """Per computation: runs per module execution, and whether every trip count on the way was known."""
    callers: dict[str, list[tuple[str, int, bool]]] = {}
    for comp in module.computations.values():
        for instr in comp.instrs:
            if instr.opcode in _NOT_CALLS or _collective_at(instr, comp):
                continue
            for role, callee in callees(instr):
                trips = _trip_count(module, instr) if instr.opcode == "while" and role in _LOOP_ROLES else 1
                callers.setdefault(callee, []).append(
                    (comp.name, 1 if trips is None else trips, trips is not None)
                )
    memo: dict[str, tuple[int, bool]] = {}

    def count(name: str, seen: frozenset[str]) -> tuple[int, bool]:
        if name in memo:
            return memo[name]
        if name not in callers or name in seen:  # only the entry runs uncalled (any root, lacking one)
            return (1 if module.entry in (None, name) else 0), True
        total, known = 0, True
        for caller, trips, trips_known in callers[name]:
            n, k = count(caller, seen | {name})
            total, known = total + n * trips, known and k and trips_known
        memo[name] = (total, known)
        return memo[name]

    return {name: count(name, frozenset()) for name in module.computations}


def _trip_count(module: Module, loop: Instr) -> int | None:
    """XLA's known_trip_count, else (bound - init) / step from a constant bound in the condition."""
    if m := _KNOWN_TRIP_RE.search(loop.attrs):
        return int(m[1])
    init_step = _INIT_STEP_RE.search(loop.attrs)
    condition = dict(callees(loop)).get("condition")
    bound = _loop_bound(module, condition) if condition else None
    if init_step is None or bound is None:
        return None
    init, step = int(init_step[1]), int(init_step[2])
    direction, limit = bound
    if step <= 0:
        return None
    if direction == "LT":
        return max(0, -(-(limit - init) // step))
    return max(0, (limit - init) // step + 1)


def _loop_bound(module: Module, name: str) -> tuple[str, int] | None:
    """('LT' | 'LE', constant) when the condition's root is `induction < constant` (maybe fused)."""
    comp = module.computations.get(name)
    compare = comp.root if comp else None
    if compare is None:
        return None
    scope, outer = comp, {}
    if compare.opcode == "fusion" and (fused := _called(module, compare)) and fused.root:
        # A fused parameter stands for the fusion's operand in the condition computation.
        outer = {p: compare.operands[k] for k, p in _params(fused).items() if k < len(compare.operands)}
        scope, compare = fused, fused.root
    direction = _DIRECTION_RE.search(compare.attrs)
    if compare.opcode != "compare" or direction is None or len(compare.operands) != 2:
        return None
    lhs, rhs = (_constant(comp, outer[o]) if o in outer else _constant(scope, o) for o in compare.operands)
    if rhs is not None and lhs is None and direction[1] in ("LT", "LE"):
        return direction[1], rhs
    mirrored = {"GT": "LT", "GE": "LE"}
    if lhs is not None and rhs is None and direction[1] in mirrored:
        return mirrored[direction[1]], lhs
    return None


def _called(module: Module, instr: Instr) -> Computation | None:
    return module.computations.get(dict(callees(instr)).get("calls", ""))


def _params(comp: Computation) -> dict[int, str]:
    return {int(i.args): i.name for i in comp.instrs if i.opcode == "parameter" and _INT_RE.match(i.args)}


def _constant(comp: Computation, name: str) -> int | None:
    instr = comp.by_name.get(name)
    if instr is None or instr.opcode != "constant":
        return None
    m = _INT_RE.match(instr.args)
    return int(m[1]) if m else None


def _only_shards_taken(module: Module, comp: Computation, instr: Instr, element: int | None, n: int) -> bool:
    """Whether every use of the all-reduce (or its tuple element) keeps one and the same 1/n slice.

    Slices of different shapes (readers that take this device's piece along different dims, as
    when one reader wants the value split over sequence and another over features) are not one
    reduce-scatter's result: the all-reduce stays an all-reduce.
    """
    shapes: set[str] = set()
    if element is None:
        ok = _sliced_only(module, comp, instr.name, arrays(instr.shape)[0][0], n, shapes)
        return ok and len(shapes) == 1
    users = comp.users.get(instr.name, [])
    if instr.root or not users or any(u.opcode != "get-tuple-element" for u in users):
        return False
    mine = [u for u in users if (m := _INDEX_RE.search(u.attrs)) and int(m[1]) == element]
    elements = arrays(instr.shape)[element][0]
    ok = bool(mine) and all(_sliced_only(module, comp, u.name, elements, n, shapes) for u in mine)
    return ok and len(shapes) == 1


def _sliced_only(
    module: Module, comp: Computation, name: str, elements: int, n: int, shapes: set[str]
) -> bool:
    """Whether `name` is only sliced to 1/n; adds each slice's `dynamic_slice_sizes` to `shapes`."""
    value, users = comp.by_name.get(name), comp.users.get(name, [])
    if value is None or value.root or not users:
        return False
    for user in users:
        if user.opcode in _PASS_THROUGH:
            ok = _sliced_only(module, comp, user.name, elements, n, shapes)
        elif user.opcode == "fusion":
            ok = _sliced_in_fusion(module, user, name, elements, n, shapes)
        else:  # a slice of `name` itself (not of an offset) down to 1/n of its elements
            kept = arrays(user.shape)
            ok = (
                user.opcode == "dynamic-slice" and user.operands.count(name) == 1 and user.operands[0] == name
            )
            ok = ok and len(kept) == 1 and kept[0][0] * n == elements
            sizes = _SLICE_SIZES_RE.search(user.attrs)
            shapes.add(sizes[1] if sizes else user.shape)
        if not ok:
            return False
    return True


def _sliced_in_fusion(
    module: Module, fusion: Instr, name: str, elements: int, n: int, shapes: set[str]
) -> bool:
    fused = _called(module, fusion)
    params = _params(fused) if fused else {}
    slots = [k for k, o in enumerate(fusion.operands) if o == name]
    return all(k in params and _sliced_only(module, fused, params[k], elements, n, shapes) for k in slots)


# --- Mesh attribution ---
def _positions(
    mesh: MeshShape, device_ids: Sequence[int] | None, assignment: Sequence[int] | None
) -> list[int]:
    """Mesh position (row-major) of each partition id."""
    if assignment is None:
        return list(range(mesh.size))
    ids = list(range(mesh.size)) if device_ids is None else list(device_ids)
    if len(set(ids)) != mesh.size or sorted(ids) != sorted(assignment):
        raise HloParseError(
            f"device_ids {ids} and device_assignment {list(assignment)} must each list the same {mesh.size} "
            f"distinct devices of mesh {mesh}: the mesh's device ids and the executable's assignment."
        )
    where = {d: i for i, d in enumerate(ids)}
    return [where[d] for d in assignment]


def _varying_axes(c: HloCollective, mesh: MeshShape, positions: list[int]) -> tuple[str, ...]:
    varying: set[int] = set()
    for group in c.groups:
        bad = [p for p in group if not 0 <= p < len(positions)]
        if bad:
            raise HloParseError(
                f"HLO instruction {c.name!r}: group {group} names partition {bad[0]}, but mesh {mesh} has "
                f"{mesh.size} devices. Pass the mesh the module was compiled for.",
                instruction=c.name,
            )
        coords = [np.unravel_index(positions[p], mesh.shape) for p in group]
        varying |= {i for i in range(len(mesh.shape)) if len({int(x[i]) for x in coords}) > 1}
    return tuple(mesh.axes[i] for i in sorted(varying))

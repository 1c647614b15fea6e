"""Collectives of a compiled XLA HLO module, attributed to mesh axes and canonicalised for comparison."""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import warnings
from collections.abc import Sequence

import numpy as np

from ir.comm import Collective, CollectiveKind
from ir.sharding import MeshShape

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

_COMMENT_RE = re.compile(r"/\*.*?\*/")
_HEADER_RE = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s*\(.*\{\s*$")
_INSTR_RE = re.compile(r"^\s*(ROOT\s+)?%?([^\s=]+)\s*=\s*(.+)$")
_OPCODE_RE = re.compile(r"\s*([a-z][\w\-]*)\(")
_NAME_RE = re.compile(r"%([^\s,(){}]+)")
_ARRAY_RE = re.compile(r"\b([a-z][a-z0-9]*)\[([^\]]*)\]")
_BITS_RE = re.compile(r"[a-z]+?(\d+)")
_NUM_PARTITIONS_RE = re.compile(r"\bnum_partitions=(\d+)")
_CALLEE_RE = re.compile(
    r"\b(calls|to_apply|body|condition|true_computation|false_computation|branch_computations"
    r"|called_computations)=(\{[^}]*\}|%?[\w.\-]+)"
)
_CALLEE_NAME_RE = re.compile(r"%?([\w.\-]+)")
_EXPLICIT_GROUP_RE = re.compile(r"\{([^{}]*)\}")
_IOTA_GROUPS_RE = re.compile(r"\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_MESH_GROUPS_RE = re.compile(r"mesh\[([^\]]*)\](?:,\s*device_ids=\(((?:[^()]|\([^()]*\))*)\))?\s*\{([^}]*)\}")
_MESH_AXIS_RE = re.compile(r"'?([\w.\-]+)'?=(\d+)")
_AXIS_REF_RE = re.compile(r"'?([\w.\-]+)'?(?::\((\d+)\)(\d+))?")
_DEVICE_IOTA_RE = re.compile(r"^\[([\d,]+)\](?:<=\[([\d,]+)\])?(?:T\(([\d,]+)\))?$")
_PAIRS_RE = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")
_PAIR_RE = re.compile(r"\{(\d+),(\d+)\}")
_DIMENSIONS_RE = re.compile(r"\bdimensions=\{")
_KNOWN_TRIP_RE = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_INIT_STEP_RE = re.compile(r'"known_init_step":\{"init":"(-?\d+)","step":"(-?\d+)"\}')
_DIRECTION_RE = re.compile(r"\bdirection=([A-Z]+)")
_INDEX_RE = re.compile(r"\bindex=(\d+)")
_INT_RE = re.compile(r"^\s*(-?\d+)\s*$")
_SLICE_SIZES_RE = re.compile(r"\bdynamic_slice_sizes=\{([^}]*)\}")


class HloParseError(ValueError):
    """HLO text this module cannot read, or that does not fit the mesh it is attributed to.

    Attributes:
      instruction: the offending HLO instruction name ('' when not about one instruction).
    """

    def __init__(self, message: str, *, instruction: str = ""):
        super().__init__(message)
        self.instruction = instruction


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


@dataclasses.dataclass(slots=True)
class _Instr:
    name: str
    shape: str
    opcode: str
    args: str  # the text between the opcode's parentheses
    operands: tuple[str, ...]
    attrs: str
    root: bool


@dataclasses.dataclass(slots=True)
class _Computation:
    name: str
    instrs: list[_Instr] = dataclasses.field(default_factory=list)
    by_name: dict[str, _Instr] = dataclasses.field(default_factory=dict)
    users: dict[str, list[_Instr]] = dataclasses.field(default_factory=dict)
    root: _Instr | None = None


@dataclasses.dataclass(slots=True)
class _Module:
    computations: dict[str, _Computation]
    num_partitions: int | None
    entry: str | None


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
    module = _parse_module(hlo_text)
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
    module = _parse_module(hlo_text)
    return _find(module, canonical=canonical, num_partitions=num_partitions or module.num_partitions)


# --- Reading the text ---
def _parse_module(text: str) -> _Module:
    header = _NUM_PARTITIONS_RE.search(text.split("\n", 1)[0])
    computations: dict[str, _Computation] = {}
    current: _Computation | None = None
    entry = None
    for raw in text.splitlines():
        line = _COMMENT_RE.sub("", raw).rstrip()
        if current is None:
            m = _HEADER_RE.match(line)
            if m and not line.startswith("HloModule") and " = " not in line:
                current = _Computation(m[2])
                computations[current.name] = current
                entry = m[2] if m[1] else entry
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR_RE.match(line)
        if m:
            instr = _parse_instr(m[2], m[3], root=bool(m[1]))
            current.instrs.append(instr)
            current.by_name[instr.name] = instr
            if instr.root:
                current.root = instr
            for operand in instr.operands:
                current.users.setdefault(operand, []).append(instr)
    return _Module(computations, int(header[1]) if header else None, entry)


def _parse_instr(name: str, rhs: str, *, root: bool) -> _Instr:
    if rhs.startswith("("):
        end = _closing(rhs, 0)
        shape, rest = rhs[: end + 1], rhs[end + 1 :]
    else:
        shape, _, rest = rhs.partition(" ")
    m = _OPCODE_RE.match(rest)
    if not m:
        raise HloParseError(
            f"HLO instruction {name!r}: cannot find its opcode in {rhs[:120]!r}.", instruction=name
        )
    close = _closing(rest, m.end() - 1)
    args = rest[m.end() : close]
    return _Instr(name, shape, m[1], args, tuple(_NAME_RE.findall(args)), rest[close + 1 :], root)


def _closing(text: str, start: int) -> int:
    """Index of the bracket closing the one at `start` (any of (), {}, [] nest inside)."""
    depth = 0
    for i in range(start, len(text)):
        ch = text[i]
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
            if depth == 0:
                return i
    raise HloParseError(f"unbalanced brackets in HLO text {text[start : start + 120]!r}.")


def _arrays(shape: str) -> list[tuple[int, int]]:
    """(elements, bits per element) of each array in an HLO shape string, tuples flattened."""
    out = []
    for dtype, dims in _ARRAY_RE.findall(shape):
        if dtype == "token":
            continue
        bits = 8 if dtype == "pred" else int(_BITS_RE.match(dtype)[1])
        elements = math.prod(int(d.lstrip("<=")) for d in dims.split(",") if d.strip())
        out.append((elements, bits))
    return out


def _nbytes(array: tuple[int, int]) -> int:
    return math.ceil(array[0] * array[1] / 8)


def _callees(instr: _Instr) -> list[tuple[str, str]]:
    """(role, computation name) of every computation the instruction calls."""
    return [(role, n) for role, ref in _CALLEE_RE.findall(instr.attrs) for n in _CALLEE_NAME_RE.findall(ref)]


# --- Replica groups ---
def _replica_groups(instr: _Instr, num_partitions: int | None) -> tuple[tuple[int, ...], ...]:
    """Partition ids per group from any of the three printed syntaxes (or permute pairs)."""
    pairs = _PAIRS_RE.search(instr.attrs)
    if pairs:
        return tuple((int(s), int(t)) for s, t in _PAIR_RE.findall(pairs[1]))
    pos = instr.attrs.find("replica_groups=")
    text = instr.attrs[pos + len("replica_groups=") :] if pos >= 0 else "{}"
    if text.startswith("{"):
        body = text[1 : _closing(text, 0)]
        groups = tuple(
            tuple(int(v) for v in g.split(",") if v.strip()) for g in _EXPLICIT_GROUP_RE.findall(body)
        )
        if groups:
            return groups
        if num_partitions is None:
            raise HloParseError(
                f"HLO instruction {instr.name!r} has replica_groups={{}} (all devices) and the module "
                "header gives no num_partitions; pass num_partitions.",
                instruction=instr.name,
            )
        return (tuple(range(num_partitions)),)
    if m := _IOTA_GROUPS_RE.match(text):
        return _iota_groups(m)
    if m := _MESH_GROUPS_RE.match(text):
        return _mesh_groups(instr.name, m)
    raise HloParseError(
        f"HLO instruction {instr.name!r}: unknown replica group syntax {text[:80]!r}; this module reads "
        "{{0,1},{2,3}}, [2,2]<=[4]T(...) and mesh[...] {...}.",
        instruction=instr.name,
    )


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _iota_groups(m: re.Match[str]) -> tuple[tuple[int, ...], ...]:
    """`[G,S]<=[dims]T(perm)`: iota(prod dims) reshaped to dims, transposed by perm, cut into G rows."""
    dims = _ints(m[3])
    ids = np.arange(math.prod(dims)).reshape(dims).transpose(_ints(m[4]) if m[4] else range(len(dims)))
    return tuple(tuple(int(v) for v in row) for row in ids.reshape(int(m[1]), int(m[2])))


def _mesh_groups(name: str, m: re.Match[str]) -> tuple[tuple[int, ...], ...]:
    """`mesh['a'=2,'b'=4], device_ids=(...) {'b'}`: XLA's own mesh over the partition ids.

    Each mesh axis is cut into the pieces its sub-axis references `'a':(pre)size` delimit (pre is the
    product of the sizes on the major side), the grouped pieces are moved to the minor end in the
    order referenced, and consecutive runs of group size ids form the groups.
    """
    axes_text, devices_text, refs_text = m.groups()
    axes = [(a, int(n)) for a, n in _MESH_AXIS_RE.findall(axes_text)]
    sizes = [n for _, n in axes]
    index = {a: i for i, (a, _) in enumerate(axes)}
    devices = _mesh_devices(name, devices_text, math.prod(sizes))
    refs = []
    for ref in (r.strip() for r in refs_text.split(",")):
        if not ref:
            continue
        r = _AXIS_REF_RE.fullmatch(ref)
        if not r or r[1] not in index:
            raise HloParseError(
                f"HLO instruction {name!r}: {ref!r} is not an axis of mesh[{axes_text}].", instruction=name
            )
        i = index[r[1]]
        lo, hi = (int(r[2]), int(r[2]) * int(r[3])) if r[2] else (1, sizes[i])
        refs.append((i, lo, hi))
    cuts = [{1, n} for n in sizes]
    for i, lo, hi in refs:
        cuts[i] |= {lo, hi}
    pieces, piece_of = [], {}
    for i, cut in enumerate(cuts):
        for lo, hi in itertools.pairwise(sorted(cut)):
            piece_of[i, lo] = len(pieces)
            pieces.append(hi // lo)
    grouped = [piece_of[i, b] for i, lo, hi in refs for b in sorted(cuts[i]) if lo <= b < hi]
    rest = [p for p in range(len(pieces)) if p not in grouped]
    group_size = math.prod(pieces[p] for p in grouped)
    ids = np.asarray(devices).reshape(pieces).transpose(rest + grouped).reshape(-1, group_size)
    return tuple(tuple(int(v) for v in row) for row in ids)


def _mesh_devices(name: str, text: str | None, n: int) -> list[int]:
    if not text:
        return list(range(n))
    text = text.strip()
    if m := _DEVICE_IOTA_RE.match(text):
        shape = _ints(m[2] or m[1])
        ids = np.arange(math.prod(shape)).reshape(shape)
        if m[3]:
            ids = ids.transpose(_ints(m[3]))
        devices = [int(v) for v in ids.flat]
    else:
        devices = _ints(re.sub(r"^\[[\d,]*\]", "", text))
    if len(devices) != n:
        raise HloParseError(
            f"HLO instruction {name!r}: device_ids=({text}) does not list {n} devices.", instruction=name
        )
    return devices


# --- Finding collectives, counting them and canonicalising ---
def _find(module: _Module, *, canonical: bool, num_partitions: int | None) -> tuple[HloCollective, ...]:
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
            groups = _replica_groups(start, num_partitions)
            sizes = {len(g) for g in groups}
            group_size = sizes.pop() if len(sizes) == 1 else 0
            results = _arrays(instr.shape)
            inputs = [_arrays(comp.by_name[o].shape) for o in start.operands if o in comp.by_name]
            inputs = [a[0] for a in inputs if len(a) == 1]
            # A tuple all-to-all sends operand i to peer i: its elements are one exchange.
            tuple_a2a = kind is CollectiveKind.ALL_TO_ALL and not _DIMENSIONS_RE.search(start.attrs)
            if tuple_a2a and len(results) > 1:
                elements = [sum(_nbytes(a) for a in results)]
            elif len(inputs) == len(results):
                elements = [max(_nbytes(r), _nbytes(i)) for r, i in zip(results, inputs, strict=True)]
            else:
                scale = max(group_size, 1) if kind is CollectiveKind.REDUCE_SCATTER else 1
                elements = [_nbytes(r) * scale for r in results]
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


def _collective_at(instr: _Instr, comp: _Computation) -> tuple[CollectiveKind, _Instr] | None:
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


def _counts(module: _Module) -> dict[str, tuple[int, bool]]:
    """Per computation: runs per module execution, and whether every trip count on the way was known."""
    callers: dict[str, list[tuple[str, int, bool]]] = {}
    for comp in module.computations.values():
        for instr in comp.instrs:
            if instr.opcode in _NOT_CALLS or _collective_at(instr, comp):
                continue
            for role, callee in _callees(instr):
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


def _trip_count(module: _Module, loop: _Instr) -> int | None:
    """XLA's known_trip_count, else (bound - init) / step from a constant bound in the condition."""
    if m := _KNOWN_TRIP_RE.search(loop.attrs):
        return int(m[1])
    init_step = _INIT_STEP_RE.search(loop.attrs)
    condition = dict(_callees(loop)).get("condition")
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


def _loop_bound(module: _Module, name: str) -> tuple[str, int] | None:
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


def _called(module: _Module, instr: _Instr) -> _Computation | None:
    return module.computations.get(dict(_callees(instr)).get("calls", ""))


def _params(comp: _Computation) -> dict[int, str]:
    return {int(i.args): i.name for i in comp.instrs if i.opcode == "parameter" and _INT_RE.match(i.args)}


def _constant(comp: _Computation, name: str) -> int | None:
    instr = comp.by_name.get(name)
    if instr is None or instr.opcode != "constant":
        return None
    m = _INT_RE.match(instr.args)
    return int(m[1]) if m else None


def _only_shards_taken(
    module: _Module, comp: _Computation, instr: _Instr, element: int | None, n: int
) -> bool:
    """Whether every use of the all-reduce (or its tuple element) keeps one and the same 1/n slice.

    Slices of different shapes (readers that take this device's piece along different dims, as
    when one reader wants the value split over sequence and another over features) are not one
    reduce-scatter's result: the all-reduce stays an all-reduce.
    """
    shapes: set[str] = set()
    if element is None:
        ok = _sliced_only(module, comp, instr.name, _arrays(instr.shape)[0][0], n, shapes)
        return ok and len(shapes) == 1
    users = comp.users.get(instr.name, [])
    if instr.root or not users or any(u.opcode != "get-tuple-element" for u in users):
        return False
    mine = [u for u in users if (m := _INDEX_RE.search(u.attrs)) and int(m[1]) == element]
    elements = _arrays(instr.shape)[element][0]
    ok = bool(mine) and all(_sliced_only(module, comp, u.name, elements, n, shapes) for u in mine)
    return ok and len(shapes) == 1


def _sliced_only(
    module: _Module, comp: _Computation, name: str, elements: int, n: int, shapes: set[str]
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
            kept = _arrays(user.shape)
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
    module: _Module, fusion: _Instr, name: str, elements: int, n: int, shapes: set[str]
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

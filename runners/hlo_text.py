"""Compiled XLA HLO text read into computations of instructions; array sizes, callees and replica groups.

Each instruction keeps its name, result shape, opcode, the text between the opcode's parentheses, the
operands named there and the attribute text after them; each computation indexes its instructions by
name and by user. Replica groups, in any of the three printed syntaxes, and collective-permute pairs
become partition ids. Which instructions are collectives, and what they mean on a mesh, is `runners.hlo`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re

import numpy as np

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


class HloParseError(ValueError):
    """HLO text that cannot be read, or that does not fit the mesh it is attributed to.

    Attributes:
      instruction: the offending HLO instruction name ('' when not about one instruction).
    """

    def __init__(self, message: str, *, instruction: str = ""):
        super().__init__(message)
        self.instruction = instruction


@dataclasses.dataclass(slots=True)
class Instr:
    name: str
    shape: str
    opcode: str
    args: str  # the text between the opcode's parentheses
    operands: tuple[str, ...]
    attrs: str
    root: bool


@dataclasses.dataclass(slots=True)
class Computation:
    name: str
    instrs: list[Instr] = dataclasses.field(default_factory=list)
    by_name: dict[str, Instr] = dataclasses.field(default_factory=dict)
    users: dict[str, list[Instr]] = dataclasses.field(default_factory=dict)
    root: Instr | None = None


@dataclasses.dataclass(slots=True)
class Module:
    computations: dict[str, Computation]
    num_partitions: int | None
    entry: str | None


# --- Reading the text ---
def parse_module(text: str) -> Module:
    header = _NUM_PARTITIONS_RE.search(text.split("\n", 1)[0])
    computations: dict[str, Computation] = {}
    current: Computation | None = None
    entry = None
    for raw in text.splitlines():
        line = _COMMENT_RE.sub("", raw).rstrip()
        if current is None:
            m = _HEADER_RE.match(line)
            if m and not line.startswith("HloModule") and " = " not in line:
                current = Computation(m[2])
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
    return Module(computations, int(header[1]) if header else None, entry)


def _parse_instr(name: str, rhs: str, *, root: bool) -> Instr:
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
    return Instr(name, shape, m[1], args, tuple(_NAME_RE.findall(args)), rest[close + 1 :], root)


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


def arrays(shape: str) -> list[tuple[int, int]]:
    """(elements, bits per element) of each array in an HLO shape string, tuples flattened."""
    out = []
    for dtype, dims in _ARRAY_RE.findall(shape):
        if dtype == "token":
            continue
        bits = 8 if dtype == "pred" else int(_BITS_RE.match(dtype)[1])
        elements = math.prod(int(d.lstrip("<=")) for d in dims.split(",") if d.strip())
        out.append((elements, bits))
    return out


def array_nbytes(array: tuple[int, int]) -> int:
    return math.ceil(array[0] * array[1] / 8)


def callees(instr: Instr) -> list[tuple[str, str]]:
    """(role, computation name) of every computation the instruction calls."""
    return [(role, n) for role, ref in _CALLEE_RE.findall(instr.attrs) for n in _CALLEE_NAME_RE.findall(ref)]


# --- Replica groups ---
def replica_groups(instr: Instr, num_partitions: int | None) -> tuple[tuple[int, ...], ...]:
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

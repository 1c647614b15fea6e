"""Collectives as values: what the SPMD program must communicate, predicted or found in HLO."""

from __future__ import annotations

import dataclasses
import enum
import threading
import weakref
from collections.abc import Iterable


class CollectiveKind(enum.Enum):
    ALL_REDUCE = "all-reduce"
    REDUCE_SCATTER = "reduce-scatter"
    ALL_GATHER = "all-gather"
    ALL_TO_ALL = "all-to-all"
    COLLECTIVE_PERMUTE = "collective-permute"

    # Members are singletons compared by identity: hashed by identity too (Enum hashes the
    # name in Python on every dict lookup, and these key hot tables).
    __hash__ = object.__hash__


@dataclasses.dataclass(frozen=True, slots=True, eq=False, weakref_slot=True, init=False)  # made by __new__
class Collective:
    """One collective of the per-device program.

    Collectives are interned, as `ir.sharding.Sharding`s are: equal collectives are one object,
    so they compare and hash by identity (they key the simulator's table of collective costs,
    looked up for every collective of every plan). The table holds them weakly.

    Attributes:
      kind: the collective.
      axes: the mesh axes its groups span, in mesh order.
      bytes: per-device buffer size in bytes, the larger of input and output: the full
        (gathered) buffer for all-gather and reduce-scatter, the buffer for all-reduce,
        all-to-all and collective-permute. Ring costs are written over this size.
      value: the tensor it moves ('' when unknown, e.g. parsed from HLO).
      count: how many times it runs per step (scan trip counts multiply).
    """

    kind: CollectiveKind
    axes: tuple[str, ...]
    bytes: int
    value: str = ""
    count: int = 1

    def __new__(
        cls, kind: CollectiveKind, axes: tuple[str, ...], bytes: int, value: str = "", count: int = 1
    ):
        key = (kind, axes, bytes, value, count)
        ref = _INTERNED.get(key)
        if ref is not None:
            hit = ref()
            if hit is not None:
                return hit
        made = object.__new__(cls)
        # (the slots' own setters: a frozen dataclass's __setattr__ refuses)
        _SET_KIND(made, kind)
        _SET_AXES(made, axes)
        _SET_BYTES(made, bytes)
        _SET_VALUE(made, value)
        _SET_COUNT(made, count)
        new = _Entry(made, _drop)
        new.key = key
        ref = _INTERNED.setdefault(key, new)  # one step: of two threads, one interns its own
        if ref is new:
            return made
        hit = ref()
        if hit is not None:
            return hit
        with _INTERNING:  # the entry's collective died and its entry is not dropped yet
            ref = _INTERNED.get(key)
            hit = ref() if ref is not None else None
            if hit is not None:
                return hit
            _INTERNED[key] = new
        return made

    def __reduce__(self):  # another process interns its own
        return (Collective, (self.kind, self.axes, self.bytes, self.value, self.count))

    def named(self, value: str) -> Collective:
        """This collective moving the tensor `value` (one alike in shape and layout)."""
        return Collective(self.kind, self.axes, self.bytes, value, self.count)

    def repeated(self, times: int) -> Collective:
        """This collective run `times` times as often."""
        return Collective(self.kind, self.axes, self.bytes, self.value, self.count * times)

    @property
    def total_bytes(self) -> int:
        return self.bytes * self.count


class _Entry(weakref.ref):
    """A weak reference to an interned collective that knows its key (to drop it when it dies)."""

    __slots__ = ("key",)


def _drop(entry: _Entry) -> None:
    # Called when a collective dies, possibly by the garbage collector inside `__new__`'s
    # critical section of this very thread (hence a reentrant lock); drops the key unless
    # another collective of that key was interned since.
    with _INTERNING:
        if _INTERNED.get(entry.key) is entry:
            del _INTERNED[entry.key]


# (kind, axes, bytes, value, count) -> a weak reference to the one Collective of that value. A
# dict of weak references rather than a WeakValueDictionary: looked up at C speed (propagation
# names a collective for each value an unrolled model's layers move).
_INTERNED: dict[tuple, _Entry] = {}
_INTERNING = threading.RLock()
_SET_KIND, _SET_AXES, _SET_BYTES, _SET_VALUE, _SET_COUNT = (
    Collective.__dict__[name].__set__ for name in ("kind", "axes", "bytes", "value", "count")
)


def bytes_by_kind_axes(
    collectives: Iterable[Collective],
) -> dict[tuple[CollectiveKind, tuple[str, ...]], int]:
    """Sums per-step bytes per (kind, axes)."""
    out: dict[tuple[CollectiveKind, tuple[str, ...]], int] = {}
    for c in collectives:
        key = (c.kind, c.axes)
        out[key] = out.get(key, 0) + c.total_bytes
    return out

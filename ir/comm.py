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
        hit = _INTERNED.get(key)
        if hit is None:
            made = object.__new__(cls)
            object.__setattr__(made, "kind", kind)
            object.__setattr__(made, "axes", axes)
            object.__setattr__(made, "bytes", bytes)
            object.__setattr__(made, "value", value)
            object.__setattr__(made, "count", count)
            with _INTERNING:  # a weak table's setdefault is not one step: two threads, one object
                hit = _INTERNED.setdefault(key, made)
        return hit

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


_INTERNED: weakref.WeakValueDictionary[tuple, Collective] = weakref.WeakValueDictionary()
_INTERNING = threading.Lock()


def bytes_by_kind_axes(
    collectives: Iterable[Collective],
) -> dict[tuple[CollectiveKind, tuple[str, ...]], int]:
    """Sums per-step bytes per (kind, axes)."""
    out: dict[tuple[CollectiveKind, tuple[str, ...]], int] = {}
    for c in collectives:
        key = (c.kind, c.axes)
        out[key] = out.get(key, 0) + c.total_bytes
    return out

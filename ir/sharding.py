"""Mesh shapes and per-dimension shardings: the vocabulary every other module speaks."""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Iterable, Sequence


class LinkKind(enum.Enum):
    """How the devices along one mesh axis are connected."""

    INTRA_NODE = "intra_node"  # NVLink / ICI
    INTER_NODE = "inter_node"  # InfiniBand / DCN

    # Members are singletons compared by identity: hashed by identity too (Enum hashes the name
    # in Python, and a mesh, which holds these, keys hot tables).
    __hash__ = object.__hash__


class ShardingError(ValueError):
    """A sharding that cannot apply to its tensor or mesh.

    The message is `problem` and, when given, `fix` as a separate sentence, so a caller can add
    where the sharding came from between the two.

    Attributes:
      tensor: the tensor's name ('' when unknown).
      dim: the offending dimension, or None.
      axis: the offending mesh axis, or None.
      problem: what is wrong, without the remedy.
      fix: the remedy ('' when it is part of `problem`).
    """

    def __init__(
        self,
        message: str,
        *,
        tensor: str = "",
        dim: int | None = None,
        axis: str | None = None,
        fix: str = "",
    ):
        super().__init__(f"{message}. {fix}" if fix else message)
        self.tensor = tensor
        self.dim = dim
        self.axis = axis
        self.problem = message
        self.fix = fix


@dataclasses.dataclass(frozen=True, slots=True)
class MeshShape:
    """Named mesh axes and their sizes, major to minor, with the link kind of each axis.

    The device order is row-major over `shape`, as in `jax.make_mesh`.
    """

    axes: tuple[str, ...]
    shape: tuple[int, ...]
    links: tuple[LinkKind, ...] = ()
    # axis name -> size, for the hot lookups of axes_size (not part of the value).
    _sizes: dict[str, int] = dataclasses.field(init=False, repr=False, compare=False)
    _hash: int = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if not self.links:
            object.__setattr__(self, "links", (LinkKind.INTRA_NODE,) * len(self.axes))
        if len(self.axes) != len(self.shape) or len(self.links) != len(self.axes):
            raise ShardingError(
                f"mesh has {len(self.axes)} axis names but {len(self.shape)} sizes; "
                "give one size per axis, e.g. data=2,model=4."
            )
        if len(set(self.axes)) != len(self.axes):
            raise ShardingError(f"mesh axis names {self.axes} repeat; name each axis once.")
        for name, size in zip(self.axes, self.shape, strict=True):
            if not name.isidentifier():
                raise ShardingError(f"mesh axis name {name!r} is not an identifier; use e.g. 'data'.")
            if size < 1:
                raise ShardingError(f"mesh axis {name!r} has size {size}; sizes must be >= 1.")
        object.__setattr__(self, "_sizes", dict(zip(self.axes, self.shape, strict=True)))
        object.__setattr__(self, "_hash", hash((self.axes, self.shape, self.links)))

    def __hash__(self) -> int:  # worked out once: a mesh keys hot tables
        return self._hash

    def __reduce__(self):  # made afresh in another process (its hash is that process's)
        return (MeshShape, (self.axes, self.shape, self.links))

    @classmethod
    def parse(cls, text: str) -> MeshShape:
        """Parses 'data=2,model=4' (an optional ':inter' suffix marks an inter-node axis)."""
        axes, shape, links = [], [], []
        for part in text.split(","):
            part = part.strip()
            name, eq, size = part.partition("=")
            size, _, link = size.partition(":")
            if not eq or not size.strip().isdigit():
                raise ShardingError(
                    f"mesh {text!r}: {part!r} is not NAME=SIZE; write e.g. --mesh data=2,model=4."
                )
            axes.append(name.strip())
            shape.append(int(size))
            links.append(LinkKind.INTER_NODE if link.strip() == "inter" else LinkKind.INTRA_NODE)
        return cls(tuple(axes), tuple(shape), tuple(links))

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def axis_size(self, axis: str) -> int:
        size = self._sizes.get(axis)
        if size is None:
            raise ShardingError(f"unknown mesh axis {axis!r}; this mesh has axes {self.axes}.", axis=axis)
        return size

    def axes_size(self, axes: Iterable[str]) -> int:
        n = 1
        sizes = self._sizes
        for a in axes:
            size = sizes.get(a)
            if size is None:
                return n * self.axis_size(a)  # raises
            n *= size
        return n

    def __str__(self) -> str:
        return ",".join(f"{a}={s}" for a, s in zip(self.axes, self.shape, strict=True))


DimSharding = tuple[str, ...]  # mesh axes of one tensor dim, major to minor; () = not sharded


def describe_axes(axes: Sequence[str], mesh: MeshShape) -> str:
    """Mesh axes with their sizes, for messages.

    ("model",) → "mesh axis 'model' (size 4)"; ("data", "model") → "mesh axes 'data' × 'model'
    (size 2 × 4 = 8)".
    """
    if len(axes) == 1:
        return f"mesh axis {axes[0]!r} (size {mesh.axis_size(axes[0])})"
    sizes = " × ".join(str(mesh.axis_size(a)) for a in axes)
    return f"mesh axes {' × '.join(repr(a) for a in axes)} (size {sizes} = {mesh.axes_size(axes)})"


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class Sharding:
    """Per tensor dim, the mesh axes it is split over; plus axes of a pending partial sum.

    Like `jax.sharding.PartitionSpec`, with one tuple per dim (empty = replicated).
    `partial` holds mesh axes over which each device has a partial sum of the value.

    Shardings are interned: equal shardings are one object, so they compare and hash by
    identity (they key every propagation and simulator cache, and a tuple of them hashes at the
    speed of a tuple of ints).
    """

    dims: tuple[DimSharding, ...]
    partial: frozenset[str] = frozenset()

    def __new__(cls, dims: tuple[DimSharding, ...], partial: frozenset[str] = frozenset()):
        key = (dims, partial)
        hit = _INTERNED.get(key)
        if hit is None:
            made = object.__new__(cls)
            object.__setattr__(made, "dims", dims)
            object.__setattr__(made, "partial", partial)
            # setdefault is one step under the GIL: two threads making the same sharding at
            # once still share one object.
            hit = _INTERNED.setdefault(key, made)
        return hit

    def __init__(self, dims: tuple[DimSharding, ...], partial: frozenset[str] = frozenset()):
        pass  # made once, by __new__

    def __reduce__(self):  # another process (a Ray worker, an Optuna journal) interns its own
        return (Sharding, (self.dims, self.partial))

    @classmethod
    def replicated(cls, rank: int) -> Sharding:
        hit = _REPLICATED.get(rank)
        if hit is None:
            hit = _REPLICATED[rank] = cls(((),) * rank)
        return hit

    @classmethod
    def from_spec(cls, spec: Sequence[str | Sequence[str] | None], rank: int | None = None) -> Sharding:
        """Builds from PartitionSpec-like entries: None, 'axis' or ('a', 'b') per dim."""
        dims = []
        for entry in spec:
            if entry is None:
                dims.append(())
            elif isinstance(entry, str):
                dims.append((entry,))
            else:
                dims.append(tuple(entry))
        if rank is not None:
            dims.extend([()] * (rank - len(dims)))
        return cls(tuple(dims))

    @property
    def rank(self) -> int:
        return len(self.dims)

    @property
    def used_axes(self) -> tuple[str, ...]:
        return tuple(a for d in self.dims for a in d)

    def is_replicated(self) -> bool:
        return not self.used_axes and not self.partial

    def shard_shape(self, shape: Sequence[int], mesh: MeshShape) -> tuple[int, ...]:
        return tuple(n // mesh.axes_size(d) for n, d in zip(shape, self.dims, strict=True))

    def shard_fraction(self, mesh: MeshShape) -> int:
        """How many pieces the tensor is split into (product of used axis sizes)."""
        return mesh.axes_size(self.used_axes)

    def to_spec(self) -> tuple[str | tuple[str, ...] | None, ...]:
        """PartitionSpec entries, trailing replicated dims dropped."""
        out = [None if not d else (d[0] if len(d) == 1 else d) for d in self.dims]
        while out and out[-1] is None:
            out.pop()
        return tuple(out)

    def check(self, shape: Sequence[int], mesh: MeshShape, tensor: str = "") -> None:
        """Raises ShardingError naming the tensor, dim and axis when this sharding cannot apply."""
        where = f"{tensor}: " if tensor else ""
        if len(shape) != len(self.dims):
            raise ShardingError(
                f"{where}sharding has {len(self.dims)} dims but the tensor has rank {len(shape)} "
                f"(shape {tuple(shape)}); give one entry per dim.",
                tensor=tensor,
            )
        seen: set[str] = set()
        for dim, (size, axes) in enumerate(zip(shape, self.dims, strict=True)):
            for axis in axes:
                if axis not in mesh.axes:
                    raise ShardingError(
                        f"{where}dim {dim} names unknown mesh axis {axis!r}; the mesh has axes {mesh.axes}.",
                        tensor=tensor,
                        dim=dim,
                        axis=axis,
                    )
                if axis in seen:
                    raise ShardingError(
                        f"{where}mesh axis {axis!r} is used twice on one tensor; shard each mesh "
                        "axis over at most one dim.",
                        tensor=tensor,
                        dim=dim,
                        axis=axis,
                    )
                seen.add(axis)
            n = mesh.axes_size(axes)
            if size % n:
                raise ShardingError(
                    f"{where}dim {dim} (size {size}) is sharded over {describe_axes(axes, mesh)}, "
                    f"and {n} does not divide {size}",
                    tensor=tensor,
                    dim=dim,
                    axis=axes[-1] if axes else None,
                    fix="Use a mesh axis size that divides it, or leave this dim unsharded.",
                )
        for axis in self.partial:
            if axis not in mesh.axes:
                raise ShardingError(f"{where}partial axis {axis!r} is not a mesh axis.", tensor=tensor)
            if axis in seen:
                raise ShardingError(
                    f"{where}mesh axis {axis!r} both shards a dim and holds a partial sum.",
                    tensor=tensor,
                    axis=axis,
                )

    def __str__(self) -> str:
        body = ", ".join("{" + ",".join(d) + "}" if d else "{}" for d in self.dims)
        tail = f" partial={{{','.join(sorted(self.partial))}}}" if self.partial else ""
        return f"[{body}]{tail}"


_REPLICATED: dict[int, Sharding] = {}  # Sharding.replicated(rank), made once per rank
_INTERNED: dict[tuple, Sharding] = {}  # (dims, partial) -> the one Sharding of that value

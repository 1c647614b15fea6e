"""Resharding as XLA's SPMD partitioner carries it out: the collectives that turn one sharding of
a value into another (docs/xla-partitioner.md)."""

from __future__ import annotations

import functools

from ir.comm import Collective, CollectiveKind
from ir.graph import Value
from ir.sharding import MeshShape, Sharding


def reshard(
    v: Value,
    have: Sharding,
    want: Sharding,
    mesh: MeshShape,
    sum_groups: tuple[tuple[str, ...], ...] | None = None,
) -> tuple[list[Collective], Sharding]:
    """The collectives that turn `have` into `want` (which has no pending sum).

    Each step follows what XLA's SPMD partitioner emits (docs/xla-partitioner.md). Pending sums
    go first: when `want` appends partial axes to exactly one dim, a reduce-scatter into that
    dim, then one all-reduce of the other partial axes on the scattered shard; otherwise one
    all-reduce per group of `sum_groups` (default: all partial axes in one group), after which
    the axes `want` adds are local slices. Then axes that leave one dim for another move by
    all-to-all (after the receiving dims took their free local slices). Last, minor dim first,
    each dim drops the axes `want` does not keep as a prefix: by an all-gather, or, when it
    trades them for axes the tensor leaves free, by a collective-permute (plus a partial
    all-gather when the new tiling is coarser). Axes `want` only adds are local slices, free.

    Args:
      sum_groups: the partial axes grouped by the sharded reduction dim that made them.

    Returns:
      The collectives, and the sharding once pending sums are resolved.
    """
    colls: list[Collective] = []
    dims = list(have.dims)
    itemsize = v.itemsize

    def local_bytes() -> int:
        n = itemsize
        for size, axes in zip(v.shape, dims, strict=True):
            n *= size // mesh.axes_size(axes)
        return n

    def order(axes) -> tuple[str, ...]:
        return tuple(a for a in mesh.axes if a in axes)

    if have.partial:
        scattered: set[str] = set()
        scatter_dims = []
        for d, (h, w) in enumerate(zip(have.dims, want.dims, strict=True)):
            if w[: len(h)] != h:
                continue
            extra = []
            for a in w[len(h) :]:
                if a not in have.partial or a in scattered:
                    break
                extra.append(a)
            if extra:
                scatter_dims.append((d, tuple(extra)))
                scattered.update(extra)
        if len(scatter_dims) == 1:
            # XLA scatters into one output dim at most; the rest of the sum is then reduced
            # on the scattered shard, by one all-reduce whichever reduction dims it came from.
            ((d, extra),) = scatter_dims
            colls.append(Collective(CollectiveKind.REDUCE_SCATTER, order(extra), local_bytes(), v.name))
            dims[d] = dims[d] + extra
            rest = order(have.partial - set(extra))
            if rest:
                colls.append(Collective(CollectiveKind.ALL_REDUCE, rest, local_bytes(), v.name))
        else:
            for group in sum_groups or (tuple(have.partial),):
                axes = order(set(group) & have.partial)
                if axes:
                    colls.append(Collective(CollectiveKind.ALL_REDUCE, axes, local_bytes(), v.name))
    resolved = Sharding(tuple(dims))

    wanted_dim = {a: d for d, axes in enumerate(want.dims) for a in axes}
    # Before an all-to-all, XLA first takes the local slices the target adds over axes the tensor
    # leaves free, so the all-to-all moves the smaller shard.
    receiving = {
        wanted_dim[a]
        for d in range(len(dims))
        for a in dims[d][len(_common_prefix(dims[d], want.dims[d])) :]
        if wanted_dim.get(a, d) != d
    }
    for d in sorted(receiving):
        used = {a for axes in dims for a in axes}
        dims[d] = dims[d] + tuple(a for a in want.dims[d] if a not in used)
    # All-to-alls: axes that leave one dim for another. The axes that go from one dim to the
    # same other dim move in one all-to-all over all of them, as XLA's partitioner does.
    for d in range(len(dims)):
        keep = _common_prefix(dims[d], want.dims[d])
        moves: dict[int, list[str]] = {}
        for a in dims[d][len(keep) :]:
            d2 = wanted_dim.get(a)
            if d2 is not None and d2 != d and a not in dims[d2]:
                moves.setdefault(d2, []).append(a)
        for d2, axes in moves.items():
            colls.append(Collective(CollectiveKind.ALL_TO_ALL, order(axes), local_bytes(), v.name))
            dims[d] = tuple(x for x in dims[d] if x not in axes)
            dims[d2] = dims[d2] + tuple(axes)
    # All-gathers: axes a dim must drop, one all-gather per dim, minor-most dim first. This is
    # the order of XLA's partitioner (it walks the dims to replicate in reverse), and it decides
    # the bytes: [V@model, D@data] -> replicated gathers [V/4, D] over data, then [V, D] over model.
    # A dim that trades axes for others the tensor leaves free ([V@data] -> [V@model]) is instead
    # re-tiled by a collective-permute, as XLA does (see _retile).
    for d in reversed(range(len(dims))):
        keep = _common_prefix(dims[d], want.dims[d])
        drop = dims[d][len(keep) :]
        add = want.dims[d][len(keep) :]
        others = {a for d2, axes in enumerate(dims) if d2 != d for a in axes}
        n_drop, n_add = mesh.axes_size(drop), mesh.axes_size(add)
        if drop and add and not others & set(add) and (n_add % n_drop == 0 or n_drop % n_add == 0):
            permute_axes, gather_axes = _retile(mesh, tuple(dims), d, want.dims[d])
            if not gather_axes:  # as fine or finer: the target shard is sliced out, then moved
                dims[d] = want.dims[d]
            if permute_axes:
                colls.append(
                    Collective(CollectiveKind.COLLECTIVE_PERMUTE, permute_axes, local_bytes(), v.name)
                )
            if gather_axes:  # coarser: the source shard moved, then a partial all-gather
                dims[d] = want.dims[d]
                colls.append(Collective(CollectiveKind.ALL_GATHER, gather_axes, local_bytes(), v.name))
        elif drop:
            dims[d] = keep
            colls.append(Collective(CollectiveKind.ALL_GATHER, order(drop), local_bytes(), v.name))
    return colls, resolved


@functools.lru_cache(maxsize=1 << 16)
def _retile(
    mesh: MeshShape, dims: tuple[tuple[str, ...], ...], d: int, new: tuple[str, ...]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """How XLA's partitioner moves dim `d` of a tensor sharded `dims` onto the axes `new`.

    XLA lays a sharding out as a tile assignment [tiles per dim..., replicas], the replica index
    running over the mesh axes the tensor leaves unused, in mesh order. Between two assignments
    of the same shape it sends each device's shard to the device at the same index (one
    collective-permute). When the dims tile differently by a factor q, the finer side is first
    matched by splitting the coarser side's tiles q ways, taking the major part of its replica
    index as the sub-tile: a finer target then slices locally and permutes; a coarser target
    receives the q sub-tiles and all-gathers them over the axes of that major part.

    It walks every device of the mesh, and depends on the layouts alone (not on the tensor's
    shape): memoised.

    Returns:
      The mesh axes the permute's pairs span (empty when every device keeps its data), and the
      all-gather's axes (empty unless the target is coarser).
    """
    size = dict(zip(mesh.axes, mesh.shape, strict=True))
    target = (*dims[:d], new, *dims[d + 1 :])

    def replicas(s):
        used = {a for axes in s for a in axes}
        return tuple(a for a in mesh.axes if a not in used and size[a] > 1)

    def index(coord, axes) -> int:
        i = 0
        for a in axes:
            i = i * size[a] + coord[a]
        return i

    r_src, r_dst = replicas(dims), replicas(target)
    n_have, n_new = mesh.axes_size(dims[d]), mesh.axes_size(new)
    q = max(n_have, n_new) // min(n_have, n_new)

    def key(coord, s, reps, split):
        tiles = [index(coord, axes) for axes in s]
        r, n_r = index(coord, reps), mesh.axes_size(reps)
        if split:  # the major part of the replica index becomes a sub-tile of dim d
            tiles[d] = tiles[d] * q + r // (n_r // q)
            r %= n_r // q
        return (*tiles, r)

    coords = [dict(zip(mesh.axes, c, strict=True)) for c in _product(mesh.shape)]
    by_key = {key(c, target, r_dst, n_new < n_have): i for i, c in enumerate(coords)}
    moved: set[str] = set()
    for c in coords:
        dst = coords[by_key[key(c, dims, r_src, n_new > n_have)]]
        moved.update(a for a in mesh.axes if c[a] != dst[a])
    gather: list[str] = []
    if n_new < n_have:
        for a in r_dst:
            if mesh.axes_size(gather) >= q:
                break
            gather.append(a)
    return tuple(a for a in mesh.axes if a in moved), tuple(gather)


def _product(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = [()]
    for n in shape:
        out = [(*c, i) for c in out for i in range(n)]
    return out


def _common_prefix(a: tuple[str, ...], b: tuple[str, ...]) -> tuple[str, ...]:
    n = 0
    while n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return a[:n]

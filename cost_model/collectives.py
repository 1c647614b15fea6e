"""Collective times under the alpha-beta model: ring formulas per mesh axis, flat or hierarchical over several."""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Sequence

from cost_model.hardware import LinkSpec
from cost_model.meshes import MeshTopology
from ir.comm import Collective, CollectiveKind

# One mesh axis as a collective sees it: (axis size, the link along it).
AxisLink = tuple[int, LinkSpec]


class Algorithm(enum.Enum):
    """How a collective over several mesh axes is run."""

    RING = "ring"  # one ring over the product of the axes, at the slowest link's speed
    HIERARCHICAL = "hierarchical"  # one ring per axis, fastest link first, on shrinking pieces


@dataclasses.dataclass(frozen=True, slots=True)
class CollectiveEstimate:
    """A collective's predicted time.

    Attributes:
      seconds: time per training step, seconds (one call × the collective's count).
      algorithm: the cheaper of the flat ring and the hierarchical decomposition.
    """

    seconds: float
    algorithm: Algorithm


def _check(size_bytes: float, n: int, bandwidth: float, latency: float, efficiency: float) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"group size n is {n!r}; it must be a whole number >= 1.")
    if not size_bytes >= 0:
        raise ValueError(f"size_bytes is {size_bytes!r}; it must be >= 0.")
    if not bandwidth > 0:
        raise ValueError(f"bandwidth is {bandwidth!r} bytes/s; it must be > 0.")
    if not latency >= 0:
        raise ValueError(f"latency is {latency!r} s; it must be >= 0.")
    if not 0 < efficiency <= 1:
        raise ValueError(f"efficiency is {efficiency!r}; it must be a fraction of peak in (0, 1].")


def _terms(kind: CollectiveKind, n: int) -> tuple[float, int]:
    """(bandwidth factor on S/B, number of α steps) of the ring formula for `kind` over n devices."""
    if kind is CollectiveKind.ALL_REDUCE:
        return 2 * (n - 1) / n, 2 * (n - 1)
    if kind is CollectiveKind.COLLECTIVE_PERMUTE:
        return 1.0, 1
    return (n - 1) / n, n - 1  # all-gather, reduce-scatter, all-to-all


def _alpha_beta(
    kind: CollectiveKind, size_bytes: float, n: int, bandwidth: float, latency: float, efficiency: float
) -> float:
    _check(size_bytes, n, bandwidth, latency, efficiency)
    if n == 1:
        return 0.0
    beta, steps = _terms(kind, n)
    return beta * size_bytes / (bandwidth * efficiency) + steps * latency


def ring_all_reduce_time(
    size_bytes: float, n: int, bandwidth: float, latency: float, efficiency: float = 1.0
) -> float:
    """Seconds for a ring all-reduce: 2(n−1)/n · S/(B·e) + 2(n−1)·α.

    A reduce-scatter then an all-gather: 2(n−1) steps, each moving S/n bytes per device.

    Args:
      size_bytes: S, the buffer each device holds, bytes.
      n: devices in the group; 1 costs 0.
      bandwidth: B, bytes/s per direction per device.
      latency: α, seconds per step.
      efficiency: e, the fraction of B reached at this message size, in (0, 1].
    """
    return _alpha_beta(CollectiveKind.ALL_REDUCE, size_bytes, n, bandwidth, latency, efficiency)


def ring_all_gather_time(
    size_bytes: float, n: int, bandwidth: float, latency: float, efficiency: float = 1.0
) -> float:
    """Seconds for a ring all-gather: (n−1)/n · S/(B·e) + (n−1)·α.

    Args:
      size_bytes: S, the full (gathered) buffer, bytes; each device starts with S/n.
      n: devices in the group; 1 costs 0.
      bandwidth: B, bytes/s per direction per device.
      latency: α, seconds per step.
      efficiency: e, the fraction of B reached at this message size, in (0, 1].
    """
    return _alpha_beta(CollectiveKind.ALL_GATHER, size_bytes, n, bandwidth, latency, efficiency)


def ring_reduce_scatter_time(
    size_bytes: float, n: int, bandwidth: float, latency: float, efficiency: float = 1.0
) -> float:
    """Seconds for a ring reduce-scatter: (n−1)/n · S/(B·e) + (n−1)·α.

    Args:
      size_bytes: S, the full (unscattered) buffer, bytes; each device ends with S/n.
      n: devices in the group; 1 costs 0.
      bandwidth: B, bytes/s per direction per device.
      latency: α, seconds per step.
      efficiency: e, the fraction of B reached at this message size, in (0, 1].
    """
    return _alpha_beta(CollectiveKind.REDUCE_SCATTER, size_bytes, n, bandwidth, latency, efficiency)


def all_to_all_time(
    size_bytes: float, n: int, bandwidth: float, latency: float, efficiency: float = 1.0
) -> float:
    """Seconds for an all-to-all: (n−1)/n · S/(B·e) + (n−1)·α.

    Each device keeps 1/n of its buffer and sends the other (n−1)/n, one piece to each peer.

    Args:
      size_bytes: S, the buffer each device holds (before and after), bytes.
      n: devices in the group; 1 costs 0.
      bandwidth: B, bytes/s per direction per device.
      latency: α, seconds per peer exchange.
      efficiency: e, the fraction of B reached at this message size, in (0, 1].
    """
    return _alpha_beta(CollectiveKind.ALL_TO_ALL, size_bytes, n, bandwidth, latency, efficiency)


def collective_permute_time(
    size_bytes: float, n: int, bandwidth: float, latency: float, efficiency: float = 1.0
) -> float:
    """Seconds for a collective-permute: S/(B·e) + α (each device sends its buffer to one peer).

    Args:
      size_bytes: S, the buffer each device sends, bytes.
      n: devices in the group; 1 costs 0 (nothing moves).
      bandwidth: B, bytes/s per direction per device.
      latency: α, seconds.
      efficiency: e, the fraction of B reached at this message size, in (0, 1].
    """
    return _alpha_beta(CollectiveKind.COLLECTIVE_PERMUTE, size_bytes, n, bandwidth, latency, efficiency)


def ring_time(
    kind: CollectiveKind,
    size_bytes: float,
    n: int,
    bandwidth: float,
    latency: float,
    efficiency: float = 1.0,
) -> float:
    """Seconds for one collective of `kind` over one group (see the per-kind functions for S).

    Args:
      kind: the collective.
      size_bytes: S, bytes, as `ir.comm.Collective.bytes` defines it.
      n: devices in the group.
      bandwidth: bytes/s per direction per device.
      latency: seconds per step.
      efficiency: fraction of `bandwidth` reached, in (0, 1].
    """
    return _alpha_beta(kind, size_bytes, n, bandwidth, latency, efficiency)


def _active(groups: Sequence[AxisLink]) -> list[AxisLink]:
    return [(n, link) for n, link in groups if n > 1]


def flat_ring_time(kind: CollectiveKind, size_bytes: float, groups: Sequence[AxisLink]) -> float:
    """Seconds for one ring over the product of several axes.

    The ring runs at its slowest link: bandwidth is the smallest effective bandwidth (peak ×
    efficiency at S) among the axes, latency the largest α.

    Args:
      kind: the collective.
      size_bytes: S, bytes, as `ir.comm.Collective.bytes` defines it.
      groups: (size, link) per mesh axis the collective spans.
    """
    active = _active(groups)
    if not active:
        return 0.0
    n = math.prod(size for size, _ in active)
    bandwidth = min(link.effective_bandwidth(size_bytes) for _, link in active)
    latency = max(link.latency for _, link in active)
    return ring_time(kind, size_bytes, n, bandwidth, latency)


def hierarchical_time(kind: CollectiveKind, size_bytes: float, groups: Sequence[AxisLink]) -> float:
    """Seconds for a collective run as one ring per axis, fastest link first.

    All-reduce: reduce-scatter over the fastest axis, all-reduce the 1/n piece over the next,
    ..., then all-gather back out. With ring costs RS + AG = AR, so the time is
    Σ_i AR(S_i, n_i) with S_i = S / (n_1 ⋯ n_{i−1}): the slow links carry only the small pieces.
    Reduce-scatter and all-gather: Σ_i RS(S_i, n_i) (the all-gather mirrors it, same cost).
    All-to-all: one all-to-all per axis on the whole buffer, Σ_i A2A(S, n_i).
    Collective-permute has no decomposition and costs as the flat ring.
    Each level uses its own link's efficiency at its own message size S_i.

    Args:
      kind: the collective.
      size_bytes: S, bytes, as `ir.comm.Collective.bytes` defines it.
      groups: (size, link) per mesh axis the collective spans.
    """
    if kind is CollectiveKind.COLLECTIVE_PERMUTE:
        return flat_ring_time(kind, size_bytes, groups)
    levels = sorted(_active(groups), key=lambda g: (-g[1].bandwidth, g[1].latency))
    total, size = 0.0, float(size_bytes)
    for n, link in levels:
        total += ring_time(kind, size, n, link.bandwidth, link.latency, link.efficiency_at(size))
        if kind is not CollectiveKind.ALL_TO_ALL:
            size /= n
    return total


def multi_axis_time(
    kind: CollectiveKind, size_bytes: float, groups: Sequence[AxisLink]
) -> CollectiveEstimate:
    """The cheaper of `flat_ring_time` and `hierarchical_time`, for one call.

    Over a single axis (or axes of size 1) both are the same ring and the answer is RING; a tie
    also answers RING.

    Args:
      kind: the collective.
      size_bytes: S, bytes, as `ir.comm.Collective.bytes` defines it.
      groups: (size, link) per mesh axis the collective spans.
    """
    flat = flat_ring_time(kind, size_bytes, groups)
    if len(_active(groups)) <= 1:
        return CollectiveEstimate(flat, Algorithm.RING)
    hierarchical = hierarchical_time(kind, size_bytes, groups)
    if hierarchical < flat:
        return CollectiveEstimate(hierarchical, Algorithm.HIERARCHICAL)
    return CollectiveEstimate(flat, Algorithm.RING)


def collective_estimate(c: Collective, topo: MeshTopology) -> CollectiveEstimate:
    """Seconds per step for `c` on `topo` (one call × c.count), and the algorithm chosen.

    Raises:
      ShardingError: `c` names an axis the mesh does not have.
    """
    one = multi_axis_time(c.kind, c.bytes, topo.axis_links(c.axes))
    return CollectiveEstimate(one.seconds * c.count, one.algorithm)


def collective_time(c: Collective, topo: MeshTopology) -> float:
    """Seconds per step for `c` on `topo`: alpha-beta ring time × c.count; 0 over one device."""
    return collective_estimate(c, topo).seconds

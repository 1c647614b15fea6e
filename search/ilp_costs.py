"""The ILP's prices: seconds per node strategy, split by Part, of an op's compute and a value's reshards.

They are the simulator's: an op's roofline time on its local shard at the rate the simulator
picks, and the alpha-beta time of the collectives ir.propagate reshards a value with, each in
the Part the simulator's overlap rule puts it in.
"""

from __future__ import annotations

import math

import numpy as np

from cost_model.collectives import collective_time
from cost_model.compute import local_sizes, op_flops, roofline_time
from cost_model.meshes import MeshTopology
from cost_model.simulate import device_rate
from ir.comm import CollectiveKind
from ir.graph import Graph, Op, Role, Value
from ir.reshard import reshard
from ir.sharding import MeshShape, Sharding
from ir.sum_targets import scatters, sum_kind
from search.ilp_factors import Factors, Groups
from search.ilp_nodes import N_PARTS, Interner, Part, Source, check_deadline

_ZERO = np.zeros(N_PARTS)


class Prices:
    """Seconds per strategy and Part of ops and reads of one problem, cached by what decides them.

    Args:
      mesh: the mesh the factors' axes are on.
      topo: the mesh on its hardware (collective times).
      overlap: whether communication may hide behind compute (else every collective is exposed).
      intern: the builder's interned shardings (the caches' keys).
      deadline: a time.perf_counter() value; pricing past it raises OutOfTime (one op's matrix of
        reshards can take a second on a three-axis mesh).
    """

    def __init__(
        self,
        mesh: MeshShape,
        topo: MeshTopology,
        overlap: bool,
        intern: Interner,
        deadline: float | None = None,
    ):
        self.mesh = mesh
        self.topo = topo
        self.device = topo.hardware.device
        self.overlap = overlap
        self.intern = intern
        self.deadline = deadline
        self._reshard_cache: dict[tuple, np.ndarray] = {}
        self._matrix_cache: dict[tuple, np.ndarray] = {}
        self._compute_cache: dict[tuple, tuple] = {}
        self._collective_cache: dict[tuple, float] = {}

    # -- compute ----------------------------------------------------------------------------------

    def compute_all(self, g: Graph, op: Op, strategies: list[Factors], fused) -> np.ndarray:
        """Seconds per strategy and Part of one execution of `op` (cached per kind of op)."""
        key = (
            id(strategies),
            op.primitive,
            op.params.get("y") if op.primitive == "integer_pow" else None,
            tuple((g.values[v].itemsize, v in fused) for v in (*op.inputs, *op.outputs)),
            g.values[op.inputs[0]].dtype if op.inputs else "",
            _compute_part(op),
        )
        hit = self._compute_cache.get(key)
        if hit is None or hit[0] is not strategies:
            hit = self._compute_cache[key] = (
                strategies,
                np.array([self.compute(g, op, f, fused) for f in strategies]),
            )
        return hit[1]

    def compute(self, g: Graph, op: Op, factors: Factors, fused) -> np.ndarray:
        """Seconds of one execution of `op` with `factors` (roofline of its local shard), in its Part."""
        sizes = local_sizes(op, factors, self.mesh)
        flops, _ = op_flops(op, sizes)
        traffic = 0.0
        for vid, dims in (
            *zip(op.inputs, op.rule.operands, strict=True),
            *zip(op.outputs, op.rule.results, strict=True),
        ):
            if vid not in fused:
                traffic += math.prod(sizes[f] for d in dims for f in d) * g.values[vid].itemsize
        out = np.zeros(N_PARTS)
        peak = device_rate(self.device, g, op, op.primitive) if flops else 1.0
        out[_compute_part(op)] = roofline_time(flops, traffic, peak, self.device.memory_bandwidth)
        return out

    # -- resharding -------------------------------------------------------------------------------

    def matrix(
        self,
        g: Graph,
        vid: int,
        have: Source,
        wants: tuple[Sharding, ...],
        *,
        same: bool = False,
        replicated_free: bool = False,
    ) -> np.ndarray:
        """Seconds per (have strategy, want) and Part, [n_have, n_want, P]; the diagonal [n, P] if `same`."""
        v = g.values[vid]
        kind = sum_kind(g, vid) if any(h.partial for h in have.shardings) else ("",)
        have_ids = self.intern.source(have)
        want_ids = self.intern.items(wants)
        key = (
            v.shape,
            v.itemsize,
            _phase_key(v),
            kind,
            have_ids.tobytes(),
            want_ids.tobytes(),
            same,
            replicated_free,
        )
        m = self._matrix_cache.get(key)
        if m is None:
            if same:
                pairs = zip(have.shardings, have.groups, strict=True)
                m = np.array(
                    [
                        self._reshard(v, h, gr, w, replicated_free, kind)
                        for (h, gr), w in zip(pairs, wants, strict=True)
                    ]
                )
            else:
                # Strategies of a node often share a layout: price each distinct (have, want) once.
                _, rows, row_of = np.unique(have_ids, return_index=True, return_inverse=True)
                _, cols, col_of = np.unique(want_ids, return_index=True, return_inverse=True)
                distinct = []
                for r in rows:
                    check_deadline(self.deadline, "pricing reshards for the model")
                    h, gr = have.shardings[r], have.groups[r]
                    distinct.append([self._reshard(v, h, gr, wants[c], replicated_free, kind) for c in cols])
                m = np.array(distinct).reshape(len(rows), len(cols), N_PARTS)[row_of.ravel()][
                    :, col_of.ravel()
                ]
            self._matrix_cache[key] = m
        return m

    def _reshard(
        self, v: Value, have: Sharding, groups: Groups, want: Sharding, replicated_free: bool, kind: tuple
    ) -> np.ndarray:
        """Seconds per Part of resharding `v` from `have` (its pending sums grouped as `groups`, made
        by an op of `kind`: ir.sum_targets.sum_kind) to `want`."""
        if replicated_free and not want.used_axes:
            want = Sharding(have.dims)
        if have == want:
            return _ZERO
        key = (v.shape, v.itemsize, _phase_key(v), have, groups, want, kind)
        hit = self._reshard_cache.get(key)
        if hit is not None:
            return hit
        if have.partial and want.dims != have.dims and not scatters(kind, groups, have, want, self.mesh):
            # A sum XLA does not reduce-scatter: all-reduced, then read from there (ir.propagate).
            whole = Sharding(have.dims)
            colls, _ = reshard(v, have, whole, self.mesh, groups or None)
            colls = [*colls, *reshard(v, whole, want, self.mesh)[0]]
        else:
            colls, _ = reshard(v, have, want, self.mesh, groups or None)
        backward, param = _phase_key(v)
        out = np.zeros(N_PARTS)
        for c in colls:
            ck = (c.kind, c.axes, c.bytes, c.count)  # its time does not depend on the value's name
            t = self._collective_cache.get(ck)
            if t is None:
                t = self._collective_cache[ck] = collective_time(c, self.topo)
            if not self.overlap:
                out[Part.EXPOSED_COMM] += t
            elif backward:
                out[Part.BWD_COMM] += t
            elif c.kind is CollectiveKind.ALL_GATHER and param:
                out[Part.FWD_COMM] += t
            else:
                out[Part.EXPOSED_COMM] += t
        self._reshard_cache[key] = out
        return out


def _phase_key(v: Value) -> tuple[bool, bool]:
    """(made in the backward pass, a parameter or optimizer state): what the overlap rule reads."""
    return ("transpose(" in v.name, v.role in (Role.PARAM, Role.OPT_STATE))


def _compute_part(op: Op) -> Part:
    if "transpose(" in op.scope:
        return Part.BWD_COMPUTE
    if "jvp(" in op.scope:
        return Part.FWD_COMPUTE
    return Part.OTHER_COMPUTE

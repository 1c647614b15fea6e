"""Alpha-beta collective times: ring closed forms, efficiency, multi-axis flat vs hierarchical."""

from __future__ import annotations

import pytest

from cost_model.collectives import (
    Algorithm,
    CollectiveEstimate,
    all_to_all_time,
    collective_estimate,
    collective_permute_time,
    collective_time,
    flat_ring_time,
    hierarchical_time,
    multi_axis_time,
    ring_all_gather_time,
    ring_all_reduce_time,
    ring_reduce_scatter_time,
    ring_time,
)
from cost_model.hardware import DeviceSpec, Hardware, LinkSpec, load_hardware
from cost_model.meshes import topology
from ir.comm import Collective, CollectiveKind
from ir.sharding import MeshShape, ShardingError

GiB = 2**30
NVLINK = LinkSpec(450e9, 1e-6)  # bytes/s per direction, seconds per step
IB = LinkSpec(50e9, 5e-6)
AR, AG, RS = CollectiveKind.ALL_REDUCE, CollectiveKind.ALL_GATHER, CollectiveKind.REDUCE_SCATTER
A2A, PERMUTE = CollectiveKind.ALL_TO_ALL, CollectiveKind.COLLECTIVE_PERMUTE


def _hw(intra: LinkSpec = NVLINK, inter: LinkSpec = IB) -> Hardware:
    return Hardware("test", DeviceSpec("d", {"bfloat16": 1e15}, 3e12, 8e10), intra, inter, 8)


def _topo(mesh: str, nodes: int | None = None, hw: Hardware | None = None):
    return topology(hw or _hw(), MeshShape.parse(mesh), nodes)


# ------------------------------------------------------------------------------------ closed forms


def test_all_reduce_1gib_over_8_gpus_at_450gbs():
    # 2(n-1)/n · S/B + 2(n-1)·α = 1.75 · 2^30 / 4.5e11 + 14 µs
    expected = 1.75 * GiB / 450e9 + 14e-6
    assert expected == pytest.approx(4.18966e-3, rel=1e-5)
    assert ring_all_reduce_time(GiB, 8, 450e9, 1e-6) == pytest.approx(expected)
    c = Collective(AR, ("data",), GiB)
    assert collective_time(c, topology(load_hardware("h100"), MeshShape.parse("data=8"))) == pytest.approx(
        expected
    )


@pytest.mark.parametrize(
    "fn, beta, steps",
    [
        (ring_all_reduce_time, 2 * 3 / 4, 6),
        (ring_all_gather_time, 3 / 4, 3),  # S is the gathered size
        (ring_reduce_scatter_time, 3 / 4, 3),  # S is the unscattered size
        (all_to_all_time, 3 / 4, 3),  # each device sends (n-1)/n of its buffer
        (collective_permute_time, 1, 1),
    ],
)
def test_ring_closed_forms(fn, beta: float, steps: int):
    size, n, bw, alpha = 1e8, 4, 1e11, 2e-6
    assert fn(size, n, bw, alpha) == pytest.approx(beta * size / bw + steps * alpha)
    # half the bandwidth reached doubles the bandwidth term only
    assert fn(size, n, bw, alpha, efficiency=0.5) == pytest.approx(2 * beta * size / bw + steps * alpha)
    assert fn(size, 1, bw, alpha) == 0.0


@pytest.mark.parametrize("kind", list(CollectiveKind))
def test_one_device_costs_nothing(kind: CollectiveKind):
    assert ring_time(kind, GiB, 1, 1e9, 1e-6) == 0.0
    assert collective_time(Collective(kind, ("data",), GiB), _topo("data=1,model=8")) == 0.0
    assert collective_time(Collective(kind, (), GiB), _topo("data=8")) == 0.0


@pytest.mark.parametrize(
    "args, message",
    [
        ((1e6, 0, 1e9, 1e-6, 1.0), "group size n is 0; it must be a whole number >= 1."),
        ((-1, 4, 1e9, 1e-6, 1.0), "size_bytes is -1; it must be >= 0."),
        ((1e6, 4, 0, 1e-6, 1.0), "bandwidth is 0 bytes/s; it must be > 0."),
        ((1e6, 4, 1e9, -1e-6, 1.0), "latency is -1e-06 s; it must be >= 0."),
        ((1e6, 4, 1e9, 1e-6, 0.0), "efficiency is 0.0; it must be a fraction of peak in (0, 1]."),
    ],
)
def test_bad_arguments(args: tuple, message: str):
    with pytest.raises(ValueError) as e:
        ring_all_reduce_time(*args)
    assert str(e.value) == message


def test_count_multiplies():
    topo = _topo("data=8")
    once = collective_time(Collective(AR, ("data",), GiB), topo)
    assert collective_time(Collective(AR, ("data",), GiB, count=12), topo) == pytest.approx(12 * once)


# ------------------------------------------------------------------------------------ intra / inter


def test_inter_node_axis_uses_the_network():
    topo = _topo("data=8,model=8", nodes=8)
    data = collective_time(Collective(AG, ("data",), GiB), topo)
    model = collective_time(Collective(AG, ("model",), GiB), topo)
    assert data == pytest.approx(7 / 8 * GiB / 50e9 + 7 * 5e-6)
    assert model == pytest.approx(7 / 8 * GiB / 450e9 + 7 * 1e-6)


# --------------------------------------------------------------------------------------- multi-axis


def test_all_reduce_over_nodes_is_hierarchical():
    topo = _topo("data=8,model=8", nodes=8)
    c = Collective(AR, ("data", "model"), GiB)
    # one ring over 64 devices at the network's speed and latency
    flat = 2 * 63 / 64 * GiB / 50e9 + 126 * 5e-6
    # reduce-scatter + all-gather over NVLink (= an all-reduce), all-reduce of S/8 over IB
    hierarchical = (1.75 * GiB / 450e9 + 14e-6) + (1.75 * GiB / 8 / 50e9 + 14 * 5e-6)
    groups = topo.axis_links(c.axes)
    assert flat_ring_time(AR, GiB, groups) == pytest.approx(flat)
    assert hierarchical_time(AR, GiB, groups) == pytest.approx(hierarchical)
    assert hierarchical == pytest.approx(8.95728e-3, rel=1e-5)
    assert collective_estimate(c, topo) == CollectiveEstimate(
        pytest.approx(hierarchical), Algorithm.HIERARCHICAL
    )


def test_hierarchy_runs_the_fastest_link_first_whatever_the_axis_order():
    topo = _topo("data=8,model=8", nodes=8)
    forward = collective_time(Collective(RS, ("data", "model"), GiB), topo)
    backward = collective_time(Collective(RS, ("model", "data"), GiB), topo)
    expected = (7 / 8 * GiB / 450e9 + 7e-6) + (7 / 8 * GiB / 8 / 50e9 + 7 * 5e-6)
    assert forward == backward == pytest.approx(expected)


def test_same_link_axes_have_equal_bandwidth_terms_and_fewer_steps_hierarchically():
    groups = _topo("data=2,model=4").axis_links(("data", "model"))
    flat = flat_ring_time(AR, GiB, groups)
    hierarchical = hierarchical_time(AR, GiB, groups)
    assert flat == pytest.approx(1.75 * GiB / 450e9 + 14e-6)
    # 2(2-1) + 2(4-1) = 8 steps instead of 2(8-1) = 14
    assert flat - hierarchical == pytest.approx(6e-6)


def test_all_to_all_can_prefer_the_flat_ring():
    groups = _topo("data=2,model=4").axis_links(("data", "model"))
    flat = 7 / 8 * GiB / 450e9 + 7e-6
    hierarchical = (1 / 2 * GiB / 450e9 + 1e-6) + (3 / 4 * GiB / 450e9 + 3e-6)
    assert hierarchical_time(A2A, GiB, groups) == pytest.approx(hierarchical)
    assert multi_axis_time(A2A, GiB, groups) == CollectiveEstimate(pytest.approx(flat), Algorithm.RING)


def test_permute_over_several_axes_crosses_the_slowest_link():
    topo = _topo("data=8,model=8", nodes=8)
    c = Collective(PERMUTE, ("data", "model"), 1e8)
    assert collective_estimate(c, topo) == CollectiveEstimate(
        pytest.approx(1e8 / 50e9 + 5e-6), Algorithm.RING
    )


def test_size_one_axes_are_ignored():
    topo = _topo("data=1,model=8")
    both = collective_estimate(Collective(AR, ("data", "model"), GiB), topo)
    assert both == CollectiveEstimate(pytest.approx(1.75 * GiB / 450e9 + 14e-6), Algorithm.RING)


def test_unknown_axis():
    with pytest.raises(ShardingError, match="unknown mesh axis 'fsdp'"):
        collective_time(Collective(AR, ("fsdp",), GiB), _topo("data=8"))


# --------------------------------------------------------------------------------------- efficiency


def test_efficiency_curve_applies_at_the_message_size():
    curved = LinkSpec(450e9, 1e-6, ((1e6, 0.5), (1e9, 1.0)))
    topo = _topo("data=8", hw=_hw(intra=curved))
    small = collective_time(Collective(AR, ("data",), 1e6), topo)
    large = collective_time(Collective(AR, ("data",), 1e9), topo)
    assert small == pytest.approx(1.75 * 1e6 / (450e9 * 0.5) + 14e-6)
    assert large == pytest.approx(1.75 * 1e9 / 450e9 + 14e-6)


def test_hierarchical_levels_use_their_own_message_sizes():
    # the IB level sees S/8 = 1.25e8 bytes, below the curve's first point: 0.5 of peak
    slow = LinkSpec(50e9, 5e-6, ((2e8, 0.5), (2e9, 1.0)))
    topo = _topo("data=8,model=8", nodes=8, hw=_hw(inter=slow))
    seconds = hierarchical_time(RS, 1e9, topo.axis_links(("data", "model")))
    expected = (7 / 8 * 1e9 / 450e9 + 7e-6) + (7 / 8 * 1.25e8 / (50e9 * 0.5) + 7 * 5e-6)
    assert seconds == pytest.approx(expected)
    # the flat ring uses the slowest effective bandwidth at the full size: 1e9 sits at
    # log-fraction log(5)/log(10) ≈ 0.699 of the way from 2e8 to 2e9
    fraction = 0.5 + 0.5 * 0.69897
    flat = 63 / 64 * 1e9 / (50e9 * fraction) + 63 * 5e-6
    assert flat_ring_time(RS, 1e9, topo.axis_links(("data", "model"))) == pytest.approx(flat, rel=1e-4)

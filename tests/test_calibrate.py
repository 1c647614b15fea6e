"""Calibration: α-β fits recover the ring formulas, device rates fit by hand, presets load back, one real CLI run."""

from __future__ import annotations

import dataclasses
import json
import math
import time

import numpy as np
import pytest

from auto_partition import cli
from cost_model.calibrate import (
    Benchmarks,
    CalibrationError,
    CollectiveSample,
    CopySample,
    MatmulSample,
    Measurements,
    comparison,
    fit,
    fit_device,
    fit_link,
    save_calibration,
)
from cost_model.collectives import ring_time
from cost_model.hardware import LinkSpec, load_hardware
from ir.comm import CollectiveKind
from ir.sharding import LinkKind, MeshShape

AR, AG, RS, A2A, CP = (
    CollectiveKind.ALL_REDUCE,
    CollectiveKind.ALL_GATHER,
    CollectiveKind.REDUCE_SCATTER,
    CollectiveKind.ALL_TO_ALL,
    CollectiveKind.COLLECTIVE_PERMUTE,
)
SIZES = tuple(2**e for e in range(10, 31, 2))  # 1 KiB .. 1 GiB


def synthetic(
    bandwidth: float,
    latency: float,
    *,
    axis: str = "x",
    ns: tuple[int, ...] = (2, 4, 8),
    kinds: tuple[CollectiveKind, ...] = (AR, AG, RS, A2A),
    sizes: tuple[int, ...] = SIZES,
    efficiency=lambda size: 1.0,
) -> list[CollectiveSample]:
    """Timings exactly as cost_model.collectives predicts them."""
    return [
        CollectiveSample(kind, axis, n, s, ring_time(kind, s, n, bandwidth, latency, efficiency(s)))
        for n in ns
        for kind in kinds
        for s in sizes
    ]


# ------------------------------------------------------------------------------------------ links


@pytest.mark.parametrize(
    "bandwidth, latency",
    [(450e9, 1e-6), (50e9, 5e-6), (1e10, 1e-5), (2.5e7, 3e-3)],
    ids=["nvlink", "infiniband", "cpu", "slow"],
)
@pytest.mark.parametrize("ns", [(2,), (4,), (2, 4, 8)], ids=["n2", "n4", "pooled"])
def test_fit_recovers_alpha_beta_exactly(bandwidth: float, latency: float, ns: tuple[int, ...]):
    result = fit_link(synthetic(bandwidth, latency, ns=ns))
    assert result.latency == pytest.approx(latency, rel=1e-9)
    assert result.fitted_bandwidth == pytest.approx(bandwidth, rel=1e-9)
    assert result.bandwidth == pytest.approx(bandwidth, rel=1e-9)
    assert result.efficiency == ()  # the ring formulas hold at every size: no curve
    assert result.residual < 1e-9
    assert (result.rejected, result.notes) == (0, ())


def test_fit_matches_hand_solution_of_two_all_reduces():
    # All-reduce over n=4: t = 1.5·S·β + 6·α. Two sizes, two unknowns: solved by hand.
    b_true, a_true = 1 / 200e9, 2e-6
    s1, s2 = 1e6, 1e8
    t1, t2 = 1.5 * s1 * b_true + 6 * a_true, 1.5 * s2 * b_true + 6 * a_true
    beta = (t2 - t1) / (1.5 * (s2 - s1))
    alpha = (t1 - 1.5 * s1 * beta) / 6
    result = fit_link([CollectiveSample(AR, "x", 4, int(s1), t1), CollectiveSample(AR, "x", 4, int(s2), t2)])
    assert result.fitted_bandwidth == pytest.approx(1 / beta, rel=1e-12)
    assert result.latency == pytest.approx(alpha, rel=1e-9)
    assert 1 / beta == pytest.approx(200e9, rel=1e-12)


def test_fit_uses_collective_permute_formula():
    result = fit_link(synthetic(100e9, 4e-6, kinds=(CP, AR), ns=(4,)))
    assert result.latency == pytest.approx(4e-6, rel=1e-9)
    assert result.bandwidth == pytest.approx(100e9, rel=1e-9)


def test_fit_is_robust_to_noise_and_outliers():
    rng = np.random.default_rng(0)
    clean = synthetic(450e9, 1e-6, ns=(8,))
    noisy = [
        CollectiveSample(s.kind, s.axis, s.n, s.size_bytes, s.seconds * math.exp(rng.normal(0, 0.03)))
        for s in clean
    ]
    # Two runs hit by something else on the machine (a 5x stall).
    for i in (3, 20):
        s = noisy[i]
        noisy[i] = CollectiveSample(s.kind, s.axis, s.n, s.size_bytes, 5 * s.seconds)
    result = fit_link(noisy)
    assert result.rejected >= 2
    assert result.latency == pytest.approx(1e-6, rel=0.1)
    assert result.fitted_bandwidth == pytest.approx(450e9, rel=0.05)
    assert result.bandwidth == pytest.approx(450e9, rel=0.1)
    assert result.residual < 0.05


def test_efficiency_curve_recovers_size_dependent_bandwidth():
    # Messages under 256 MiB reach only part of the bandwidth (too few channels busy), down to 30%.
    def eff(size: float) -> float:
        return min(1.0, max(0.3, 0.3 + 0.7 * math.log(size / 2**20) / math.log(2**28 / 2**20)))

    samples = synthetic(450e9, 1e-6, ns=(8,), kinds=(AR, AG), efficiency=eff)
    result = fit_link(samples)
    assert result.fitted_bandwidth < 0.9 * 450e9  # the plain α-β fit is biased ...
    assert result.latency == pytest.approx(1e-6, rel=1e-5)  # ... the fit with the curve is not
    assert result.bandwidth == pytest.approx(450e9, rel=1e-5)
    # Points only where the bandwidth term is at least a quarter of the time (1 MiB and up here).
    assert [size for size, _ in result.efficiency] == [2.0**e for e in range(20, 31, 2)]
    for size, fraction in result.efficiency:
        assert fraction == pytest.approx(eff(size), rel=1e-5)
    link = result.link()
    for s in samples:
        predicted = ring_time(
            s.kind, s.size_bytes, s.n, link.bandwidth, link.latency, link.efficiency_at(s.size_bytes)
        )
        assert predicted == pytest.approx(s.seconds, rel=1e-5)
    assert result.residual < 1e-5


def test_nonpositive_latency_falls_back_to_base():
    # Times slightly below the pure bandwidth term: the fitted α comes out negative.
    samples = [
        CollectiveSample(AR, "x", 4, s, ring_time(AR, s, 4, 100e9, 0.0) - 1e-7) for s in (2**24, 2**26, 2**28)
    ]
    base = LinkSpec(123e9, 7e-6)
    result = fit_link(samples, base)
    assert result.latency == base.latency
    assert result.fitted_bandwidth > 0
    assert any("latency kept from the base preset" in n for n in result.notes)
    with pytest.raises(CalibrationError, match="not both positive"):
        fit_link(samples)


def test_nonpositive_bandwidth_falls_back_to_base():
    # Bigger messages taking less time: noise, not a link.
    samples = [CollectiveSample(AR, "x", 4, s, 1e-3 - s * 1e-12) for s in (2**10, 2**16, 2**20)]
    base = LinkSpec(123e9, 7e-6)
    result = fit_link(samples, base)
    assert result.fitted_bandwidth == pytest.approx(base.bandwidth)
    assert result.latency > 0
    assert any("bandwidth kept from the base preset" in n for n in result.notes)


def test_one_size_cannot_separate_latency_and_bandwidth():
    samples = synthetic(450e9, 1e-6, sizes=(2**20,), kinds=(AR,), ns=(8,))
    base = LinkSpec(123e9, 7e-6)
    result = fit_link(samples, base)
    assert (result.fitted_bandwidth, result.latency) == (pytest.approx(123e9), 7e-6)
    assert "cannot be told apart" in result.notes[0]
    with pytest.raises(CalibrationError):
        fit_link(samples)
    with pytest.raises(CalibrationError, match="no collective timings"):
        fit_link([CollectiveSample(AR, "x", 1, 2**20, 1e-3)])


# ---------------------------------------------------------------------------------------- devices


def _matmul(dtype: str, size: int, rate: float) -> MatmulSample:
    return MatmulSample(dtype, size, size, size, 2.0 * size**3 / rate)


def test_fit_device_by_hand():
    base = load_hardware("h100").device
    samples = [
        _matmul("bfloat16", 1024, 3e14),
        _matmul("bfloat16", 8192, 7e14),
        _matmul("tf32", 8192, 3.5e14),
    ]
    copies = [CopySample(2**28, 2 * 2**28 / 2.5e12), CopySample(2**30, 2 * 2**30 / 3.0e12)]
    result = fit_device(base, samples, copies, name="NVIDIA H100 80GB HBM3")
    d = result.device
    efficiency = 7e14 / 9.894e14  # bfloat16 is the reference dtype: its datasheet peak stays
    assert d.matmul_efficiency == pytest.approx(efficiency)
    assert d.flops("bfloat16") == pytest.approx(9.894e14)
    assert d.matmul_flops("bfloat16") == pytest.approx(7e14)
    assert d.matmul_flops("tf32") == pytest.approx(3.5e14)
    assert d.flops("float8") == pytest.approx(1.9789e15)  # not measured: base peak, same efficiency
    assert d.memory_efficiency == pytest.approx(3.0 / 3.35)
    assert d.memory_bandwidth == pytest.approx(3.0e12)
    assert d.hbm_capacity == base.hbm_capacity
    assert d.name == "NVIDIA H100 80GB HBM3"
    assert dict(result.achieved) == {"bfloat16": pytest.approx(7e14), "tf32": pytest.approx(3.5e14)}
    assert dict(result.matmul_curves)["bfloat16"] == (
        (pytest.approx(2.0 * 1024**3), pytest.approx(3 / 7)),
        (pytest.approx(2.0 * 8192**3), 1.0),
    )
    assert result.copy_curve == ((2.0**28, pytest.approx(2.5 / 3.0)), (2.0**30, 1.0))


def test_fit_device_raises_peaks_below_measurement():
    base = load_hardware("cpu").device  # bfloat16 peak 5e10, HBM 1e10 (assumptions)
    result = fit_device(base, [_matmul("bfloat16", 256, 8e10)], [CopySample(2**24, 2 * 2**24 / 2e10)])
    d = result.device
    assert (d.flops("bfloat16"), d.matmul_efficiency) == (pytest.approx(8e10), 1.0)
    assert (d.hbm_bandwidth, d.memory_efficiency) == (pytest.approx(2e10), 1.0)
    assert any("above the preset peak: peak raised" in n for n in result.notes)
    assert any("above the preset HBM bandwidth" in n for n in result.notes)


def test_fit_device_without_samples_keeps_base():
    base = load_hardware("h100").device
    result = fit_device(base, [], [])
    assert result.device == base
    assert result.copy_bandwidth is None


# --------------------------------------------------------------------------------------- presets


def measurements(mesh: str, *, links: dict[str, tuple[float, float]]) -> Measurements:
    """Synthetic measurements on `mesh`: each axis's link is (bandwidth, latency)."""
    shape = MeshShape.parse(mesh)
    collectives = [
        s
        for axis, n in zip(shape.axes, shape.shape, strict=True)
        for s in synthetic(*links[axis], axis=axis, ns=(n,))
    ]
    return Measurements(
        host="gpu-node-17",
        when="2025-01-02T03:04:05Z",
        jax_version="0.10.2",
        jaxlib_version="0.10.2",
        platform="gpu",
        device_kind="NVIDIA H100 80GB HBM3",
        device_count=shape.size,
        mesh=shape,
        matmul=(_matmul("bfloat16", 8192, 7e14),),
        copy=(CopySample(2**30, 2 * 2**30 / 3e12),),
        collectives=tuple(collectives),
    )


def test_preset_loads_back_and_records_where_and_when(tmp_path):
    base = load_hardware("h100")
    m = measurements("data=2:inter,model=4", links={"data": (40e9, 8e-6), "model": (400e9, 2e-6)})
    cal = fit(base, m, name="h100-lab")
    path = tmp_path / "h100-lab.yaml"
    save_calibration(cal, path)
    hw = load_hardware(str(path))
    assert hw == cal.hardware
    assert hw.name == "h100-lab"
    for fact in (
        "gpu-node-17",
        "2025-01-02T03:04:05Z",
        "jax 0.10.2",
        "NVIDIA H100 80GB HBM3",
        "base preset h100",
    ):
        assert fact in hw.source
    assert "mesh data=2 inter_node, model=4 intra_node" in hw.source
    # The marked axis fits the inter-node link, the other the intra-node link (4 significant digits).
    assert (hw.inter_node.bandwidth, hw.inter_node.latency) == (pytest.approx(40e9), pytest.approx(8e-6))
    assert (hw.intra_node.bandwidth, hw.intra_node.latency) == (pytest.approx(400e9), pytest.approx(2e-6))
    assert hw.device.matmul_flops("bfloat16") == pytest.approx(7e14, rel=1e-3)
    assert (hw.devices_per_node, hw.nodes, hw.device.hbm_capacity) == (8, 1, 80e9)
    assert hw.device.flops("float8") == 1.9789e15  # not measured: the base figure, not rounded
    assert "# Timings" in path.read_text()
    rows = {r.quantity: r for r in comparison(cal)}
    row = rows["axis model (n=4, intra_node) bandwidth"]
    assert (row.measured, row.preset, row.unit) == (pytest.approx(400e9), 450e9, "B/s")
    assert rows["matmul bfloat16"].preset == pytest.approx(9.894e14)


def test_collectives_compiled_away_are_not_fitted():
    base = load_hardware("h100")
    m = measurements("model=8", links={"model": (400e9, 2e-6)})
    bogus = [CollectiveSample(CP, "model", 8, 2**20, 1e-9, compiled_ops=0)]
    cal = fit(base, dataclasses.replace(m, collectives=(*m.collectives, *bogus)))
    assert cal.hardware.intra_node.bandwidth == pytest.approx(400e9)
    assert "axis model: XLA compiled away the collective-permute benchmarks: not fitted" in cal.notes


def test_unmeasured_link_kind_keeps_base():
    base = load_hardware("h100")
    cal = fit(base, measurements("model=8", links={"model": (400e9, 2e-6)}))
    assert cal.hardware.inter_node == base.inter_node
    assert any("no inter_node axis measured" in n for n in cal.notes)
    assert dict(cal.links)[LinkKind.INTER_NODE] is None


def test_benchmarks_reject_bad_settings():
    with pytest.raises(CalibrationError, match="cannot benchmark matmuls in 'float64'"):
        Benchmarks(((8, 8, 8),), ("float64",), (), ())
    with pytest.raises(CalibrationError, match="repeats is 0; it must be a whole number >= 1"):
        Benchmarks(((8, 8, 8),), ("bfloat16",), (), (), repeats=0)


# ------------------------------------------------------------------------------------ command line


def test_calibrate_quick_on_fake_cpu_devices(tmp_path, capsys):
    out = tmp_path / "cpu-lab.yaml"
    start = time.perf_counter()
    rc = cli.main(
        ["calibrate", "--hardware", "cpu", "--mesh", "data=2,model=4", "--quick", "-o", str(out), "--json"]
    )
    took = time.perf_counter() - start
    printed, err = capsys.readouterr()
    assert rc == 0, err
    doc = json.loads(printed)
    hw = load_hardware(str(out))
    assert hw.name == "cpu-lab"
    assert doc["measurements"]["devices"] == 8 and doc["measurements"]["mesh"] == "data=2,model=4"
    assert "measured by auto-partition calibrate on host" in hw.source and "platform cpu" in hw.source
    quantities = {r["quantity"] for r in doc["rows"]}
    assert {
        "HBM copy",
        "axis data (n=2, intra_node) latency",
        "axis model (n=4, intra_node) bandwidth",
    } <= quantities
    collectives = doc["measurements"]["collectives"]
    assert len({(c["kind"], c["axis"]) for c in collectives}) == 8  # four collectives over each of two axes
    chain = Benchmarks.for_platform("cpu", quick=True).chain
    assert {c["compiled_ops"] for c in collectives} == {chain}  # XLA kept every chained collective
    assert took < 60, f"--quick took {took:.0f} s on CPU"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--mesh", "data=4,model=4"], "mesh data=4,model=4 needs 16 devices but 8 are available"),
        (["--dtypes", "float64"], "cannot benchmark matmuls in 'float64'"),
        (["--hardware", "h1000"], "unknown hardware preset 'h1000'; did you mean 'h100'?"),
    ],
)
def test_calibrate_errors_are_one_line(argv, message, capsys, tmp_path):
    args = ["calibrate", "--hardware", "cpu", "-o", str(tmp_path / "x.yaml"), *argv]
    rc = cli.main(args)
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "x.yaml").exists()

"""Calibration: microbenchmark timings fitted into a new hardware preset that records where and when."""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
from collections.abc import Sequence

import numpy as np

from cost_model.collectives import ring_time
from cost_model.hardware import DTYPES, DeviceSpec, Hardware, LinkSpec, save_hardware
from cost_model.meshes import layout_links
from cost_model.microbench import (
    Benchmarks,
    CalibrationError,
    CollectiveSample,
    CopySample,
    MatmulSample,
    Measurements,
    measure,
    measure_collectives,
    measure_copy,
    measure_matmul,
)
from ir.comm import CollectiveKind
from ir.sharding import LinkKind, MeshShape

# Which measured dtype sets the matmul efficiency, most representative of training first.
_REFERENCE_ORDER = ("bfloat16", "tf32", "float16", "float32", "float8", "int8")
# A sample informs the bandwidth (and the efficiency curve) only when its bandwidth term is at least
# this share of its time; below it, subtracting the latency leaves mostly noise.
_BANDWIDTH_SHARE = 0.25
# An efficiency curve within this distance of 1.0 at every size is measurement noise: none is stored.
_FLAT_CURVE = 0.02
# Outlier rejection: a sample whose relative residual is this many robust standard deviations
# (1.4826 × median absolute deviation) from the median is dropped, but never one within 5%.
_OUTLIER_SIGMAS = 4.0
_OUTLIER_FLOOR = 0.05
# Most rounds of refitting α with the efficiency curve held.
_REFITS = 50


def _ring_terms(kind: CollectiveKind, n: int) -> tuple[float, float]:
    """(factor on S/B, α steps) of `kind` over n devices, read off cost_model.collectives.ring_time."""
    return ring_time(kind, 1.0, n, 1.0, 0.0), ring_time(kind, 0.0, n, 1.0, 1.0)


@dataclasses.dataclass(frozen=True, slots=True)
class LinkFit:
    """A link fitted to collective timings: t = factor(kind, n)·S/(B·e(S)) + steps(kind, n)·α.

    Attributes:
      bandwidth: B, peak bytes/s per direction per device: the larger of the least-squares
        bandwidth and the best bandwidth achieved at any size.
      latency: α, seconds per ring step.
      efficiency: (bytes, fraction of B) per measured size; () when flat within 2%.
      fitted_bandwidth: the least-squares 1/β, bytes/s (before the efficiency curve).
      residual: the median |relative error| of the fitted link (α, B and the curve) over the
        samples kept.
      samples: samples fitted.
      rejected: samples dropped as outliers.
      notes: fallbacks taken, e.g. a latency kept from the base preset.
    """

    bandwidth: float
    latency: float
    efficiency: tuple[tuple[float, float], ...]
    fitted_bandwidth: float
    residual: float
    samples: int
    rejected: int = 0
    notes: tuple[str, ...] = ()

    def link(self) -> LinkSpec:
        return LinkSpec(self.bandwidth, self.latency, self.efficiency)


def _weighted_lstsq(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    """(β, α) minimising Σ((a·β + b·α − t)/t)²: relative errors, so small messages count too."""
    design = np.stack([a / t, b / t], axis=1)
    scale = np.linalg.norm(design, axis=0)  # columns differ by ~1e12 (bytes vs steps): equilibrate
    (beta, alpha), *_ = np.linalg.lstsq(design / scale, np.ones_like(t), rcond=None)
    return float(beta / scale[0]), float(alpha / scale[1])


def _fixed(coef: np.ndarray, rest: np.ndarray, t: np.ndarray) -> float:
    """x minimising Σ((coef·x − rest)/t)²."""
    w = 1.0 / t**2
    return float(np.sum(w * coef * rest) / np.sum(w * coef * coef))


def _guarded(
    a: np.ndarray, b: np.ndarray, t: np.ndarray, beta: float, alpha: float, base: LinkSpec
) -> tuple[float, float, list[str]]:
    """(β, α) with each non-positive one replaced by the base's and the other refitted given it."""
    notes = []
    if beta > 0 and alpha <= 0:
        notes.append(f"fitted latency {alpha:.3g} s is not positive: latency kept from the base preset")
        alpha = base.latency
        beta = _fixed(a, t - b * alpha, t)
    elif alpha > 0 and beta <= 0:
        notes.append(
            f"fitted 1/bandwidth {beta:.3g} s/B is not positive: bandwidth kept from the base preset"
        )
        beta = 1.0 / base.bandwidth
        alpha = _fixed(b, t - a * beta, t)
    if beta <= 0 or alpha <= 0:
        notes.append("latency and bandwidth kept from the base preset")
        beta, alpha = 1.0 / base.bandwidth, base.latency
    return beta, alpha, notes


def fit_link(samples: Sequence[CollectiveSample], fallback: LinkSpec | None = None) -> LinkFit:
    """Fits α (latency per ring step) and B (bandwidth) to collective timings by the ring formulas.

    A weighted least-squares fit of t = factor·S·β + steps·α (relative residuals), dropping
    outliers beyond 4 robust standard deviations and refitting; then an efficiency curve, the
    bandwidth each size achieved once latency is subtracted, relative to the peak, so that the
    model reproduces the measured medians at the measured sizes; then α is refitted with each
    size's achieved bandwidth held, and the curve redrawn, until α settles (so α comes from the
    small messages, not from a bandwidth that varies with size).

    Args:
      samples: timings over groups of any sizes n > 1 (several axes of one link kind pool).
      fallback: the link to take α or B from when the fit gives a value <= 0; None raises.

    Raises:
      CalibrationError: no usable samples, or a non-positive fit and no fallback.
    """
    rows = [s for s in samples if s.n > 1 and math.isfinite(s.seconds) and s.seconds > 0]
    if not rows:
        raise CalibrationError("no collective timings over groups of 2 or more devices to fit.", what="link")
    terms = [_ring_terms(s.kind, s.n) for s in rows]
    a = np.array([f * s.size_bytes for (f, _), s in zip(terms, rows, strict=True)], dtype=float)
    b = np.array([steps for _, steps in terms], dtype=float)
    t = np.array([s.seconds for s in rows], dtype=float)
    notes: list[str] = []
    keep = np.ones(len(rows), dtype=bool)
    separable = len({round(x, 12) for x in (a / b)}) >= 2
    if separable:
        for _ in range(3):
            beta, alpha = _weighted_lstsq(a[keep], b[keep], t[keep])
            r = (a * beta + b * alpha - t) / t
            med = np.median(r[keep])
            spread = _OUTLIER_SIGMAS * 1.4826 * np.median(np.abs(r[keep] - med))
            new = np.abs(r - med) <= max(spread, _OUTLIER_FLOOR)
            if new.sum() < 3 or np.array_equal(new, keep):
                break
            keep = new
        beta, alpha = _weighted_lstsq(a[keep], b[keep], t[keep])
    else:
        beta = alpha = -1.0
        notes.append("one message size only: latency and bandwidth cannot be told apart")

    ak, bk, tk = a[keep], b[keep], t[keep]
    if beta <= 0 or alpha <= 0:
        if fallback is None:
            raise CalibrationError(
                f"the fit gives β={beta:.3g} s/byte, α={alpha:.3g} s, not both positive; measure more "
                "message sizes, or give a fallback link.",
                what="link",
            )
        beta, alpha, more = _guarded(ak, bk, tk, beta, alpha, fallback)
        notes += more
    fitted = 1.0 / beta
    peak, curve = _efficiency_curve(rows, keep, alpha, fitted)
    # With a curve, the α of the plain α-β fit is biased (it absorbed the size dependence): refit α
    # with the bandwidth each size achieved held (only sizes off the curve inform it), then redraw
    # the curve, until α settles. Each round shrinks α's error by a ratio of message sizes.
    for _ in range(_REFITS if curve and not notes else 0):
        model = LinkSpec(peak, alpha, curve)
        achieved = np.array([model.effective_bandwidth(s.size_bytes) for s in rows])[keep]
        new_alpha = _fixed(bk, tk - ak / achieved, tk)
        if not new_alpha > 0:
            break
        settled = abs(new_alpha - alpha) <= 1e-9 * alpha
        alpha = new_alpha
        peak, curve = _efficiency_curve(rows, keep, alpha, fitted)
        if settled:
            break
    model = LinkSpec(peak, alpha, curve)
    predicted = np.array(
        [ring_time(s.kind, s.size_bytes, s.n, peak, alpha, model.efficiency_at(s.size_bytes)) for s in rows]
    )
    residual = float(np.median(np.abs(predicted[keep] / tk - 1)))
    return LinkFit(peak, alpha, curve, fitted, residual, int(keep.sum()), int((~keep).sum()), tuple(notes))


def _efficiency_curve(
    rows: Sequence[CollectiveSample], keep: np.ndarray, alpha: float, fitted: float
) -> tuple[float, tuple[tuple[float, float], ...]]:
    """(peak bandwidth, curve): per size, the median bandwidth achieved once α is subtracted."""
    achieved: dict[int, list[float]] = {}
    for s, kept in zip(rows, keep, strict=True):
        factor, steps = _ring_terms(s.kind, s.n)
        moving = s.seconds - steps * alpha
        if kept and moving >= _BANDWIDTH_SHARE * s.seconds:
            achieved.setdefault(s.size_bytes, []).append(factor * s.size_bytes / moving)
    per_size = {size: statistics.median(v) for size, v in sorted(achieved.items())}
    peak = max([fitted, *per_size.values()])
    # Fractions stay in (0, 1] as LinkSpec requires; under 0.1% a link is broken, not slow.
    curve = tuple((float(size), min(1.0, max(1e-3, bw / peak))) for size, bw in per_size.items())
    if all(f >= 1 - _FLAT_CURVE for _, f in curve):
        curve = ()
    return peak, curve


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceFit:
    """Device rates fitted to matmul and copy timings.

    Attributes:
      device: the fitted spec: for every measured dtype, peak × matmul_efficiency is the best
        matmul rate achieved; peak HBM bandwidth × memory_efficiency the best copy bandwidth.
      achieved: the best matmul FLOP/s per measured dtype.
      matmul_curves: per dtype, (FLOPs of the matmul, achieved / best) per size.
      copy_bandwidth: the best copy bandwidth, bytes/s (None when none was measured).
      copy_curve: (bytes, achieved / best) per size.
      notes: what was kept from the base, and why.
    """

    device: DeviceSpec
    achieved: tuple[tuple[str, float], ...]
    matmul_curves: tuple[tuple[str, tuple[tuple[float, float], ...]], ...]
    copy_bandwidth: float | None
    copy_curve: tuple[tuple[float, float], ...]
    notes: tuple[str, ...] = ()


def fit_device(
    base: DeviceSpec,
    matmul: Sequence[MatmulSample],
    copy: Sequence[CopySample],
    *,
    name: str | None = None,
) -> DeviceFit:
    """Fits peak FLOP/s per dtype, matmul efficiency and HBM bandwidth to the timings.

    The best achieved rate per dtype is what a large matmul reaches. The base's peak (a
    datasheet figure) is kept for the reference dtype (bfloat16, else tf32, ...) and
    matmul_efficiency = best achieved / that peak; every measured dtype's peak is then set so
    that peak × efficiency = its best achieved rate, and unmeasured dtypes keep the base peak
    (so they are assumed to reach the same efficiency). A measurement above the datasheet raises
    the peak instead (efficiency 1). The HBM bandwidth is fitted the same way.

    Args:
      base: the spec to start from.
      matmul: matmul timings.
      copy: copy timings.
      name: the device name (default: the base's).
    """
    notes: list[str] = []
    best: dict[str, float] = {}
    curves: dict[str, list[tuple[float, float]]] = {}
    for s in matmul:
        best[s.dtype] = max(best.get(s.dtype, 0.0), s.flops_per_s)
    for s in sorted(matmul, key=lambda s: s.flops):
        curves.setdefault(s.dtype, []).append((s.flops, s.flops_per_s / best[s.dtype]))
    table = dict(base.peak_flops)
    efficiency = base.matmul_efficiency
    if best:
        listed = [d for d in _REFERENCE_ORDER if d in best and d in table]
        if listed:
            ref = listed[0]
            efficiency = min(1.0, best[ref] / table[ref])
            if efficiency == 1.0:
                notes.append(
                    f"matmul {ref} reached {best[ref]:.3g} FLOP/s, above the preset peak: peak raised"
                )
        else:
            efficiency = 1.0
            notes.append("no measured dtype is in the base preset: peaks are the best achieved rates")
        for dtype, rate in best.items():
            table[dtype] = rate / efficiency
        kept = [d for d in table if d not in best]
        if kept:
            notes.append(
                f"peak FLOP/s of {', '.join(kept)} not measured: base peaks kept (at the fitted matmul "
                "efficiency)"
            )
    else:
        notes.append("no matmul measured: peak FLOP/s and matmul efficiency kept from the base preset")
    hbm, memory_efficiency = base.hbm_bandwidth, base.memory_efficiency
    copy_best = max((s.bandwidth for s in copy), default=None)
    if copy_best is None:
        notes.append("no copy measured: HBM bandwidth kept from the base preset")
    else:
        memory_efficiency = min(1.0, copy_best / hbm)
        hbm = copy_best / memory_efficiency
        if memory_efficiency == 1.0:
            notes.append(f"copy reached {copy_best:.3g} B/s, above the preset HBM bandwidth: peak raised")
    device = DeviceSpec(
        name=name or base.name,
        peak_flops=table,  # type: ignore[arg-type]
        hbm_bandwidth=hbm,
        hbm_capacity=base.hbm_capacity,
        matmul_efficiency=efficiency,
        memory_efficiency=memory_efficiency,
    )
    copy_curve = tuple(
        (float(s.nbytes), s.bandwidth / copy_best) for s in sorted(copy, key=lambda s: s.nbytes)
    )
    return DeviceFit(
        device=device,
        achieved=tuple((d, best[d]) for d in DTYPES if d in best),
        matmul_curves=tuple((d, tuple(curves[d])) for d in DTYPES if d in curves),
        copy_bandwidth=copy_best,
        copy_curve=copy_curve,
        notes=tuple(notes),
    )


# ------------------------------------------------------------------------------------- calibration


@dataclasses.dataclass(frozen=True, slots=True)
class Calibration:
    """A calibrated preset with everything it came from.

    Attributes:
      base: the preset it started from.
      hardware: the calibrated preset.
      measurements: the timings.
      mesh: the mesh measured, its links laid out on the base hardware.
      device: the device fit.
      axes: per measured mesh axis, its own link fit (for reports; None when it could not be fitted).
      links: per link kind, the fit over every axis of that kind (None: not measured, base kept).
      notes: every fallback taken.
    """

    base: Hardware
    hardware: Hardware
    measurements: Measurements
    mesh: MeshShape
    device: DeviceFit
    axes: tuple[tuple[str, LinkFit | None], ...]
    links: tuple[tuple[LinkKind, LinkFit | None], ...]
    notes: tuple[str, ...]


def fit(base: Hardware, measurements: Measurements, *, name: str | None = None) -> Calibration:
    """Fits a new Hardware to `measurements`, keeping from `base` what was not measured.

    Args:
      base: the preset to start from (its links stand in for unmeasured link kinds and for fits
        that come out non-positive).
      measurements: the timings (`measure`).
      name: the new preset's name (default: '<base>-calibrated').
    """
    m = measurements
    mesh = MeshShape(m.mesh.axes, m.mesh.shape, layout_links(m.mesh, base.devices_per_node))
    notes: list[str] = list(m.notes)
    if m.platform == "cpu":
        notes.append(
            "measured on CPU devices sharing one host: the figures describe this host (a test of the "
            "mechanism), not the base preset's device"
        )
    device = fit_device(base.device, m.matmul, m.copy, name=m.device_kind or base.device.name)
    notes += device.notes
    by_axis: dict[str, list[CollectiveSample]] = {}
    for s in m.collectives:
        by_axis.setdefault(s.axis, []).append(s)
    for axis, samples in by_axis.items():
        gone = sorted({s.kind.value for s in samples if s.compiled_ops == 0})
        if gone:
            by_axis[axis] = [s for s in samples if s.compiled_ops != 0]
            notes.append(f"axis {axis}: XLA compiled away the {', '.join(gone)} benchmarks: not fitted")
    axes: list[tuple[str, LinkFit | None]] = []
    for axis, samples in by_axis.items():
        base_link = base.link(mesh.links[mesh.axes.index(axis)])
        try:
            axes.append((axis, fit_link(samples, base_link)))
        except CalibrationError as e:
            axes.append((axis, None))
            notes.append(f"axis {axis}: {e}")
    links: list[tuple[LinkKind, LinkFit | None]] = []
    new_links = {}
    for kind in LinkKind:
        names = [a for a, k in zip(mesh.axes, mesh.links, strict=True) if k is kind and a in by_axis]
        samples = [s for a in names for s in by_axis[a]]
        result: LinkFit | None = None
        if samples:
            try:
                result = fit_link(samples, base.link(kind))
                notes += [f"{kind.value} link: {n}" for n in result.notes]
            except CalibrationError as e:
                notes.append(f"{kind.value} link: {e}")
        else:
            notes.append(f"no {kind.value} axis measured: {kind.value} link kept from the base preset")
        links.append((kind, result))
        new_links[kind] = result.link() if result else base.link(kind)
    hardware = Hardware(
        name=name or f"{base.name}-calibrated",
        device=_rounded_device(device.device, base.device),
        intra_node=_rounded_link(new_links[LinkKind.INTRA_NODE], base.intra_node),
        inter_node=_rounded_link(new_links[LinkKind.INTER_NODE], base.inter_node),
        devices_per_node=base.devices_per_node,
        nodes=base.nodes,
        source=_source(base, m, mesh, links, notes),
    )
    return Calibration(base, hardware, m, mesh, device, tuple(axes), tuple(links), tuple(notes))


def _tidy(x: float, base: float | None = None) -> float:
    """A fitted `x` to 4 significant digits (timings are not more precise, and the file stays
    readable); a value taken unchanged from the base preset stays as it was."""
    return x if x == base else float(f"{x:.4g}")


def _rounded_device(d: DeviceSpec, base: DeviceSpec) -> DeviceSpec:
    peaks = dict(base.peak_flops)
    return dataclasses.replace(
        d,
        peak_flops=tuple((k, _tidy(v, peaks.get(k))) for k, v in d.peak_flops),
        hbm_bandwidth=_tidy(d.hbm_bandwidth, base.hbm_bandwidth),
        matmul_efficiency=_tidy(d.matmul_efficiency, base.matmul_efficiency),
        memory_efficiency=_tidy(d.memory_efficiency, base.memory_efficiency),
    )


def _rounded_link(link: LinkSpec, base: LinkSpec) -> LinkSpec:
    if link == base:
        return base
    curve = tuple((float(round(b)), float(f"{f:.3g}")) for b, f in link.efficiency)
    return LinkSpec(_tidy(link.bandwidth), _tidy(link.latency), curve)


def _source(
    base: Hardware,
    m: Measurements,
    mesh: MeshShape,
    links: Sequence[tuple[LinkKind, LinkFit | None]],
    notes: Sequence[str],
) -> str:
    axes = ", ".join(f"{a}={n} {k.value}" for a, n, k in zip(mesh.axes, mesh.shape, mesh.links, strict=True))
    fitted = ["matmul FLOP/s (" + ", ".join(sorted({s.dtype for s in m.matmul})) + ")"] if m.matmul else []
    fitted += ["HBM bandwidth"] if m.copy else []
    fitted += [f"{k.value} link" for k, f in links if f is not None]
    parts = [
        f"measured by auto-partition calibrate on host {m.host} at {m.when}",
        f"jax {m.jax_version}, jaxlib {m.jaxlib_version}, platform {m.platform}, "
        f"{m.device_count} x {m.device_kind!r}",
        f"mesh {axes}",
        f"base preset {base.name}",
        "fitted: " + (", ".join(fitted) or "nothing"),
        "kept from the base: HBM capacity, devices per node, nodes",
        *notes,
    ]
    return "; ".join(parts)


@dataclasses.dataclass(frozen=True, slots=True)
class Row:
    """One quantity of a calibration report: measured, the base preset's figure, the new preset's.

    Attributes:
      quantity: e.g. 'matmul bfloat16', 'HBM copy', 'axis model (n=4, intra_node) bandwidth'.
      unit: 'FLOP/s', 'B/s' or 's'.
      measured: the measurement (the best rate achieved, or the per-axis fit).
      preset: the base preset's effective figure (peak × efficiency); None when it lists none.
      calibrated: the new preset's effective figure.
      note: how it was measured or fitted.
    """

    quantity: str
    unit: str
    measured: float
    preset: float | None
    calibrated: float
    note: str = ""


def comparison(cal: Calibration) -> tuple[Row, ...]:
    """Measured against preset figures, per matmul dtype, for the copy and per mesh axis."""
    base, new, m = cal.base.device, cal.hardware.device, cal.measurements
    rows = []
    for dtype, rate in cal.device.achieved:
        listed = dict(base.peak_flops)
        sizes = [s for s in m.matmul if s.dtype == dtype]
        best = max(sizes, key=lambda s: s.flops_per_s)
        rows.append(
            Row(
                f"matmul {dtype}",
                "FLOP/s",
                rate,
                listed[dtype] * base.matmul_efficiency if dtype in listed else None,
                new.matmul_flops(dtype),
                f"best of {len(sizes)} sizes, at {best.m}x{best.k}x{best.n}",
            )
        )
    if cal.device.copy_bandwidth is not None:
        best_copy = max(m.copy, key=lambda s: s.bandwidth)
        rows.append(
            Row(
                "HBM copy",
                "B/s",
                cal.device.copy_bandwidth,
                base.memory_bandwidth,
                new.memory_bandwidth,
                f"read+write, best of {len(m.copy)} sizes, at {best_copy.nbytes / 2**20:g} MiB",
            )
        )
    mesh = cal.mesh
    for axis, result in cal.axes:
        if result is None:
            continue
        kind = mesh.links[mesh.axes.index(axis)]
        old, link = cal.base.link(kind), cal.hardware.link(kind)
        label = f"axis {axis} (n={mesh.axis_size(axis)}, {kind.value})"
        fit_note = f"fit ±{result.residual:.0%} over {result.samples} timings"
        if result.rejected:
            fit_note += f", {result.rejected} outliers dropped"
        rows.append(
            Row(f"{label} bandwidth", "B/s", result.bandwidth, old.bandwidth, link.bandwidth, fit_note)
        )
        rows.append(Row(f"{label} latency", "s", result.latency, old.latency, link.latency, "per ring step"))
    return tuple(rows)


def calibrate(
    base: Hardware,
    mesh: MeshShape | None = None,
    benchmarks: Benchmarks | None = None,
    *,
    quick: bool = False,
    name: str | None = None,
) -> Hardware:
    """Measures the local devices and returns `base` refitted to them (see `measure`, `fit`).

    Args:
      base: the preset to start from; its devices_per_node lays out the mesh's links (an axis
        marked `:inter` in the mesh is fitted into the inter-node link).
      mesh: the mesh for the collectives (default: all local devices on one axis).
      benchmarks: what to measure (default: `Benchmarks.for_platform`).
      quick: with the default benchmarks, the quick set.
      name: the new preset's name (default: '<base>-calibrated').
    """
    m = measure(mesh, benchmarks, quick=quick)
    return fit(base, m, name=name).hardware


def save_calibration(cal: Calibration, path: str | os.PathLike[str]) -> None:
    """Writes the calibrated preset (readable by `load_hardware`), its raw timings as comments."""
    save_hardware(cal.hardware, path)
    m = cal.measurements
    lines = ["", "# Timings (median seconds per call) this preset was fitted to:"]
    lines += [
        f"#   matmul {s.dtype} {s.m}x{s.k}x{s.n}: {s.seconds:.4g} s, {s.flops_per_s:.4g} FLOP/s"
        for s in m.matmul
    ]
    lines += [f"#   copy {s.nbytes} B: {s.seconds:.4g} s, {s.bandwidth:.4g} B/s" for s in m.copy]
    lines += [
        f"#   {s.kind.value} over {s.axis} (n={s.n}) {s.size_bytes} B: {s.seconds:.4g} s"
        for s in m.collectives
    ]
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


__all__ = [
    "Benchmarks",
    "Calibration",
    "CalibrationError",
    "CollectiveSample",
    "CopySample",
    "DeviceFit",
    "LinkFit",
    "MatmulSample",
    "Measurements",
    "Row",
    "calibrate",
    "comparison",
    "fit",
    "fit_device",
    "fit_link",
    "measure",
    "measure_collectives",
    "measure_copy",
    "measure_matmul",
    "save_calibration",
]

"""Microbenchmarks on the local devices: matmuls, an HBM copy and each collective over each mesh axis, timed with jax."""

from __future__ import annotations

import dataclasses
import datetime
import functools
import math
import re
import socket
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from cost_model.hardware import DTYPES
from ir.comm import CollectiveKind
from ir.sharding import LinkKind, MeshShape


class CalibrationError(ValueError):
    """Measurements that cannot be taken, or timings that cannot be fitted.

    Attributes:
      what: the quantity at fault, e.g. 'link intra_node' or 'matmul dtype float64'.
    """

    def __init__(self, problem: str, *, what: str = ""):
        super().__init__(problem)
        self.what = what


# Matmul dtypes a benchmark can run, as (array dtype, dot precision, accumulator dtype). `float32` is
# true float32 arithmetic (HIGHEST precision); `tf32` is a float32 dot at DEFAULT precision, the rate
# the simulator charges float32 matmuls at (tensor-core TF32 on NVIDIA GPUs, plain float32 on CPU).
_MATMUL_DTYPES: dict[str, tuple[str, str, str | None]] = {
    "float32": ("float32", "highest", None),
    "tf32": ("float32", "default", None),
    "bfloat16": ("bfloat16", "default", None),
    "float16": ("float16", "default", None),
    "float8": ("float8_e4m3fn", "default", "bfloat16"),
    "int8": ("int8", "default", "int32"),
}
_KINDS = (
    CollectiveKind.ALL_REDUCE,
    CollectiveKind.ALL_GATHER,
    CollectiveKind.REDUCE_SCATTER,
    CollectiveKind.ALL_TO_ALL,
)


# ------------------------------------------------------------------------------------------ plans


@dataclasses.dataclass(frozen=True, slots=True)
class Benchmarks:
    """What to measure, and how often.

    Attributes:
      matmul_sizes: (m, k, n) per matmul: [m, k] @ [k, n].
      matmul_dtypes: keys of the peak FLOP/s table to measure (see `_MATMUL_DTYPES`).
      copy_sizes: array sizes for the HBM copy, bytes (each run reads and writes this much).
      collective_sizes: S per collective, bytes, as `ir.comm.Collective.bytes` defines it (the
        full buffer: gathered for all-gather, unscattered for reduce-scatter).
      collective_kinds: the collectives to run over each mesh axis.
      warmup: untimed runs after compiling.
      repeats: timed runs; the median counts.
      chain: calls per timed run: matmuls and copies dispatched back to back, collectives chained
        inside one compiled program (so per-call dispatch does not count as link latency).
    """

    matmul_sizes: tuple[tuple[int, int, int], ...]
    matmul_dtypes: tuple[str, ...]
    copy_sizes: tuple[int, ...]
    collective_sizes: tuple[int, ...]
    collective_kinds: tuple[CollectiveKind, ...] = _KINDS
    warmup: int = 1
    repeats: int = 5
    chain: int = 4

    def __post_init__(self):
        for key in self.matmul_dtypes:
            _matmul_dtype(key)
        for field, least in (("warmup", 0), ("repeats", 1), ("chain", 1)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise CalibrationError(
                    f"Benchmarks.{field} is {value!r}; it must be a whole number >= {least}.", what=field
                )

    @classmethod
    def for_platform(cls, platform: str, *, quick: bool = False) -> Benchmarks:
        """Default sizes: large enough on a GPU/TPU to reach peak rates; small on CPU (a mechanism test).

        Args:
          platform: jax's platform name ('gpu', 'tpu', 'cpu').
          quick: fewer and smaller sizes, fewer repeats.
        """
        if platform in ("gpu", "cuda", "rocm", "tpu"):
            squares = (2048, 4096) if quick else (1024, 2048, 4096, 8192)
            return cls(
                matmul_sizes=(*((s, s, s) for s in squares), (16384, 8192, 4096)),
                matmul_dtypes=("bfloat16", "tf32") if quick else ("bfloat16", "float16", "tf32", "float32"),
                copy_sizes=(2**28, 2**30) if quick else (2**26, 2**28, 2**30, 2**32),
                collective_sizes=tuple(2**e for e in range(10, 31, 4 if quick else 2)),
                repeats=5 if quick else 10,
                chain=4 if quick else 8,
            )
        if quick:
            return cls(
                matmul_sizes=((128, 128, 128), (256, 256, 256), (512, 128, 256)),
                matmul_dtypes=("tf32", "bfloat16"),
                copy_sizes=(2**22, 2**24),
                collective_sizes=(2**12, 2**16, 2**20),
                repeats=3,
                chain=2,
            )
        return cls(
            matmul_sizes=((256, 256, 256), (512, 512, 512), (1024, 256, 512)),
            matmul_dtypes=("float32", "tf32", "bfloat16"),
            copy_sizes=(2**24, 2**26),
            collective_sizes=tuple(2**e for e in range(12, 23, 2)),
        )


def _matmul_dtype(key: str) -> tuple[str, str, str | None]:
    if key not in _MATMUL_DTYPES:
        raise CalibrationError(
            f"cannot benchmark matmuls in {key!r}; choose from {', '.join(_MATMUL_DTYPES)} "
            f"(peak FLOP/s keys: {', '.join(DTYPES)}).",
            what=f"matmul dtype {key}",
        )
    return _MATMUL_DTYPES[key]


# ---------------------------------------------------------------------------------------- samples


@dataclasses.dataclass(frozen=True, slots=True)
class MatmulSample:
    """One timed matmul [m, k] @ [k, n] on one device.

    Attributes:
      dtype: the peak FLOP/s key it measures ('bfloat16', 'tf32', ...).
      m, k, n: the shape.
      seconds: median time per matmul.
    """

    dtype: str
    m: int
    k: int
    n: int
    seconds: float

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.k * self.n

    @property
    def flops_per_s(self) -> float:
        return self.flops / self.seconds


@dataclasses.dataclass(frozen=True, slots=True)
class CopySample:
    """One timed elementwise pass over an array (read once, written once).

    Attributes:
      nbytes: the array size, bytes.
      seconds: median time per pass.
    """

    nbytes: int
    seconds: float

    @property
    def bandwidth(self) -> float:
        """Bytes read plus bytes written, per second."""
        return 2.0 * self.nbytes / self.seconds


@dataclasses.dataclass(frozen=True, slots=True)
class CollectiveSample:
    """One timed collective over one mesh axis.

    Attributes:
      kind: the collective.
      axis: the mesh axis.
      n: devices in each group (the axis size).
      size_bytes: S, bytes, as `ir.comm.Collective.bytes` defines it.
      seconds: median time per collective.
      compiled_ops: ops of this kind in the compiled program (None: not checked). XLA may
        rewrite collectives; 0 means it removed them and the timing measured nothing.
    """

    kind: CollectiveKind
    axis: str
    n: int
    size_bytes: int
    seconds: float
    compiled_ops: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Measurements:
    """Everything measured, and where and when.

    Attributes:
      host: the host name.
      when: the start, UTC, ISO 8601 to the second.
      jax_version, jaxlib_version: the software measured with.
      platform: jax's platform ('cpu', 'gpu', 'tpu').
      device_kind: jax's device kind, e.g. 'NVIDIA H100 80GB HBM3'.
      device_count: local devices.
      mesh: the mesh the collectives ran on (links as marked; `fit` lays them out on the hardware).
      matmul, copy, collectives: the samples.
      notes: what could not be measured, and why.
    """

    host: str
    when: str
    jax_version: str
    jaxlib_version: str
    platform: str
    device_kind: str
    device_count: int
    mesh: MeshShape
    matmul: tuple[MatmulSample, ...]
    copy: tuple[CopySample, ...]
    collectives: tuple[CollectiveSample, ...]
    notes: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------ timing


def _seconds(fn: Callable[..., Any], args: Sequence[Any], *, warmup: int, repeats: int, batch: int) -> float:
    """Median seconds of `batch` back-to-back calls of `fn(*args)`, divided by `batch`."""
    import jax

    jax.block_until_ready(fn(*args))  # compiles, unless already compiled
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = None
        for _ in range(batch):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / batch)
    return statistics.median(times)


def _triple(size: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(size, int):
        return (size, size, size)
    m, k, n = size
    return (int(m), int(k), int(n))


def measure_matmul(
    sizes: Iterable[int | Sequence[int]],
    dtypes: Iterable[str],
    *,
    device: Any = None,
    warmup: int = 1,
    repeats: int = 5,
    batch: int = 4,
) -> tuple[MatmulSample, ...]:
    """Times jit'd matmuls [m, k] @ [k, n] on one device.

    Args:
      sizes: n for an n×n×n matmul, or (m, k, n).
      dtypes: peak FLOP/s keys ('bfloat16', 'tf32', 'float32', 'float16', 'float8', 'int8').
      device: the device (default: the first local one).
      warmup: untimed runs after compiling.
      repeats: timed runs; the median counts.
      batch: matmuls dispatched back to back per timed run.

    Returns:
      One sample per (dtype, size), dtypes outermost.
    """
    import jax
    import jax.numpy as jnp

    device = device or jax.devices()[0]
    samples = []
    for key in dtypes:
        dtype, precision, accumulate = _matmul_dtype(key)
        prec = jax.lax.Precision.HIGHEST if precision == "highest" else jax.lax.Precision.DEFAULT
        out_type = jnp.dtype(accumulate) if accumulate else None
        fn = jax.jit(lambda a, b, p=prec, o=out_type: jnp.matmul(a, b, precision=p, preferred_element_type=o))
        for size in sizes:
            m, k, n = _triple(size)
            a = _random((m, k), dtype, device, seed=0)
            b = _random((k, n), dtype, device, seed=1)
            seconds = _seconds(fn, (a, b), warmup=warmup, repeats=repeats, batch=batch)
            samples.append(MatmulSample(key, m, k, n, seconds))
    return tuple(samples)


def _random(shape: tuple[int, int], dtype: str, device: Any, seed: int) -> Any:
    """Random values (made on the host: compiling a device RNG costs more than it saves), scaled so
    that products stay finite, on `device`."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    if jnp.issubdtype(jnp.dtype(dtype), jnp.integer):
        values = rng.integers(-8, 8, size=shape, dtype=np.int8)
    else:
        values = rng.standard_normal(shape, dtype=np.float32) / np.float32(math.sqrt(shape[-1]))
    return jax.device_put(values.astype(jnp.dtype(dtype)), device)


def measure_copy(
    sizes: Iterable[int], *, device: Any = None, warmup: int = 1, repeats: int = 5, batch: int = 4
) -> tuple[CopySample, ...]:
    """Times a jit'd `x + 1` over float32 arrays of `sizes` bytes on one device (HBM bandwidth).

    Args:
      sizes: array sizes, bytes (rounded down to whole float32 elements).
      device: the device (default: the first local one).
      warmup: untimed runs after compiling.
      repeats: timed runs; the median counts.
      batch: passes dispatched back to back per timed run.
    """
    import jax

    device = device or jax.devices()[0]
    fn = jax.jit(lambda x: x + 1)
    samples = []
    for size in sizes:
        count = max(1, int(size) // 4)
        x = _zeros(count, jax.sharding.SingleDeviceSharding(device))
        samples.append(CopySample(4 * count, _seconds(fn, (x,), warmup=warmup, repeats=repeats, batch=batch)))
    return tuple(samples)


def _zeros(count: int, sharding: Any) -> Any:
    """A float32 zeros array of `count` elements made in place with `sharding` (nothing sent from the host)."""
    import jax
    import jax.numpy as jnp

    return jax.jit(functools.partial(jnp.zeros, (count,), jnp.float32), out_shardings=sharding)()


def _collective_body(kind: CollectiveKind, axis: str, n: int, chain: int) -> Callable[[Any], Any]:
    """A per-device function running `chain` dependent collectives of `kind` over `axis`."""
    from jax import lax

    def body(x):
        length = x.shape[0]
        for _ in range(chain):
            if kind is CollectiveKind.ALL_REDUCE:
                x = lax.psum(x, axis)
            elif kind is CollectiveKind.ALL_GATHER:
                x = lax.all_gather(x, axis, tiled=True)[:length]
            elif kind is CollectiveKind.REDUCE_SCATTER:
                x = lax.dynamic_update_slice(x, lax.psum_scatter(x, axis, tiled=True), (0,))
            elif kind is CollectiveKind.ALL_TO_ALL:
                x = lax.all_to_all(x, axis, 0, 0, tiled=True)
            else:
                x = lax.ppermute(x, axis, [(i, (i + 1) % n) for i in range(n)])
        return x

    return body


def _check_devices(mesh: MeshShape, devices: Sequence[Any]) -> None:
    if len(devices) < mesh.size:
        raise CalibrationError(
            f"mesh {mesh} needs {mesh.size} devices but {len(devices)} are available; use a mesh whose "
            f"sizes multiply to at most {len(devices)}, or on CPU set XLA_FLAGS=--xla_force_host_platform_"
            f"device_count={mesh.size} before JAX starts.",
            what="mesh",
        )


def measure_collectives(
    mesh: MeshShape,
    sizes: Iterable[int],
    kinds: Iterable[CollectiveKind] = _KINDS,
    *,
    devices: Sequence[Any] | None = None,
    warmup: int = 1,
    repeats: int = 5,
    chain: int = 4,
) -> tuple[CollectiveSample, ...]:
    """Times each collective over each mesh axis (of size > 1) with shard_map, at several sizes.

    Every device holds its own float32 buffer; a compiled program runs `chain` collectives in a
    data-dependent chain (all-gather keeps a slice, reduce-scatter writes its piece back), and the
    time per collective is the median run over `chain`.

    Args:
      mesh: the mesh; it runs on the first `mesh.size` devices, row-major.
      sizes: S per collective, bytes, as `ir.comm.Collective.bytes` defines it; rounded down so
        every piece holds whole float32 elements.
      kinds: the collectives.
      devices: the devices (default: all local ones).
      warmup: untimed runs after compiling.
      repeats: timed runs; the median counts.
      chain: collectives per compiled program.

    Raises:
      CalibrationError: fewer devices than the mesh needs.
    """
    import jax
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    devices = list(devices if devices is not None else jax.devices())
    _check_devices(mesh, devices)
    grid = np.array(devices[: mesh.size], dtype=object).reshape(mesh.shape)
    jmesh = jax.sharding.Mesh(grid, mesh.axes, axis_types=(AxisType.Auto,) * len(mesh.axes))
    spec = PartitionSpec(tuple(mesh.axes))
    sharding = NamedSharding(jmesh, spec)
    samples = []
    for axis, n in zip(mesh.axes, mesh.shape, strict=True):
        if n == 1:
            continue
        for kind in kinds:
            body = _collective_body(kind, axis, n, chain)
            fn = jax.jit(jax.shard_map(body, mesh=jmesh, in_specs=spec, out_specs=spec, check_vma=False))
            for size in sizes:
                # Elements per device: a multiple of n so pieces split evenly; all-gather starts from S/n.
                elements = max(n, (int(size) // 4) // n * n)
                local = elements // n if kind is CollectiveKind.ALL_GATHER else elements
                x = _zeros(local * mesh.size, sharding)
                compiled = fn.lower(x).compile()
                ops = len(re.findall(rf" {kind.value}(?:-start)?\(", compiled.as_text()))
                seconds = _seconds(compiled, (x,), warmup=warmup, repeats=repeats, batch=1) / chain
                samples.append(CollectiveSample(kind, axis, n, 4 * elements, seconds, ops))
    return tuple(samples)


def measure(
    mesh: MeshShape | None = None, benchmarks: Benchmarks | None = None, *, quick: bool = False
) -> Measurements:
    """Runs every microbenchmark on the local devices and records where and when.

    Args:
      mesh: the mesh for the collectives (default: all local devices on one axis 'devices').
      benchmarks: what to measure (default: `Benchmarks.for_platform`).
      quick: with the default benchmarks, the quick set.
    """
    import jax
    import jaxlib

    devices = jax.devices()
    mesh = mesh or MeshShape(("devices",), (len(devices),), (LinkKind.INTRA_NODE,))
    _check_devices(mesh, devices)  # before spending time on the other benchmarks
    platform = devices[0].platform
    plan = benchmarks or Benchmarks.for_platform(platform, quick=quick)
    timing = {"warmup": plan.warmup, "repeats": plan.repeats}
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    notes = []
    if all(n == 1 for n in mesh.shape):
        notes.append(f"mesh {mesh} has no axis of 2 or more devices: no collectives measured")
    return Measurements(
        host=socket.gethostname(),
        when=when,
        jax_version=jax.__version__,
        jaxlib_version=jaxlib.__version__,
        platform=platform,
        device_kind=devices[0].device_kind,
        device_count=len(devices),
        mesh=mesh,
        matmul=measure_matmul(plan.matmul_sizes, plan.matmul_dtypes, batch=plan.chain, **timing),
        copy=measure_copy(plan.copy_sizes, batch=plan.chain, **timing),
        collectives=measure_collectives(
            mesh, plan.collective_sizes, plan.collective_kinds, chain=plan.chain, **timing
        ),
        notes=tuple(notes),
    )

"""Hardware specs: device rates, intra- and inter-node links, node layout; read from YAML presets."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import itertools
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from ir.sharding import LinkKind

# Arithmetic the peak FLOP/s table may name. `float32` is true float32 arithmetic; `tf32` is the
# NVIDIA tensor-core rate that XLA uses for float32 dots at default precision; `float8` covers every
# float8 variant (e4m3fn, e5m2, ...).
DTYPES = ("float64", "float32", "tf32", "bfloat16", "float16", "float8", "int8")


class HardwareError(ValueError):
    """A hardware or mesh description that cannot be used.

    Attributes:
      source: the file it came from ('' when built in code).
      field: the dotted field at fault, e.g. 'intra_node.bandwidth' ('' when none).
      problem: what is wrong and how to fix it, without the file name.
    """

    def __init__(self, problem: str, *, source: str = "", field: str = ""):
        super().__init__(f"{source}: {problem}" if source else problem)
        self.source = source
        self.field = field
        self.problem = problem

    def at(self, source: str) -> HardwareError:
        """The same error, attributed to `source` (a file name)."""
        return HardwareError(self.problem, source=source, field=self.field)


# Per numeric field: its unit and an example value, for messages.
_UNITS: dict[str, tuple[str, str]] = {
    "peak_flops": ("FLOP/s", "9.894e+14"),
    "hbm_bandwidth": ("bytes/s", "3.35e+12"),
    "hbm_capacity": ("bytes", "8.0e+10"),
    "bandwidth": ("bytes/s per direction per device", "4.5e+11"),
    "latency": ("seconds per ring step", "1.0e-06"),
    "matmul_efficiency": ("a fraction of peak in (0, 1]", "0.8"),
    "memory_efficiency": ("a fraction of peak in (0, 1]", "0.9"),
    "devices_per_node": ("devices", "8"),
    "nodes": ("nodes", "1"),
}


def _leaf(field: str) -> str:
    return field.rsplit(".", 1)[-1]


def _unit(field: str) -> tuple[str, str]:
    parts = field.split(".")
    for part in reversed(parts):
        if part in _UNITS:
            return _UNITS[part]
    return ("", "1")


def _check_positive(value: Any, field: str) -> float:
    """`value` as a float when it is a finite number > 0; else HardwareError naming `field`."""
    unit, example = _unit(field)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise HardwareError(
            f"{field} is {value!r}; write a number of {unit}, e.g. {_leaf(field)}: {example}", field=field
        )
    if not math.isfinite(value) or value <= 0:
        raise HardwareError(
            f"{field} is {value:g}; it must be a positive number of {unit}, e.g. {_leaf(field)}: {example}",
            field=field,
        )
    return float(value)


def _check_fraction(value: Any, field: str) -> float:
    value = _check_positive(value, field)
    if value > 1:
        raise HardwareError(
            f"{field} is {value:g}; it must be a fraction of peak in (0, 1], e.g. {_leaf(field)}: 0.8",
            field=field,
        )
    return value


def _check_count(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HardwareError(
            f"{field} is {value!r}; it must be a whole number >= 1, e.g. {_leaf(field)}: {_unit(field)[1]}",
            field=field,
        )
    return value


def _check_dtype(dtype: str, field: str) -> str:
    if dtype not in DTYPES:
        close = difflib.get_close_matches(str(dtype), DTYPES, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        where = f"{field} has unknown" if field else "unknown"
        raise HardwareError(f"{where} dtype {dtype!r}; {hint}Known dtypes: {', '.join(DTYPES)}.", field=field)
    return dtype


def normalize_dtype(dtype: Any) -> str:
    """The DTYPES key for a JAX/NumPy dtype or its name: 'float8_e4m3fn' → 'float8'."""
    name = str(getattr(dtype, "name", dtype))
    return "float8" if name.startswith("float8") else name


# ------------------------------------------------------------------------------------------- values


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceSpec:
    """One accelerator: its peak arithmetic rates and its HBM.

    Attributes:
      name: a readable name, e.g. 'NVIDIA H100 SXM5 80GB'.
      peak_flops: dense peak FLOP/s per dtype (keys from DTYPES), as (dtype, FLOP/s) pairs in
        DTYPES order; a mapping is accepted and converted.
      hbm_bandwidth: peak HBM bandwidth, bytes/s.
      hbm_capacity: HBM capacity, bytes.
      matmul_efficiency: the fraction of peak FLOP/s that matmuls reach, in (0, 1]; calibration fits it.
      memory_efficiency: the fraction of peak HBM bandwidth that copies reach, in (0, 1].
    """

    name: str
    peak_flops: tuple[tuple[str, float], ...]
    hbm_bandwidth: float
    hbm_capacity: float
    matmul_efficiency: float = 1.0
    memory_efficiency: float = 1.0

    def __post_init__(self):
        pairs = self.peak_flops.items() if isinstance(self.peak_flops, Mapping) else self.peak_flops
        table = {
            _check_dtype(d, "device.peak_flops"): _check_positive(v, f"device.peak_flops.{d}")
            for d, v in pairs
        }
        if not table:
            raise HardwareError(
                "device.peak_flops is empty; list at least one dtype, e.g. peak_flops: {bfloat16: 9.894e+14}",
                field="device.peak_flops",
            )
        ordered = tuple((d, table[d]) for d in DTYPES if d in table)
        object.__setattr__(self, "peak_flops", ordered)
        object.__setattr__(self, "hbm_bandwidth", _check_positive(self.hbm_bandwidth, "device.hbm_bandwidth"))
        object.__setattr__(self, "hbm_capacity", _check_positive(self.hbm_capacity, "device.hbm_capacity"))
        for name in ("matmul_efficiency", "memory_efficiency"):
            object.__setattr__(self, name, _check_fraction(getattr(self, name), f"device.{name}"))

    def flops(self, dtype: Any) -> float:
        """Peak dense FLOP/s for `dtype` (a DTYPES key, or a JAX dtype such as float8_e4m3fn).

        Raises:
          HardwareError: the spec lists no rate for it.
        """
        key = _check_dtype(normalize_dtype(dtype), "")
        for d, v in self.peak_flops:
            if d == key:
                return v
        listed = ", ".join(d for d, _ in self.peak_flops)
        raise HardwareError(
            f"{self.name} lists no peak FLOP/s for {key!r} (it lists {listed}); add "
            f"device.peak_flops.{key} to the hardware file.",
            field=f"device.peak_flops.{key}",
        )

    def matmul_flops(self, dtype: Any) -> float:
        """FLOP/s a matmul reaches: peak × matmul_efficiency."""
        return self.flops(dtype) * self.matmul_efficiency

    @property
    def memory_bandwidth(self) -> float:
        """Bytes/s a copy reaches: peak HBM bandwidth × memory_efficiency."""
        return self.hbm_bandwidth * self.memory_efficiency


@dataclasses.dataclass(frozen=True, slots=True)
class LinkSpec:
    """The link the devices along one kind of mesh axis talk over.

    Attributes:
      bandwidth: bytes/s one device can send in one direction while receiving as much (the
        per-direction figure: half of a vendor's 'bidirectional' total). Ring formulas use it.
      latency: alpha, seconds per ring step.
      efficiency: the fraction of `bandwidth` reached at a message size, as (bytes, fraction)
        points with increasing sizes, interpolated linearly in log(bytes) and held flat beyond the
        ends; () means 1.0 at every size. Calibration fits it.
    """

    bandwidth: float
    latency: float
    efficiency: tuple[tuple[float, float], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "bandwidth", _check_positive(self.bandwidth, "bandwidth"))
        object.__setattr__(self, "latency", _check_positive(self.latency, "latency"))
        object.__setattr__(self, "efficiency", _check_curve(self.efficiency, "efficiency"))

    def efficiency_at(self, size_bytes: float) -> float:
        """The fraction of peak bandwidth reached by a message of `size_bytes` bytes."""
        curve = self.efficiency
        if not curve:
            return 1.0
        if size_bytes <= curve[0][0]:
            return curve[0][1]
        for (b0, f0), (b1, f1) in itertools.pairwise(curve):
            if size_bytes <= b1:
                t = (math.log(size_bytes) - math.log(b0)) / (math.log(b1) - math.log(b0))
                return f0 + t * (f1 - f0)
        return curve[-1][1]

    def effective_bandwidth(self, size_bytes: float) -> float:
        """Bytes/s per direction for a message of `size_bytes`: bandwidth × efficiency_at(size)."""
        return self.bandwidth * self.efficiency_at(size_bytes)


def _check_curve(curve: Any, field: str) -> tuple[tuple[float, float], ...]:
    fix = "write [bytes, fraction] points, e.g. efficiency: [[1.0e+6, 0.4], [1.0e+9, 0.9]]"
    if not isinstance(curve, Sequence) or isinstance(curve, str):
        raise HardwareError(f"{field} is {curve!r}; {fix}", field=field)
    points: list[tuple[float, float]] = []
    for i, point in enumerate(curve):
        ok = isinstance(point, Sequence) and not isinstance(point, str) and len(point) == 2
        if not ok or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in point):
            raise HardwareError(f"{field} point {i} is {point!r}; {fix}", field=field)
        size, fraction = float(point[0]), float(point[1])
        if not (math.isfinite(size) and size > 0):
            raise HardwareError(f"{field} point {i} has size {size:g} bytes; sizes must be > 0.", field=field)
        if not 0 < fraction <= 1:
            raise HardwareError(
                f"{field} point {i} has fraction {fraction:g}; fractions of peak must lie in (0, 1].",
                field=field,
            )
        if points and size <= points[-1][0]:
            raise HardwareError(
                f"{field} point {i} ({size:g} bytes) does not follow point {i - 1} ({points[-1][0]:g} "
                "bytes); list message sizes in increasing order.",
                field=field,
            )
        points.append((size, fraction))
    return tuple(points)


@dataclasses.dataclass(frozen=True, slots=True)
class Hardware:
    """A machine: identical devices in nodes, a fast link inside a node and a slower one across.

    Attributes:
      name: the preset or file name, e.g. 'h100'.
      device: the accelerator.
      intra_node: the link between devices of one node (NVLink, ICI).
      inter_node: the link between nodes, per device (InfiniBand, DCN).
      devices_per_node: devices in one node.
      nodes: how many nodes there are when no node count is given.
      source: provenance: the datasheets the figures come from, or where and when they were measured.
    """

    name: str
    device: DeviceSpec
    intra_node: LinkSpec
    inter_node: LinkSpec
    devices_per_node: int
    nodes: int = 1
    source: str = ""

    def __post_init__(self):
        _check_count(self.devices_per_node, "devices_per_node")
        _check_count(self.nodes, "nodes")

    @property
    def total_devices(self) -> int:
        return self.devices_per_node * self.nodes

    def link(self, kind: LinkKind) -> LinkSpec:
        return self.intra_node if kind is LinkKind.INTRA_NODE else self.inter_node


# ------------------------------------------------------------------------------------------- files


def check_fields(
    doc: Any,
    *,
    required: Sequence[str],
    optional: Sequence[str],
    where: str,
    example: str,
    field_examples: Mapping[str, str] | None = None,
) -> Mapping[str, Any]:
    """`doc` as a mapping with all `required` and no unknown fields; else HardwareError.

    Args:
      doc: the parsed YAML value.
      required: fields that must be present.
      optional: fields that may be present.
      where: the dotted path of `doc` ('' for the top level), for messages.
      example: a one-line example of `doc`, for the message when it is not a mapping.
      field_examples: per field, an example value for the message when it is missing (numeric
        fields with a known unit need none).
    """
    label = f"section {where!r}" if where else "the file"
    if not isinstance(doc, Mapping):
        raise HardwareError(
            f"{label} must be a mapping of fields, e.g. {example}; it is {type(doc).__name__}.", field=where
        )
    valid = (*required, *optional)
    for key in doc:
        if key not in valid:
            path = f"{where}.{key}" if where else str(key)
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid fields here are {', '.join(valid)}."
            raise HardwareError(f"unknown field {path!r}; {hint}", field=path)
    for key in required:
        if key not in doc:
            path = f"{where}.{key}" if where else key
            unit, value = _unit(path)
            value = (field_examples or {}).get(key, value)
            what = f" ({unit})" if unit else ""
            under = f" under {where!r}" if where else ""
            raise HardwareError(
                f"missing field {path!r}{what}; add it{under}, e.g. {key}: {value}", field=path
            )
    return doc


def _number(value: Any) -> Any:
    """YAML 1.1 reads `450e9` (no dot, no exponent sign) as a string; take it as the number meant."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _device(doc: Any) -> DeviceSpec:
    doc = check_fields(
        doc,
        required=("peak_flops", "hbm_bandwidth", "hbm_capacity"),
        optional=("name", "matmul_efficiency", "memory_efficiency"),
        where="device",
        example="device: {peak_flops: {bfloat16: 9.894e+14}, hbm_bandwidth: 3.35e+12, hbm_capacity: 8.0e+10}",
        field_examples={"peak_flops": "{bfloat16: 9.894e+14}"},
    )
    flops = doc["peak_flops"]
    if not isinstance(flops, Mapping):
        raise HardwareError(
            f"device.peak_flops is {flops!r}; write a mapping of dtype to FLOP/s, e.g. "
            "peak_flops: {bfloat16: 9.894e+14}",
            field="device.peak_flops",
        )
    table = {}
    for dtype, value in flops.items():
        _check_dtype(dtype, "device.peak_flops")
        table[dtype] = _check_positive(_number(value), f"device.peak_flops.{dtype}")
    values = {}
    for key in ("hbm_bandwidth", "hbm_capacity"):
        values[key] = _check_positive(_number(doc[key]), f"device.{key}")
    for key in ("matmul_efficiency", "memory_efficiency"):
        values[key] = _check_fraction(_number(doc.get(key, 1.0)), f"device.{key}")
    return DeviceSpec(str(doc.get("name", "")), table, **values)  # type: ignore[arg-type]


def _link(doc: Any, where: str) -> LinkSpec:
    doc = check_fields(
        doc,
        required=("bandwidth", "latency"),
        optional=("efficiency",),
        where=where,
        example=f"{where}: {{bandwidth: 4.5e+11, latency: 1.0e-06}}",
    )
    bandwidth = _check_positive(_number(doc["bandwidth"]), f"{where}.bandwidth")
    latency = _check_positive(_number(doc["latency"]), f"{where}.latency")
    curve = doc.get("efficiency") or ()
    if isinstance(curve, Sequence) and not isinstance(curve, str):
        curve = [[_number(v) for v in p] if isinstance(p, list) else p for p in curve]
    return LinkSpec(bandwidth, latency, _check_curve(curve, f"{where}.efficiency"))


def hardware_from_dict(doc: Any, *, default_name: str = "") -> Hardware:
    """Builds Hardware from parsed YAML; raises HardwareError naming the field (not the file)."""
    doc = check_fields(
        doc,
        required=("devices_per_node", "device", "intra_node", "inter_node"),
        optional=("name", "nodes", "source"),
        where="",
        example="{name: h100, devices_per_node: 8, device: {...}, intra_node: {...}, inter_node: {...}}",
        field_examples={
            "device": "{peak_flops: {bfloat16: 9.894e+14}, hbm_bandwidth: 3.35e+12, hbm_capacity: 8.0e+10}",
            "intra_node": "{bandwidth: 4.5e+11, latency: 1.0e-06}",
            "inter_node": "{bandwidth: 5.0e+10, latency: 5.0e-06}",
        },
    )
    return Hardware(
        name=str(doc.get("name", default_name)),
        device=_device(doc["device"]),
        intra_node=_link(doc["intra_node"], "intra_node"),
        inter_node=_link(doc["inter_node"], "inter_node"),
        devices_per_node=_check_count(doc["devices_per_node"], "devices_per_node"),
        nodes=_check_count(doc.get("nodes", 1), "nodes"),
        source=str(doc.get("source", "")),
    )


def hardware_to_dict(hw: Hardware) -> dict[str, Any]:
    """Hardware as plain YAML-ready data, in the order of the preset files."""

    def link(spec: LinkSpec) -> dict[str, Any]:
        out: dict[str, Any] = {"bandwidth": spec.bandwidth, "latency": spec.latency}
        if spec.efficiency:
            out["efficiency"] = [[b, f] for b, f in spec.efficiency]
        return out

    device: dict[str, Any] = {
        "name": hw.device.name,
        "peak_flops": dict(hw.device.peak_flops),
        "hbm_bandwidth": hw.device.hbm_bandwidth,
        "hbm_capacity": hw.device.hbm_capacity,
    }
    for key in ("matmul_efficiency", "memory_efficiency"):
        if getattr(hw.device, key) != 1.0:
            device[key] = getattr(hw.device, key)
    return {
        "name": hw.name,
        "source": hw.source,
        "devices_per_node": hw.devices_per_node,
        "nodes": hw.nodes,
        "device": device,
        "intra_node": link(hw.intra_node),
        "inter_node": link(hw.inter_node),
    }


class _Dumper(yaml.SafeDumper):
    """Floats that YAML 1.1 reads back as floats (`1.0e+16`, never `1e+16`); pairs inline."""


def _represent_float(dumper: yaml.SafeDumper, value: float) -> yaml.Node:
    text = repr(value)
    if "e" in text and "." not in text.split("e")[0]:
        text = text.replace("e", ".0e")
    return dumper.represent_scalar("tag:yaml.org,2002:float", text)


def _represent_list(dumper: yaml.SafeDumper, value: list) -> yaml.Node:
    flow = all(not isinstance(v, dict | list) for v in value)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=flow)


_Dumper.add_representer(float, _represent_float)
_Dumper.add_representer(list, _represent_list)


def save_hardware(hw: Hardware, path: str | os.PathLike[str]) -> None:
    """Writes `hw` as a YAML file that `load_hardware` reads back to an equal value."""
    text = yaml.dump(hardware_to_dict(hw), Dumper=_Dumper, sort_keys=False, allow_unicode=True)
    header = f"# Hardware {hw.name!r} for auto-partition. Units: FLOP/s, bytes/s, bytes, seconds.\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(header + text)


def _config_dir(kind: str) -> Any:
    return importlib.resources.files("configs").joinpath(kind)


def presets(kind: str = "hardware") -> tuple[str, ...]:
    """Names of the presets shipped in configs/<kind> ('hardware' or 'meshes')."""
    return tuple(
        sorted(p.name[: -len(".yaml")] for p in _config_dir(kind).iterdir() if p.name.endswith(".yaml"))
    )


def read_yaml(name_or_path: str | os.PathLike[str], kind: str) -> tuple[Any, str, str]:
    """Reads a preset of configs/<kind> or a YAML file: (parsed document, source for messages, stem).

    Raises:
      HardwareError: no such preset or file, or not valid YAML.
    """
    label = {"meshes": "mesh"}.get(kind, kind)
    text_name = os.fspath(name_or_path)
    is_path = os.sep in text_name or "/" in text_name or text_name.endswith((".yaml", ".yml"))
    if is_path or os.path.exists(text_name):
        source = text_name
        try:
            with open(text_name, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise HardwareError(f"no {label} file {text_name!r}; check the path.") from None
        stem = os.path.splitext(os.path.basename(text_name))[0]
    else:
        names = presets(kind)
        if text_name not in names:
            close = difflib.get_close_matches(text_name, names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise HardwareError(
                f"unknown {label} preset {text_name!r}; {hint}Presets: {', '.join(names)}; or give the "
                "path of a YAML file."
            )
        source = f"configs/{kind}/{text_name}.yaml"
        text = _config_dir(kind).joinpath(f"{text_name}.yaml").read_text(encoding="utf-8")
        stem = text_name
    try:
        return yaml.safe_load(text), source, stem
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise HardwareError(f"not valid YAML{line} ({problem}).", source=source) from None


def load_hardware(name_or_path: str | os.PathLike[str]) -> Hardware:
    """Reads a hardware preset ('h100', 'h200', 'a100', 'tpu-v5p', 'cpu') or a YAML file.

    Raises:
      HardwareError: naming the file, the field and the fix.
    """
    doc, source, stem = read_yaml(name_or_path, "hardware")
    try:
        return hardware_from_dict(doc, default_name=stem)
    except HardwareError as e:
        raise e.at(source) from None

"""Hardware presets, hardware and mesh files, and the layout of mesh axes on nodes."""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import yaml

from cost_model.hardware import (
    DeviceSpec,
    Hardware,
    HardwareError,
    LinkSpec,
    hardware_to_dict,
    load_hardware,
    presets,
    save_hardware,
)
from cost_model.meshes import MeshFile, TopologyError, layout_links, load_mesh, topology
from ir.sharding import LinkKind, MeshShape, ShardingError

INTRA, INTER = LinkKind.INTRA_NODE, LinkKind.INTER_NODE

# ------------------------------------------------------------------------------------------ presets


def test_presets_are_shipped():
    assert presets() == ("a100", "cpu", "h100", "h200", "tpu-v5p")
    assert presets("meshes") == ("256gpu", "64gpu", "dp2_tp4", "node8")


# name: (bf16 FLOP/s, HBM B/s, HBM bytes, intra B/s, inter B/s, devices per node)
PRESET_FIGURES = {
    "h100": (989.4e12, 3.35e12, 80e9, 450e9, 50e9, 8),
    "h200": (989.4e12, 4.8e12, 141e9, 450e9, 50e9, 8),
    "a100": (312e12, 2.039e12, 80e9, 300e9, 25e9, 8),
    "tpu-v5p": (459e12, 2.765e12, 95 * 2**30, 200e9, 6.25e9, 64),
    "cpu": (50e9, 10e9, 4e9, 10e9, 1.25e9, 8),
}


@pytest.mark.parametrize("name", sorted(PRESET_FIGURES))
def test_preset_figures(name: str):
    hw = load_hardware(name)
    bf16, hbm_bw, hbm, intra, inter, dpn = PRESET_FIGURES[name]
    assert hw.name == name
    assert hw.device.flops("bfloat16") == pytest.approx(bf16)
    assert hw.device.hbm_bandwidth == pytest.approx(hbm_bw)
    assert hw.device.hbm_capacity == pytest.approx(hbm)
    assert hw.intra_node.bandwidth == pytest.approx(intra)
    assert hw.inter_node.bandwidth == pytest.approx(inter)
    assert hw.devices_per_node == dpn
    assert hw.nodes == 1
    assert hw.source


@pytest.mark.parametrize("name", ["a100", "cpu", "h100", "h200", "tpu-v5p"])
def test_every_preset_figure_has_a_comment(name: str):
    """Each numeric line carries its source (or 'assumption') in a comment on it or just above it."""
    from configs import __file__ as configs_init

    path = configs_init.replace("__init__.py", f"hardware/{name}.yaml")
    lines = open(path, encoding="utf-8").read().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"\s*\w+: [-+0-9.e]+\s*(#.*)?$", line) and not line.lstrip().startswith("nodes:"):
            above = lines[i - 1].strip() if i else ""
            assert "#" in line or above.startswith("#"), f"{name}.yaml line {i + 1} has no source: {line!r}"


def test_nvlink_per_direction_is_half_the_bidirectional_total():
    assert load_hardware("h100").intra_node.bandwidth == 900e9 / 2
    assert load_hardware("a100").intra_node.bandwidth == 600e9 / 2


def test_flops_lookup_by_jax_or_numpy_dtype():
    device = load_hardware("h100").device
    assert device.flops("float8_e4m3fn") == device.flops("float8") == pytest.approx(1978.9e12)
    assert device.flops(np.dtype("float32")) == pytest.approx(66.9e12)
    assert device.matmul_flops("bfloat16") == device.flops("bfloat16")


def test_flops_lookup_errors():
    with pytest.raises(HardwareError) as e:
        load_hardware("a100").device.flops("float8_e5m2")
    assert str(e.value) == (
        "NVIDIA A100 SXM4 80GB lists no peak FLOP/s for 'float8' (it lists float64, float32, tf32, "
        "bfloat16, float16, int8); add device.peak_flops.float8 to the hardware file."
    )
    with pytest.raises(HardwareError, match=r"^unknown dtype 'bf16'; did you mean 'bfloat16'\?"):
        load_hardware("h100").device.flops("bf16")


def test_efficiencies_scale_rates():
    device = DeviceSpec("d", {"bfloat16": 1e15}, 2e12, 8e10, matmul_efficiency=0.5, memory_efficiency=0.8)
    assert device.matmul_flops("bfloat16") == 0.5e15
    assert device.memory_bandwidth == pytest.approx(1.6e12)


# -------------------------------------------------------------------------------- efficiency curve


CURVE = LinkSpec(100e9, 1e-6, ((1e6, 0.4), (1e9, 0.9)))


@pytest.mark.parametrize(
    "size, fraction",
    [
        (0, 0.4),  # below the first point: held flat
        (1e3, 0.4),
        (1e6, 0.4),
        (math.sqrt(1e6 * 1e9), 0.65),  # halfway in log(bytes)
        (1e7, 0.4 + 0.5 / 3),  # a third of the way: log10 7 is 1/3 from 6 to 9
        (1e9, 0.9),
        (1e12, 0.9),  # above the last point: held flat
    ],
)
def test_efficiency_curve_is_log_linear(size: float, fraction: float):
    assert CURVE.efficiency_at(size) == pytest.approx(fraction)
    assert CURVE.effective_bandwidth(size) == pytest.approx(100e9 * fraction)


def test_no_curve_means_full_bandwidth():
    assert LinkSpec(1e9, 1e-6).efficiency_at(123) == 1.0


# --------------------------------------------------------------------------------------- save/load


def test_save_load_round_trip(tmp_path):
    hw = Hardware(
        name="fitted",
        device=DeviceSpec("x", {"bfloat16": 9e14, "float32": 6e13}, 3e12, 8e10, matmul_efficiency=0.7),
        intra_node=LinkSpec(4e11, 2e-6, ((1e5, 0.2), (1e16, 0.95))),
        inter_node=LinkSpec(4.5e10, 8e-6),
        devices_per_node=8,
        nodes=4,
        source="calibrated on host gpu-17 on 2025-01-01",
    )
    path = tmp_path / "fitted.yaml"
    save_hardware(hw, path)
    assert load_hardware(path) == hw
    assert "1.0e+16" in path.read_text()  # floats YAML 1.1 reads back as floats


@pytest.mark.parametrize("name", ["a100", "cpu", "h100", "h200", "tpu-v5p"])
def test_presets_round_trip(tmp_path, name: str):
    hw = load_hardware(name)
    save_hardware(hw, tmp_path / "hw.yaml")
    assert load_hardware(tmp_path / "hw.yaml") == hw


def test_numbers_yaml_reads_as_strings_are_accepted(tmp_path):
    doc = hardware_to_dict(load_hardware("h100"))
    text = yaml.safe_dump(doc).replace("450000000000.0", "450e9")
    (tmp_path / "hw.yaml").write_text(text)
    assert load_hardware(tmp_path / "hw.yaml").intra_node.bandwidth == 450e9


# ------------------------------------------------------------------------------------ bad hardware


def _set(section: str, key: str, value: Any) -> Callable[[dict], None]:
    def edit(doc: dict) -> None:
        (doc[section] if section else doc)[key] = value

    return edit


def _drop(section: str, key: str) -> Callable[[dict], None]:
    return lambda doc: (doc[section] if section else doc).pop(key)


def _rename(section: str, old: str, new: str) -> Callable[[dict], None]:
    return lambda doc: doc[section].__setitem__(new, doc[section].pop(old))


BAD_HARDWARE = [
    (
        _drop("device", "hbm_bandwidth"),
        "missing field 'device.hbm_bandwidth' (bytes/s); add it under 'device', e.g. hbm_bandwidth: 3.35e+12",
    ),
    (
        _drop("", "intra_node"),
        "missing field 'intra_node'; add it, e.g. intra_node: {bandwidth: 4.5e+11, latency: 1.0e-06}",
    ),
    (
        _drop("inter_node", "latency"),
        "missing field 'inter_node.latency' (seconds per ring step); add it under 'inter_node', "
        "e.g. latency: 1.0e-06",
    ),
    (
        _rename("device", "hbm_bandwidth", "hbm_bandwith"),
        "unknown field 'device.hbm_bandwith'; did you mean 'hbm_bandwidth'?",
    ),
    (_set("", "gpus_per_node", 8), "unknown field 'gpus_per_node'; did you mean 'devices_per_node'?"),
    (
        _set("intra_node", "bandwidth", 0),
        "intra_node.bandwidth is 0; it must be a positive number of bytes/s per direction per device, "
        "e.g. bandwidth: 4.5e+11",
    ),
    (
        _set("inter_node", "bandwidth", -5e10),
        "inter_node.bandwidth is -5e+10; it must be a positive number of bytes/s per direction per device, "
        "e.g. bandwidth: 4.5e+11",
    ),
    (
        _set("intra_node", "latency", 0),
        "intra_node.latency is 0; it must be a positive number of seconds per ring step, e.g. latency: 1.0e-06",
    ),
    (
        _set("intra_node", "bandwidth", "fast"),
        "intra_node.bandwidth is 'fast'; write a number of bytes/s per direction per device, "
        "e.g. bandwidth: 4.5e+11",
    ),
    (
        lambda doc: doc["device"]["peak_flops"].__setitem__("bfloat16", 0),
        "device.peak_flops.bfloat16 is 0; it must be a positive number of FLOP/s, e.g. bfloat16: 9.894e+14",
    ),
    (
        lambda doc: doc["device"]["peak_flops"].__setitem__("bf16", 1e15),
        "device.peak_flops has unknown dtype 'bf16'; did you mean 'bfloat16'? Known dtypes: float64, "
        "float32, tf32, bfloat16, float16, float8, int8.",
    ),
    (
        _set("device", "hbm_capacity", -1),
        "device.hbm_capacity is -1; it must be a positive number of bytes, e.g. hbm_capacity: 8.0e+10",
    ),
    (
        _set("device", "matmul_efficiency", 1.5),
        "device.matmul_efficiency is 1.5; it must be a fraction of peak in (0, 1], e.g. matmul_efficiency: 0.8",
    ),
    (
        _set("", "devices_per_node", 0),
        "devices_per_node is 0; it must be a whole number >= 1, e.g. devices_per_node: 8",
    ),
    (
        _set("intra_node", "efficiency", [[1e9, 0.5], [1e6, 0.9]]),
        "intra_node.efficiency point 1 (1e+06 bytes) does not follow point 0 (1e+09 bytes); list message "
        "sizes in increasing order.",
    ),
    (
        _set("intra_node", "efficiency", [[1e6, 1.5]]),
        "intra_node.efficiency point 0 has fraction 1.5; fractions of peak must lie in (0, 1].",
    ),
    (
        _set("", "device", 3),
        "section 'device' must be a mapping of fields, e.g. device: {peak_flops: {bfloat16: 9.894e+14}, "
        "hbm_bandwidth: 3.35e+12, hbm_capacity: 8.0e+10}; it is int.",
    ),
]


@pytest.mark.parametrize("edit, message", BAD_HARDWARE)
def test_bad_hardware_file(tmp_path, edit: Callable[[dict], None], message: str):
    doc = copy.deepcopy(hardware_to_dict(load_hardware("h100")))
    edit(doc)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(HardwareError) as e:
        load_hardware(path)
    assert str(e.value) == f"{path}: {message}"
    assert e.value.source == str(path)
    assert e.value.problem == message


def test_not_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(HardwareError) as e:
        load_hardware(path)
    assert str(e.value) == f"{path}: not valid YAML at line 2 (expected ',' or ']', but got '<stream end>')."


def test_unknown_preset_and_missing_file():
    with pytest.raises(HardwareError) as e:
        load_hardware("h10")
    assert str(e.value) == (
        "unknown hardware preset 'h10'; did you mean 'h100'? Presets: a100, cpu, h100, h200, tpu-v5p; "
        "or give the path of a YAML file."
    )
    with pytest.raises(HardwareError, match=r"^no hardware file 'nope.yaml'; check the path.$"):
        load_hardware("nope.yaml")


def test_bad_values_built_in_code():
    with pytest.raises(HardwareError, match=r"^bandwidth is 0; it must be a positive number"):
        LinkSpec(0, 1e-6)
    with pytest.raises(HardwareError, match=r"^latency is -1e-06; it must be a positive number"):
        LinkSpec(1e9, -1e-6)
    with pytest.raises(HardwareError, match=r"^device.peak_flops has unknown dtype 'fp8'"):
        DeviceSpec("d", {"fp8": 1e15}, 1e12, 1e10)
    assert issubclass(HardwareError, ValueError)


# ---------------------------------------------------------------------------------------- topology


def _hw(dpn: int = 8, nodes: int = 1) -> Hardware:
    return Hardware(
        "h100",
        DeviceSpec("d", {"bfloat16": 1e15}, 3e12, 8e10),
        LinkSpec(450e9, 1e-6),
        LinkSpec(50e9, 5e-6),
        dpn,
        nodes,
    )


# (mesh, --nodes) -> per-axis links and nodes used, on 8 devices per node
TOPOLOGY = [
    ("data=8", None, (INTRA,), 1),
    ("data=4", None, (INTRA,), 1),  # part of one node
    ("data=2,model=4", None, (INTRA, INTRA), 1),
    ("data=8", 1, (INTRA,), 1),
    ("data=2,model=8", 2, (INTER, INTRA), 2),
    ("model=8,data=2", 2, (INTER, INTRA), 2),  # data is minor: pairs of neighbours share a node
    ("data=8,model=8", 8, (INTER, INTRA), 8),
    ("data=8:inter,model=8", 8, (INTER, INTRA), 8),
    ("model=8,data=8:inter", 8, (INTRA, INTER), 8),  # a marked axis is outermost wherever written
    ("data=2:inter,model=4", None, (INTER, INTRA), 1),  # a mark wins even inside one node
    ("a=2,b=4,c=2", 2, (INTER, INTRA, INTRA), 2),
    ("data=4,fsdp=8,model=8", 32, (INTER, INTER, INTRA), 32),
    ("a=4,b=6", 3, (INTER, INTER), 3),  # b's groups straddle nodes: 6 does not divide 8
]


@pytest.mark.parametrize("mesh, nodes, links, used", TOPOLOGY)
def test_topology_rule(mesh: str, nodes: int | None, links: tuple[LinkKind, ...], used: int):
    topo = topology(_hw(), MeshShape.parse(mesh), nodes)
    assert topo.mesh.links == links
    assert topo.nodes == used
    assert layout_links(MeshShape.parse(mesh), 8) == links


def test_topology_lookups():
    topo = topology(_hw(), MeshShape.parse("data=2,model=8"), 2)
    assert (topo.bandwidth("model"), topo.latency("model")) == (450e9, 1e-6)
    assert (topo.bandwidth("data"), topo.latency("data")) == (50e9, 5e-6)
    assert topo.link_kind("data") is INTER
    assert topo.axis_links(("data", "model")) == ((2, LinkSpec(50e9, 5e-6)), (8, LinkSpec(450e9, 1e-6)))
    assert str(topo) == (
        "data=2 inter_node (50 GB/s, 5 us), model=8 intra_node (450 GB/s, 1 us) on 2 node(s) × 8 h100"
    )
    with pytest.raises(ShardingError, match="unknown mesh axis 'fsdp'"):
        topo.bandwidth("fsdp")


def test_hardware_nodes_bound_the_mesh_when_no_node_count_is_given():
    assert topology(_hw(nodes=4), MeshShape.parse("data=4,model=8"), None).nodes == 4
    assert topology(_hw(nodes=4), MeshShape.parse("data=2,model=8"), None).nodes == 2


MISMATCH = [
    (
        "data=16",
        None,
        "mesh data=16 has 16 devices but hardware h100 with --nodes 1 has 8; use --nodes 2 or a smaller mesh.",
    ),
    (
        "data=16",
        1,
        "mesh data=16 has 16 devices but hardware h100 with --nodes 1 has 8; use --nodes 2 or a smaller mesh.",
    ),
    (
        "data=8",
        2,
        "mesh data=8 has 8 devices but hardware h100 with --nodes 2 has 16; use --nodes 1 or a mesh of 16 devices.",
    ),
    (
        "data=4",
        2,
        "mesh data=4 has 4 devices but hardware h100 with --nodes 2 has 16; use a mesh of 16 devices, or "
        "leave out --nodes to use part of one node.",
    ),
    (
        "data=12",
        None,
        "mesh data=12 has 12 devices but hardware h100 with --nodes 1 has 8; use a mesh of at most 8 "
        "devices or a multiple of 8 (whole nodes).",
    ),
    (
        "data=12",
        2,
        "mesh data=12 has 12 devices but hardware h100 with --nodes 2 has 16; use a mesh of at most 8 "
        "devices or a multiple of 8 (whole nodes).",
    ),
    ("data=8", 0, "--nodes is 0; give a whole number of nodes >= 1."),
]


@pytest.mark.parametrize("mesh, nodes, message", MISMATCH)
def test_mesh_does_not_match_hardware(mesh: str, nodes: int | None, message: str):
    with pytest.raises(TopologyError) as e:
        topology(_hw(), MeshShape.parse(mesh), nodes)
    assert str(e.value) == message
    assert e.value.hardware == "h100"
    assert isinstance(e.value, HardwareError)


# -------------------------------------------------------------------------------------- mesh files


MESH_PRESETS = {
    "node8": ("data=8", 1, (INTRA,)),
    "dp2_tp4": ("data=2,model=4", 1, (INTRA, INTRA)),
    "64gpu": ("data=8,model=8", 8, (INTER, INTRA)),
    "256gpu": ("data=4,fsdp=8,model=8", 32, (INTER, INTER, INTRA)),
}


@pytest.mark.parametrize("name", sorted(MESH_PRESETS))
def test_mesh_presets(name: str):
    text, nodes, links = MESH_PRESETS[name]
    mesh_file = load_mesh(name)
    assert isinstance(mesh_file, MeshFile)
    assert str(mesh_file.mesh) == text
    assert mesh_file.nodes == nodes
    assert mesh_file.hardware == "h100"
    assert mesh_file.description
    topo = topology(load_hardware(mesh_file.hardware), mesh_file.mesh, mesh_file.nodes)
    assert topo.mesh.links == links


BAD_MESH = [
    ("axes: [data]\n", "missing field 'shape'; add it, e.g. shape: [2, 4]"),
    ("axes: [data]\nshap: [8]\n", "unknown field 'shap'; did you mean 'shape'?"),
    ("axes: [data]\nshape: 8\n", "shape is 8; write a list, e.g. shape: [2, 4]"),
    ("axes: [data]\nshape: [0]\n", "shape[0] (axis 'data') is 0; sizes must be >= 1."),
    (
        "axes: [data, model]\nshape: [2, 4]\nlinks: [inter_node]\n",
        "links has 1 entries for 2 axes; give one link kind per axis.",
    ),
    (
        "axes: [data]\nshape: [8]\nlinks: [nvlink]\n",
        "links is ['nvlink']; write intra_node or inter_node per axis, e.g. links: [inter_node, intra_node]",
    ),
    ("axes: [data]\nshape: [8]\nnodes: 0\n", "nodes is 0; it must be a whole number >= 1, e.g. nodes: 8"),
    (
        "axes: [data, model]\nshape: [8]\n",
        "mesh has 2 axis names but 1 sizes; give one size per axis, e.g. data=2,model=4.",
    ),
]


@pytest.mark.parametrize("text, message", BAD_MESH)
def test_bad_mesh_file(tmp_path, text: str, message: str):
    path = tmp_path / "mesh.yaml"
    path.write_text(text)
    with pytest.raises(HardwareError) as e:
        load_mesh(path)
    assert str(e.value) == f"{path}: {message}"


def test_unknown_mesh_preset():
    with pytest.raises(HardwareError) as e:
        load_mesh("node9")
    assert str(e.value) == (
        "unknown mesh preset 'node9'; did you mean 'node8'? Presets: 256gpu, 64gpu, dp2_tp4, node8; "
        "or give the path of a YAML file."
    )

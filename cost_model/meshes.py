"""Meshes on hardware: mesh files (configs/meshes) and the link, bandwidth and latency of each mesh axis."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable
from typing import Any

from cost_model.hardware import Hardware, HardwareError, LinkSpec, check_fields, read_yaml
from ir.sharding import LinkKind, MeshShape, ShardingError


class TopologyError(HardwareError):
    """A mesh that does not fit the hardware it is placed on.

    Attributes:
      mesh: the mesh.
      hardware: the hardware's name.
      nodes: the node count it was placed on.
    """

    def __init__(self, problem: str, *, mesh: MeshShape, hardware: str, nodes: int):
        super().__init__(problem)
        self.mesh = mesh
        self.hardware = hardware
        self.nodes = nodes


# ---------------------------------------------------------------------------------------- topology


def layout_links(mesh: MeshShape, devices_per_node: int) -> tuple[LinkKind, ...]:
    """The link kind of each mesh axis when the mesh is laid out on nodes of `devices_per_node`.

    The rule:
      1. An axis marked inter-node in `mesh.links` (`data=8:inter`) is inter-node, even where it
         would fit in a node (to model e.g. two 4-GPU hosts). Marked axes are placed outermost,
         across nodes, as `jax.experimental.mesh_utils.create_hybrid_device_mesh` places its DCN axes.
      2. The other axes are laid out row-major (the last axis varies fastest) from the first device
         of a node. If they hold at most `devices_per_node` devices in all, they share one node and
         are all intra-node. Otherwise, walking them from minor to major, an axis is intra-node when
         the product of its size and the sizes of the unmarked axes more minor than it divides
         `devices_per_node`: then every group along it lies inside one node. If not, some group
         crosses a node boundary and the axis is inter-node (the slower link bounds its ring), as
         is every axis more major.

    E.g. with 8 devices per node: data=8 → intra; data=2,model=8 → data inter, model intra;
    model=8,data=2 → model inter, data intra; data=8:inter,model=8 → data inter, model intra;
    model=8,data=8:inter → model intra, data inter.
    """
    links = list(mesh.links)
    unmarked = [i for i, kind in enumerate(links) if kind is LinkKind.INTRA_NODE]
    if math.prod(mesh.shape[i] for i in unmarked) <= devices_per_node:
        return tuple(links)
    inner = 1
    for i in reversed(unmarked):
        inner *= mesh.shape[i]
        links[i] = LinkKind.INTRA_NODE if devices_per_node % inner == 0 else LinkKind.INTER_NODE
    return tuple(links)


@dataclasses.dataclass(frozen=True, slots=True)
class MeshTopology:
    """A mesh placed on hardware: the link and its bandwidth and latency for every mesh axis.

    Attributes:
      hardware: the hardware.
      mesh: the mesh, with `links` resolved by `layout_links`.
      nodes: the nodes it occupies.
    """

    hardware: Hardware
    mesh: MeshShape
    nodes: int

    def link_kind(self, axis: str) -> LinkKind:
        self.mesh.axis_size(axis)  # raises for an unknown axis, naming the mesh's axes
        return self.mesh.links[self.mesh.axes.index(axis)]

    def link(self, axis: str) -> LinkSpec:
        return self.hardware.link(self.link_kind(axis))

    def bandwidth(self, axis: str) -> float:
        """Peak bytes/s per direction per device along `axis`."""
        return self.link(axis).bandwidth

    def latency(self, axis: str) -> float:
        """Seconds per ring step along `axis`."""
        return self.link(axis).latency

    def axis_links(self, axes: Iterable[str]) -> tuple[tuple[int, LinkSpec], ...]:
        """(size, link) for each of `axes`, in the order given."""
        return tuple((self.mesh.axis_size(a), self.link(a)) for a in axes)

    def __str__(self) -> str:
        parts = []
        for axis, size, kind in zip(self.mesh.axes, self.mesh.shape, self.mesh.links, strict=True):
            link = self.hardware.link(kind)
            parts.append(
                f"{axis}={size} {kind.value} ({link.bandwidth / 1e9:g} GB/s, {link.latency * 1e6:g} us)"
            )
        hw = self.hardware
        return f"{', '.join(parts)} on {self.nodes} node(s) × {hw.devices_per_node} {hw.name}"


def topology(hardware: Hardware, mesh: MeshShape, nodes: int | None = None) -> MeshTopology:
    """Places `mesh` on `hardware` and decides each axis's link (see `layout_links` for the rule).

    Args:
      hardware: the hardware.
      mesh: the mesh; an axis marked inter-node stays inter-node.
      nodes: the node count (`--nodes`); the mesh must then use exactly nodes × devices_per_node
        devices. None: the hardware's own `nodes`, of which the mesh may use fewer, in whole nodes
        or inside one node.

    Raises:
      TopologyError: the mesh does not match the device count.
    """
    dpn = hardware.devices_per_node
    if nodes is not None and (isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1):
        raise TopologyError(
            f"--nodes is {nodes!r}; give a whole number of nodes >= 1.",
            mesh=mesh,
            hardware=hardware.name,
            nodes=nodes if isinstance(nodes, int) else 0,
        )
    given = nodes if nodes is not None else hardware.nodes
    total = given * dpn
    size = mesh.size
    where = f"mesh {mesh} has {size} devices but hardware {hardware.name} with --nodes {given} has {total}"

    def fail(fix: str) -> TopologyError:
        return TopologyError(f"{where}; {fix}", mesh=mesh, hardware=hardware.name, nodes=given)

    whole = size % dpn == 0
    if size > total:
        raise fail(f"use --nodes {size // dpn} or a smaller mesh." if whole else _whole_nodes(dpn))
    if nodes is not None and size != total:
        if whole:
            raise fail(f"use --nodes {size // dpn} or a mesh of {total} devices.")
        if size < dpn:
            raise fail(f"use a mesh of {total} devices, or leave out --nodes to use part of one node.")
        raise fail(_whole_nodes(dpn))
    if size > dpn and not whole:
        raise fail(_whole_nodes(dpn))
    used = max(1, size // dpn)
    resolved = MeshShape(mesh.axes, mesh.shape, layout_links(mesh, dpn))
    return MeshTopology(hardware, resolved, used)


def _whole_nodes(dpn: int) -> str:
    return f"use a mesh of at most {dpn} devices or a multiple of {dpn} (whole nodes)."


# ------------------------------------------------------------------------------------------- files

_EXAMPLE = "{axes: [data, model], shape: [2, 4]}"


@dataclasses.dataclass(frozen=True, slots=True)
class MeshFile:
    """A mesh as written in a mesh file.

    Attributes:
      mesh: the mesh; `links` holds the marks written in the file (unmarked axes read intra-node
        until `topology` lays them out).
      nodes: the node count it spans (`--nodes`), or None when not given.
      hardware: the hardware preset it was written for ('' when any).
      description: a line saying what it is for.
    """

    mesh: MeshShape
    nodes: int | None = None
    hardware: str = ""
    description: str = ""


def _names(doc: Any, field: str, kind: type, example: str) -> list[Any]:
    value = doc[field]
    if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise HardwareError(f"{field} is {value!r}; write a list, e.g. {field}: {example}", field=field)
    return value


def mesh_from_dict(doc: Any) -> MeshFile:
    """Builds a MeshFile from parsed YAML; raises HardwareError naming the field (not the file)."""
    doc = check_fields(
        doc,
        required=("axes", "shape"),
        optional=("links", "nodes", "hardware", "description"),
        where="",
        example=_EXAMPLE,
        field_examples={"axes": "[data, model]", "shape": "[2, 4]"},
    )
    axes = _names(doc, "axes", str, "[data, model]")
    shape = _names(doc, "shape", int, "[2, 4]")
    for i, size in enumerate(shape):
        if size < 1:
            raise HardwareError(
                f"shape[{i}] (axis {axes[i] if i < len(axes) else i!r}) is {size}; sizes must be >= 1.",
                field="shape",
            )
    values = [k.value for k in LinkKind]
    links_text = doc.get("links", [LinkKind.INTRA_NODE.value] * len(axes))
    if not isinstance(links_text, list) or any(t not in values for t in links_text):
        raise HardwareError(
            f"links is {links_text!r}; write {' or '.join(values)} per axis, e.g. "
            "links: [inter_node, intra_node]",
            field="links",
        )
    if len(links_text) != len(axes):
        raise HardwareError(
            f"links has {len(links_text)} entries for {len(axes)} axes; give one link kind per axis.",
            field="links",
        )
    try:
        mesh = MeshShape(tuple(axes), tuple(shape), tuple(LinkKind(t) for t in links_text))
    except ShardingError as e:
        raise HardwareError(str(e), field="axes") from None
    nodes = doc.get("nodes")
    if nodes is not None and (isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1):
        raise HardwareError(
            f"nodes is {nodes!r}; it must be a whole number >= 1, e.g. nodes: 8", field="nodes"
        )
    return MeshFile(mesh, nodes, str(doc.get("hardware", "")), str(doc.get("description", "")))


def load_mesh(name_or_path: str | os.PathLike[str]) -> MeshFile:
    """Reads a mesh preset ('node8', 'dp2_tp4', '64gpu', '256gpu') or a YAML mesh file.

    Raises:
      HardwareError: naming the file, the field and the fix.
    """
    doc, source, _ = read_yaml(name_or_path, "meshes")
    try:
        return mesh_from_dict(doc)
    except HardwareError as e:
        raise e.at(source) from None

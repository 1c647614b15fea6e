"""Tests for runners.hlo: collectives read from HLO text, attributed to mesh axes, canonicalised."""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ir.comm import Collective, CollectiveKind, bytes_by_kind_axes
from ir.sharding import MeshShape
from runners.hlo import (
    HloParseError,
    UnknownTripCountWarning,
    collectives_from_hlo,
    find_collectives,
)

AR, AG, RS = CollectiveKind.ALL_REDUCE, CollectiveKind.ALL_GATHER, CollectiveKind.REDUCE_SCATTER
A2A, CP = CollectiveKind.ALL_TO_ALL, CollectiveKind.COLLECTIVE_PERMUTE
MESH = MeshShape(("data", "model"), (2, 4))
MESH3 = MeshShape(("a", "b", "c"), (2, 2, 2))

_REDUCER = """%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}
"""


def _module(*lines: str, extra: str = "") -> str:
    """An SPMD module on 8 partitions whose entry takes %p: f32[16,32] and runs `lines`."""
    body = "\n".join(f"  {line}" for line in lines)
    return (
        "HloModule m, is_scheduled=true, num_partitions=8\n\n"
        f"{_REDUCER}\n{extra}\n"
        "ENTRY %main (p: f32[16,32]) -> f32[16,32] {\n"
        "  %p = f32[16,32]{1,0} parameter(0)\n"
        f"{body}\n}}\n"
    )


def _ar(groups: str) -> str:
    return _module(
        f"ROOT %ar = f32[16,32]{{1,0}} all-reduce(%p), channel_id=1, replica_groups={groups}, to_apply=%add"
    )


# ---------------------------------------------------------------------------------------------------
# Replica group syntaxes → mesh axes (2x4 mesh data=2, model=4; partition p sits at (p // 4, p % 4)).

GROUP_CASES = [
    # explicit lists
    ("{{0,1,2,3},{4,5,6,7}}", ("model",)),
    ("{{0,4},{1,5},{2,6},{3,7}}", ("data",)),
    ("{{0,1,2,3,4,5,6,7}}", ("data", "model")),
    ("{}", ("data", "model")),  # empty = all partitions in one group
    ("{{0,1},{2,3},{4,5},{6,7}}", ("model",)),  # a sub-axis of model
    ("{{0,5},{1,4},{2,7},{3,6}}", ("data", "model")),  # not a product of axes: report what varies
    # iota lists
    ("[2,4]<=[8]", ("model",)),
    ("[4,2]<=[2,4]T(1,0)", ("data",)),
    ("[1,8]<=[8]", ("data", "model")),
    # named mesh form: XLA's own axes, mapped back through partition ids
    ("mesh['axis_0'=2,'axis_1'=4] {'axis_0'}", ("data",)),
    ("mesh['axis_0'=2,'axis_1'=4] {'axis_1'}", ("model",)),
    ("mesh['axis_0'=1,'axis_1'=4,'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_1'}", ("model",)),
    ("mesh['axis_0'=4,'axis_1'=2], device_ids=([2,4]T(1,0)) {'axis_0'}", ("model",)),
    ("mesh['axis_0'=8] {'axis_0':(1)2}", ("data",)),
    ("mesh['axis_0'=8] {'axis_0':(2)4}", ("model",)),
    ("mesh[x=2,y=4], device_ids=(0,4,1,5,2,6,3,7) {y}", ("data", "model")),
    ("mesh['axis_0'=2,'axis_1'=4] {'axis_0','axis_1'}", ("data", "model")),
]


@pytest.mark.parametrize(("groups", "axes"), GROUP_CASES)
def test_replica_group_syntax_to_axes(groups, axes):
    assert collectives_from_hlo(_ar(groups), MESH) == (Collective(AR, axes, 16 * 32 * 4),)


@pytest.mark.parametrize(
    ("groups", "expected"),
    [
        ("[4,2]<=[2,4]T(1,0)", ((0, 4), (1, 5), (2, 6), (3, 7))),
        ("[2,4]<=[2,4]", ((0, 1, 2, 3), (4, 5, 6, 7))),
        ("[2,4]<=[4,2]T(1,0)", ((0, 2, 4, 6), (1, 3, 5, 7))),
        ("[2,4]<=[2,2,2]T(2,1,0)", ((0, 4, 2, 6), (1, 5, 3, 7))),
        (
            "mesh['axis_0'=1,'axis_1'=4,'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_1'}",
            ((0, 1, 2, 3), (4, 5, 6, 7)),
        ),
        (
            "mesh['axis_0'=2,'axis_1'=4], device_ids=([2,2,2]T(0,2,1)) {'axis_1':(2)2}",
            ((0, 2), (1, 3), (4, 6), (5, 7)),
        ),
        ("mesh['axis_0'=8] {'axis_0':(1)2}", ((0, 4), (1, 5), (2, 6), (3, 7))),
        ("mesh['axis_0'=2,'axis_1'=4] {'axis_1','axis_0'}", ((0, 4, 1, 5, 2, 6, 3, 7),)),
    ],
)
def test_replica_groups_golden(groups, expected):
    (found,) = find_collectives(_ar(groups))
    assert found.groups == expected


@pytest.mark.parametrize("groups", ["{{0},{1},{2},{3},{4},{5},{6},{7}}", "[8,1]<=[8]", "mesh['axis_0'=8] {}"])
def test_groups_of_one_device_are_dropped(groups):
    assert collectives_from_hlo(_ar(groups), MESH) == ()
    assert len(find_collectives(_ar(groups))) == 1  # still listed before attribution


@pytest.mark.parametrize(
    ("pairs", "axes"),
    [
        ("{{0,1},{1,2},{2,3},{3,0},{4,5},{5,6},{6,7},{7,4}}", ("model",)),
        ("{{0,4},{4,0},{1,5},{5,1}}", ("data",)),
        ("{{0,0},{1,1}}", None),
    ],
)
def test_collective_permute_pairs(pairs, axes):
    text = _module(
        f"ROOT %cp = f32[16,32]{{1,0}} collective-permute(%p), channel_id=1, source_target_pairs={pairs}"
    )
    expected = (Collective(CP, axes, 2048),) if axes else ()
    assert collectives_from_hlo(text, MESH) == expected


def test_device_assignment_maps_partitions_to_mesh_positions():
    # Partition p runs on device assignment[p]; devices 0..7 sit at mesh positions 0..7.
    text = _ar("{{0,1,2,3},{4,5,6,7}}")
    got = collectives_from_hlo(text, MESH, list(range(8)), device_assignment=[0, 4, 1, 5, 2, 6, 3, 7])
    assert got == (Collective(AR, ("data", "model"), 2048),)
    # Without an assignment, device_ids alone cannot move partitions: partition p is mesh position p.
    assert collectives_from_hlo(text, MESH, [7, 6, 5, 4, 3, 2, 1, 0]) == (Collective(AR, ("model",), 2048),)


# ---------------------------------------------------------------------------------------------------
# Shapes, tuples, async pairs.


@pytest.mark.parametrize(
    ("shape", "nbytes"),
    [
        ("bf16[8,128]{1,0}", 2048),
        ("f32[]", 4),
        ("pred[10]{0}", 10),
        ("s4[3]{0}", 2),
        ("f8e4m3fn[64]{0}", 64),
        ("c64[2]{0}", 16),
    ],
)
def test_bytes_per_dtype(shape, nbytes):
    text = _module(f"ROOT %ar = {shape} all-reduce(%q), channel_id=1, replica_groups={{}}, to_apply=%add")
    assert find_collectives(text)[0].bytes == nbytes


def test_tuple_all_reduce_splits_per_element():
    text = _module(
        "%q = bf16[512]{0} parameter(1)",
        "%ar = (f32[16,32]{1,0}, bf16[512]{0}) all-reduce(%p, %q), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add",
        "ROOT %g = f32[16,32]{1,0} get-tuple-element(%ar), index=0",
    )
    assert collectives_from_hlo(text, MESH) == (
        Collective(AR, ("model",), 2048),
        Collective(AR, ("model",), 1024),
    )
    assert [c.name for c in find_collectives(text)] == ["ar#0", "ar#1"]


def test_tuple_all_to_all_is_one_exchange():
    text = _module(
        "%a = f32[4,16]{1,0} slice(%p), slice={[0:4], [0:16]}",
        "%a2a = (f32[4,16]{1,0}, f32[4,16]{1,0}, /*index=2*/f32[4,16]{1,0}, f32[4,16]{1,0}) all-to-all(%a, %a, %a, %a), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}",
        "ROOT %g = f32[4,16]{1,0} get-tuple-element(%a2a), index=0",
    )
    assert collectives_from_hlo(text, MESH) == (Collective(A2A, ("model",), 4 * 256),)


def test_reduce_scatter_and_all_gather_count_the_full_buffer():
    text = _module(
        "%rs = f32[4,32]{1,0} reduce-scatter(%p), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}, to_apply=%add",
        "ROOT %ag = f32[16,32]{1,0} all-gather(%rs), channel_id=2, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}",
    )
    assert collectives_from_hlo(text, MESH) == (
        Collective(RS, ("model",), 2048),
        Collective(AG, ("model",), 2048),
    )


_WRAPPED_RS = """%wrapped_rs (w0: f32[16,32]) -> f32[4,32] {
  %w0 = f32[16,32]{1,0} parameter(0)
  ROOT %rs = f32[4,32]{1,0} reduce-scatter(%w0), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}, to_apply=%add
}
"""


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (
            [
                "%ags = (f32[4,32]{1,0}, f32[16,32]{1,0}) all-gather-start(%q), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}",
                "ROOT %agd = f32[16,32]{1,0} all-gather-done(%ags)",
            ],
            Collective(AG, ("model",), 2048),
        ),
        (
            [
                "%ars = f32[4,32]{1,0} all-reduce-start(%q), channel_id=1, replica_groups=[4,2]<=[2,4]T(1,0), to_apply=%add",
                "ROOT %ard = f32[4,32]{1,0} all-reduce-done(%ars)",
            ],
            Collective(AR, ("data",), 512),
        ),
        (
            [
                "%cps = (f32[4,32]{1,0}, f32[4,32]{1,0}, u32[], u32[]) collective-permute-start(%q), channel_id=1, source_target_pairs={{0,4},{4,0}}",
                "ROOT %cpd = f32[4,32]{1,0} collective-permute-done(%cps)",
            ],
            Collective(CP, ("data",), 512),
        ),
        (
            [
                "%rss = ((f32[16,32]{1,0}), f32[4,32]{1,0}) reduce-scatter-start(%p), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}, to_apply=%add",
                "ROOT %rsd = f32[4,32]{1,0} reduce-scatter-done(%rss)",
            ],
            Collective(RS, ("model",), 2048),
        ),
        (
            [
                "%as = ((f32[16,32]{1,0}), f32[4,32]{1,0}, u32[]) async-start(%p), calls=%wrapped_rs",
                "%au = ((f32[16,32]{1,0}), f32[4,32]{1,0}, u32[]) async-update(%as), calls=%wrapped_rs",
                "ROOT %ad = f32[4,32]{1,0} async-done(%au), calls=%wrapped_rs",
            ],
            Collective(RS, ("model",), 2048),
        ),
    ],
)
def test_async_pairs_count_once(lines, expected):
    text = _module("%q = f32[4,32]{1,0} parameter(1)", *lines, extra=_WRAPPED_RS)
    assert collectives_from_hlo(text, MESH) == (expected,)


# ---------------------------------------------------------------------------------------------------
# While loops.

_BODY = """%body{n} (t{n}: (s32[], f32[16,32])) -> (s32[], f32[16,32]) {{
  %t{n} = (s32[], f32[16,32]{{1,0}}) parameter(0)
  %i{n} = s32[] get-tuple-element(%t{n}), index=0
  %v{n} = f32[16,32]{{1,0}} get-tuple-element(%t{n}), index=1
  {inner}
  ROOT %r{n} = (s32[], f32[16,32]{{1,0}}) tuple(%i{n}, %w{n})
}}

%cond{n} (c{n}: (s32[], f32[16,32])) -> pred[] {{
  %c{n} = (s32[], f32[16,32]{{1,0}}) parameter(0)
  %ci{n} = s32[] get-tuple-element(%c{n}), index=0
  %lim{n} = s32[] constant({limit})
  ROOT %lt{n} = pred[] compare(%ci{n}, %lim{n}), direction=LT
}}
"""


def _loops(config: str, inner_config: str | None = None, limit: int = 7) -> str:
    ar = "%w{n} = f32[16,32]{{1,0}} all-reduce(%v{n}), channel_id=1, replica_groups={{{{0,1,2,3}},{{4,5,6,7}}}}, to_apply=%add"
    if inner_config is None:
        extra = _BODY.format(n=1, inner=ar.format(n=1), limit=limit)
    else:
        inner_loop = (
            "%in2 = (s32[], f32[16,32]{1,0}) tuple(%i2, %v2)\n"
            f"  %wl2 = (s32[], f32[16,32]{{1,0}}) while(%in2), condition=%cond1, body=%body1{inner_config}\n"
            "  %w2 = f32[16,32]{1,0} get-tuple-element(%wl2), index=1"
        )
        extra = _BODY.format(n=1, inner=ar.format(n=1), limit=limit) + _BODY.format(
            n=2, inner=inner_loop, limit=limit
        )
    outer = 2 if inner_config is not None else 1
    return _module(
        "%zero = s32[] constant(0)",
        "%init = (s32[], f32[16,32]{1,0}) tuple(%zero, %p)",
        f"%loop = (s32[], f32[16,32]{{1,0}}) while(%init), condition=%cond{outer}, body=%body{outer}{config}",
        "ROOT %out = f32[16,32]{1,0} get-tuple-element(%loop), index=1",
        extra=extra,
    )


_KNOWN = ', backend_config={"known_trip_count":{"n":"5"}}'
_INIT_STEP = ', backend_config={"known_induction_variable":{"tuple_index":"0"},"known_init_step":{"init":"2","step":"1"}}'


@pytest.mark.parametrize(
    ("text", "count"),
    [
        (_loops(_KNOWN), 5),
        (_loops(_INIT_STEP, limit=7), 5),  # 2, 3, ..., 6: bound 7 read from the condition
        (_loops(', backend_config={"known_trip_count":{"n":"3"}}', inner_config=_KNOWN), 15),  # nested
    ],
)
def test_while_body_collective_counts_trips(text, count):
    assert collectives_from_hlo(text, MESH) == (Collective(AR, ("model",), 2048, count=count),)


_FUSED_COMPARE = """%cmp (k0: s32[], k1: s32[]) -> pred[] {
  %k0 = s32[] parameter(0)
  %k1 = s32[] parameter(1)
  ROOT %lt = pred[] compare(%k0, %k1), direction=GT
}

ENTRY"""


def test_while_bound_read_through_a_fused_compare():
    # XLA wraps the condition's compare in a fusion; the bound is the fusion's constant operand.
    text = _loops(_INIT_STEP, limit=9)
    text = text.replace("compare(%ci1, %lim1), direction=LT", "fusion(%lim1, %ci1), kind=kLoop, calls=%cmp")
    text = text.replace("ENTRY", _FUSED_COMPARE)
    assert collectives_from_hlo(text, MESH) == (Collective(AR, ("model",), 2048, count=7),)


def test_unknown_trip_count_warns_and_counts_once():
    with pytest.warns(UnknownTripCountWarning, match="w1"):
        got = collectives_from_hlo(_loops(""), MESH)
    assert got == (Collective(AR, ("model",), 2048, count=1),)
    assert not find_collectives(_loops(""))[0].trip_count_known


# ---------------------------------------------------------------------------------------------------
# Canonicalisation: all-reduce whose users only keep this device's 1/n shard == reduce-scatter.

_SLICE_FUSION = """%fused_slice (f0: f32[16,32], f1: s32[]) -> f32[16,8] {
  %f0 = f32[16,32]{1,0} parameter(0)
  %f1 = s32[] parameter(1)
  %z = s32[] constant(0)
  %ds = f32[16,8]{1,0} dynamic-slice(%f0, %z, %f1), dynamic_slice_sizes={16,8}
  ROOT %tr = f32[8,16]{0,1} transpose(%ds), dimensions={1,0}
}
"""
_AR4 = (
    "%ar = f32[16,32]{1,0} all-reduce(%p), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add"
)
_OFFSET = ["%pid = u32[] partition-id()", "%off = s32[] convert(%pid)", "%zero = s32[] constant(0)"]


@pytest.mark.parametrize(
    ("lines", "kind"),
    [
        ([_AR4, "ROOT %f = f32[8,16]{0,1} fusion(%ar, %off), kind=kLoop, calls=%fused_slice"], RS),
        (
            [
                _AR4,
                "%b = f32[512]{0} bitcast(%ar)",
                "%r = f32[16,32]{1,0} reshape(%b)",
                "ROOT %ds = f32[16,8]{1,0} dynamic-slice(%r, %zero, %off), dynamic_slice_sizes={16,8}",
            ],
            RS,
        ),
        (
            [_AR4, "ROOT %ds = f32[16,16]{1,0} dynamic-slice(%ar, %zero, %off), dynamic_slice_sizes={16,16}"],
            AR,
        ),  # 1/2
        (
            [
                _AR4,
                "%ds = f32[16,8]{1,0} dynamic-slice(%ar, %zero, %off), dynamic_slice_sizes={16,8}",
                "%n = f32[16,32]{1,0} negate(%ar)",
                "ROOT %t = (f32[16,8]{1,0}, f32[16,32]{1,0}) tuple(%ds, %n)",
            ],
            AR,  # also used whole
        ),
        ([_AR4.replace("%ar =", "ROOT %ar =")], AR),
    ],
)
def test_all_reduce_then_own_shard_is_reduce_scatter(lines, kind):
    text = _module(*_OFFSET, *lines, extra=_SLICE_FUSION)
    assert collectives_from_hlo(text, MESH) == (Collective(kind, ("model",), 2048),)
    assert collectives_from_hlo(text, MESH, canonical=False) == (Collective(AR, ("model",), 2048),)


def test_tuple_all_reduce_canonicalises_per_element():
    text = _module(
        *_OFFSET,
        "%ar = (f32[16,32]{1,0}, f32[16,32]{1,0}) all-reduce(%p, %p), channel_id=1, replica_groups=[2,4]<=[8], to_apply=%add",
        "%g0 = f32[16,32]{1,0} get-tuple-element(%ar), index=0",
        "%g1 = f32[16,32]{1,0} get-tuple-element(%ar), index=1",
        "%c0 = f32[16,32]{1,0} copy(%g0)",
        "%s0 = f32[8,16]{0,1} fusion(%c0, %off), kind=kLoop, calls=%fused_slice",
        "%n1 = f32[16,32]{1,0} negate(%g1)",
        "ROOT %t = (f32[8,16]{0,1}, f32[16,32]{1,0}) tuple(%s0, %n1)",
        extra=_SLICE_FUSION,
    )
    assert collectives_from_hlo(text, MESH) == (
        Collective(RS, ("model",), 2048),
        Collective(AR, ("model",), 2048),
    )


# ---------------------------------------------------------------------------------------------------
# Errors.


def test_unknown_group_syntax_is_an_error():
    with pytest.raises(HloParseError, match=r"HLO instruction 'ar': unknown replica group syntax") as err:
        collectives_from_hlo(_ar("<<0,1>>"), MESH)
    assert err.value.instruction == "ar"


def test_partition_outside_the_mesh_is_an_error():
    small = MeshShape(("data",), (4,))
    with pytest.raises(HloParseError, match=r"names partition 4, but mesh data=4 has 4 devices"):
        collectives_from_hlo(_ar("{{0,1,2,3},{4,5,6,7}}"), small)


# ---------------------------------------------------------------------------------------------------
# End to end: compiled by XLA on 8 fake CPU devices.


def _jax_mesh(shape, names, devices=None):
    if devices is None:
        return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))
    return Mesh(np.asarray(devices).reshape(shape), names, axis_types=(AxisType.Auto,) * len(shape))


def _compile(mesh, f, args, in_specs, out_spec):
    named = [NamedSharding(mesh, s) for s in in_specs]
    return jax.jit(f, in_shardings=named, out_shardings=NamedSharding(mesh, out_spec)).lower(*args).compile()


def _constrain(mesh, spec):
    return lambda x: jax.lax.with_sharding_constraint(x * 2, NamedSharding(mesh, spec)) + 1


X, W = jax.ShapeDtypeStruct((16, 64), jnp.float32), jax.ShapeDtypeStruct((64, 32), jnp.float32)


@pytest.fixture(scope="module")
def mesh24():
    return _jax_mesh((2, 4), ("data", "model"))


def test_e2e_matmul_contracting_on_model_all_reduces(mesh24):
    c = _compile(mesh24, jnp.matmul, (X, W), [P(None, "model"), P("model", None)], P(None, None))
    assert collectives_from_hlo(c.as_text(), MESH) == (Collective(AR, ("model",), 16 * 32 * 4),)


def test_e2e_constraint_gathers_data(mesh24):
    c = _compile(mesh24, _constrain(mesh24, P(None, None)), (X,), [P("data", None)], P(None, None))
    assert collectives_from_hlo(c.as_text(), MESH) == (Collective(AG, ("data",), 16 * 64 * 4),)


def test_e2e_reshard_across_dims_is_all_to_all(mesh24):
    c = _compile(mesh24, _constrain(mesh24, P(None, "model")), (X,), [P("model", None)], P(None, "model"))
    assert collectives_from_hlo(c.as_text(), MESH) == (Collective(A2A, ("model",), 16 * 64 * 4 // 4),)


def test_e2e_sharded_contraction_with_sharded_output_is_reduce_scatter(mesh24):
    c = _compile(mesh24, jnp.matmul, (X, W), [P(None, "model"), P("model", None)], P(None, "model"))
    text = c.as_text()
    assert collectives_from_hlo(text, MESH) == (Collective(RS, ("model",), 16 * 32 * 4),)
    assert collectives_from_hlo(text, MESH, canonical=False) == (Collective(AR, ("model",), 16 * 32 * 4),)


def test_e2e_scan_body_collective_counts_trips(mesh24):
    def step(x, ws):
        return jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, ws)[0]

    ws = jax.ShapeDtypeStruct((5, 64, 64), jnp.float32)
    c = _compile(mesh24, step, (X, ws), [P(None, "model"), P(None, "model", None)], P(None, None))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnknownTripCountWarning)
        got = collectives_from_hlo(c.as_text(), MESH)
    # The carry must return to P(None, 'model'), so each step's all-reduce keeps only a shard.
    assert got == (Collective(RS, ("model",), 16 * 64 * 4, count=5), Collective(AG, ("model",), 16 * 64 * 4))
    assert bytes_by_kind_axes(got) == {(RS, ("model",)): 5 * 4096, (AG, ("model",)): 4096}
    # Without XLA's known_trip_count the bound is read from the (fused) compare in the condition.
    stripped = re.sub(r'"known_trip_count":\{"n":"5"\},?', "", c.as_text())
    assert "known_trip_count" not in stripped
    assert collectives_from_hlo(stripped, MESH) == got


@pytest.mark.parametrize(
    ("spec", "axes"), [(("a", "c"), ("a", "c")), (("c", "b"), ("b", "c")), (("b",), ("b",))]
)
def test_e2e_2x2x2_mesh_reduction_over_axes(spec, axes):
    mesh = _jax_mesh((2, 2, 2), ("a", "b", "c"))
    c = _compile(mesh, jnp.matmul, (X, W), [P(None, spec), P(spec, None)], P())
    assert collectives_from_hlo(c.as_text(), MESH3) == (Collective(AR, axes, 16 * 32 * 4),)


def test_e2e_permuted_device_order_uses_partition_ids(mesh24):
    perm = [3, 1, 6, 0, 7, 2, 5, 4]
    permuted = _jax_mesh((2, 4), ("data", "model"), np.asarray(jax.devices())[perm])

    def psum_model(mesh):
        return jax.shard_map(
            lambda a: jax.lax.psum(a, "model"),
            mesh=mesh,
            in_specs=P("data", "model"),
            out_specs=P("data", None),
        )

    compiled = _compile(permuted, psum_model(permuted), (X,), [P("data", "model")], P("data", None))
    plain = _compile(mesh24, psum_model(mesh24), (X,), [P("data", "model")], P("data", None))
    # Groups name positions in the device assignment, and that assignment is the mesh's own order.
    assert find_collectives(compiled.as_text()) == find_collectives(plain.as_text())
    assignment = [d.id for d in compiled.runtime_executable().local_devices()]
    assert assignment == perm
    expected = (Collective(AR, ("model",), 8 * 16 * 4),)
    assert collectives_from_hlo(compiled.as_text(), MESH) == expected
    assert collectives_from_hlo(compiled.as_text(), MESH, perm, device_assignment=assignment) == expected

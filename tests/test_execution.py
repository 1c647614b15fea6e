"""Expert strategies executed under JAX's partitioner on a fake 2x4 mesh, against the unsharded step.

For every model and applicable strategy, in both execution modes, the sharded step must match
the unsharded one within `runners.execute.TOLERANCE` (per dtype: float32 2e-3 of the output's
scale, see there why), and the loss within 1e-5 relative. In the constrained mode, every
(kind, mesh axes) row of collective bytes must agree within 5% between propagation and the
compiled HLO. The portable mode's agreement is measured by benchmarks/xla_agreement.py and the
differences are explained in docs/portable-mode.md; here its numerics are checked.

The full matrix is marked slow (CI runs it after the default suite); a representative subset
runs by default.
"""

from __future__ import annotations

import functools

import pytest

from auto_partition.workloads import resolve
from ir.propagate import propagate_plan
from ir.sharding import MeshShape
from ir.trace import trace
from models import hf
from runners.execute import reference_outputs, verify
from runners.program import Mode
from search.baselines import baseline_plans

MESH = MeshShape.parse("data=2,model=4")
BUILTIN = ("mlp", "gpt", "llama", "bert", "vit", "moe", "builtin:llama:tiny:scan")
HF = ("hf-gpt2", "hf-llama", "hf-bert", "hf-vit")
HF_STRATEGIES = ("dp", "fsdp", "tp")
# Run by default: one case per strategy, spread over the models.
DEFAULT = {
    ("mlp", "dp"),
    ("gpt", "fsdp"),
    ("llama", "tp"),
    ("bert", "dp_tp"),
    ("gpt", "fsdp_tp"),
    ("gpt", "sp"),
    ("moe", "ep"),
    ("builtin:llama:tiny:scan", "fsdp_tp"),
    ("vit", "tp"),
    ("hf-gpt2", "tp"),
}


@functools.cache
def _model(spec: str):
    w = resolve(spec)
    g = trace(w)
    rules = hf.TP_RULES.get(spec)
    plans = baseline_plans(g, MESH, tp_rules=rules)
    return w, g, plans, reference_outputs(w)


def _cases():
    out = []
    for spec in (*BUILTIN, *HF):
        _, _, plans, _ = _model(spec)
        for name in plans:
            if spec in HF and name not in HF_STRATEGIES:
                continue
            marks = () if (spec, name) in DEFAULT else (pytest.mark.slow,)
            out.append(pytest.param(spec, name, marks=marks, id=f"{spec}-{name}"))
    return out


@pytest.mark.parametrize("spec,strategy", _cases())
def test_strategy_matches_unsharded_and_hlo(spec, strategy):
    w, g, plans, ref = _model(spec)
    prop = propagate_plan(g, plans[strategy])
    for mode in (Mode.CONSTRAINED, Mode.PORTABLE):
        v = verify(w, prop, mode, repeats=1, reference=ref)
        assert v.within_tolerance, f"{mode.value}: max error {v.max_error:.2e}"
        # The loss (last output) has no AdamW amplification: hold it much tighter.
        assert v.output_errors[-1] <= 1e-5, f"{mode.value}: loss differs by {v.output_errors[-1]:.2e}"
        if mode is Mode.CONSTRAINED:
            bad = [(r.kind.value, r.axes, r.predicted, r.compiled) for r in v.rows if r.agreement < 0.95]
            assert not bad, f"collective bytes predicted vs compiled differ: {bad}"

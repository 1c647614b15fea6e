"""Mixture-of-experts decoder: Llama-style attention with a top-k routed SwiGLU expert layer in every block."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from ir.workload import Workload, WorkloadError
from models import common

SUPPORTS_SCAN = False


@dataclasses.dataclass(frozen=True, slots=True)
class MoEConfig:
    """Sizes of an MoE decoder and of its training batch.

    Tokens are routed within groups of `group_size` consecutive positions of one sequence (GShard's
    groups); each expert takes at most `capacity` tokens per group and drops the rest.
    """

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    n_experts: int
    vocab: int
    batch_size: int
    seq_len: int
    top_k: int = 2
    capacity_factor: float = 1.25
    group_size: int = 1024
    aux_loss_weight: float = 0.01
    dtype: str = "float32"
    rope_theta: float = 10_000.0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def group(self) -> int:
        """Tokens per routing group: `group_size`, or the whole sequence when shorter."""
        return min(self.group_size, self.seq_len)

    @property
    def capacity(self) -> int:
        """Slots per expert per group: top_k * group * capacity_factor / n_experts, rounded up."""
        return math.ceil(self.top_k * self.group * self.capacity_factor / self.n_experts)


SIZES: dict[str, MoEConfig] = {
    "tiny": MoEConfig(2, 64, 4, 2, 128, n_experts=4, vocab=256, batch_size=8, seq_len=32),
    "medium": MoEConfig(
        12, 1024, 16, 4, 2816, n_experts=8, vocab=32000, batch_size=8, seq_len=2048, dtype="bfloat16"
    ),
    "mixtral-8x7b": MoEConfig(
        32,
        4096,
        32,
        8,
        14336,
        n_experts=8,
        vocab=32000,
        batch_size=8,
        seq_len=4096,
        dtype="bfloat16",
        rope_theta=1_000_000.0,
    ),
}


def init_layer(key: common.Key, cfg: MoEConfig) -> common.Params:
    """One block: `ln1`, `attn/{q,k,v,o}/kernel`, `ln2` and the routed experts under `moe/`.

    Expert weights are stacked on a leading expert dim: `moe/w_in`, `moe/w_gate` [E, d, ff] and
    `moe/w_out` [E, ff, d]; the router is `moe/router/kernel` [d, E].
    """
    dtype = jnp.dtype(cfg.dtype)
    k_attn, k_router, k_in, k_gate, k_out = common.split_key(key, 5)
    e, d, ff = cfg.n_experts, cfg.d_model, cfg.d_ff
    return {
        "ln1": common.norm_init(d, dtype, bias=False),
        "attn": common.attention_init(
            k_attn, d, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, dtype, bias=False
        ),
        "ln2": common.norm_init(d, dtype, bias=False),
        "moe": {
            "router": common.dense_init(k_router, d, e, dtype, bias=False),
            "w_in": common.normal(k_in, (e, d, ff), dtype),
            "w_gate": common.normal(k_gate, (e, d, ff), dtype),
            "w_out": common.normal(k_out, (e, ff, d), dtype),
        },
    }


def init_params(key: common.Key, cfg: MoEConfig) -> common.Params:
    """`embed/embedding` [vocab, d], the layers, `ln_f/scale` and `lm_head/kernel` [d, vocab]."""
    dtype = jnp.dtype(cfg.dtype)
    k_embed, k_layers, k_head = common.split_key(key, 3)
    return {
        "embed": {"embedding": common.normal(k_embed, (cfg.vocab, cfg.d_model), dtype)},
        **common.init_layers(k_layers, cfg.n_layers, functools.partial(init_layer, cfg=cfg), scan=False),
        "ln_f": common.norm_init(cfg.d_model, dtype, bias=False),
        "lm_head": common.dense_init(k_head, cfg.d_model, cfg.vocab, dtype, bias=False),
    }


def route(logits: jax.Array, cfg: MoEConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-k routing with per-group expert capacity.

    Args:
      logits: router logits [batch, groups, group, experts], float32.
      cfg: routing sizes.

    Returns:
      `(dispatch, combine, aux)`: dispatch is a 0/1 float32 tensor [batch, groups, group, experts,
      capacity] placing each kept token in one slot of each of its experts; combine is dispatch
      weighted by the token's renormalised top-k gate; aux is the Switch-Transformer load-balancing
      loss (n_experts * sum_e fraction_e * mean_prob_e, 1.0 when perfectly balanced).
    """
    n_experts, capacity = cfg.n_experts, cfg.capacity
    probs = jax.nn.softmax(logits, axis=-1)
    # Only the choice of experts comes from top_k; gate values are read back with one-hot products, so
    # gradients flow through elementwise ops and reductions instead of top_k's gather/scatter.
    _, experts = jax.lax.top_k(jax.lax.stop_gradient(probs), cfg.top_k)  # [b, n, g, k]
    chosen = [jax.nn.one_hot(experts[..., j], n_experts, dtype=jnp.int32) for j in range(cfg.top_k)]
    gates = [jnp.sum(probs * c, axis=-1, keepdims=True) for c in chosen]  # [b, n, g, 1] each
    gate_total = sum(gates)
    dispatch = jnp.zeros((*logits.shape, capacity), jnp.float32)
    combine = jnp.zeros_like(dispatch)
    # Slots fill first with every token's first choice, then with second choices, in token order.
    filled = jnp.zeros((*logits.shape[:2], 1, n_experts), jnp.int32)
    for choice, gate in zip(chosen, gates, strict=True):
        slot = jnp.cumsum(choice, axis=2) - 1 + filled  # [b, n, g, e]
        filled = filled + choice.sum(axis=2, keepdims=True)
        kept = (choice * (slot < capacity)).astype(jnp.float32)
        placed = jax.nn.one_hot(slot, capacity, dtype=jnp.float32) * kept[..., None]
        dispatch = dispatch + placed
        combine = combine + (gate / gate_total)[..., None] * placed
    top1_fraction = chosen[0].astype(jnp.float32).mean(axis=(0, 1, 2))
    aux = n_experts * jnp.sum(top1_fraction * probs.mean(axis=(0, 1, 2)))
    return dispatch, combine, aux


def moe_mlp(p: common.Params, x: jax.Array, cfg: MoEConfig) -> tuple[jax.Array, jax.Array]:
    """Routed SwiGLU experts on x [batch, seq, d]; returns (y [batch, seq, d], aux loss).

    Dispatch and combine are one-hot einsums; expert activations are [experts, batch, groups, capacity,
    d], so sharding the expert dim of `w_in`/`w_gate`/`w_out` is expert parallelism.
    """
    b, s, d = x.shape
    xg = x.reshape(b, s // cfg.group, cfg.group, d)
    logits = jnp.einsum("bngd,de->bnge", xg, p["router"]["kernel"], preferred_element_type=jnp.float32)
    dispatch, combine, aux = route(logits, cfg)
    expert_in = jnp.einsum("bngec,bngd->ebncd", dispatch.astype(x.dtype), xg)
    gate = jnp.einsum("ebncd,edf->ebncf", expert_in, p["w_gate"])
    hidden = jax.nn.silu(gate) * jnp.einsum("ebncd,edf->ebncf", expert_in, p["w_in"])
    expert_out = jnp.einsum("ebncf,efd->ebncd", hidden, p["w_out"])
    y = jnp.einsum("bngec,ebncd->bngd", combine.astype(x.dtype), expert_out)
    return y.reshape(b, s, d), aux


def block(x: jax.Array, p: common.Params, cfg: MoEConfig) -> tuple[jax.Array, jax.Array]:
    """A pre-RMSNorm block with MoE MLP and the named activations of `common.pre_norm_block`."""
    x = checkpoint_name(x, "resid")
    h = checkpoint_name(common.rms_norm(p["ln1"], x), "attn_in")
    a = common.attention(
        p["attn"], h, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, causal=True, rope_theta=cfg.rope_theta
    )
    x = x + checkpoint_name(a, "attn_out")
    h = checkpoint_name(common.rms_norm(p["ln2"], x), "mlp_in")
    m, aux = moe_mlp(p["moe"], h, cfg)
    return x + checkpoint_name(m, "mlp_out"), aux


def forward(params: common.Params, tokens: jax.Array, cfg: MoEConfig) -> tuple[jax.Array, jax.Array]:
    """Logits [batch, seq, vocab] and the load-balancing loss averaged over layers."""
    x = jnp.take(params["embed"]["embedding"], tokens, axis=0)
    aux_total = jnp.zeros((), jnp.float32)
    for i in range(cfg.n_layers):
        x, aux = block(x, params[f"layers_{i}"], cfg)
        aux_total = aux_total + aux
    logits = common.dense(params["lm_head"], common.rms_norm(params["ln_f"], x))
    return logits, aux_total / cfg.n_layers


def build(cfg: MoEConfig, *, scan: bool, source: str) -> Workload:
    """The MoE training-step Workload; loss = cross entropy + aux_loss_weight * load-balancing loss."""
    del scan  # the registry rejects scan=True for MoE
    if cfg.seq_len % cfg.group:
        raise WorkloadError(
            f"moe: seq_len ({cfg.seq_len}) must be a multiple of the routing group size ({cfg.group}); "
            "choose a seq_len that is."
        )

    def loss_fn(params, batch):
        logits, aux = forward(params, batch["tokens"], cfg)
        return common.cross_entropy(logits, batch["targets"]) + cfg.aux_loss_weight * aux

    return common.build_workload(
        init_params=functools.partial(init_params, cfg=cfg),
        make_batch=lambda key: common.token_batch(key, cfg.batch_size, cfg.seq_len, cfg.vocab),
        loss_fn=loss_fn,
        source=source,
    )

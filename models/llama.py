"""Llama-style decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP, no biases, untied lm_head."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from ir.workload import Workload
from models import common

SUPPORTS_SCAN = True


@dataclasses.dataclass(frozen=True, slots=True)
class LlamaConfig:
    """Sizes of a Llama model and of its training batch."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    vocab: int
    batch_size: int
    seq_len: int
    dtype: str = "float32"
    rope_theta: float = 500_000.0
    remat: bool = False  # activation checkpointing per layer

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


SIZES: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(2, 64, 4, 2, 128, 256, batch_size=8, seq_len=32),
    "1b": LlamaConfig(16, 2048, 32, 8, 8192, 128256, batch_size=8, seq_len=2048, dtype="bfloat16"),
    "8b": LlamaConfig(32, 4096, 32, 8, 14336, 128256, batch_size=8, seq_len=4096, dtype="bfloat16"),
    "70b": LlamaConfig(80, 8192, 64, 8, 28672, 128256, batch_size=8, seq_len=4096, dtype="bfloat16"),
}


def init_layer(key: common.Key, cfg: LlamaConfig) -> common.Params:
    """One decoder layer: `ln1/scale`, `attn/{q,k,v,o}/kernel`, `ln2/scale`, `mlp/{w_in,w_gate,w_out}`."""
    dtype = jnp.dtype(cfg.dtype)
    k_attn, k_in, k_gate, k_out = common.split_key(key, 4)
    return {
        "ln1": common.norm_init(cfg.d_model, dtype, bias=False),
        "attn": common.attention_init(
            k_attn, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, dtype, bias=False
        ),
        "ln2": common.norm_init(cfg.d_model, dtype, bias=False),
        "mlp": {
            "w_in": common.normal(k_in, (cfg.d_model, cfg.d_ff), dtype),
            "w_gate": common.normal(k_gate, (cfg.d_model, cfg.d_ff), dtype),
            "w_out": common.normal(k_out, (cfg.d_ff, cfg.d_model), dtype),
        },
    }


def init_params(key: common.Key, cfg: LlamaConfig, *, scan: bool) -> common.Params:
    """All parameters: `embed/embedding` [vocab, d], the layers, `ln_f/scale` and `lm_head/kernel` [d, vocab]."""
    dtype = jnp.dtype(cfg.dtype)
    k_embed, k_layers, k_head = common.split_key(key, 3)
    return {
        "embed": {"embedding": common.normal(k_embed, (cfg.vocab, cfg.d_model), dtype)},
        **common.init_layers(k_layers, cfg.n_layers, functools.partial(init_layer, cfg=cfg), scan=scan),
        "ln_f": common.norm_init(cfg.d_model, dtype, bias=False),
        "lm_head": common.dense_init(k_head, cfg.d_model, cfg.vocab, dtype, bias=False),
    }


def swiglu(p: common.Params, x: jax.Array) -> jax.Array:
    """`(silu(x @ w_gate) * (x @ w_in)) @ w_out`."""
    return (jax.nn.silu(x @ p["w_gate"]) * (x @ p["w_in"])) @ p["w_out"]


def forward(params: common.Params, tokens: jax.Array, cfg: LlamaConfig) -> jax.Array:
    """Logits [batch, seq, vocab] (in the param dtype) for int32 tokens [batch, seq]."""
    attn = functools.partial(
        common.attention,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads,
        causal=True,
        rope_theta=cfg.rope_theta,
    )
    block = functools.partial(common.pre_norm_block, norm=common.rms_norm, attn=attn, mlp=swiglu)
    x = jnp.take(params["embed"]["embedding"], tokens, axis=0)
    x = common.apply_layers(params, x, block, cfg.n_layers, remat=cfg.remat)
    return common.dense(params["lm_head"], common.rms_norm(params["ln_f"], x))


def build(cfg: LlamaConfig, *, scan: bool, source: str) -> Workload:
    """The Llama training-step Workload for `cfg`; layers stacked and scanned when `scan`."""

    def loss_fn(params, batch):
        return common.cross_entropy(forward(params, batch["tokens"], cfg), batch["targets"])

    return common.build_workload(
        init_params=functools.partial(init_params, cfg=cfg, scan=scan),
        make_batch=lambda key: common.token_batch(key, cfg.batch_size, cfg.seq_len, cfg.vocab),
        loss_fn=loss_fn,
        source=source,
    )

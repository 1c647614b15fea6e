"""GPT-2 family decoder: pre-LayerNorm, learned positions, GELU MLP of width 4d, lm head tied to the embedding."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from ir.workload import Workload
from models import common

SUPPORTS_SCAN = True


@dataclasses.dataclass(frozen=True, slots=True)
class GPTConfig:
    """Sizes of a GPT-2 model and of its training batch.

    The vocabulary is GPT-2's 50257 padded to 50304 (a multiple of 64, as nanoGPT does) so it divides
    common mesh axis sizes. `n_positions` rows of learned position embedding; a longer `seq_len`
    override grows the table to `seq_len`.
    """

    n_layers: int
    d_model: int
    n_heads: int
    vocab: int
    batch_size: int
    seq_len: int
    n_positions: int
    dtype: str = "float32"
    remat: bool = False  # activation checkpointing per layer

    @property
    def d_ff(self) -> int:
        return 4 * self.d_model


_GPT2_VOCAB = 50304


SIZES: dict[str, GPTConfig] = {
    "tiny": GPTConfig(2, 64, 4, 256, batch_size=8, seq_len=32, n_positions=32),
    "gpt2": GPTConfig(12, 768, 12, _GPT2_VOCAB, batch_size=8, seq_len=1024, n_positions=1024),
    "gpt2-medium": GPTConfig(24, 1024, 16, _GPT2_VOCAB, batch_size=8, seq_len=1024, n_positions=1024),
    "gpt2-large": GPTConfig(36, 1280, 20, _GPT2_VOCAB, batch_size=8, seq_len=1024, n_positions=1024),
    "gpt2-xl": GPTConfig(48, 1600, 25, _GPT2_VOCAB, batch_size=8, seq_len=1024, n_positions=1024),
}


def init_layer(key: common.Key, cfg: GPTConfig) -> common.Params:
    """One block: `ln1`, `attn/{q,k,v,o}/{kernel,bias}`, `ln2`, `mlp/{w_in,b_in,w_out,b_out}`."""
    dtype = jnp.dtype(cfg.dtype)
    head_dim = cfg.d_model // cfg.n_heads
    # GPT-2 scales the init of projections that write into the residual stream by 1/sqrt(2 n_layers).
    out_std = common.INIT_STD / (2 * cfg.n_layers) ** 0.5
    k_attn, k_in, k_out = common.split_key(key, 3)
    return {
        "ln1": common.norm_init(cfg.d_model, dtype, bias=True),
        "attn": common.attention_init(
            k_attn, cfg.d_model, cfg.n_heads, cfg.n_heads, head_dim, dtype, bias=True, out_std=out_std
        ),
        "ln2": common.norm_init(cfg.d_model, dtype, bias=True),
        "mlp": {
            "w_in": common.normal(k_in, (cfg.d_model, cfg.d_ff), dtype),
            "b_in": common.zeros((cfg.d_ff,), dtype),
            "w_out": common.normal(k_out, (cfg.d_ff, cfg.d_model), dtype, out_std),
            "b_out": common.zeros((cfg.d_model,), dtype),
        },
    }


def init_params(key: common.Key, cfg: GPTConfig, *, scan: bool) -> common.Params:
    """All parameters: `embed/embedding` [vocab, d], `pos_embed/embedding` [positions, d], layers, `ln_f`."""
    dtype = jnp.dtype(cfg.dtype)
    k_embed, k_pos, k_layers = common.split_key(key, 3)
    n_positions = max(cfg.n_positions, cfg.seq_len)
    return {
        "embed": {"embedding": common.normal(k_embed, (cfg.vocab, cfg.d_model), dtype)},
        "pos_embed": {"embedding": common.normal(k_pos, (n_positions, cfg.d_model), dtype, 0.01)},
        **common.init_layers(k_layers, cfg.n_layers, functools.partial(init_layer, cfg=cfg), scan=scan),
        "ln_f": common.norm_init(cfg.d_model, dtype, bias=True),
    }


def gelu_mlp(p: common.Params, x: jax.Array) -> jax.Array:
    """`gelu(x @ w_in + b_in) @ w_out + b_out` (tanh-approximate GELU, as GPT-2)."""
    return jax.nn.gelu(x @ p["w_in"] + p["b_in"], approximate=True) @ p["w_out"] + p["b_out"]


def forward(params: common.Params, tokens: jax.Array, cfg: GPTConfig) -> jax.Array:
    """Logits [batch, seq, vocab] for int32 tokens [batch, seq]; the head is `embed/embedding` transposed."""
    attn = functools.partial(common.attention, n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads, causal=True)
    block = functools.partial(common.pre_norm_block, norm=common.layer_norm, attn=attn, mlp=gelu_mlp)
    seq = tokens.shape[1]
    embedding = params["embed"]["embedding"]
    x = jnp.take(embedding, tokens, axis=0) + params["pos_embed"]["embedding"][:seq]
    x = common.apply_layers(params, x, block, cfg.n_layers, remat=cfg.remat)
    return common.layer_norm(params["ln_f"], x) @ embedding.T


def build(cfg: GPTConfig, *, scan: bool, source: str) -> Workload:
    """The GPT-2 training-step Workload for `cfg`; layers stacked and scanned when `scan`."""

    def loss_fn(params, batch):
        return common.cross_entropy(forward(params, batch["tokens"], cfg), batch["targets"])

    return common.build_workload(
        init_params=functools.partial(init_params, cfg=cfg, scan=scan),
        make_batch=lambda key: common.token_batch(key, cfg.batch_size, cfg.seq_len, cfg.vocab),
        loss_fn=loss_fn,
        source=source,
    )

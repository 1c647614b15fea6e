"""BERT encoder trained with masked-LM: post-LayerNorm blocks, GELU MLP, MLM head tied to the embedding."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from ir.workload import Workload
from models import common

SUPPORTS_SCAN = False
# Fraction of positions that carry the masked-LM loss in generated batches (BERT's 15%).
MASK_RATE = 0.15


@dataclasses.dataclass(frozen=True, slots=True)
class BertConfig:
    """Sizes of a BERT model and of its training batch.

    The vocabulary is BERT's 30522 padded to 30528 (a multiple of 64). No token-type embeddings:
    the batch has no segment ids.
    """

    n_layers: int
    d_model: int
    n_heads: int
    d_ff: int
    vocab: int
    batch_size: int
    seq_len: int
    n_positions: int
    dtype: str = "float32"
    remat: bool = False  # activation checkpointing per layer


_BERT_VOCAB = 30528

SIZES: dict[str, BertConfig] = {
    "tiny": BertConfig(2, 64, 4, 256, 256, batch_size=8, seq_len=32, n_positions=32),
    "bert-base": BertConfig(12, 768, 12, 3072, _BERT_VOCAB, batch_size=32, seq_len=512, n_positions=512),
    "bert-large": BertConfig(24, 1024, 16, 4096, _BERT_VOCAB, batch_size=32, seq_len=512, n_positions=512),
}


def init_layer(key: common.Key, cfg: BertConfig) -> common.Params:
    """One block: `attn/{q,k,v,o}/{kernel,bias}`, `ln1`, `mlp/{w_in,b_in,w_out,b_out}`, `ln2`."""
    dtype = jnp.dtype(cfg.dtype)
    k_attn, k_in, k_out = common.split_key(key, 3)
    return {
        "attn": common.attention_init(
            k_attn, cfg.d_model, cfg.n_heads, cfg.n_heads, cfg.d_model // cfg.n_heads, dtype, bias=True
        ),
        "ln1": common.norm_init(cfg.d_model, dtype, bias=True),
        "mlp": {
            "w_in": common.normal(k_in, (cfg.d_model, cfg.d_ff), dtype),
            "b_in": common.zeros((cfg.d_ff,), dtype),
            "w_out": common.normal(k_out, (cfg.d_ff, cfg.d_model), dtype),
            "b_out": common.zeros((cfg.d_model,), dtype),
        },
        "ln2": common.norm_init(cfg.d_model, dtype, bias=True),
    }


def init_params(key: common.Key, cfg: BertConfig) -> common.Params:
    """Embeddings, `ln_embed`, the layers and `mlm_head/{dense,ln,bias}` (decoder = embedding transposed)."""
    dtype = jnp.dtype(cfg.dtype)
    k_embed, k_pos, k_layers, k_head = common.split_key(key, 4)
    n_positions = max(cfg.n_positions, cfg.seq_len)
    return {
        "embed": {"embedding": common.normal(k_embed, (cfg.vocab, cfg.d_model), dtype)},
        "pos_embed": {"embedding": common.normal(k_pos, (n_positions, cfg.d_model), dtype)},
        "ln_embed": common.norm_init(cfg.d_model, dtype, bias=True),
        **common.init_layers(k_layers, cfg.n_layers, functools.partial(init_layer, cfg=cfg), scan=False),
        "mlm_head": {
            "dense": common.dense_init(k_head, cfg.d_model, cfg.d_model, dtype, bias=True),
            "ln": common.norm_init(cfg.d_model, dtype, bias=True),
            "bias": common.zeros((cfg.vocab,), dtype),
        },
    }


def post_norm_block(x: jax.Array, p: common.Params, cfg: BertConfig) -> jax.Array:
    """`ln1(x + attn(x))`, then `ln2(x + mlp(x))`; attention reads the (already normed) residual."""
    x = checkpoint_name(x, "resid")
    h = checkpoint_name(x, "attn_in")
    a = common.attention(p["attn"], h, n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads, causal=False)
    x = common.layer_norm(p["ln1"], x + checkpoint_name(a, "attn_out"), eps=1e-12)
    h = checkpoint_name(x, "mlp_in")
    mlp = p["mlp"]
    m = jax.nn.gelu(h @ mlp["w_in"] + mlp["b_in"], approximate=True) @ mlp["w_out"] + mlp["b_out"]
    return common.layer_norm(p["ln2"], x + checkpoint_name(m, "mlp_out"), eps=1e-12)


def forward(params: common.Params, tokens: jax.Array, cfg: BertConfig) -> jax.Array:
    """MLM logits [batch, seq, vocab] for int32 tokens [batch, seq]."""
    seq = tokens.shape[1]
    embedding = params["embed"]["embedding"]
    x = jnp.take(embedding, tokens, axis=0) + params["pos_embed"]["embedding"][:seq]
    x = common.layer_norm(params["ln_embed"], x, eps=1e-12)
    x = common.apply_layers(
        params, x, functools.partial(post_norm_block, cfg=cfg), cfg.n_layers, remat=cfg.remat
    )
    head = params["mlm_head"]
    h = jax.nn.gelu(common.dense(head["dense"], x), approximate=True)
    h = common.layer_norm(head["ln"], h, eps=1e-12)
    return h @ embedding.T + head["bias"]


def make_batch(key: common.Key, cfg: BertConfig) -> common.Batch:
    """Random `tokens`, `targets` (int32 [B, S]) and a float32 `mask` [B, S] marking ~15% of positions."""
    k_tokens, k_mask = common.split_key(key, 2)
    batch = common.token_batch(k_tokens, cfg.batch_size, cfg.seq_len, cfg.vocab)
    shape = (cfg.batch_size, cfg.seq_len)
    batch["mask"] = common.bernoulli(k_mask, MASK_RATE, shape)
    return batch


def build(cfg: BertConfig, *, scan: bool, source: str) -> Workload:
    """The BERT masked-LM training-step Workload for `cfg`; the loss is weighted by `batch['mask']`."""
    del scan  # the registry rejects scan=True for BERT

    def loss_fn(params, batch):
        logits = forward(params, batch["tokens"], cfg)
        return common.cross_entropy(logits, batch["targets"], batch["mask"])

    return common.build_workload(
        init_params=functools.partial(init_params, cfg=cfg),
        make_batch=functools.partial(make_batch, cfg=cfg),
        loss_fn=loss_fn,
        source=source,
    )

"""Vision Transformer classifier: patch embedding as reshape + matmul, cls token, pre-LN blocks, linear head."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from ir.workload import Workload
from models import common

SUPPORTS_SCAN = False


@dataclasses.dataclass(frozen=True, slots=True)
class ViTConfig:
    """Sizes of a ViT and of its training batch (images are [batch, image, image, channels])."""

    n_layers: int
    d_model: int
    n_heads: int
    d_ff: int
    image_size: int
    patch_size: int
    n_classes: int
    batch_size: int
    channels: int = 3
    dtype: str = "float32"
    remat: bool = False  # activation checkpointing per layer

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


SIZES: dict[str, ViTConfig] = {
    "tiny": ViTConfig(2, 64, 4, 256, image_size=32, patch_size=8, n_classes=16, batch_size=8),
    "vit-base": ViTConfig(12, 768, 12, 3072, image_size=224, patch_size=16, n_classes=1000, batch_size=256),
    "vit-large": ViTConfig(24, 1024, 16, 4096, image_size=224, patch_size=16, n_classes=1000, batch_size=256),
}


def init_layer(key: common.Key, cfg: ViTConfig) -> common.Params:
    """One block: `ln1`, `attn/{q,k,v,o}/{kernel,bias}`, `ln2`, `mlp/{w_in,b_in,w_out,b_out}`."""
    dtype = jnp.dtype(cfg.dtype)
    k_attn, k_in, k_out = common.split_key(key, 3)
    return {
        "ln1": common.norm_init(cfg.d_model, dtype, bias=True),
        "attn": common.attention_init(
            k_attn, cfg.d_model, cfg.n_heads, cfg.n_heads, cfg.d_model // cfg.n_heads, dtype, bias=True
        ),
        "ln2": common.norm_init(cfg.d_model, dtype, bias=True),
        "mlp": {
            "w_in": common.normal(k_in, (cfg.d_model, cfg.d_ff), dtype),
            "b_in": common.zeros((cfg.d_ff,), dtype),
            "w_out": common.normal(k_out, (cfg.d_ff, cfg.d_model), dtype),
            "b_out": common.zeros((cfg.d_model,), dtype),
        },
    }


def init_params(key: common.Key, cfg: ViTConfig) -> common.Params:
    """All parameters: patch embedding, cls token, positions, layers, final norm and head.

    Leaves: `patch_embed/{kernel,bias}` ([p*p*C, d]), `cls/embedding` [1, d], `pos_embed/embedding`
    [1 + patches, d], `layers_i/...`, `ln_f/{scale,bias}`, `head/{kernel,bias}` ([d, n_classes]).
    """
    dtype = jnp.dtype(cfg.dtype)
    k_patch, k_cls, k_pos, k_layers, k_head = common.split_key(key, 5)
    patch_dim = cfg.patch_size * cfg.patch_size * cfg.channels
    return {
        "patch_embed": common.dense_init(k_patch, patch_dim, cfg.d_model, dtype, bias=True),
        "cls": {"embedding": common.normal(k_cls, (1, cfg.d_model), dtype)},
        "pos_embed": {"embedding": common.normal(k_pos, (1 + cfg.n_patches, cfg.d_model), dtype)},
        **common.init_layers(k_layers, cfg.n_layers, functools.partial(init_layer, cfg=cfg), scan=False),
        "ln_f": common.norm_init(cfg.d_model, dtype, bias=True),
        "head": common.dense_init(k_head, cfg.d_model, cfg.n_classes, dtype, bias=True),
    }


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C], patches in row-major order."""
    b, h, w, c = images.shape
    p = patch_size
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def mlp(p: common.Params, x: jax.Array) -> jax.Array:
    """`gelu(x @ w_in + b_in) @ w_out + b_out`."""
    return jax.nn.gelu(x @ p["w_in"] + p["b_in"], approximate=True) @ p["w_out"] + p["b_out"]


def forward(params: common.Params, images: jax.Array, cfg: ViTConfig) -> jax.Array:
    """Class logits [batch, n_classes] for images [batch, image, image, channels]."""
    attn = functools.partial(common.attention, n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads, causal=False)
    block = functools.partial(common.pre_norm_block, norm=common.layer_norm, attn=attn, mlp=mlp)
    x = common.dense(params["patch_embed"], patchify(images.astype(cfg.dtype), cfg.patch_size))
    cls = jnp.broadcast_to(params["cls"]["embedding"][None], (x.shape[0], 1, cfg.d_model))
    x = jnp.concatenate([cls, x], axis=1) + params["pos_embed"]["embedding"]
    x = common.apply_layers(params, x, block, cfg.n_layers, remat=cfg.remat)
    return common.dense(params["head"], common.layer_norm(params["ln_f"], x[:, 0]))


def make_batch(key: common.Key, cfg: ViTConfig) -> common.Batch:
    """Random `images` float32 [B, H, W, C] and `labels` int32 [B]."""
    k_img, k_lab = common.split_key(key, 2)
    shape = (cfg.batch_size, cfg.image_size, cfg.image_size, cfg.channels)
    return {
        "images": common.normal(k_img, shape, jnp.float32, std=1.0),
        "labels": common.randint(k_lab, (cfg.batch_size,), cfg.n_classes),
    }


def build(cfg: ViTConfig, *, scan: bool, source: str) -> Workload:
    """The ViT classification training-step Workload for `cfg`."""
    del scan  # the registry rejects scan=True for ViT

    def loss_fn(params, batch):
        return common.cross_entropy(forward(params, batch["images"], cfg), batch["labels"])

    return common.build_workload(
        init_params=functools.partial(init_params, cfg=cfg),
        make_batch=functools.partial(make_batch, cfg=cfg),
        loss_fn=loss_fn,
        source=source,
    )

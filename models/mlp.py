"""A plain multi-layer perceptron regressor (GELU hidden layers, linear output) trained with MSE."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from ir.workload import Workload
from models import common

SUPPORTS_SCAN = False


@dataclasses.dataclass(frozen=True, slots=True)
class MLPConfig:
    """Layer widths `(d_in, hidden..., d_out)` (one dense layer per consecutive pair) and batch size."""

    widths: tuple[int, ...]
    batch_size: int
    dtype: str = "float32"

    @property
    def n_layers(self) -> int:
        return len(self.widths) - 1


SIZES: dict[str, MLPConfig] = {
    "tiny": MLPConfig((64, 128, 128, 64), batch_size=8),
    "small": MLPConfig((1024, 4096, 4096, 1024), batch_size=256),
    "large": MLPConfig((8192, 32768, 32768, 32768, 8192), batch_size=1024),
}


def init_params(key: common.Key, cfg: MLPConfig) -> common.Params:
    """`layers_i/{kernel,bias}` with kernel [widths[i], widths[i+1]]."""
    dtype = jnp.dtype(cfg.dtype)
    keys = common.split_key(key, cfg.n_layers)
    return {
        f"layers_{i}": common.dense_init(keys[i], d_in, d_out, dtype, bias=True, std=d_in**-0.5)
        for i, (d_in, d_out) in enumerate(zip(cfg.widths[:-1], cfg.widths[1:], strict=True))
    }


def forward(params: common.Params, x: jax.Array, cfg: MLPConfig) -> jax.Array:
    """Predictions [batch, d_out] for inputs [batch, d_in]."""
    for i in range(cfg.n_layers):
        x = common.dense(params[f"layers_{i}"], x)
        if i < cfg.n_layers - 1:
            x = jax.nn.gelu(x, approximate=True)
    return x


def make_batch(key: common.Key, cfg: MLPConfig) -> common.Batch:
    """Random `x` float32 [B, d_in] and `y` float32 [B, d_out]."""
    k_x, k_y = common.split_key(key, 2)
    return {
        "x": common.normal(k_x, (cfg.batch_size, cfg.widths[0]), jnp.float32, std=1.0),
        "y": common.normal(k_y, (cfg.batch_size, cfg.widths[-1]), jnp.float32, std=1.0),
    }


def build(cfg: MLPConfig, *, scan: bool, source: str) -> Workload:
    """The MLP regression training-step Workload for `cfg` (mean squared error)."""
    del scan  # the registry rejects scan=True for the MLP

    def loss_fn(params, batch):
        pred = forward(params, batch["x"].astype(cfg.dtype), cfg)
        return jnp.mean(jnp.square(pred.astype(jnp.float32) - batch["y"]))

    return common.build_workload(
        init_params=functools.partial(init_params, cfg=cfg),
        make_batch=functools.partial(make_batch, cfg=cfg),
        loss_fn=loss_fn,
        source=source,
    )

"""Pieces shared by the built-in models: initialisers, norms, attention, RoPE, losses and the AdamW step."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.ad_checkpoint import checkpoint_name

from ir.workload import Workload

Params = dict[str, Any]
Batch = dict[str, jax.Array]

LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.01
ARG_NAMES = ("params", "opt_state", "batch")
# Learned weights start as N(0, 0.02²), the GPT-2 / BERT / Llama convention.
INIT_STD = 0.02
# Masked attention logits: far below any real score, yet finite so softmax never produces NaN.
_MASK_VALUE = -1e30


# ---------------------------------------------------------------------------------------------------------
# Training step and workload assembly
# ---------------------------------------------------------------------------------------------------------


def optimizer() -> optax.GradientTransformation:
    """The optimizer every built-in model trains with: `optax.adamw(1e-3, weight_decay=0.01)`."""
    return optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)


def make_train_step(
    loss_fn: Callable[[Params, Batch], jax.Array],
) -> Callable[[Params, Any, Batch], tuple[Params, Any, jax.Array]]:
    """Wraps a loss into one AdamW training step.

    Args:
      loss_fn: `loss_fn(params, batch) -> scalar float32 loss`.

    Returns:
      `train_step(params, opt_state, batch) -> (new_params, new_opt_state, loss)`.
    """
    opt = optimizer()

    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, new_opt_state = opt.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        return new_params, new_opt_state, loss

    return train_step


def build_workload(
    *,
    init_params: Callable[[Key], Params],
    make_batch: Callable[[Key], Batch],
    loss_fn: Callable[[Params, Batch], jax.Array],
    source: str,
) -> Workload:
    """Assembles a model's Workload; abstract arguments come from `jax.eval_shape`, so nothing is allocated.

    Args:
      init_params: `init_params(key) -> params`, a traceable random initialiser.
      make_batch: `make_batch(key) -> batch`, a traceable random batch of the configured shape.
      loss_fn: `loss_fn(params, batch) -> scalar loss`.
      source: the workload's rebuild string, e.g. 'builtin:gpt:tiny'.

    Returns:
      A Workload whose `fn` is the AdamW train step, `args` are ShapeDtypeStruct pytrees
      `(params, opt_state, batch)` and `init(seed)` makes the same pytrees with real random arrays
      (drawn on the host with NumPy through `HostKey`, so initialising compiles almost nothing).
    """
    opt = optimizer()
    params = jax.eval_shape(lambda: init_params(jax.random.key(0)))
    opt_state = jax.eval_shape(opt.init, params)
    batch = jax.eval_shape(lambda: make_batch(jax.random.key(1)))
    opt_init = jax.jit(opt.init)

    def init(seed: int) -> tuple[Params, Any, Batch]:
        param_key, batch_key = split_key(HostKey((seed,)), 2)
        real_params = jax.tree.map(jnp.asarray, init_params(param_key))
        return real_params, opt_init(real_params), jax.tree.map(jnp.asarray, make_batch(batch_key))

    return Workload(
        fn=make_train_step(loss_fn),
        args=(params, opt_state, batch),
        donate_argnums=(0, 1),
        init=init,
        arg_names=ARG_NAMES,
        source=source,
    )


# ---------------------------------------------------------------------------------------------------------
# Initialisers
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class HostKey:
    """A random key whose samples NumPy draws on the host.

    `init(seed)` draws parameters and batches with it; `jax.eval_shape` traces the same code with a
    JAX key. (Under jit, every `jax.random` call of a new shape compiles its own threefry kernel, which
    makes even a tiny model take seconds to initialise.) Splitting appends the child index to
    `entropy`, so samples are deterministic.
    """

    entropy: tuple[int, ...]


Key = jax.Array | HostKey


def split_key(key: Key, n: int) -> tuple[Key, ...]:
    """`n` independent keys derived from `key` (a JAX key or a HostKey)."""
    if isinstance(key, HostKey):
        return tuple(HostKey((*key.entropy, i)) for i in range(n))
    return tuple(jax.random.split(key, n))


def normal(key: Key, shape: tuple[int, ...], dtype: Any, std: float = INIT_STD) -> jax.Array:
    """N(0, std²) samples drawn in float32 and cast to `dtype`."""
    if isinstance(key, HostKey):
        samples = np.random.default_rng(key.entropy).standard_normal(shape, dtype=np.float32)
        return (std * samples).astype(dtype)
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def randint(key: Key, shape: tuple[int, ...], high: int) -> jax.Array:
    """Uniform int32 samples in [0, high)."""
    if isinstance(key, HostKey):
        return np.random.default_rng(key.entropy).integers(0, high, shape, dtype=np.int32)
    return jax.random.randint(key, shape, 0, high, jnp.int32)


def bernoulli(key: Key, rate: float, shape: tuple[int, ...]) -> jax.Array:
    """float32 samples that are 1.0 with probability `rate`, else 0.0."""
    if isinstance(key, HostKey):
        return (np.random.default_rng(key.entropy).random(shape) < rate).astype(np.float32)
    return jax.random.bernoulli(key, rate, shape).astype(jnp.float32)


def zeros(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """Host zeros, for biases (a constant, so tracing and real initialisation both take it as is)."""
    return np.zeros(shape, dtype)


def dense_init(key: Key, d_in: int, d_out: int, dtype: Any, *, bias: bool, std: float = INIT_STD) -> Params:
    """A linear layer `{'kernel': [d_in, d_out]}` plus `'bias': [d_out]` (zeros) when `bias`."""
    p = {"kernel": normal(key, (d_in, d_out), dtype, std)}
    if bias:
        p["bias"] = zeros((d_out,), dtype)
    return p


def norm_init(d: int, dtype: Any, *, bias: bool) -> Params:
    """A norm's `{'scale': ones[d]}` plus `'bias': zeros[d]` for LayerNorm."""
    p = {"scale": np.ones((d,), dtype)}
    if bias:
        p["bias"] = zeros((d,), dtype)
    return p


def attention_init(
    key: Key,
    d_model: int,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    dtype: Any,
    *,
    bias: bool,
    out_std: float = INIT_STD,
) -> Params:
    """Attention projections `q, k, v` ([d_model, heads*head_dim]) and `o` ([n_heads*head_dim, d_model])."""
    kq, kk, kv, ko = split_key(key, 4)
    return {
        "q": dense_init(kq, d_model, n_heads * head_dim, dtype, bias=bias),
        "k": dense_init(kk, d_model, n_kv_heads * head_dim, dtype, bias=bias),
        "v": dense_init(kv, d_model, n_kv_heads * head_dim, dtype, bias=bias),
        "o": dense_init(ko, n_heads * head_dim, d_model, dtype, bias=bias, std=out_std),
    }


def init_layers(key: Key, n_layers: int, init_layer: Callable[[Key], Params], *, scan: bool) -> Params:
    """Initialises the transformer layers.

    Layer i is drawn from the i-th split of `key` in both layouts, so a scanned model holds the same
    numbers as its unrolled twin.

    Returns:
      `{'layers_0': ..., 'layers_1': ...}` when unrolled; `{'layers': ...}` with every leaf stacked on a
      leading [n_layers] dim when `scan`.
    """
    if scan and not isinstance(key, HostKey):
        return {"layers": jax.vmap(init_layer)(jax.random.split(key, n_layers))}
    layers = [init_layer(k) for k in split_key(key, n_layers)]
    if scan:
        return {"layers": jax.tree.map(lambda *xs: np.stack(xs), *layers)}
    return {f"layers_{i}": layer for i, layer in enumerate(layers)}


def apply_layers(
    params: Params,
    x: jax.Array,
    block: Callable[[jax.Array, Params], jax.Array],
    n_layers: int,
    *,
    remat: bool = False,
) -> jax.Array:
    """Runs the layers made by `init_layers`: a `jax.lax.scan` over `params['layers']` when stacked.

    `remat`: activation checkpointing per layer (`jax.checkpoint`, nothing saved inside a layer):
    the backward pass recomputes each layer's forward from the layer's input.
    """
    if remat:
        block = jax.checkpoint(block, policy=jax.checkpoint_policies.nothing_saveable)
    if "layers" in params:
        x, _ = jax.lax.scan(lambda h, p: (block(h, p), None), x, params["layers"])
        return x
    for i in range(n_layers):
        x = block(x, params[f"layers_{i}"])
    return x


# ---------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------


def dense(p: Params, x: jax.Array) -> jax.Array:
    """`x @ kernel (+ bias)` over the last dim of x."""
    y = x @ p["kernel"]
    if "bias" in p:
        y = y + p["bias"]
    return y


def layer_norm(p: Params, x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """LayerNorm over the last dim, computed in float32 and returned in x's dtype."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(axis=-1, keepdims=True)
    var = jnp.square(xf - mean).mean(axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps) * p["scale"]
    if "bias" in p:
        y = y + p["bias"]
    return y.astype(x.dtype)


def rms_norm(p: Params, x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """RMSNorm over the last dim, computed in float32 and returned in x's dtype."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.square(xf).mean(axis=-1, keepdims=True) + eps) * p["scale"]
    return y.astype(x.dtype)


def apply_rope(x: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding (half-split convention) on x of shape [batch, seq, heads, head_dim]."""
    seq, head_dim = x.shape[1], x.shape[-1]
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = jnp.arange(seq, dtype=jnp.float32)[:, None] * inv_freq[None, :]  # [seq, head_dim/2]
    cos = jnp.cos(angles)[None, :, None, :]
    sin = jnp.sin(angles)[None, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def attention(
    p: Params,
    x: jax.Array,
    *,
    n_heads: int,
    n_kv_heads: int,
    causal: bool,
    rope_theta: float | None = None,
) -> jax.Array:
    """Multi-head (or grouped-query) self-attention.

    Query head h reads key/value head h // (n_heads // n_kv_heads). Scores and softmax run in float32.

    Args:
      p: projections from `attention_init`.
      x: [batch, seq, d_model].
      n_heads: query heads.
      n_kv_heads: key/value heads; divides n_heads.
      causal: mask future positions.
      rope_theta: apply RoPE to q and k with this base; None for none.

    Returns:
      [batch, seq, d_model], the output projection applied.
    """
    b, s, _ = x.shape
    q, k, v = dense(p["q"], x), dense(p["k"], x), dense(p["v"], x)
    head_dim = q.shape[-1] // n_heads
    q = q.reshape(b, s, n_heads, head_dim)
    k = k.reshape(b, s, n_kv_heads, head_dim)
    v = v.reshape(b, s, n_kv_heads, head_dim)
    if rope_theta is not None:
        q, k = apply_rope(q, rope_theta), apply_rope(k, rope_theta)
    q = q * jnp.asarray(head_dim**-0.5, q.dtype)
    f32 = jnp.float32
    if n_kv_heads == n_heads:
        scores = jnp.einsum("bshd,bthd->bhst", q, k, preferred_element_type=f32)
    else:
        q = q.reshape(b, s, n_kv_heads, n_heads // n_kv_heads, head_dim)
        scores = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=f32)
    if causal:
        scores = jnp.where(jnp.tril(jnp.ones((s, s), bool)), scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    if n_kv_heads == n_heads:
        out = jnp.einsum("bhst,bthd->bshd", probs, v)
    else:
        out = jnp.einsum("bkgst,btkd->bskgd", probs, v)
    return dense(p["o"], out.reshape(b, s, n_heads * head_dim))


def pre_norm_block(
    x: jax.Array,
    p: Params,
    *,
    norm: Callable[[Params, jax.Array], jax.Array],
    attn: Callable[[Params, jax.Array], jax.Array],
    mlp: Callable[[Params, jax.Array], jax.Array],
) -> jax.Array:
    """A pre-norm transformer block `x + attn(norm(x))`, then `x + mlp(norm(x))`, with named activations.

    Names (`checkpoint_name`): 'resid' (block input), 'attn_in', 'attn_out', 'mlp_in', 'mlp_out'.

    Args:
      x: residual stream [batch, seq, d_model].
      p: the layer's params with 'ln1', 'attn', 'ln2', 'mlp'.
      norm: `norm(norm_params, x)`.
      attn: `attn(attn_params, h)`.
      mlp: `mlp(mlp_params, h)`.
    """
    x = checkpoint_name(x, "resid")
    h = checkpoint_name(norm(p["ln1"], x), "attn_in")
    x = x + checkpoint_name(attn(p["attn"], h), "attn_out")
    h = checkpoint_name(norm(p["ln2"], x), "mlp_in")
    return x + checkpoint_name(mlp(p["mlp"], h), "mlp_out")


# ---------------------------------------------------------------------------------------------------------
# Losses and batches
# ---------------------------------------------------------------------------------------------------------


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Mean softmax cross entropy in float32.

    The target log-probability is picked with a one-hot product rather than a gather, so a
    vocab-sharded logits tensor needs only a reduction.

    Args:
      logits: [..., n_classes].
      targets: int [...].
      weights: optional [...] weights (e.g. the MLM mask); the mean is then weighted.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.sum(logp * jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32), axis=-1)
    if weights is None:
        return nll.mean()
    w = weights.astype(jnp.float32)
    return (nll * w).sum() / jnp.maximum(w.sum(), 1.0)


def token_batch(key: Key, batch_size: int, seq_len: int, vocab: int) -> Batch:
    """A random language-model batch `{'tokens', 'targets'}`, both int32 [batch_size, seq_len]."""
    k_tok, k_tgt = split_key(key, 2)
    shape = (batch_size, seq_len)
    return {"tokens": randint(k_tok, shape, vocab), "targets": randint(k_tgt, shape, vocab)}

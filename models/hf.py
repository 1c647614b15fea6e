"""Training-step workloads for four Hugging Face Flax models, used as outside test subjects."""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ir.workload import Workload, WorkloadError

__all__ = ["TP_RULES", "get", "names", "sizes"]

TP_RULES: dict[str, tuple[tuple[str, int], ...]] = {
    "hf-gpt2": (
        # Conv1D kernels are [out, in]: column parallel shards dim 0, row parallel dim 1.
        (r"attn/c_attn/(kernel|bias)$", 0),
        (r"attn/c_proj/kernel$", 1),
        (r"mlp/c_fc/(kernel|bias)$", 0),
        (r"mlp/c_proj/kernel$", 1),
    ),
    "hf-llama": (
        (r"self_attn/(q|k|v)_proj/kernel$", 1),
        (r"self_attn/o_proj/kernel$", 0),
        (r"mlp/(gate|up)_proj/kernel$", 1),
        (r"mlp/down_proj/kernel$", 0),
    ),
    "hf-bert": (
        (r"attention/self/(query|key|value)/kernel$", 1),
        (r"attention/self/(query|key|value)/bias$", 0),
        (r"attention/output/dense/kernel$", 0),
        (r"intermediate/dense/kernel$", 1),
        (r"intermediate/dense/bias$", 0),
        (r"layer/\d+/output/dense/kernel$", 0),
    ),
    "hf-vit": (
        (r"attention/attention/(query|key|value)/kernel$", 1),
        (r"attention/attention/(query|key|value)/bias$", 0),
        (r"attention/output/dense/kernel$", 0),
        (r"intermediate/dense/kernel$", 1),
        (r"intermediate/dense/bias$", 0),
        (r"layer/\d+/output/dense/kernel$", 0),
    ),
}
"""Megatron tensor parallelism per model: (regex, dim) pairs.

Each regex is applied with `re.search` to a '/'-joined param path (with or without a leading
'params/'); a matching param is sharded on `dim` over the tensor-parallel mesh axis, every other
param is replicated over it. Column-parallel layers (q/k/v projections, MLP up projections) shard
their output features and bias; row-parallel layers (attention output, MLP down projection) shard
their input features and keep their bias replicated. At most one rule matches any path.

Param paths ('/'-joined pytree keys of the `params` argument; prefix them with 'params/' for
value names in a Graph). Shapes are at size 'tiny'; L is the layer index (0 and 1).
Flax's GPT-2 Conv1D stores kernels as [out, in] -- the transpose of the PyTorch Conv1D -- and
every other kernel below is a flax Dense kernel, [in, out].

hf-gpt2 (FlaxGPT2LMHeadModel; lm head tied to wte, no separate param)
  transformer/wte/embedding                   (256, 64)    [vocab, hidden]
  transformer/wpe/embedding                   (64, 64)     [positions, hidden]
  transformer/h/L/ln_1/{scale,bias}           (64,)
  transformer/h/L/attn/c_attn/kernel          (192, 64)    [3*hidden (q|k|v), hidden]
  transformer/h/L/attn/c_attn/bias            (192,)
  transformer/h/L/attn/c_proj/kernel          (64, 64)     [hidden out, hidden in]
  transformer/h/L/attn/c_proj/bias            (64,)
  transformer/h/L/ln_2/{scale,bias}           (64,)
  transformer/h/L/mlp/c_fc/kernel             (256, 64)    [inner, hidden]
  transformer/h/L/mlp/c_fc/bias               (256,)
  transformer/h/L/mlp/c_proj/kernel           (64, 256)    [hidden, inner]
  transformer/h/L/mlp/c_proj/bias             (64,)
  transformer/ln_f/{scale,bias}               (64,)

hf-llama (FlaxLlamaForCausalLM; 4 query heads, 2 kv heads, head_dim 16; no biases)
  model/embed_tokens/embedding                (256, 64)    [vocab, hidden]
  model/layers/L/input_layernorm/weight       (64,)
  model/layers/L/self_attn/q_proj/kernel      (64, 64)     [hidden, heads*head_dim]
  model/layers/L/self_attn/k_proj/kernel      (64, 32)     [hidden, kv_heads*head_dim]
  model/layers/L/self_attn/v_proj/kernel      (64, 32)     [hidden, kv_heads*head_dim]
  model/layers/L/self_attn/o_proj/kernel      (64, 64)     [heads*head_dim, hidden]
  model/layers/L/post_attention_layernorm/weight (64,)
  model/layers/L/mlp/gate_proj/kernel         (64, 128)    [hidden, inter]
  model/layers/L/mlp/up_proj/kernel           (64, 128)    [hidden, inter]
  model/layers/L/mlp/down_proj/kernel         (128, 64)    [inter, hidden]
  model/norm/weight                           (64,)
  lm_head/kernel                              (64, 256)    [hidden, vocab]

hf-bert (FlaxBertForMaskedLM; decoder tied to word_embeddings, only its bias is a param)
  bert/embeddings/word_embeddings/embedding   (256, 64)
  bert/embeddings/position_embeddings/embedding (64, 64)
  bert/embeddings/token_type_embeddings/embedding (2, 64)
  bert/embeddings/LayerNorm/{scale,bias}      (64,)
  bert/encoder/layer/L/attention/self/{query,key,value}/kernel (64, 64)  [hidden, heads*head_dim]
  bert/encoder/layer/L/attention/self/{query,key,value}/bias   (64,)
  bert/encoder/layer/L/attention/output/dense/kernel (64, 64)  [heads*head_dim, hidden]
  bert/encoder/layer/L/attention/output/dense/bias   (64,)
  bert/encoder/layer/L/attention/output/LayerNorm/{scale,bias} (64,)
  bert/encoder/layer/L/intermediate/dense/kernel (64, 256)     [hidden, inter]
  bert/encoder/layer/L/intermediate/dense/bias   (256,)
  bert/encoder/layer/L/output/dense/kernel    (256, 64)          [inter, hidden]
  bert/encoder/layer/L/output/dense/bias      (64,)
  bert/encoder/layer/L/output/LayerNorm/{scale,bias} (64,)
  cls/predictions/transform/dense/{kernel,bias} (64, 64), (64,)
  cls/predictions/transform/LayerNorm/{scale,bias} (64,)
  cls/predictions/bias                        (256,)             [vocab]

hf-vit (FlaxViTForImageClassification; 4x4 patches of 8x8 + cls = 17 tokens)
  vit/embeddings/cls_token                    (1, 1, 64)
  vit/embeddings/position_embeddings          (1, 17, 64)
  vit/embeddings/patch_embeddings/projection/kernel (8, 8, 3, 64)  [kh, kw, in_ch, hidden] (HWIO)
  vit/embeddings/patch_embeddings/projection/bias   (64,)
  vit/encoder/layer/L/layernorm_before/{scale,bias} (64,)
  vit/encoder/layer/L/attention/attention/{query,key,value}/kernel (64, 64)
  vit/encoder/layer/L/attention/attention/{query,key,value}/bias   (64,)
  vit/encoder/layer/L/attention/output/dense/{kernel,bias} (64, 64), (64,)
  vit/encoder/layer/L/layernorm_after/{scale,bias} (64,)
  vit/encoder/layer/L/intermediate/dense/{kernel,bias} (64, 256), (256,)
  vit/encoder/layer/L/output/dense/{kernel,bias} (256, 64), (64,)
  vit/layernorm/{scale,bias}                  (64,)
  classifier/{kernel,bias}                    (64, 8), (8,)
"""

_INSTALL_HINT = "pip install 'auto-partition[test]'"
_LEARNING_RATE = 1e-3
_WEIGHT_DECAY = 0.01
# BERT's real [MASK] id (103) is outside the tiny vocab; any fixed id serves a synthetic batch.
_MASK_TOKEN_ID = 3
_MASK_PROB = 0.15


class _Task(enum.Enum):
    CAUSAL_LM = "causal-lm"
    MASKED_LM = "masked-lm"
    IMAGE_CLASSIFICATION = "image-classification"


@dataclasses.dataclass(frozen=True, slots=True)
class _Size:
    """A model config and the batch it is stepped on.

    Attributes:
      config: keyword arguments of the transformers config class.
      batch: examples per step.
      seq: tokens per example (text models; ViT's sequence follows from image and patch size).
    """

    config: tuple[tuple[str, Any], ...]
    batch: int
    seq: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class _Model:
    model_class: str
    config_class: str
    task: _Task
    sizes: tuple[tuple[str, _Size], ...]


def _kw(**kwargs: Any) -> tuple[tuple[str, Any], ...]:
    return tuple(kwargs.items())


# Dropout off everywhere: the step is deterministic, so sharded and unsharded runs compare exactly.
_DROPOUT_OFF = {
    "hf-gpt2": _kw(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "hf-llama": _kw(attention_dropout=0.0),
    "hf-bert": _kw(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "hf-vit": _kw(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
}

# 'base' sizes are published configs: GPT-2 small (124M), TinyLlama-1.1B, bert-base-uncased and
# ViT-B/16 at 224x224 with 1000 classes.
_MODELS: dict[str, _Model] = {
    "hf-gpt2": _Model(
        "FlaxGPT2LMHeadModel",
        "GPT2Config",
        _Task.CAUSAL_LM,
        (
            (
                "tiny",
                _Size(
                    _kw(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4, n_inner=256),
                    batch=8,
                    seq=16,
                ),
            ),
            (
                "base",
                _Size(
                    _kw(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
                    batch=8,
                    seq=512,
                ),
            ),
        ),
    ),
    "hf-llama": _Model(
        "FlaxLlamaForCausalLM",
        "LlamaConfig",
        _Task.CAUSAL_LM,
        (
            (
                "tiny",
                _Size(
                    _kw(
                        vocab_size=256,
                        hidden_size=64,
                        intermediate_size=128,
                        num_hidden_layers=2,
                        num_attention_heads=4,
                        num_key_value_heads=2,
                        max_position_embeddings=64,
                    ),
                    batch=8,
                    seq=16,
                ),
            ),
            (
                "base",
                _Size(
                    _kw(
                        vocab_size=32000,
                        hidden_size=2048,
                        intermediate_size=5632,
                        num_hidden_layers=22,
                        num_attention_heads=32,
                        num_key_value_heads=4,
                        max_position_embeddings=2048,
                    ),
                    batch=8,
                    seq=512,
                ),
            ),
        ),
    ),
    "hf-bert": _Model(
        "FlaxBertForMaskedLM",
        "BertConfig",
        _Task.MASKED_LM,
        (
            (
                "tiny",
                _Size(
                    _kw(
                        vocab_size=256,
                        hidden_size=64,
                        num_hidden_layers=2,
                        num_attention_heads=4,
                        intermediate_size=256,
                        max_position_embeddings=64,
                    ),
                    batch=8,
                    seq=16,
                ),
            ),
            (
                "base",
                _Size(
                    _kw(
                        vocab_size=30522,
                        hidden_size=768,
                        num_hidden_layers=12,
                        num_attention_heads=12,
                        intermediate_size=3072,
                        max_position_embeddings=512,
                    ),
                    batch=8,
                    seq=512,
                ),
            ),
        ),
    ),
    "hf-vit": _Model(
        "FlaxViTForImageClassification",
        "ViTConfig",
        _Task.IMAGE_CLASSIFICATION,
        (
            (
                "tiny",
                _Size(
                    _kw(
                        image_size=32,
                        patch_size=8,
                        num_channels=3,
                        hidden_size=64,
                        num_hidden_layers=2,
                        num_attention_heads=4,
                        intermediate_size=256,
                        num_labels=8,
                    ),
                    batch=8,
                ),
            ),
            (
                "base",
                _Size(
                    _kw(
                        image_size=224,
                        patch_size=16,
                        num_channels=3,
                        hidden_size=768,
                        num_hidden_layers=12,
                        num_attention_heads=12,
                        intermediate_size=3072,
                        num_labels=1000,
                    ),
                    batch=8,
                ),
            ),
        ),
    ),
}


def names() -> tuple[str, ...]:
    """The Hugging Face model names `get` accepts."""
    return tuple(_MODELS)


def sizes(name: str) -> tuple[str, ...]:
    """The sizes `get(name, size)` accepts, smallest first."""
    return tuple(size for size, _ in _model(name).sizes)


def get(name: str, size: str = "tiny") -> Workload:
    """Builds the training step of a Hugging Face Flax model as a Workload.

    The step is `train_step(params, opt_state, batch) -> (params, opt_state, loss)`: a deterministic
    forward pass (dropout off), the task loss, `jax.value_and_grad`, AdamW (lr 1e-3, weight decay
    0.01) and `optax.apply_updates`, all in float32. `args` are ShapeDtypeStructs made with
    `jax.eval_shape`, so building a workload allocates nothing; `init(seed)` makes real arrays with
    the same tree structure.

    Batches (B examples, S tokens):
      hf-gpt2, hf-llama: {'input_ids': int32[B, S]}; loss is next-token cross-entropy.
      hf-bert: {'input_ids': int32[B, S], 'labels': int32[B, S], 'mask_weights': float32[B, S]};
        loss is cross-entropy on positions with weight 1 (15% of tokens, replaced by a mask id).
      hf-vit: {'pixel_values': float32[B, C, H, W] (NCHW, as HF expects), 'labels': int32[B]};
        loss is classification cross-entropy.

    Args:
      name: one of `names()`.
      size: one of `sizes(name)`. 'tiny': hidden 64, 4 heads (Llama: 2 kv heads), 2 layers,
        vocab 256, B=8, S=16; ViT: 32x32x3 images in 8x8 patches, 17 tokens, 8 labels. Batch,
        hidden, heads, MLP and vocab divide evenly over meshes of 8, 2x4 and 2x2x2 (ViT's 17
        tokens divide nothing). 'base': the published config of a small real model (tracing it
        allocates nothing, but `init` does).

    Returns:
      A Workload with arg_names ('params', 'opt_state', 'batch'), donate_argnums (0, 1) and
      source 'hf:{name}:{size}'.

    Raises:
      WorkloadError: unknown name or size, or transformers/flax/optax not installed.
    """
    spec = _model(name)
    chosen = dict(spec.sizes).get(size)
    if chosen is None:
        raise WorkloadError(f"{name}: unknown size {size!r}; available sizes are {', '.join(sizes(name))}.")
    transformers, optax = _import_deps(name)
    config_kwargs = dict(chosen.config) | dict(_DROPOUT_OFF[name])
    config = getattr(transformers, spec.config_class)(**config_kwargs)
    # _do_init=False: the model holds no weights, so `fn` closes over no arrays and building the
    # workload allocates nothing.
    model = getattr(transformers, spec.model_class)(config, _do_init=False)
    init_params = functools.partial(model.init_weights, input_shape=model.input_shape)
    make_batch = functools.partial(_make_batch, spec.task, config, chosen)
    loss_fn = functools.partial(_LOSSES[spec.task], model)
    optimizer = optax.adamw(_LEARNING_RATE, weight_decay=_WEIGHT_DECAY)

    def train_step(params: Any, opt_state: Any, batch: dict[str, jax.Array]) -> tuple[Any, Any, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def make_args(key: jax.Array) -> tuple[Any, Any, Any]:
        key_params, key_batch = jax.random.split(key)
        params = init_params(key_params)
        return params, optimizer.init(params), make_batch(key_batch)

    def init(seed: int) -> tuple[Any, Any, Any]:
        return jax.jit(make_args)(jax.random.PRNGKey(seed))

    return Workload(
        fn=train_step,
        args=jax.eval_shape(make_args, jax.ShapeDtypeStruct((2,), jnp.uint32)),
        donate_argnums=(0, 1),
        init=init,
        arg_names=("params", "opt_state", "batch"),
        source=f"hf:{name}:{size}",
    )


def _model(name: str) -> _Model:
    spec = _MODELS.get(name)
    if spec is None:
        raise WorkloadError(f"unknown Hugging Face model {name!r}; available: {', '.join(names())}.")
    return spec


def _import_deps(name: str) -> tuple[Any, Any]:
    try:
        import flax  # noqa: F401  (transformers' Flax models need it; import it to name it if missing)
        import optax
        import transformers
    except ImportError as e:
        raise WorkloadError(
            f"{name} needs transformers, flax and optax ({e}). Install them with {_INSTALL_HINT}."
        ) from None
    return transformers, optax


def _make_batch(task: _Task, config: Any, size: _Size, key: jax.Array) -> dict[str, jax.Array]:
    """A random batch for `task`; see `get` for the shapes."""
    if task is _Task.IMAGE_CLASSIFICATION:
        key_pixels, key_labels = jax.random.split(key)
        shape = (size.batch, config.num_channels, config.image_size, config.image_size)
        return {
            "pixel_values": jax.random.normal(key_pixels, shape, jnp.float32),
            "labels": jax.random.randint(key_labels, (size.batch,), 0, config.num_labels, jnp.int32),
        }
    key_ids, key_mask = jax.random.split(key)
    ids = jax.random.randint(key_ids, (size.batch, size.seq), 0, config.vocab_size, jnp.int32)
    if task is _Task.CAUSAL_LM:
        return {"input_ids": ids}
    masked = jax.random.bernoulli(key_mask, _MASK_PROB, ids.shape)
    return {
        "input_ids": jnp.where(masked, _MASK_TOKEN_ID, ids),
        "labels": ids,
        "mask_weights": masked.astype(jnp.float32),
    }


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy; logits [..., classes] float, labels [...] int."""
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]


def _causal_lm_loss(model: Any, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
    ids = batch["input_ids"]
    logits = model(ids, params=params, train=False).logits
    return _cross_entropy(logits[:, :-1], ids[:, 1:]).mean()


def _masked_lm_loss(model: Any, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
    logits = model(batch["input_ids"], params=params, train=False).logits
    weights = batch["mask_weights"]
    return (_cross_entropy(logits, batch["labels"]) * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def _image_classification_loss(model: Any, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
    logits = model(batch["pixel_values"], params=params, train=False).logits
    return _cross_entropy(logits, batch["labels"]).mean()


_LOSSES: dict[_Task, Callable[[Any, Any, dict[str, jax.Array]], jax.Array]] = {
    _Task.CAUSAL_LM: _causal_lm_loss,
    _Task.MASKED_LM: _masked_lm_loss,
    _Task.IMAGE_CLASSIFICATION: _image_classification_loss,
}

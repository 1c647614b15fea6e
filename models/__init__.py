"""Built-in models in pure JAX + optax: mlp, gpt, llama, bert, vit and moe training steps as Workloads."""

from __future__ import annotations

from models.registry import config, get, names, sizes

__all__ = ["config", "get", "names", "sizes"]

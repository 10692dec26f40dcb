"""Sizes computed without allocating: parameter counts and decode-cache numbers per token."""

from __future__ import annotations

import math

import jax
from flax import nnx

from t6_jax.config import ModelConfig


def abstract_model(cfg: ModelConfig):
  from t6_jax.model.transformer import Transformer
  return nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))


def param_count(cfg: ModelConfig) -> int:
  """All parameters, the tied embedding/LM head counted once (jax.eval_shape, no memory)."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract_model(cfg),
                                                                    nnx.Param)))


def cache_numbers_per_token_per_layer(cfg: ModelConfig) -> int:
  """Numbers a decode cache stores per past token and layer (TPA: A_k, B_k, A_v, B_v; MLA: the
  latent and the shared rope key; MHA family: K and V of every KV head)."""
  if cfg.attention in ("tpa", "tpa_kvonly"):
    return (cfg.k_rank + cfg.v_rank) * (cfg.num_heads + cfg.head_dim)
  if cfg.attention == "mla":
    return cfg.mla_kv_lora + cfg.mla_rope_dim
  return 2 * cfg.kv_heads * cfg.head_dim


def cache_bytes_per_token(cfg: ModelConfig, dtype: str = "bfloat16") -> int:
  """Bytes one past token takes in a decode cache of `dtype`, over all layers."""
  import jax.numpy as jnp
  return cache_numbers_per_token_per_layer(cfg) * cfg.num_layers * jnp.dtype(dtype).itemsize

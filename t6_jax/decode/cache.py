"""The decode cache: what each attention type's `entries()` returns, kept for every past token.

One pytree for the whole model, allocated once at a fixed length: each entry of the attention
class (`ENTRY_AXES`) gets an array (layers, batch, cache_length, ...) stacked on the layers axis
like the parameters. TPA stores A_k, RoPE-rotated B_k, A_v, B_v; MHA/MQA/GQA rotated K and V
at their KV-head count; MLA its normalised latent and rotated rope key.

Prompts are left-aligned to a shared end slot, so every sequence writes its next entry into the
same slot: `length` (a scalar) is the number of slots written, `pad_B` says how many leading
slots of each row are padding (masked out; RoPE positions are slot - pad).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from t6_jax.config import ModelConfig
from t6_jax.model.attention import make_attention
from t6_jax.sharding import RULES, Rules, constrain, rules_table


@dataclasses.dataclass(frozen=True)
class Cache:
  """entries: {name: (layers, B, S, ...)}; pad_B: (B,) int32; length: () int32 slots written."""

  entries: dict
  pad_B: jax.Array
  length: jax.Array

  @property
  def max_len(self) -> int:
    return next(iter(self.entries.values())).shape[2]


jax.tree_util.register_dataclass(Cache, data_fields=["entries", "pad_B", "length"],
                                 meta_fields=[])


def entry_axes(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
  """Logical axis names of every cache array, the attention class's ENTRY_AXES + `layers`."""
  cls = type(nnx.eval_shape(lambda: make_attention(cfg, nnx.Rngs(0), RULES["fsdp"])))
  return {name: ("layers",) + tuple(axes) for name, axes in cls.ENTRY_AXES.items()}


def entry_shapes(cfg: ModelConfig, batch: int, max_len: int,
                 dtype: str = "bfloat16") -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of the cache arrays, read off the attention class's own `entries()` (no memory)."""
  def one_layer():
    attn = make_attention(cfg, nnx.Rngs(0), RULES["fsdp"])
    x_BxSxD = jnp.zeros((batch, max_len, cfg.d_model), jnp.float32)
    dim = cfg.mla_rope_dim if cfg.attention == "mla" else cfg.head_dim
    rope = (jnp.zeros((batch, max_len, dim // 2)),) * 2
    return attn.entries(x_BxSxD, rope)

  per_layer = jax.eval_shape(one_layer)
  return {name: jax.ShapeDtypeStruct((cfg.num_layers,) + s.shape, jnp.dtype(dtype))
          for name, s in per_layer.items()}


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: str = "bfloat16",
               rules: str | Rules = "fsdp") -> Cache:
  """An empty cache (zeros), sharded by `rules` when traced under a mesh."""
  axes = entry_axes(cfg)
  entries = {name: constrain(jnp.zeros(s.shape, s.dtype), axes[name], rules_table(rules))
             for name, s in entry_shapes(cfg, batch, max_len, dtype).items()}
  return Cache(entries, jnp.zeros((batch,), jnp.int32), jnp.zeros((), jnp.int32))


def cache_bytes(cfg: ModelConfig, batch: int, max_len: int, dtype: str = "bfloat16") -> int:
  shapes = entry_shapes(cfg, batch, max_len, dtype)
  return sum(math.prod(s.shape) * s.dtype.itemsize for s in shapes.values())

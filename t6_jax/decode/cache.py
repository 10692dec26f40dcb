"""The decode cache: what each attention type's `entries()` returns, kept for every past token.

One pytree for the whole model, allocated once at a fixed length: each entry of the attention
class (`ENTRY_AXES`) gets an array (layers, batch, cache_length, ...) stacked on the layers axis
like the parameters. TPA stores A_k, RoPE-rotated B_k, A_v, B_v; MHA/MQA/GQA rotated K and V
at their KV-head count; MLA its normalised latent and rotated rope key.

When a decode kernel (Mosaic on TPU, Triton on GPU) will read it, a TPA cache is stored in the
kernels' layout (`kernels.FactorCacheLayout`: A factors transposed to (layers, B, rows, S), B
factors flat), so the kernel reads it in place as 2-D tiles instead of relaying out the whole
cache on every step; the model writes new entries straight into it and its XLA paths read it
back per layer.

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
from t6_jax.kernels import FactorCacheLayout
from t6_jax.model.attention import make_attention
from t6_jax.sharding import RULES, Rules, constrain, rules_table


@dataclasses.dataclass(frozen=True)
class Cache:
  """entries: {name: (layers, B, S, ...)}; pad_B: (B,) int32; length: () int32 slots written;
  layout (static): None, or the `FactorCacheLayout` the entries are stored in."""

  entries: dict
  pad_B: jax.Array
  length: jax.Array
  layout: FactorCacheLayout | None = None

  @property
  def max_len(self) -> int:
    name, x = next(iter(self.entries.items()))
    return x.shape[2 if self.layout is None else self.layout.slot_axis(name)]


jax.tree_util.register_dataclass(Cache, data_fields=["entries", "pad_B", "length"],
                                 meta_fields=["layout"])


def entry_axes(cfg: ModelConfig,
               layout: FactorCacheLayout | None = None) -> dict[str, tuple[str, ...]]:
  """Logical axis names of every cache array, the attention class's ENTRY_AXES + `layers`
  (in `layout`: A factors (layers, batch, rows, slots), split by heads only when the layout
  splits them; B factors (layers, batch, slots, R*d_h))."""
  if layout is not None:
    rows = "act_heads" if layout.shards > 1 else None
    return {name: (("layers", "batch", rows, "cache_length") if name.startswith("a_") else
                   ("layers", "batch", "cache_length", None))
            for name in ("a_k", "b_k", "a_v", "b_v")}
  cls = type(nnx.eval_shape(lambda: make_attention(cfg, nnx.Rngs(0), RULES["fsdp"])))
  return {name: ("layers",) + tuple(axes) for name, axes in cls.ENTRY_AXES.items()}


def entry_shapes(cfg: ModelConfig, batch: int, max_len: int, dtype: str = "bfloat16",
                 layout: FactorCacheLayout | None = None) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of the cache arrays, read off the attention class's own `entries()` (no memory),
  stored in `layout` when given."""
  def one_layer():
    attn = make_attention(cfg, nnx.Rngs(0), RULES["fsdp"])
    x_BxSxD = jnp.zeros((batch, max_len, cfg.d_model), jnp.float32)
    dim = cfg.mla_rope_dim if cfg.attention == "mla" else cfg.head_dim
    rope = (jnp.zeros((batch, max_len, dim // 2)),) * 2
    return attn.entries(x_BxSxD, rope)

  per_layer = jax.eval_shape(one_layer)
  shape = lambda name, s: ((cfg.num_layers,) + s.shape if layout is None
                           else layout.shape(name, (cfg.num_layers,) + s.shape))
  return {name: jax.ShapeDtypeStruct(shape(name, s), jnp.dtype(dtype))
          for name, s in per_layer.items()}


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: str = "bfloat16",
               rules: str | Rules = "fsdp", layout: FactorCacheLayout | None = None) -> Cache:
  """An empty cache (zeros) stored in `layout`, sharded by `rules` when traced under a mesh."""
  axes = entry_axes(cfg, layout)
  entries = {name: constrain(jnp.zeros(s.shape, s.dtype), axes[name], rules_table(rules))
             for name, s in entry_shapes(cfg, batch, max_len, dtype, layout).items()}
  return Cache(entries, jnp.zeros((batch,), jnp.int32), jnp.zeros((), jnp.int32), layout)


def cache_bytes(cfg: ModelConfig, batch: int, max_len: int, dtype: str = "bfloat16") -> int:
  shapes = entry_shapes(cfg, batch, max_len, dtype)
  return sum(math.prod(s.shape) * s.dtype.itemsize for s in shapes.values())

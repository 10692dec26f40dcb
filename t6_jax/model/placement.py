"""The model's parameters on a mesh: their shardings from the logical axes and a rules table.

  param_shardings(cfg, mesh, rules) -> NamedSharding per parameter (the `init_params` layout)
  shard_params(params, cfg, mesh, rules) -> params placed by those shardings
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from t6_jax import sharding as sharding_lib
from t6_jax.config import ModelConfig
from t6_jax.model.transformer import init_params, param_axes


@functools.lru_cache(maxsize=16)
def abstract_params(cfg: ModelConfig) -> dict:
  """ShapeDtypeStructs of `init_params(cfg)` without allocating anything (cached: tracing the
  model takes a moment and configs are frozen)."""
  return jax.eval_shape(lambda: init_params(cfg, 0))


def param_shardings(cfg: ModelConfig, mesh, rules: str | sharding_lib.Rules) -> dict:
  """NamedShardings of every parameter on `mesh` from its logical axes under `rules`."""
  specs = sharding_lib.param_specs(param_axes(cfg), abstract_params(cfg), mesh, rules)
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                      is_leaf=lambda v: isinstance(v, P))


def shard_params(params: dict, cfg: ModelConfig, mesh, rules: str | sharding_lib.Rules) -> dict:
  """`params` placed on `mesh` by their logical axes under `rules` (unchanged without mesh)."""
  if mesh is None:
    return params
  return jax.device_put(params, param_shardings(cfg, mesh, rules))

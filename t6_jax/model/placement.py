"""The model's parameters on a mesh: their shardings from the logical axes and a rules table.

  param_shardings(cfg, mesh, rules) -> NamedSharding per parameter (the `init_params` layout)
  shard_params(params, cfg, mesh, rules) -> params placed by those shardings
  config_for_mesh(cfg, mesh, rules) -> cfg with heads / MLP width padded to split over the mesh
  pad_params(params, cfg, padded, mesh, rules) -> params of that config (same outputs)
  forward_params(cfg, params, mesh, rules) -> (config, params) as evaluation and generation
      hold them: `inference_params`, padded
  padded_in_step(params, cfg, rules) -> (config, params) padded inside a traced step
  padding_changes(cfg, padded) -> what the padding changed, for a note
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from t6_jax import sharding as sharding_lib
from t6_jax.config import ModelConfig
from t6_jax.model.transformer import inference_params, init_params, param_axes


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


# Attention types whose heads can be padded: every head is independent (its own query, key
# and value rows) and the head count is free. The grouped types (GQA, MQA) tie query heads to
# KV heads by position; MHA's heads tile d_model (heads x head_dim = d_model).
PADDABLE_HEADS = ("tpa", "tpa_kvonly", "mla")


def config_for_mesh(cfg: ModelConfig, mesh, rules: str | sharding_lib.Rules) -> ModelConfig:
  """`cfg` with the query heads and the MLP's hidden units rounded up to a multiple of the mesh
  axes that split them under `rules` (`heads` and `mlp` over `tensor` in `fsdp_tp`), so that
  they do split: T6-XL's 78 heads and 4,266 units do not divide by 4 or 8 tensor shards and
  would otherwise stay whole on every shard. `cfg` itself where nothing needs padding, without
  a mesh, or for the heads of MHA, GQA and MQA."""
  if mesh is None:
    return cfg
  rules = sharding_lib.rules_table(rules)
  shards = lambda name: math.prod(mesh.shape.get(a, 1) for a in rules.mesh_axes(name))
  up = lambda n, m: -(-n // m) * m
  changes = {}
  if cfg.attention in PADDABLE_HEADS and cfg.num_heads % shards("heads"):
    changes["num_heads"] = up(cfg.num_heads, shards("heads"))
  if cfg.mlp_dim % shards("mlp"):
    changes["mlp_hidden"] = up(cfg.mlp_dim, shards("mlp"))
  return dataclasses.replace(cfg, **changes) if changes else cfg


def pad_params(params: dict, cfg: ModelConfig, padded: ModelConfig, mesh=None,
               rules: str | sharding_lib.Rules = "fsdp") -> dict:
  """`params` of `cfg` as parameters of `padded` (`config_for_mesh`): zeros appended along the
  heads and the MLP's hidden units, in any dtype, placed by `padded`'s shardings on `mesh`.

  The model's outputs do not change: a padded head's query and value rows are zero (its
  attention output is zero whatever it attends to) and so are its output-projection rows; a
  padded hidden unit's gate and up columns are zero (silu(0) * 0 = 0) and so is its
  output-projection row. Sums gain zero terms, so results agree to rounding (tested)."""
  if padded == cfg:
    return params
  target = abstract_params(padded)
  place = {} if mesh is None else {"out_shardings": param_shardings(padded, mesh, rules)}
  return jax.jit(lambda p: jax.tree.map(_padded_to, p, target), **place)(params)


def forward_params(cfg: ModelConfig, params: dict, mesh,
                   rules: str | sharding_lib.Rules) -> tuple[ModelConfig, dict]:
  """(config, params) as a forward-only run (evaluation, generation) holds them on `mesh`:
  block matrices in the compute dtype (`inference_params`), padded for the tensor axis
  (`config_for_mesh`, `pad_params`)."""
  padded = config_for_mesh(cfg, mesh, rules)
  return padded, pad_params(inference_params(cfg, params), cfg, padded, mesh, rules)


def _padded_to(x, want):
  """x with zeros appended along each axis up to `want`'s shape."""
  return jnp.pad(x, [(0, w - n) for n, w in zip(x.shape, want.shape)])


def padded_in_step(params: dict, cfg: ModelConfig,
                   rules: str | sharding_lib.Rules) -> tuple[ModelConfig, dict]:
  """(config, params) for a step traced under a mesh (`jax.set_mesh`): `config_for_mesh`'s
  padding applied to the parameters inside the step, each padded array constrained to its
  logical axes, so that a training step splits heads and MLP units over the tensor axis even
  where it does not divide them. The stored parameters, optimizer state and checkpoints keep
  the model's own sizes; the padding's gradient is sliced off by the pad's transpose, and the
  padded rows' gradients are zero (a zero head or unit contributes nothing), so the update
  is the unpadded model's. (cfg, params) unchanged where nothing needs padding."""
  mesh = jax.sharding.get_abstract_mesh()
  padded = cfg if mesh.empty else config_for_mesh(cfg, mesh, rules)
  if padded == cfg:
    return cfg, params
  rules = sharding_lib.rules_table(rules)
  target, axes = abstract_params(padded), param_axes(padded)

  return padded, jax.tree.map(
      lambda x, want, names: sharding_lib.constrain(_padded_to(x, want), names, rules),
      params, target, axes, is_leaf=lambda v: isinstance(v, jax.Array))


def padding_changes(cfg: ModelConfig, padded: ModelConfig) -> str:
  """What `config_for_mesh` changed, as settings: 'model.num_heads 78 -> 80 and
  model.mlp_hidden 4266 -> 4272' ('' for nothing)."""
  return " and ".join(f"model.{key} {getattr(cfg, prop)} -> {getattr(padded, prop)}"
                      for key, prop in (("num_heads", "num_heads"), ("mlp_hidden", "mlp_dim"))
                      if getattr(cfg, prop) != getattr(padded, prop))

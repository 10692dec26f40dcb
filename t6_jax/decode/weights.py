"""The model as the token loop reads it, prepared once: `DecodeWeights`.

A decode step reads every weight matrix once, so anything done to the weights inside the jitted
token loop (casting fp32 parameters to the compute dtype, slicing each layer out of the
stacked arrays, packing the projections one product reads, storing the batch-1 matrices
output-major) is paid again on every call of the loop: on an H200 about 3 ms a call for T6-XL,
0.18 ms a step at 16 steps a call. `prepare` does it once, in its own jitted program; the
token loop (`generate.decode_loop`) given `DecodeWeights` only reads them
(`prepare_before_loop` says when `generate` does so).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from t6_jax.config import ModelConfig
from t6_jax.model import model_from_params
from t6_jax.model.layers import dense


class _CastHead(nnx.Module):
  """The tied embedding with its LM-head use cast to the compute dtype once, before the token
  loop (reading a float32 table every step would double the head's bytes); lookups keep the
  stored table, so the residual stream starts exactly as in training."""

  def __init__(self, embed, head_VxD):
    self.embed = embed
    self.head_VxD = nnx.Variable(head_VxD)

  def __call__(self, tokens_BxT):
    return self.embed(tokens_BxT)

  def logits(self, x_BxTxD):
    head_VxD = self.head_VxD[...]
    return dense("btd,vd->btv", x_BxTxD.astype(head_VxD.dtype), head_VxD).astype(jnp.float32)


def model_in_compute_dtype(model_cfg: ModelConfig, params, rules: str, cast_head: bool = False,
                           per_layer: bool = False, one_row: bool = False):
  """The model with its block weights (and with `cast_head` the LM head) cast to the compute
  dtype, outside any loop (`per_layer`, `one_row`: see `Transformer.in_compute_dtype`)."""
  model = model_from_params(model_cfg, params, rules).in_compute_dtype(per_layer, one_row)
  dtype = jnp.dtype(model_cfg.dtype)
  if cast_head and model.embed.wte[...].dtype != dtype:
    model.embed = _CastHead(model.embed, model.embed.wte[...].astype(dtype))
  return model


@partial(jax.tree_util.register_dataclass, data_fields=["arrays"],
         meta_fields=["graphdef", "treedef", "model_cfg", "one_row"])
@dataclasses.dataclass(frozen=True)
class DecodeWeights:
  """A model's weights prepared for the token loop (a pytree: pass it to jitted functions; its
  arrays keep the parameters' shardings). The arrays are a flat tuple, with the nnx state's
  structure as static data: jax flattens a tuple in C++ on each call, the nnx state node by
  node in Python (measured on CPU at T6-small's 12 layers: 54 vs 193 us a call). `one_row`:
  prepared for batch-1 decoding (packed matrices output-major); the loop checks its batch."""
  graphdef: Any
  treedef: Any
  arrays: tuple
  model_cfg: ModelConfig
  one_row: bool

  def model(self):
    return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, self.arrays))


def for_loop(model_cfg: ModelConfig, params, rules: str, one_row: bool):
  """The model the token loop runs, from DecodeWeights or (prepared here, inside the caller's
  trace) from parameters."""
  if not isinstance(params, DecodeWeights):
    return model_in_compute_dtype(model_cfg, params, rules, cast_head=True, per_layer=True,
                                  one_row=one_row)
  if params.model_cfg != model_cfg:
    raise ValueError("these DecodeWeights were prepared for another model config; prepare "
                     "them from the parameters with this config")
  if params.one_row != one_row:
    want = "batch 1" if one_row else "batches of more than one row"
    raise ValueError(f"these DecodeWeights were prepared for one_row={params.one_row} but the "
                     f"loop decodes {want}; prepare them with batch="
                     f"{1 if one_row else 'the batch size'}")
  return params.model()


@partial(jax.jit, static_argnames=("model_cfg", "rules", "one_row"))
def _prepare(params, *, model_cfg, rules, one_row):
  graphdef, state = nnx.split(for_loop(model_cfg, params, rules, one_row))
  arrays, treedef = jax.tree.flatten(state)
  return DecodeWeights(graphdef, treedef, tuple(arrays), model_cfg, one_row)


def prepare_before_loop(batch: int) -> bool:
  """Whether `generate` prepares the weights once before the token loop (batch 1) or lets the
  loop prepare them inside its call (batches). Measured side by side on an H200 (16 steps a
  call): prepared before, T6-XL 1 x 2k takes 2.246-2.249 ms a step against 2.428-2.430 and
  T6-small 1 x 2k 0.373-0.379 against 0.382-0.389, but T6-small 16 x 32k 1.636-1.642 against
  1.617-1.619: inside the call XLA also picks the packed matrices' layouts for its GEMMs."""
  return batch == 1


def prepare(model_cfg: ModelConfig, params, rules: str, batch: int) -> DecodeWeights:
  """DecodeWeights of placed parameters for a token loop over `batch` rows (call it under the
  mesh the parameters are placed on, as the loop is)."""
  if batch < 1:
    raise ValueError(f"batch={batch}: prepare for at least one row")
  return _prepare(params, model_cfg=model_cfg, rules=rules, one_row=batch == 1)


def prepare_shapes(model_cfg: ModelConfig, params, rules: str, batch: int) -> DecodeWeights:
  """The DecodeWeights `prepare` would return, as shapes (for lowering a loop ahead of time)."""
  return jax.eval_shape(partial(_prepare, model_cfg=model_cfg, rules=rules,
                                one_row=batch == 1), params)

"""model.attention_impl=splash (interpret mode on CPU) against attention_impl=xla through the
whole model: forward logits and parameter gradients, for every attention type with packed
documents (segment ids) under shard_map on 8 forced CPU devices, and causal on one device for
each shape of call the kernel sees (as many K/V heads as query heads, fewer, a V width of its
own)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t6_jax import config as config_lib
from t6_jax import kernels
from t6_jax.kernels import Mask
from t6_jax.model import init_params, model_from_params
from t6_jax.sharding import make_mesh

ATTENTIONS = ("tpa", "tpa_kvonly", "mha", "gqa", "mqa", "mla")
BATCH, T = 4, 40  # T not a multiple of splash's 128-wide blocks (padded inside)


def tiny(attention: str):
  return config_lib.load("tiny", [
      f"model.attention={attention}", "model.num_layers=1", "model.num_kv_heads=2",
      "model.mla_q_lora=24", "model.mla_kv_lora=16", "model.mla_nope_dim=8",
      "model.mla_rope_dim=8", "model.mla_v_dim=12", "model.head_dim=16",
      "model.d_model=64"]).model


@functools.lru_cache(maxsize=None)
def params_of(cfg):
  """N(0, 1/d) weights from NumPy (zero-initialised output projections would hide attention).
  Host arrays: each jit places them on its own mesh (a cached device array made under one
  test's mesh would not fit the next test's)."""
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(lambda: init_params(cfg, 0))
  return jax.tree.map(lambda x: (rng.standard_normal(x.shape) / 8).astype(x.dtype), shapes)


def inputs(segments: bool):
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(0, 256, (BATCH, T)), jnp.int32)
  seg = None
  if segments:  # rows of 1, 2 and 3 documents; positions restart per document like packing
    seg = np.zeros((BATCH, T), np.int32)
    seg[1, 25:] = 1
    seg[2, 10:], seg[2, 30:] = 1, 2
    seg[3, 5:] = 1
    seg = jnp.asarray(seg)
  return tokens, seg


def run(cfg, impl: str, rules: str, mesh, segments: bool):
  """(logits, parameter gradients of a fixed linear function of the logits)."""
  cfg = dataclasses.replace(cfg, attention_impl=impl)
  tokens, seg = inputs(segments)
  weight = jnp.asarray(np.random.default_rng(2).standard_normal((BATCH, T, cfg.vocab_size)),
                       jnp.float32)

  def loss(params):
    logits = model_from_params(cfg, params, rules)(tokens, segment_ids_BxT=seg)
    return jnp.sum(logits * weight), logits

  step = jax.jit(jax.value_and_grad(loss, has_aux=True))
  if mesh is None:
    (_, logits), grads = step(params_of(cfg))
  else:
    with jax.set_mesh(mesh):
      (_, logits), grads = step(params_of(cfg))
  return np.asarray(logits), jax.tree.map(np.asarray, grads)


def assert_same(got, want):
  np.testing.assert_allclose(got[0], want[0], atol=2e-5, rtol=1e-4, err_msg="logits")
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got[1]),
                          jax.tree.leaves(want[1])):
    np.testing.assert_allclose(g, w, atol=2e-5 * max(1.0, np.abs(w).max()), rtol=1e-4,
                               err_msg=jax.tree_util.keystr(path))


@functools.lru_cache(maxsize=None)
def xla_reference(attention: str, segments: bool):
  return run(tiny(attention), "xla", "fsdp", None, segments)


@pytest.mark.parametrize("attention", ["tpa", "gqa", "mla"])
def test_splash_equals_xla_one_device_causal(attention):
  assert_same(run(tiny(attention), "splash", "fsdp", None, False),
              xla_reference(attention, False))


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_splash_equals_xla_sharded_fsdp_tp_with_segments(attention):
  """data=2 fsdp=2 tensor=2: batch over 4 shards, heads over 2 (MQA/GQA: K/V heads sliced or
  split per tensor shard)."""
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  assert_same(run(tiny(attention), "splash", "fsdp_tp", mesh, True),
              xla_reference(attention, True))


@pytest.mark.parametrize("attention", ["tpa", "gqa"])
def test_splash_equals_xla_sharded_fsdp_only(attention):
  mesh = make_mesh(data=1, fsdp=4, tensor=1, devices=jax.devices()[:4])
  assert_same(run(tiny(attention), "splash", "fsdp", mesh, True),
              xla_reference(attention, True))


def test_splash_leaves_what_it_cannot_express_to_xla():
  """Queries against a cache at an offset (S != T, keep masks) take the XLA path."""
  rng = np.random.default_rng(3)
  q = jnp.asarray(rng.standard_normal((2, 3, 4, 8)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((2, 9, 4, 8)), jnp.float32)
  mask = kernels.cache_mask(jnp.int32(6), 3, 9, jnp.asarray([0, 2], jnp.int32))
  assert not kernels.splash_expresses(mask, 3, 9)
  assert kernels.splash_expresses(kernels.training_mask(), 9, 9)
  got = kernels.attention(q, k, k, mask, scale=0.3, impl="splash")
  want = kernels.attention(q, k, k, mask, scale=0.3, impl="xla")
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    kernels.attention(q, k, k, Mask(), scale=0.3, impl="flash")


def test_auto_follows_the_target_platform(monkeypatch):
  """auto: splash on TPU (interpret off when the target is a TPU), XLA on the CPU."""
  seen = {}
  monkeypatch.setattr(kernels, "splash_attention",
                      lambda *a, interpret, **kw: seen.setdefault("interpret", interpret))
  q = jnp.zeros((1, 8, 2, 8))
  kernels.attention(q, q, q, kernels.training_mask(), scale=1.0, impl="auto")
  assert not seen
  monkeypatch.setattr(kernels, "target", lambda: ("tpu", None))
  kernels.attention(q, q, q, kernels.training_mask(), scale=1.0, impl="auto")
  assert seen == {"interpret": False}

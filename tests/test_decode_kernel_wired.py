"""The decode kernel wired into generation: greedy tokens with decode.attention_kernel=pallas
(off GPU and TPU: the Mosaic kernel in interpret mode, reading the cache stored in its TPU
layout) equal the XLA factor path, on one device and sharded over 8 forced CPU devices.

A float32 model and cache: both paths then agree to float32 rounding (a bf16 cache rounds the
kernel's value weights to bf16, about 3 digits, which can flip a near-tied argmax of these
random weights)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t6_jax import config as config_lib
from t6_jax import kernels
from t6_jax.decode import generate, prefill
from t6_jax.decode.generate import cache_layout
from t6_jax.kernels.tpa_decode_tpu import FactorCacheLayout, a_rows
from t6_jax.model import init_params
from t6_jax.sharding import make_mesh

# Ragged prompts, 4 rows (the batch splits over data x fsdp = 4 devices).
PROMPTS = [[3, 17, 250, 9, 41], [7, 7, 100, 2, 64, 33, 201, 5], [99], [1, 2, 3]]
NEW = 5
MAX_LEN = 20


def tiny(attention: str, kernel: str, rules: str = "fsdp"):
  return config_lib.load("tiny", [
      f"model.attention={attention}", "model.dtype=float32", "model.num_heads=6",
      "decode.cache_dtype=float32", "model.rope_bf16_tables=false", f"mesh.rules={rules}",
      f"decode.attention_kernel={kernel}"])


def random_params(cfg):
  """N(0, 1/d) weights (zero-initialised output projections would hide attention)."""
  shapes = jax.eval_shape(lambda: init_params(cfg.model, 0))
  rng = np.random.default_rng(1)
  std = cfg.model.d_model ** -0.5
  return jax.tree.map(lambda x: jnp.asarray(std * rng.standard_normal(x.shape), x.dtype),
                      shapes)


@pytest.mark.parametrize("attention", ["tpa", "tpa_kvonly"])
def test_kernel_tokens_equal_xla_one_device_and_sharded(attention):
  params = random_params(tiny(attention, "xla"))
  want = generate(params, tiny(attention, "xla"), PROMPTS, max_new_tokens=NEW,
                  max_len=MAX_LEN)
  got = generate(params, tiny(attention, "pallas"), PROMPTS, max_new_tokens=NEW,
                 max_len=MAX_LEN)
  assert got == want
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  sharded = generate(params, tiny(attention, "pallas", "fsdp_tp"), PROMPTS,
                     max_new_tokens=NEW, max_len=MAX_LEN, mesh=mesh)
  assert sharded == want


def test_cache_is_stored_in_the_kernel_layout_on_the_mesh():
  cfg = tiny("tpa", "pallas", "fsdp_tp")
  params = random_params(cfg)
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  tokens = np.asarray([p[:1] + [0] * 7 for p in PROMPTS], np.int32)
  cache, _ = prefill(cfg, params, tokens, [1, 1, 1, 1], max_len=MAX_LEN, mesh=mesh)
  m = cfg.model
  assert cache.layout == FactorCacheLayout(m.num_heads, m.head_dim, m.k_rank, m.v_rank, 2)
  rows = 2 * a_rows(m.num_heads // 2, m.k_rank)
  assert cache.entries["a_k"].shape == (m.num_layers, 4, rows, MAX_LEN)
  assert cache.entries["b_v"].shape == (m.num_layers, 4, MAX_LEN, m.v_rank * m.head_dim)
  assert cache.max_len == MAX_LEN
  spec = cache.entries["a_k"].sharding.spec
  assert tuple(spec)[1:3] == (("data", "fsdp"), "tensor")
  # The XLA setting keeps the standard layout; so does a non-factor attention.
  with jax.set_mesh(mesh):
    assert cache_layout(m, "fsdp_tp", 4, "bfloat16", True, "xla") is None
    assert cache_layout(m, "fsdp_tp", 4, "bfloat16", False, "pallas") is None


def test_decode_kernel_choice_follows_the_platform(monkeypatch):
  assert kernels.decode_kernel("pallas", "tpa", "bfloat16") == "mosaic"  # CPU: interpreted
  assert kernels.decode_kernel("auto", "tpa", "bfloat16") is None
  assert kernels.decode_kernel("auto", "mha", "bfloat16") is None
  monkeypatch.setattr(kernels, "target", lambda: ("tpu", None))
  assert kernels.decode_kernel("auto", "tpa", "float32") == "mosaic"
  monkeypatch.setattr(kernels, "target", lambda: ("gpu", None))
  assert kernels.decode_kernel("auto", "tpa_kvonly", "bfloat16") == "triton"
  assert kernels.decode_kernel("auto", "tpa", "float32") is None
  # The Triton kernel reads the cache in the same stored layout as the Mosaic one.
  m = tiny("tpa", "auto").model
  assert kernels.decode_cache_layout("auto", m, "bfloat16", batch=4, rules=None) == (
      FactorCacheLayout(m.num_heads, m.head_dim, m.k_rank, m.v_rank))
  assert kernels.decode_cache_layout("auto", m, "float32", batch=4, rules=None) is None


def test_triton_kernel_under_shard_map_equals_direct_call():
  """The GPU kernel (interpreted) under the same shard_map specs on the fsdp_tp mesh."""
  from t6_jax.kernels.sharded import tpa_decode_sharded
  from t6_jax.kernels.tpa_decode_gpu import tpa_decode_attention
  rng = np.random.default_rng(4)
  layers, batch, slots, heads, rank, dim = 2, 4, 40, 6, 2, 8
  rnd = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.bfloat16)
  cache = (rnd(layers, batch, slots, heads, rank), rnd(layers, batch, slots, rank, dim),
           rnd(layers, batch, slots, heads, rank), rnd(layers, batch, slots, rank, dim))
  q = jnp.asarray(rng.standard_normal((batch, heads, dim)), jnp.float32)
  pad_B = jnp.asarray([0, 3, 11, 30], jnp.int32)
  want = tpa_decode_attention(q, *cache, 1, pad_B, 33, kv_len=slots, interpret=True)
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  got = tpa_decode_sharded(tpa_decode_attention, mesh, ("data", "fsdp"), "tensor", q, *cache,
                           1, pad_B, 33, kv_len=slots, interpret=True)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
  # The cache as the decode step stores it for the kernel on this mesh (A rows per shard).
  layout = FactorCacheLayout(heads, dim, rank, rank, shards=2)
  stored = [jnp.stack([layout.to_cache(name, x[i]) for i in range(layers)])
            for name, x in zip(("a_k", "b_k", "a_v", "b_v"), cache)]
  got = tpa_decode_sharded(tpa_decode_attention, mesh, ("data", "fsdp"), "tensor", q, *stored,
                           1, pad_B, 33, kv_len=slots, interpret=True)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)

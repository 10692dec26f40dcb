"""The TPU kernels in interpret mode on CPU against float64 NumPy: splash attention (forward and
gradients) and the TPA factor-cache decode kernel, unsharded and under shard_map on 8 devices."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import numpy_ref
from t6_jax.kernels.sharded import splash_attention_sharded, tpa_decode_sharded
from t6_jax.kernels.splash_tpu import block_sizes_for, padded_len, splash_attention
from t6_jax.kernels.tpa_decode_tpu import tpa_decode_attention_tpu, tpu_a_layout

SCALE = 0.35


def numpy_attention_and_grads(q, k, v, dy, causal, seg):
  """y = softmax(scale q k^T, masked) v per head, and (dq, dk, dv) of sum(y * dy), float64.

  Query head h reads KV head h // (H / G); the KV gradients sum over each group's heads.
  """
  q, k, v, dy = (np.asarray(x, np.float64) for x in (q, k, v, dy))
  t_len, heads, kv_heads = q.shape[1], q.shape[2], k.shape[2]
  kh, vh = np.repeat(k, heads // kv_heads, 2), np.repeat(v, heads // kv_heads, 2)
  keep = np.ones((q.shape[0], 1, t_len, t_len), bool)
  if causal:
    keep &= np.tril(np.ones((t_len, t_len), bool))
  if seg is not None:
    keep &= (seg[:, None, :, None] == seg[:, None, None, :])
  s = np.where(keep, np.einsum("bthk,bshk->bhts", q, kh) * SCALE, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  y = np.einsum("bhts,bshv->bthv", p, vh)
  dp = np.einsum("bthv,bshv->bhts", dy, vh)
  ds = p * (dp - np.sum(dp * p, -1, keepdims=True)) * SCALE
  dq = np.einsum("bhts,bshk->bthk", ds, kh)
  group = lambda x: x.reshape(x.shape[0], x.shape[1], kv_heads, -1, x.shape[3]).sum(3)
  dk = group(np.einsum("bhts,bthk->bshk", ds, q))
  dv = group(np.einsum("bhts,bthv->bshv", p, dy))
  return y, (dq, dk, dv)


def _inputs(heads, kv_heads, k_dim, v_dim, batch=2, t_len=40, seed=0):
  r = np.random.default_rng(seed)
  shapes = [(batch, t_len, heads, k_dim), (batch, t_len, kv_heads, k_dim),
            (batch, t_len, kv_heads, v_dim), (batch, t_len, heads, v_dim)]
  return [jnp.asarray(r.normal(size=s), jnp.float32) for s in shapes]


SEG = np.repeat(np.array([[0] * 13 + [1] * 20 + [2] * 7]), 2, 0).astype(np.int32)


def test_block_sizes_pad_to_lanes():
  assert padded_len(40) == 128 and padded_len(4096) == 4096 and padded_len(1000) == 1024
  assert block_sizes_for(40).block_q == 128 and block_sizes_for(4096).block_kv == 512
  assert block_sizes_for(1000).block_q_dkv == 512 and block_sizes_for(384).block_kv == 128


# T = 40 is not a multiple of the 128-wide blocks (padded and masked).
@pytest.mark.parametrize("heads,kv_heads,k_dim,v_dim,causal,segments", [
    (6, 6, 8, 8, True, False),     # MHA, 6 heads
    (6, 2, 8, 8, True, True),      # GQA, packed documents
    (6, 1, 8, 8, False, False),    # MQA, bidirectional (padding hidden by its own segment)
    (3, 3, 24, 16, True, True),    # MLA-like: qk 24, v 16
])
def test_splash_forward_and_gradients_match_numpy(heads, kv_heads, k_dim, v_dim, causal,
                                                  segments):
  q, k, v, dy = _inputs(heads, kv_heads, k_dim, v_dim)
  seg = SEG if segments else None
  seg_j = None if seg is None else jnp.asarray(seg)
  attend = lambda q, k, v: splash_attention(q, k, v, scale=SCALE, causal=causal,
                                            segment_ids_BxT=seg_j, interpret=True)
  y, vjp = jax.vjp(attend, q, k, v)
  grads = vjp(dy)
  y_ref, grads_ref = numpy_attention_and_grads(q, k, v, dy, causal, seg)
  assert y.shape == y_ref.shape and y.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y), y_ref, atol=2e-5, rtol=1e-4)
  for name, g, g_ref in zip("qkv", grads, grads_ref):
    np.testing.assert_allclose(np.asarray(g), g_ref, atol=5e-5, rtol=1e-4, err_msg=f"d{name}")


def test_splash_bf16_and_bad_groups():
  q, k, v, _ = _inputs(6, 2, 8, 8, t_len=24)
  y = splash_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
                       scale=SCALE, interpret=True)
  y_ref, _ = numpy_attention_and_grads(q, k, v, v[:, :, :1].repeat(6, 2), True, None)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), y_ref, atol=0.05)
  with pytest.raises(ValueError, match="4 KV heads do not divide 6 query heads"):
    splash_attention(q, k[:, :, :1].repeat(4, 2), v[:, :, :1].repeat(4, 2), scale=SCALE)
  with pytest.raises(ValueError, match="must divide the padded length 128"):
    splash_attention(q, k, v, scale=SCALE, block_sizes=block_sizes_for(512))


def mesh8():
  auto = (jax.sharding.AxisType.Auto,) * 3
  return jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=auto)


# KV heads split over tensor (forward), replicated with a per-shard KV head slice (MQA, with
# gradients).
@pytest.mark.parametrize("kv_heads,grads", [(6, False), (1, True)])
def test_splash_sharded_equals_unsharded(kv_heads, grads):
  q, k, v, dy = _inputs(6, kv_heads, 8, 8, batch=4, t_len=24)
  seg = jnp.asarray(np.repeat(SEG[:1, :24], 4, 0))
  plain = lambda q, k, v: splash_attention(q, k, v, scale=SCALE, segment_ids_BxT=seg,
                                           interpret=True)
  sharded = lambda q, k, v: splash_attention_sharded(
      q, k, v, mesh=mesh8(), batch_axes=("data", "fsdp"), head_axis="tensor", scale=SCALE,
      segment_ids_BxT=seg, interpret=True)
  if not grads:
    np.testing.assert_allclose(np.asarray(jax.jit(sharded)(q, k, v)),
                               np.asarray(jax.jit(plain)(q, k, v)), atol=1e-6)
    return
  loss = lambda f: jax.jit(jax.value_and_grad(lambda *a: jnp.sum(f(*a) * dy), argnums=(0, 1, 2)))
  (l0, g0), (l1, g1) = loss(plain)(q, k, v), loss(sharded)(q, k, v)
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
  for a, b in zip(g1, g0):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def _decode_case(heads, k_rank, v_rank, slots, full_query, batch=2, head_dim=8, seed=0):
  r = np.random.default_rng(seed)
  layers = 2
  cache = [jnp.asarray(r.normal(size=s), jnp.bfloat16) for s in (
      (layers, batch, slots, heads, k_rank), (layers, batch, slots, k_rank, head_dim),
      (layers, batch, slots, heads, v_rank), (layers, batch, slots, v_rank, head_dim))]
  if full_query:
    q_parts = {"q": r.normal(size=(batch, heads, head_dim))}
    q = q_parts["q"] / (k_rank * np.sqrt(head_dim))
  else:
    q_rank = 3
    q_parts = {"a_q": r.normal(size=(batch, heads, q_rank)),
               "b_q": r.normal(size=(batch, q_rank, head_dim))}
    q = np.einsum("bhq,bqk->bhk", q_parts["a_q"], q_parts["b_q"]) / (
        q_rank * k_rank * np.sqrt(head_dim))
  return jnp.asarray(q, jnp.float32), q_parts, cache


# Odd cache lengths, ragged rows (different padding), ranks incl. 1 and 6, heads 3 and 5; the
# default block (S rounded up to 128: a partial block) and several 128-slot blocks.
@pytest.mark.parametrize("heads,ranks,slots,pos,pad,full_query", [
    (3, (2, 2), 37, 30, (0, 5), False),
    (5, (1, 3), 53, 52, (7, 0), True),
    (5, (6, 2), 21, 9, (2, 9), False),
    (3, (2, 2), 301, 290, (270, 3), True),  # 3 blocks; row 0's slots start in the last one
])
def test_decode_kernel_matches_numpy(heads, ranks, slots, pos, pad, full_query):
  q, q_parts, cache = _decode_case(heads, *ranks, slots, full_query)
  pad_B = jnp.asarray(pad, jnp.int32)
  y = tpa_decode_attention_tpu(q, *cache, 1, pad_B, pos, kv_len=slots, interpret=True,
                               block=128)
  ref = numpy_ref.factor_decode_attention(q_parts.get("a_q"), q_parts.get("b_q"),
                                          q_parts.get("q"), cache, 1, np.asarray(pad), pos,
                                          q.shape[-1])
  assert y.shape == ref.shape and y.dtype == jnp.float32
  # The weights alpha * A_v meet B_v in bf16 (as in the GPU kernel): ~3 significant digits.
  np.testing.assert_allclose(np.asarray(y), ref, atol=4e-3 * np.abs(ref).max())


def test_decode_kernel_tpu_layout_and_errors():
  q, q_parts, cache = _decode_case(5, 2, 2, 40, True)
  a_k, b_k, a_v, b_v = cache
  flat = [tpu_a_layout(a_k), b_k.reshape(*b_k.shape[:3], -1), tpu_a_layout(a_v),
          b_v.reshape(*b_v.shape[:3], -1)]
  assert flat[0].shape == (2, 2, 16, 40)
  pad_B = jnp.asarray([3, 0], jnp.int32)
  y5 = tpa_decode_attention_tpu(q, *cache, 0, pad_B, 33, kv_len=40, interpret=True)
  y4 = tpa_decode_attention_tpu(q, *flat, 0, pad_B, 33, kv_len=40, interpret=True)
  np.testing.assert_array_equal(np.asarray(y4), np.asarray(y5))
  with pytest.raises(ValueError, match="multiple of 128"):
    tpa_decode_attention_tpu(q, *cache, 0, pad_B, 33, kv_len=40, interpret=True, block=64)
  with pytest.raises(ValueError, match="do not match a query of 3 heads"):
    tpa_decode_attention_tpu(q[:, :3], *cache, 0, pad_B, 33, kv_len=40, interpret=True)


def test_decode_sharded_equals_unsharded():
  q, _, cache = _decode_case(6, 2, 3, 37, False, batch=4)
  pad_B = jnp.asarray([0, 3, 11, 30], jnp.int32)
  y = tpa_decode_attention_tpu(q, *cache, 1, pad_B, 31, kv_len=37, interpret=True)
  ys = tpa_decode_sharded(tpa_decode_attention_tpu, mesh8(), ("data", "fsdp"), "tensor", q,
                          *cache, 1, pad_B, 31, kv_len=37, interpret=True)
  assert ys.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), "tensor")
  np.testing.assert_allclose(np.asarray(ys), np.asarray(y), atol=1e-6)
  # The TPU cache layout, rows padded per tensor shard.
  a_k, b_k, a_v, b_v = cache
  tpu_cache = (tpu_a_layout(a_k, shards=2), b_k.reshape(*b_k.shape[:3], -1),
               tpu_a_layout(a_v, shards=2), b_v.reshape(*b_v.shape[:3], -1))
  yt = tpa_decode_sharded(tpa_decode_attention_tpu, mesh8(), ("data", "fsdp"), "tensor", q,
                          *tpu_cache, 1, pad_B, 31, kv_len=37, interpret=True)
  np.testing.assert_allclose(np.asarray(yt), np.asarray(y), atol=1e-6)

"""The Pallas TPA decode kernel (interpret mode on CPU) against float64 NumPy, and wired into
`Transformer.extend` against the XLA factor path."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import numpy_ref as ref
from t6_jax import config as config_lib
from t6_jax.decode.cache import entry_shapes
from t6_jax.model import init_params, model_from_params
from t6_jax import kernels
from t6_jax.kernels import FactorCacheLayout
from t6_jax.kernels import tpa_decode_gpu
from t6_jax.kernels.tpa_decode_gpu import head_chunks, tpa_decode_attention
from t6_jax.model.attention import FullQueries, TPAQueries, kernel_query


@pytest.mark.parametrize("full_query,heads,ranks,head_dim,block,splits,tune", [
    (False, 5, (6, 2, 3), 16, 16, None, {}),  # H, R_q and R_v not powers of two, several splits
    (True, 3, (1, 2, 2), 24, 32, 1, {}),      # TPA-KVonly (a full query), d_h 24
    # 20 heads in two chunks of 16 rows (12 padding), R_k 3, R_v 1, the cache layout read in
    # place, Q without its lo half; slots 40 = 2 whole blocks + a masked tail block.
    (False, 20, (2, 3, 1), 16, 16, None, {"head_tile": 16, "split_q": False, "layout": True}),
    # One chunk of 32 rows; kv_len 36 < the cache's 40 slots (the slots past it are not read).
    (False, 20, (6, 2, 2), 32, 16, 3, {"head_tile": None, "layout": True, "kv_len": 36}),
    # The split count capped by TUNING["max_splits"]: 40 slots in blocks of 16 (the last
    # one a masked tail) as 2 splits of up to 2 blocks.
    (False, 5, (6, 2, 3), 16, 16, None, {"max_splits": 2}),
])
def test_kernel_matches_numpy(full_query, heads, ranks, head_dim, block, splits, tune,
                              monkeypatch):
  layers, batch, slots = 2, 3, 40
  q_rank, k_rank, v_rank = ranks
  tune = dict(tune)
  in_layout, kv_len = tune.pop("layout", False), tune.pop("kv_len", slots)
  monkeypatch.setitem(tpa_decode_gpu.TUNING, "max_splits", tune.pop("max_splits", 0))
  rng = np.random.default_rng(heads + head_dim)
  rnd = lambda *s: rng.standard_normal(s).astype(np.float32)
  cache = [jnp.asarray(x, jnp.bfloat16) for x in (
      rnd(layers, batch, slots, heads, k_rank), rnd(layers, batch, slots, k_rank, head_dim),
      rnd(layers, batch, slots, heads, v_rank), rnd(layers, batch, slots, v_rank, head_dim))]
  operands = cache
  if in_layout:
    layout = FactorCacheLayout(heads, head_dim, k_rank, v_rank)
    operands = [jnp.stack([layout.to_cache(name, x[i]) for i in range(layers)])
                for name, x in zip(("a_k", "b_k", "a_v", "b_v"), cache)]
  a_q, b_q, q_full = rnd(batch, heads, q_rank), rnd(batch, q_rank, head_dim), None
  if full_query:
    q_full = rnd(batch, heads, head_dim)
    q = FullQueries(jnp.asarray(q_full)[:, None])
  else:
    q = TPAQueries(jnp.asarray(a_q)[:, None], jnp.asarray(b_q)[:, None])
  pad, pos, layer = np.array([0, 7, 30]), 33, 1  # ragged left padding; slots > pos unused
  q_BxHxK = kernel_query(q, q_rank, k_rank, head_dim)
  got = tpa_decode_attention(q_BxHxK, *operands, jnp.int32(layer), jnp.asarray(pad),
                             jnp.int32(pos), kv_len=kv_len, block=block, splits=splits,
                             interpret=True, **tune)
  want = ref.factor_decode_attention(a_q.astype(np.float64), b_q.astype(np.float64),
                                     None if q_full is None else q_full.astype(np.float64),
                                     cache, layer, pad, pos, head_dim)
  assert got.shape == want.shape
  # The value weights alpha * A_v go through bf16 (as in the XLA path): ~2^-9 relative.
  np.testing.assert_allclose(np.asarray(got), want, atol=4e-3 * np.abs(want).max())
  # The padding row (30 leading pad slots) only sees slots 30..33.
  assert np.abs(want[2]).max() > 0


def test_hi_lo_query_keeps_sharp_attention_accurate():
  """Logits up to ~15: a bf16 query (the default, the XLA path's precision) is good to ~3e-3
  of max |out|; split_q's hi + lo pair to under 1e-3."""
  layers, batch, slots, heads, rank, dim = 1, 2, 64, 34, 2, 64
  rng = np.random.default_rng(0)
  rnd = lambda *s: rng.standard_normal(s).astype(np.float32)
  cache = [jnp.asarray(x, jnp.bfloat16) for x in (
      rnd(layers, batch, slots, heads, rank), rnd(layers, batch, slots, rank, dim),
      rnd(layers, batch, slots, heads, rank), rnd(layers, batch, slots, rank, dim))]
  q = 0.2 * rnd(batch, heads, dim)  # the kernel's scaled query
  pad = np.zeros(batch, np.int32)
  want = ref.factor_decode_attention(None, None, q.astype(np.float64) * np.sqrt(dim) * rank,
                                     cache, 0, pad, slots - 1, dim)
  errors = {}
  for split_q in (False, True):
    got = tpa_decode_attention(jnp.asarray(q), *cache, 0, jnp.asarray(pad), slots - 1,
                               kv_len=slots, split_q=split_q, interpret=True)
    errors[split_q] = np.abs(np.asarray(got) - want).max() / np.abs(want).max()
  assert errors[True] < 1e-3 and errors[False] < 6e-3, errors


def test_split_count():
  """About per_sm programs per SM (132 SMs off GPU), capped by max_splits when > 0, every
  split a whole number of blocks."""
  assert tpa_decode_gpu._splits(1, 32, 1) == (32, 1)
  assert tpa_decode_gpu._splits(1, 32, 1, max_splits=16) == (16, 2)
  assert tpa_decode_gpu._splits(1, 32, 1, max_splits=5) == (5, 7)
  assert tpa_decode_gpu._splits(64, 512, 1) == (2, 256)


def test_head_chunks_cover_the_heads_in_powers_of_two():
  assert head_chunks(34, 64) == ((0, 64),)  # T6-small
  assert head_chunks(78, 64) == ((0, 64), (64, 16))  # T6-XL: 80 rows, not 128
  assert head_chunks(78, 32) == ((0, 32), (32, 32), (64, 16))
  assert head_chunks(20, 16) == ((0, 16), (16, 16))
  assert head_chunks(128, 64) == ((0, 64), (64, 64))
  assert head_chunks(3, 64) == ((0, 16),)
  assert head_chunks(78, None) == ((0, 128),)
  with pytest.raises(ValueError, match="power of two"):
    head_chunks(34, 24)


def test_use_kernel_setting():
  use_kernel = kernels.use_decode_kernel
  assert not use_kernel("xla", "tpa", 1, "bfloat16")
  assert use_kernel("pallas", "tpa", 1, "bfloat16")
  assert not use_kernel("pallas", "tpa", 4, "bfloat16")  # prefill chunks stay on XLA
  assert use_kernel("pallas", "mha", 1, "bfloat16")  # the grouped kernel (one device)
  assert not use_kernel("auto", "tpa", 1, "bfloat16")  # the CPU: XLA (pallas interprets)
  with pytest.raises(ValueError, match="attention_kernel"):
    use_kernel("triton", "tpa", 1, "bfloat16")


def test_auto_kernel_falls_back_for_a_float32_cache(monkeypatch):
  """On GPU (any mesh), auto takes the kernel for a 16-bit cache only; float32 stays on XLA
  (the kernel raises for it), and an explicit pallas still reaches the kernel's own error."""
  monkeypatch.setattr(kernels, "target", lambda: ("gpu", None))
  assert kernels.use_decode_kernel("auto", "tpa", 1, "bfloat16")
  assert kernels.use_decode_kernel("auto", "tpa_kvonly", 1, jnp.float16)
  assert not kernels.use_decode_kernel("auto", "tpa", 1, "float32")
  assert kernels.use_decode_kernel("pallas", "tpa", 1, "float32")
  cache = [jnp.zeros((1, 1, 16, 2, 2), jnp.float32), jnp.zeros((1, 1, 16, 2, 8), jnp.float32)]
  with pytest.raises(ValueError, match="bfloat16/float16 cache"):
    tpa_decode_attention(jnp.zeros((1, 2, 8)), cache[0], cache[1], cache[0], cache[1],
                         jnp.int32(0), jnp.zeros((1,), jnp.int32), jnp.int32(0), kv_len=16,
                         interpret=True)


def test_extend_step_kernel_equals_xla_path():
  """One decode step of a tiny bf16 model: the kernel path gives the XLA path's logits."""
  cfg = config_lib.load("tiny", ["model.num_heads=3", "model.num_layers=2",
                                 "model.dtype=bfloat16"]).model
  rng = np.random.default_rng(0)
  rnd = lambda s, scale: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype)
  # Random weights (no init compile; the zero-initialised projections would hide attention).
  params = jax.tree.map(lambda s: rnd(s, 0.15), jax.eval_shape(lambda: init_params(cfg)))
  batch, slots, pos = 2, 24, 9
  entries = {name: rnd(s, 1.0)  # a random past
             for name, s in entry_shapes(cfg, batch, slots).items()}
  pad_B = jnp.array([0, 5], jnp.int32)
  step = jnp.array([[3], [7]], jnp.int32)
  def run(params, entries, kernel):
    return model_from_params(cfg, params).extend(step, entries, pad_B, jnp.int32(pos),
                                                 kv_len=slots, factor_attention=True,
                                                 attention_kernel=kernel)

  outs = [jax.jit(run, static_argnums=2)(params, entries, k) for k in ("xla", "pallas")]
  np.testing.assert_allclose(np.asarray(outs[1][0]), np.asarray(outs[0][0]),
                             atol=2e-2 * float(jnp.abs(outs[0][0]).max()))
  # Layer 0's new entries do not depend on attention; both paths write them to slot `pos`.
  for name in entries:
    np.testing.assert_array_equal(np.asarray(outs[1][1][name][0]),
                                  np.asarray(outs[0][1][name][0]))

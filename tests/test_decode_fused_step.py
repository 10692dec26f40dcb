"""The fused TPA decode step (interpret mode on CPU): `tpa_step` (cache writes and query rows
from the packed factor projection) and the split `combine` kernel against float64 NumPy, and
the step wired into `Transformer.extend` against the XLA factor path."""

import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

import numpy_ref as ref
from t6_jax import config as config_lib
from t6_jax import kernels
from t6_jax.decode.cache import entry_shapes
from t6_jax.kernels import FactorCacheLayout
from t6_jax.kernels.tpa_decode_gpu import combine, query_shape
from t6_jax.kernels.tpa_step_gpu import tpa_step
from t6_jax.model import init_params, layers, model_from_params


@pytest.mark.parametrize("q_rank,heads,head_dim,splits,pos", [
    (6, 5, 16, 3, 9),    # TPA, R_q not a power of two, three partial sums
    (0, 3, 24, 1, 39),   # TPA-KVonly (a full query), d_h 24, the product itself, last slot
    (2, 20, 16, 2, 40),  # 20 heads (two row chunks); pos past the cache: nothing written
])
def test_tpa_step_matches_numpy(q_rank, heads, head_dim, splits, pos):
  """float32 throughout (no rounding): the kernel's cache entries and query rows equal the
  equations computed in float64."""
  layers, batch, slots, k_rank, v_rank, layer = 2, 2, 40, 2, 3, 1
  rng = np.random.default_rng(q_rank + heads)
  rnd = lambda *s: rng.standard_normal(s).astype(np.float32)
  half = head_dim // 2
  widths = ([heads * q_rank, q_rank * head_dim] if q_rank else [heads * head_dim]) + [
      heads * k_rank, k_rank * head_dim, heads * v_rank, v_rank * head_dim]
  y = rnd(splits, batch, sum(widths))
  cos, sin = rnd(batch, 1, half), rnd(batch, 1, half)
  layout = FactorCacheLayout(heads, head_dim, k_rank, v_rank)
  shapes = entry_shapes(config_lib.load("tiny", [
      f"model.num_heads={heads}", f"model.head_dim={head_dim}", f"model.k_rank={k_rank}",
      f"model.v_rank={v_rank}", f"model.num_layers={layers}"]).model, batch, slots,
      "float32", layout)
  cache = {n: jnp.asarray(rnd(*s.shape)) for n, s in shapes.items()}
  names = ("a_k", "b_k", "a_v", "b_v")
  q_hi, q_lo, *new = tpa_step(jnp.asarray(y), jnp.asarray(cos), jnp.asarray(sin),
                              *(cache[n] for n in names), layer, pos, heads=heads,
                              head_dim=head_dim, q_rank=q_rank, compute_dtype=jnp.float32,
                              split_q=False, interpret=True)
  assert q_lo is None

  # float64: sum the partials, split the packed columns, rotate, contract.
  y64 = y.astype(np.float64).sum(axis=0)
  parts = np.split(y64, np.cumsum(widths)[:-1], axis=-1)
  rot = lambda x: ref.rope(x[:, None], cos[:, 0].astype(np.float64),
                           sin[:, 0].astype(np.float64))[:, 0]
  if q_rank:
    a_q = parts[0].reshape(batch, heads, q_rank)
    b_q = rot(parts[1].reshape(batch, q_rank, head_dim))
    q = np.einsum("bhq,bqk->bhk", a_q, b_q) / (q_rank * k_rank * math.sqrt(head_dim))
  else:
    q = rot(parts[0].reshape(batch, heads, head_dim)) / (k_rank * math.sqrt(head_dim))
  a_k, b_k, a_v, b_v = parts[-4:]
  b_k = rot(b_k.reshape(batch, k_rank, head_dim)).reshape(batch, -1)
  rows, kp = query_shape(heads, head_dim)
  want_q = np.zeros((batch, rows, kp))
  want_q[:, :heads, :head_dim] = q * math.log2(math.e)
  np.testing.assert_allclose(np.asarray(q_hi), want_q, atol=1e-5 * np.abs(want_q).max())

  for name, got, value in zip(names, new, (a_k, b_k, a_v, b_v)):
    want = np.array(cache[name])
    if pos < slots:
      if name.startswith("a_"):
        want[layer, :, :value.shape[-1], pos] = value
      else:
        want[layer, :, pos, :] = value
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("heads,splits", [(20, 5), (3, 1), (34, 17)])
def test_combine_matches_numpy(heads, splits):
  """The split merge: sum_s w_s acc_s / (sum_s w_s l_s R_v), w_s = 2^(m_s - max m); a split
  with no valid slot (m = -1e30, l = 0) adds nothing."""
  batch, rows, kp, head_dim, v_rank = 2, query_shape(heads, 16)[0], 16, 12, 2
  rng = np.random.default_rng(heads)
  m = rng.standard_normal((batch, splits, rows)).astype(np.float32) * 4
  l = rng.uniform(0.5, 2.0, (batch, splits, rows)).astype(np.float32)
  acc = rng.standard_normal((batch, splits, rows, kp)).astype(np.float32)
  if splits > 1:
    m[:, -1], l[:, -1], acc[:, -1] = -1e30, 0.0, 0.0
  got = combine(jnp.asarray(m), jnp.asarray(l), jnp.asarray(acc), heads=heads,
                head_dim=head_dim, v_rank=v_rank, interpret=True)
  w = np.exp2(m.astype(np.float64) - m.max(axis=1, keepdims=True))
  want = (np.einsum("bsh,bshk->bhk", w, acc) / (np.einsum("bsh,bsh->bh", w, l)[..., None]
                                                  * v_rank))[:, :heads, :head_dim]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attention,padded", [("tpa", False), ("tpa_kvonly", False),
                                              ("tpa", True)])
def test_fused_step_equals_xla_path(attention, padded, monkeypatch):
  """One decode step of a tiny bf16 model with the Triton kernel (interpreted) chosen: the
  fused step writes layer 0's new entries exactly as the XLA path does and gives its logits.
  padded: the model prepared as a GPU's token loop holds it for a batch (the packed
  projection's 190 columns and the MLP's 170 hidden units padded with zeros to 192,
  `layers.decode_padding`)."""
  cfg = config_lib.load("tiny", [f"model.attention={attention}", "model.num_heads=3",
                                 "model.num_layers=2", "model.dtype=bfloat16"]).model
  if padded:
    monkeypatch.setattr(layers, "PAD_DECODE_WIDTHS_ON", ("gpu", "cpu"))
  rng = np.random.default_rng(0)
  rnd = lambda s, scale: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype)
  params = jax.tree.map(lambda s: rnd(s, 0.15), jax.eval_shape(lambda: init_params(cfg)))
  batch, slots, pos = 2, 24, 9
  entries = {name: rnd(s, 1.0) for name, s in entry_shapes(cfg, batch, slots).items()}
  layout = FactorCacheLayout(cfg.num_heads, cfg.head_dim, cfg.k_rank, cfg.v_rank)
  stored = {n: jnp.stack([layout.to_cache(n, x[i]) for i in range(cfg.num_layers)])
            for n, x in entries.items()}
  pad_B = jnp.array([0, 5], jnp.int32)
  step = jnp.array([[3], [7]], jnp.int32)

  def run(params, entries, kernel, layout):
    model = model_from_params(cfg, params)
    if padded and kernel != "xla":
      model = model.in_compute_dtype(per_layer=True)
      block = nnx.state(model.blocks[0])
      assert block["attn"]["packed_proj"].value.shape == (cfg.d_model, 192)
      assert block["mlp"]["packed_fc"].value.shape == (cfg.d_model, 2 * 192)
      assert block["mlp"]["packed_out"].value.shape == (192, cfg.d_model)
    return model.extend(step, entries, pad_B, jnp.int32(pos), kv_len=slots,
                        factor_attention=True, attention_kernel=kernel, layout=layout)

  want = jax.jit(run, static_argnums=(2, 3))(params, entries, "xla", None)
  fused = []
  real_step = kernels.tpa_step
  monkeypatch.setattr(kernels, "tpa_step", lambda *a, **k: fused.append(1) or real_step(*a, **k))
  monkeypatch.setattr(kernels, "decode_kernel", lambda setting, *a, **k: "triton")
  got = jax.jit(run, static_argnums=(2, 3))(params, stored, "pallas", layout)
  assert fused  # the fused step ran
  np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]),
                             atol=2e-2 * float(jnp.abs(want[0]).max()))
  for name in entries:
    np.testing.assert_array_equal(np.asarray(layout.from_cache(name, got[1][name][0])),
                                  np.asarray(want[1][name][0]), err_msg=name)


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])  # bf16: a bf16 residual
def test_batch_one_step_with_norms_in_the_gemv_kernels(monkeypatch, param_dtype):
  """Batch 1 on one GPU (the GEMV kernels interpreted): the block's two pre-norms, the merge
  of the attention kernel's splits, the MLP's silu(gate) * up and the two residual adds run
  inside the GEMV kernels; layer 0's new entries equal the XLA path's bit for bit and the
  logits agree."""
  cfg = config_lib.load("tiny", ["model.num_heads=3", "model.num_layers=2",
                                 "model.dtype=bfloat16"]).model
  rng = np.random.default_rng(0)
  rnd = lambda s, scale: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype)
  params = jax.tree.map(lambda s: rnd(s, 0.15).astype(param_dtype),
                        jax.eval_shape(lambda: init_params(cfg)))
  slots, pos = 24, 9
  entries = {name: rnd(s, 1.0) for name, s in entry_shapes(cfg, 1, slots).items()}
  layout = FactorCacheLayout(cfg.num_heads, cfg.head_dim, cfg.k_rank, cfg.v_rank)
  stored = {n: jnp.stack([layout.to_cache(n, x[i]) for i in range(cfg.num_layers)])
            for n, x in entries.items()}

  def run(params, entries, kernel, layout, per_layer):
    model = model_from_params(cfg, params)
    if per_layer:  # as the decode loop prepares it at batch 1
      model = model.in_compute_dtype(per_layer=True, one_row=True)
    return model.extend(jnp.array([[3]], jnp.int32), entries, jnp.zeros((1,), jnp.int32),
                        jnp.int32(pos), kv_len=slots, factor_attention=True,
                        attention_kernel=kernel, layout=layout)

  want = jax.jit(run, static_argnums=(2, 3, 4))(params, entries, "xla", None, False)
  prologues = []
  for name in ("gemv_partials", "gemv_residual"):
    real = getattr(kernels, name)
    monkeypatch.setattr(kernels, name, lambda *a, real=real, name=name, **k: prologues.append(
        (name, k.get("prologue") and k["prologue"][0])) or real(*a, **k))
  monkeypatch.setattr(kernels, "decode_kernel", lambda setting, *a, **k: "triton")
  monkeypatch.setattr(kernels, "gemv_applies", lambda: True)
  got = jax.jit(run, static_argnums=(2, 3, 4))(params, stored, "pallas", layout, True)
  # per layer: the pre-norm, the split merge (output projection, then the residual add),
  # the pre-norm, the gate (then the residual add)
  assert prologues == [("gemv_partials", "rms_norm"), ("gemv_residual", "combine"),
                       ("gemv_partials", "rms_norm"), ("gemv_residual", "swiglu")] * 2
  # The K-split sums add in another order than XLA's; in a bf16 residual stream (ulp 2^-7
  # relative) a flipped rounding moves the logits by a few ulps of the residual.
  tol = 2e-2 if param_dtype == "float32" else 6e-2
  np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]),
                             atol=tol * float(jnp.abs(want[0]).max()))
  for name in entries:
    np.testing.assert_array_equal(np.asarray(layout.from_cache(name, got[1][name][0])),
                                  np.asarray(want[1][name][0]), err_msg=name)

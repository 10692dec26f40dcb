"""The Pallas GEMV kernel (interpret mode on CPU) against float64 NumPy."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from t6_jax import kernels
from t6_jax.kernels import gemv_gpu
from t6_jax.kernels.gemv_gpu import gemv


@pytest.mark.parametrize("layout,k_len,n_len,splits,blocks", [
    ("kn", 100, 70, None, (32, 16)),   # ragged edges in both axes, splits from the SM count
    ("nk", 100, 70, 3, (32, 16)),      # the LM head's (N, K) weights, 3 K splits
    ("kn", 64, 128, 1, (64, 64)),      # one split, whole tiles
    ("nk", 33, 200, 2, (64, 16)),      # a second split with a single short step
])
def test_gemv_matches_numpy(layout, k_len, n_len, splits, blocks):
  rng = np.random.default_rng(k_len + n_len)
  x = jnp.asarray(rng.standard_normal(k_len), jnp.bfloat16)
  shape = (k_len, n_len) if layout == "kn" else (n_len, k_len)
  w = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  got = gemv(x, w, layout=layout, splits=splits, block_n=blocks[0], block_k=blocks[1],
             interpret=True)
  x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
  want = x64 @ w64 if layout == "kn" else w64 @ x64
  assert got.shape == (n_len,) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("layout", ["kn", "nk"])
def test_gemv_gradient_matches_numpy(layout):
  """`kernels.gemv` is differentiable (a one-row product under jax.grad on one GPU runs it):
  d/dx and d/dw of sum(c * y) against float64 NumPy."""
  rng = np.random.default_rng(7)
  k_len, n_len = 24, 40
  x = rng.standard_normal(k_len)
  w = rng.standard_normal((k_len, n_len) if layout == "kn" else (n_len, k_len))
  c = rng.standard_normal(n_len)
  loss = lambda x, w: jnp.sum(jnp.asarray(c, jnp.float32) * kernels.gemv(
      x, w, layout=layout, block_n=16, block_k=16))
  dx, dw = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x, jnp.float32),
                                          jnp.asarray(w, jnp.float32))
  want_dx = w @ c if layout == "kn" else c @ w
  want_dw = np.outer(x, c) if layout == "kn" else np.outer(c, x)
  np.testing.assert_allclose(np.asarray(dx), want_dx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dw), want_dw, rtol=1e-5, atol=1e-5)


def test_gemv_rejects_mismatched_operands():
  with pytest.raises(ValueError, match="does not match"):
    gemv(jnp.zeros(5), jnp.zeros((4, 3)), interpret=True)
  with pytest.raises(ValueError, match="layout"):
    gemv(jnp.zeros(4), jnp.zeros((4, 3)), layout="kk", interpret=True)


@pytest.mark.parametrize("layout", ["kn", "nk"])
def test_gemv_prologues_match_numpy(layout):
  """float32 operands (no rounding): the kernel's pre-norm prologue gives rms_norm(r) @ w and
  its SwiGLU prologue silu(gate) * up @ w from three partial sums of (gate | up)."""
  rng = np.random.default_rng(3)
  k_len, n_len, eps = 70, 50, 1e-6
  w = rng.standard_normal((k_len, n_len) if layout == "kn" else (n_len, k_len))
  product = (lambda x: x @ w) if layout == "kn" else (lambda x: w @ x)
  r = rng.standard_normal(k_len)
  want = product(r / np.sqrt(np.mean(r * r) + eps))
  for norm_once in (0, 1):  # the norm in a loop of block_k loads, or in one load
    got = gemv(jnp.asarray(r, jnp.float32), jnp.asarray(w, jnp.float32), layout=layout,
               splits=3, block_k=16, prologue=("rms_norm", eps), norm_once=norm_once,
               interpret=True)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  parts = rng.standard_normal((3, 2 * k_len))
  got = gemv(jnp.asarray(parts, jnp.float32), jnp.asarray(w, jnp.float32), layout=layout,
             splits=2, block_k=16, prologue=("swiglu",), interpret=True)
  gate, up = parts.sum(axis=0)[:k_len], parts.sum(axis=0)[k_len:]
  want = product(gate / (1 + np.exp(-gate)) * up)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="does not match"):
    gemv(jnp.asarray(r, jnp.float32), jnp.asarray(w, jnp.float32), layout=layout,
         prologue=("swiglu",), interpret=True)


@pytest.mark.parametrize("layout", ["kn", "nk"])
@pytest.mark.parametrize("splits,r_dtype", [(1, "float32"), (4, "float32"), (7, "bfloat16")])
def test_gemv_residual_epilogue_matches_numpy(layout, splits, r_dtype):
  """With a residual r the kernel returns r + (x @ w rounded to w's dtype), in r's dtype, the
  K splits summed and added by each column tile's last program: against float64 NumPy, with
  bf16 weights (the product's rounding is the one the model's residual add makes)."""
  rng = np.random.default_rng(5)
  k_len, n_len = 300, 90
  w = jnp.asarray(rng.standard_normal((k_len, n_len) if layout == "kn" else (n_len, k_len)),
                  jnp.bfloat16)
  x = jnp.asarray(rng.standard_normal(k_len), jnp.bfloat16)
  r = jnp.asarray(rng.standard_normal(n_len), r_dtype)
  got = gemv(x, w, layout=layout, splits=splits, block_n=32, block_k=32, residual=r,
             interpret=True)
  w64, x64 = np.asarray(w, np.float64), np.asarray(x, np.float64)
  y64 = x64 @ w64 if layout == "kn" else w64 @ x64
  y_rounded = np.asarray(jnp.asarray(y64, jnp.bfloat16), np.float64)
  want = np.asarray(r, np.float64) + y_rounded
  assert got.dtype == jnp.dtype(r_dtype) and got.shape == (n_len,)
  # fp32 sums in another order than float64's can flip one bf16 rounding of y (2^-8 of |y|)
  # and, in a bf16 residual, the rounding of the sum.
  tol = 2.0 ** -7 * (np.abs(y64) + (np.abs(want) if r_dtype == "bfloat16" else 0)) + 1e-5
  assert np.all(np.abs(np.asarray(got, np.float64) - want) <= tol)
  if r_dtype == "float32":  # one fp32 add of two exact values: equal where y rounded alike
    want32 = np.asarray(r, np.float32) + y_rounded.astype(np.float32)
    assert np.mean(np.asarray(got) == want32) > 0.9
  # The tickets written by an earlier kernel (zeros=n) serve as the epilogue's counters.
  y, zeros = gemv(x, w, layout=layout, splits=3, zeros=gemv_gpu.ticket_slots(n_len),
                  interpret=True)
  np.testing.assert_array_equal(np.asarray(zeros), 0)
  again = gemv(x, w, layout=layout, splits=splits, block_n=32, block_k=32, residual=r,
               tickets=zeros, interpret=True)
  np.testing.assert_array_equal(np.asarray(again), np.asarray(got))
  with pytest.raises(ValueError, match="residual"):
    gemv(x, w, layout=layout, residual=r[:-1], interpret=True)


@pytest.mark.parametrize("splits,heads,head_dim,rows,kp", [(5, 3, 16, 16, 16),
                                                          (32, 5, 24, 16, 32)])
def test_gemv_combine_prologue_matches_numpy(splits, heads, head_dim, rows, kp):
  """The attention output merged from the decode kernel's splits inside the output
  projection's kernel: sum_s w_s acc_s / (sum_s w_s l_s R_v), w_s = 2^(m_s - max m), then
  times w; padding rows and columns of the splits are ignored, an empty split (m = -1e30,
  l = 0) counts for nothing."""
  rng = np.random.default_rng(splits)
  v_rank, n_len = 2, 40
  m = rng.standard_normal((splits, rows)) * 3
  m[1] = -1e30  # a split without a valid slot
  l = rng.uniform(0.5, 2.0, (splits, rows))
  l[1] = 0.0
  acc = rng.standard_normal((splits, rows, kp))
  acc[1] = 0.0
  w = rng.standard_normal((heads * head_dim, n_len))
  got = gemv((jnp.asarray(acc, jnp.float32), jnp.asarray(m, jnp.float32),
              jnp.asarray(l, jnp.float32)), jnp.asarray(w, jnp.float32), splits=3, block_k=16,
             prologue=("combine", heads, head_dim, v_rank), interpret=True)
  wt = np.exp2(m - m.max(axis=0))[:, :heads]                       # (S, H)
  y = np.einsum("sh,shk->hk", wt, acc[:, :heads, :head_dim]) / (
      np.einsum("sh,sh->h", wt, l[:, :heads])[:, None] * v_rank)
  np.testing.assert_allclose(np.asarray(got), y.reshape(-1) @ w, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="does not match"):
    gemv((jnp.zeros((2, 16, 16)), jnp.zeros((2, 16)), jnp.zeros((2, 16))), jnp.zeros((50, 4)),
         prologue=("combine", 3, 16, 1), interpret=True)

"""The packed factor projection's backward in one pass (interpret mode) against float64
NumPy and against XLA's concatenation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t6_jax import kernels
from t6_jax.kernels import tpa_unpack_gpu
from t6_jax.model.layers import apply_rope


def numpy_unpack(y, widths, rotate, cos, sin):
  """float64 pieces of the packed rows y (M, N), RoPE (half-split) on the rotated ones."""
  out, offset, half = [], 0, cos.shape[1]
  for w, turn in zip(widths, rotate):
    p = y[:, offset:offset + w]
    if turn:
      p = p.reshape(len(y), -1, 2 * half)
      x1, x2, c, s = p[..., :half], p[..., half:], cos[:, None], sin[:, None]
      p = np.concatenate([x1 * c + x2 * s, -x1 * s + x2 * c], -1).reshape(len(y), w)
    out.append(p)
    offset += w
  return out


def numpy_packed_grad(d_pieces, widths, rotate, cos, sin, width):
  """The transpose of `numpy_unpack` (a linear map of each row), column by column."""
  m = len(cos)
  grad = np.zeros((m, width))
  for k in range(sum(widths)):
    e = np.zeros((m, width))
    e[:, k] = 1.0
    grad[:, k] = sum((d * f).sum(1) for d, f in zip(d_pieces, numpy_unpack(
        e, widths, rotate, cos, sin)))
  return grad


@pytest.mark.parametrize("rows", [4, 16])
def test_packed_grad_matches_numpy(rows):
  rng = np.random.default_rng(rows)
  m, half, width = 10, 4, 64
  widths, rotate = [12, 3 * 2 * half, 5, 2 * 2 * half], [False, True, False, True]
  d_pieces = [rng.standard_normal((m, w)) for w in widths]
  cos, sin = rng.standard_normal((m, half)), rng.standard_normal((m, half))
  got = tpa_unpack_gpu.packed_grad([jnp.asarray(p, jnp.float32) for p in d_pieces], rotate,
                                   jnp.asarray(cos, jnp.float32), jnp.asarray(sin, jnp.float32),
                                   width, rows=rows, interpret=True)
  want = numpy_packed_grad(d_pieces, widths, rotate, cos, sin, width)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(got)[:, sum(widths):] == 0)  # the padding columns
  with pytest.raises(ValueError, match="whole chunks"):
    tpa_unpack_gpu.packed_grad([jnp.zeros((m, 6))], [True], jnp.zeros((m, half)),
                               jnp.zeros((m, half)), 8, interpret=True)


def test_unpack_factors_grad_equals_xla():
  """kernels.unpack_factors under jax.grad: the kernel's backward (pallas) equals XLA's
  slices, RoPE and concatenation (xla); the forward is the same either way."""
  rng = np.random.default_rng(1)
  b, t, half = 2, 5, 4
  widths, rotate = [6, 2 * 2 * half, 3, 2 * half], [False, True, False, True]
  y = jnp.asarray(rng.standard_normal((b, t, 48)), jnp.float32)
  cos, sin = (jnp.asarray(rng.standard_normal((b, t, half)), jnp.float32) for _ in range(2))
  cs = [jnp.asarray(rng.standard_normal((b, t, w)), jnp.float32) for w in widths]

  def loss(y, impl):
    pieces = kernels.unpack_factors(y, widths, rotate, cos, sin, apply_rope, impl=impl)
    return sum(jnp.sum(c * p) for c, p in zip(cs, pieces))

  want = jax.grad(loss)(y, "xla")
  got = jax.grad(loss)(y, "pallas")
  assert "pallas_call" in str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(y, "pallas"))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(float(loss(y, "pallas")), float(loss(y, "xla")), rtol=1e-6)


@pytest.mark.parametrize("rules", ["fsdp", "fsdp_tp"])
def test_unpack_factors_on_a_mesh(rules):
  """On a mesh the backward runs per shard (the rules never split the packed width), and
  without rules the split is unknown: XLA's concatenation. Both equal the float64
  transpose of the unpacking."""
  from t6_jax.sharding import RULES as RULE_TABLES
  from t6_jax.sharding import make_mesh
  tensor = 2 if rules == "fsdp_tp" else 1
  mesh = make_mesh(data=1, fsdp=4 // tensor, tensor=tensor, devices=jax.devices()[:4],
                   rules=rules)
  rng = np.random.default_rng(2)
  b, t, half, width = 4, 3, 4, 40
  widths, rotate = [6, 2 * 2 * half, 3, 2 * half], [False, True, False, True]
  y = jnp.asarray(rng.standard_normal((b, t, width)), jnp.float32)
  cos, sin = (jnp.asarray(rng.standard_normal((b, t, half)), jnp.float32) for _ in range(2))
  cs = [jnp.asarray(rng.standard_normal((b, t, w)), jnp.float32) for w in widths]
  grad = lambda r: jax.jit(jax.grad(lambda y: sum(jnp.sum(c * p) for c, p in zip(
      cs, kernels.unpack_factors(y, widths, rotate, cos, sin, apply_rope, impl="pallas",
                                 rules=r)))))
  with jax.set_mesh(mesh):
    jaxpr = str(jax.make_jaxpr(grad(RULE_TABLES[rules]))(y))
    got = grad(RULE_TABLES[rules])(y)
    assert "pallas_call" not in str(jax.make_jaxpr(grad(None))(y))
  assert "pallas_call" in jaxpr and "shard_map" in jaxpr
  want = numpy_packed_grad([np.asarray(c, np.float64).reshape(b * t, -1) for c in cs], widths,
                           rotate, np.asarray(cos, np.float64).reshape(b * t, half),
                           np.asarray(sin, np.float64).reshape(b * t, half), width)
  np.testing.assert_allclose(np.asarray(got).reshape(b * t, width), want, rtol=1e-5,
                             atol=1e-5)

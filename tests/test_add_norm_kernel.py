"""The residual add + pre-norm kernels (interpret mode on CPU) and their dispatch against
float64 NumPy."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t6_jax import config as config_lib
from t6_jax import kernels
from t6_jax.kernels import add_norm_gpu
from t6_jax.model import model_from_params
from t6_jax.model.transformer import init_params
from t6_jax.sharding import RULES as RULE_TABLES
from t6_jax.sharding import make_mesh

EPS = 1e-6


def numpy_add_norm(x, y, ds, dn):
  """float64 s = x + y, n = s / sqrt(mean(s^2) + eps), and the gradient of
  sum(ds s) + sum(dn n) with respect to x (= y's), by the chain rule written out."""
  x, y, ds, dn = (np.asarray(a, np.float64) for a in (x, y, ds, dn))
  s = x + y
  r = 1.0 / np.sqrt(np.mean(s * s, axis=-1, keepdims=True) + EPS)
  n = s * r
  d = s.shape[-1]
  # dn_i d n_i / d s_j = r dn_j - r^3 s_j sum_i(dn_i s_i) / D
  grad = ds + r * dn - r ** 3 * s * np.sum(dn * s, axis=-1, keepdims=True) / d
  return s, n, grad


def _operands(shape, seed, y_dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  x, y, ds, dn = (rng.standard_normal(shape) for _ in range(4))
  return (jnp.asarray(x * 3.0, jnp.float32), jnp.asarray(y, y_dtype),
          jnp.asarray(ds, jnp.float32), jnp.asarray(dn, y_dtype))


@pytest.mark.parametrize("m,d,elements", [(10, 48, 128), (7, 100, 64), (3, 16, 4096)])
def test_add_norm_kernels_match_numpy(m, d, elements):
  """Ragged rows and widths (d not a power of two), programs of one to many rows."""
  x, y, ds, dn = _operands((m, d), m + d)
  s, n = add_norm_gpu.add_norm(x, y, eps=EPS, interpret=True, elements=elements)
  dx, dy = add_norm_gpu.add_norm_grad(s, dn, ds, jnp.float32, eps=EPS, interpret=True,
                                      elements=elements)
  want_s, want_n, want_grad = numpy_add_norm(x, y, ds, dn)
  np.testing.assert_allclose(np.asarray(s), want_s, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(n), want_n, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(dx), want_grad, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(dy), np.asarray(dx))


def test_add_norm_kernel_dtypes():
  """A bf16 sublayer output: n and dy come out in bf16 (rounded once), s and dx in fp32."""
  x, y, ds, dn = _operands((6, 40), 1, jnp.bfloat16)
  s, n = add_norm_gpu.add_norm(x, y, eps=EPS, interpret=True)
  dx, dy = add_norm_gpu.add_norm_grad(s, dn, ds, jnp.bfloat16, eps=EPS, interpret=True)
  assert (s.dtype, n.dtype, dx.dtype, dy.dtype) == (jnp.float32, jnp.bfloat16, jnp.float32,
                                                    jnp.bfloat16)
  _, want_n, want_grad = numpy_add_norm(x, y, ds, dn)
  np.testing.assert_allclose(np.asarray(n, np.float64), want_n, rtol=2.0 ** -8, atol=1e-30)
  np.testing.assert_allclose(np.asarray(dx), want_grad, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="one"):
    add_norm_gpu.add_norm(x, y[:, :-1], eps=EPS, interpret=True)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_add_rms_norm_forward_and_grads_match_numpy(impl):
  """kernels.add_rms_norm under jax.grad, with the kernels (pallas) and XLA's ops (xla)."""
  x, y, ds, dn = _operands((2, 5, 24), 2)
  fn = lambda x, y: kernels.add_rms_norm(x, y, eps=EPS, impl=impl)
  loss = lambda x, y: sum(jnp.sum(c * o) for c, o in zip((ds, dn), fn(x, y)))
  grads = jax.grad(loss, argnums=(0, 1))
  jaxpr = str(jax.make_jaxpr(grads)(x, y))
  assert ("pallas_call" in jaxpr) == (impl == "pallas")
  want_s, want_n, want_grad = numpy_add_norm(x, y, ds, dn)
  s, n = fn(x, y)
  np.testing.assert_allclose(np.asarray(s), want_s, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(n), want_n, rtol=1e-5, atol=1e-6)
  for g in grads(x, y):
    np.testing.assert_allclose(np.asarray(g), want_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rules", ["fsdp", "fsdp_tp"])
def test_add_rms_norm_on_a_mesh(rules):
  """Rows split over fsdp (and d_model whole under fsdp_tp): the kernels per shard under
  shard_map; without rules the split is unknown and XLA's ops run."""
  tensor = 2 if rules == "fsdp_tp" else 1
  mesh = make_mesh(data=1, fsdp=4 // tensor, tensor=tensor, devices=jax.devices()[:4],
                   rules=rules)
  x, y, ds, dn = _operands((4, 3, 32), 3)
  grads = lambda rules: jax.jit(jax.grad(lambda x, y: sum(jnp.sum(c * o) for c, o in zip(
      (ds, dn), kernels.add_rms_norm(x, y, eps=EPS, impl="pallas", rules=rules)))))
  with jax.set_mesh(mesh):
    run = grads(RULE_TABLES[rules])
    jaxpr = str(jax.make_jaxpr(run)(x, y))
    dx = run(x, y)
    assert "pallas_call" not in str(jax.make_jaxpr(grads(None))(x, y))
  assert "pallas_call" in jaxpr and "shard_map" in jaxpr
  np.testing.assert_allclose(np.asarray(dx), numpy_add_norm(x, y, ds, dn)[2], rtol=1e-5,
                             atol=1e-5)


def test_add_rms_norm_auto_takes_the_kernels_on_gpu_only(monkeypatch):
  x = jnp.ones((2, 3, 8))
  trace = lambda: str(jax.make_jaxpr(jax.grad(
      lambda x: jnp.sum(kernels.add_rms_norm(x, x, eps=EPS)[1])))(x))
  assert "pallas_call" not in trace()
  monkeypatch.setattr(kernels, "target", lambda: ("gpu", None))
  assert "pallas_call" in trace()
  with pytest.raises(ValueError, match="model.norm_impl='fast'"):
    kernels.add_rms_norm(x, x, eps=EPS, impl="fast")


def test_model_with_the_kernels_equals_xla():
  """The whole model with every residual add and pre-norm in the kernels (interpreted): the
  logits and the parameter gradients equal XLA's ops' (float32, tiny config)."""
  cfg = config_lib.load("tiny", ["model.dtype=float32", "model.num_layers=2"]).model
  params = init_params(cfg)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 8)), jnp.int32)

  def run(impl):
    c = dataclasses.replace(cfg, norm_impl=impl)
    loss = lambda p: jnp.sum(jnp.sin(model_from_params(c, p)(tokens)))
    return jax.value_and_grad(loss)(params), str(jax.make_jaxpr(loss)(params))

  (want, want_grads), _ = run("xla")
  (got, got_grads), jaxpr = run("pallas")
  assert jaxpr.count("pallas_call") == 3  # two in the layer scan's body, the final norm
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    # fp32 sums in another order: errors on the scale of each gradient's largest entries
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4,
                               atol=1e-5 * float(jnp.abs(w).max()))


@pytest.mark.parametrize("impl, carries", [("xla", 1), ("pallas", 2)])
def test_scanned_layers_carry_the_unadded_output_only_with_the_kernel(impl, carries):
  """The layer scan carries (x, the MLP output not yet added) only where the kernel fuses
  that add: otherwise x alone, as remat keeps one carry per layer (a TPU pod's AOT compile of
  t6-medium with remat=full needed 18% more temporaries per chip with both)."""
  cfg = config_lib.load("tiny", ["model.dtype=float32", "model.num_layers=2",
                                 "model.scan_layers=true", f"model.norm_impl={impl}"]).model
  params = init_params(cfg)
  tokens = jnp.zeros((2, 8), jnp.int32)
  jaxpr = jax.make_jaxpr(lambda p: model_from_params(cfg, p)(tokens))(params)
  scans = [e.params for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
  assert len(scans) == 1
  if "num_carry" in scans[0]:  # jax 0.10
    assert scans[0]["num_carry"] == carries
  else:  # jax 0.11: ft_out, a flat tree of the (carries, ys) outputs
    assert len(list(scans[0]["ft_out"].unpack()[0])) == carries

"""The SwiGLU backward kernel (interpret mode on CPU) and its dispatch against float64 NumPy."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t6_jax import config as config_lib
from t6_jax import kernels
from t6_jax.model.layers import Mlp
from t6_jax.sharding import rules_table
from t6_jax.kernels import swiglu_gpu
from t6_jax.sharding import RULES as RULE_TABLES
from t6_jax.sharding import make_mesh


def numpy_swiglu_grads(dh, g, u):
  """float64 (dg, du) of h = g sigmoid(g) u, from the product rule written out."""
  dh, g, u = (np.asarray(a, np.float64) for a in (dh, g, u))
  sig = 1.0 / (1.0 + np.exp(-g))
  return dh * u * (sig + g * sig * (1.0 - sig)), dh * g * sig


def _operands(shape, dtype, seed=0):
  rng = np.random.default_rng(seed)
  # g spans silu's whole range (large |g| saturates the sigmoid).
  g = rng.standard_normal(shape) * 4.0
  return [jnp.asarray(a, dtype) for a in (rng.standard_normal(shape), g,
                                          rng.standard_normal(shape))]


@pytest.mark.parametrize("shape,block", [((3, 5, 70), 64), ((2, 4, 32), 256), ((1, 1, 7), 16)])
def test_swiglu_grad_kernel_matches_numpy(shape, block):
  """Ragged sizes (a last block only partly inside the array) and blocks bigger than it."""
  dh, g, u = _operands(shape, jnp.float32)
  dg, du = swiglu_gpu.swiglu_grad(dh, g, u, block=block, interpret=True)
  want_dg, want_du = numpy_swiglu_grads(dh, g, u)
  assert dg.shape == du.shape == shape and dg.dtype == du.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(dg), want_dg, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(du), want_du, rtol=1e-5, atol=1e-6)


def test_swiglu_grad_kernel_bf16_rounds_once():
  """bf16 operands: the gradients are the float64 values of the bf16 inputs, rounded once to
  bf16 (within one bf16 ulp: fp32 arithmetic before the rounding)."""
  dh, g, u = _operands((4, 3, 50), jnp.bfloat16, seed=1)
  dg, du = swiglu_gpu.swiglu_grad(dh, g, u, block=32, interpret=True)
  assert dg.dtype == du.dtype == jnp.bfloat16
  for got, want in zip((dg, du), numpy_swiglu_grads(dh, g, u)):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2.0 ** -8, atol=1e-30)


def test_swiglu_grad_kernel_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="one shape"):
    swiglu_gpu.swiglu_grad(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros((3, 2)),
                           interpret=True)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_swiglu_forward_and_grads_match_numpy(impl):
  """kernels.swiglu under jax.grad: the forward is silu(g) * u, the gradients the product
  rule's, with the kernel's backward (pallas) and XLA's (xla)."""
  c, g, u = _operands((2, 3, 40), jnp.float32, seed=2)
  fn = lambda g, u: kernels.swiglu(g, u, impl=impl)
  loss = lambda g, u: jnp.sum(c * fn(g, u))
  (dg, du), jaxpr = jax.grad(loss, argnums=(0, 1))(g, u), str(jax.make_jaxpr(
      jax.grad(loss, argnums=(0, 1)))(g, u))
  assert ("pallas_call" in jaxpr) == (impl == "pallas")
  g64, u64 = np.asarray(g, np.float64), np.asarray(u, np.float64)
  np.testing.assert_allclose(np.asarray(fn(g, u)), g64 / (1 + np.exp(-g64)) * u64,
                             rtol=1e-6, atol=1e-6)
  want_dg, want_du = numpy_swiglu_grads(c, g, u)
  np.testing.assert_allclose(np.asarray(dg), want_dg, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(du), want_du, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rules", ["fsdp", "fsdp_tp"])
def test_swiglu_on_a_mesh(rules):
  """On a mesh the kernel runs per shard (the batch over fsdp, the hidden units over tensor
  with fsdp_tp); without rules the split is unknown and XLA's backward runs."""
  tensor = 2 if rules == "fsdp_tp" else 1
  mesh = make_mesh(data=1, fsdp=4 // tensor, tensor=tensor, devices=jax.devices()[:4],
                   rules=rules)
  c, g, u = _operands((4, 3, 32), jnp.float32, seed=3)
  grads = lambda rules: jax.jit(jax.grad(lambda g, u: jnp.sum(c * kernels.swiglu(
      g, u, impl="pallas", rules=rules)), argnums=(0, 1)))
  with jax.set_mesh(mesh):
    run = grads(RULE_TABLES[rules])
    jaxpr = str(jax.make_jaxpr(run)(g, u))
    dg, du = run(g, u)
    assert "pallas_call" not in str(jax.make_jaxpr(grads(None))(g, u))
  assert "pallas_call" in jaxpr and "shard_map" in jaxpr
  want_dg, want_du = numpy_swiglu_grads(c, g, u)
  np.testing.assert_allclose(np.asarray(dg), want_dg, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(du), want_du, rtol=1e-5, atol=1e-6)


def test_swiglu_auto_takes_the_kernel_on_gpu_only(monkeypatch):
  g = jnp.zeros((2, 3, 8))
  trace = lambda: str(jax.make_jaxpr(jax.grad(
      lambda g: jnp.sum(kernels.swiglu(g, g))))(g))
  assert "pallas_call" not in trace()  # CPU: XLA's backward
  monkeypatch.setattr(kernels, "target", lambda: ("gpu", None))
  assert "pallas_call" in trace()
  g = jnp.zeros((2, 3, 10))  # a width XLA pads for its GEMMs: XLA's backward
  assert "pallas_call" not in trace()
  with pytest.raises(ValueError, match="model.swiglu_impl='fast'"):
    kernels.swiglu(g, g, impl="fast")


def test_swiglu_auto_looks_at_each_shards_width(monkeypatch):
  """Hidden units split over tensor (fsdp_tp): auto takes the kernel where each shard's
  width is a multiple of 8 (48 -> 24), not where only the whole width is (40 -> 20)."""
  mesh = make_mesh(data=1, fsdp=2, tensor=2, devices=jax.devices()[:4], rules="fsdp_tp")
  monkeypatch.setattr(kernels, "target", lambda: ("gpu", mesh))
  for width, kernel in [(48, True), (40, False)]:
    g = jnp.zeros((4, 3, width))
    with jax.set_mesh(mesh):
      jaxpr = str(jax.make_jaxpr(jax.grad(lambda g: jnp.sum(kernels.swiglu(
          g, g, rules=RULE_TABLES["fsdp_tp"]))))(g))
    assert ("pallas_call" in jaxpr) == kernel, width



def test_mlp_padded_to_the_kernel_width_is_unchanged():
  """The MLP pads its hidden width (70) to the kernel's multiple of 8 where the kernel runs:
  the output and the parameter gradients equal the unpadded MLP's (XLA's backward)."""
  cfg = config_lib.load("tiny", ["model.mlp_hidden=70", "model.dtype=float32"]).model
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((2, 3, cfg.d_model)), jnp.float32)
  c_proj = jnp.asarray(rng.standard_normal((70, cfg.d_model)), jnp.float32) * 0.1

  def run(impl):
    mlp = Mlp(dataclasses.replace(cfg, swiglu_impl=impl), nnx.Rngs(0), rules_table("fsdp"))
    mlp.c_proj[...] = c_proj
    graphdef, state = nnx.split(mlp)
    loss = lambda state: jnp.sum(jnp.sin(nnx.merge(graphdef, state)(x)))
    return jax.value_and_grad(loss)(state), str(jax.make_jaxpr(jax.grad(loss))(state))

  assert kernels.swiglu_padding(70, impl="pallas") == 2
  assert kernels.swiglu_padding(72, impl="pallas") == 0
  assert kernels.swiglu_padding(70, impl="auto") == 0  # CPU: XLA's backward, no padding
  (want, want_grads), want_jaxpr = run("xla")
  (got, got_grads), jaxpr = run("pallas")
  assert "pallas_call" in jaxpr and " pad" in jaxpr and "pallas_call" not in want_jaxpr
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    assert g.shape == w.shape
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6)

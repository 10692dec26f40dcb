"""The fused, chunked LM head + cross-entropy (train/loss.py) against float64 NumPy and against
the unfused path (the model's fp32 logits and optax's cross-entropy).

Tolerances: everything is float32 here; NumPy is float64. Loss sums of ~100 tokens and their
gradients agree to 1e-5 relative; a wrong chunk boundary, a missed ignored token or a
gradient scaled by the wrong factor is off by far more.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t6_jax import config as config_lib
from t6_jax import kernels
from t6_jax.kernels import cross_entropy_gpu
from t6_jax.model import model_from_params
from t6_jax.model.transformer import layers_scanned
from t6_jax.sharding import RULES as RULE_TABLES
from t6_jax.sharding import make_mesh, rules_table
from t6_jax.train import loss as loss_lib
from t6_jax.train import step as step_lib

RULES = rules_table("fsdp")


def numpy_loss_and_grads(x, w, targets, z=0.0):
  """float64 sum of -log softmax(x w^T)[target] over kept tokens, and its gradients; z > 0:
  of nll + z lse^2 (the z-loss; d/dlogits = softmax (1 + 2 z lse) - onehot)."""
  x, w = x.astype(np.float64), w.astype(np.float64)
  logits = x @ w.T
  m = logits.max(-1, keepdims=True)
  lse = m[..., 0] + np.log(np.exp(logits - m).sum(-1))
  keep = targets != -1
  safe = np.where(keep, targets, 0)
  nll = lse - np.take_along_axis(logits, safe[..., None], -1)[..., 0]
  dlogits = np.exp(logits - lse[..., None]) * (1.0 + 2.0 * z * lse)[..., None]
  np.put_along_axis(dlogits, safe[..., None], np.take_along_axis(dlogits, safe[..., None], -1)
                    - 1.0, -1)
  dlogits *= keep[..., None]
  return ((nll + z * lse * lse) * keep).sum(), dlogits @ w, np.einsum("btv,btd->vd", dlogits, x)


@pytest.mark.parametrize("chunks,impl", [(1, "xla"), (2, "xla"), (8, "xla"), (2, "pallas")])
def test_chunked_loss_and_grads_match_numpy(chunks, impl):
  rng = np.random.default_rng(0)
  b, t, d, v = 3, 8, 16, 37
  x = rng.standard_normal((b, t, d)).astype(np.float32)
  w = (0.5 * rng.standard_normal((v, d))).astype(np.float32)
  targets = rng.integers(0, v, (b, t)).astype(np.int32)
  targets[rng.random((b, t)) < 0.3] = -1

  def f(x, w):
    return loss_lib.lm_head_cross_entropy(x, w, targets, dtype="float32", rules=RULES,
                                          chunks=chunks, impl=impl)

  loss, (dx, dw) = jax.jit(jax.value_and_grad(f, (0, 1)))(x, w)
  want_loss, want_dx, want_dw = numpy_loss_and_grads(x, w, targets)
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(dx), want_dx, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(dw), want_dw, rtol=1e-5, atol=1e-6)
  # Not differentiated (evaluation), the same loss from the forward-only loop.
  np.testing.assert_allclose(float(jax.jit(f)(x, w)), want_loss, rtol=1e-5)
  # The cotangent scales both gradients (the backward pass only multiplies).
  dx3, dw3 = jax.grad(lambda x, w: 3.0 * f(x, w), (0, 1))(x, w)
  np.testing.assert_allclose(np.asarray(dx3), 3 * want_dx, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(dw3), 3 * want_dw, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunks,impl", [(2, "xla"), (2, "pallas")])
def test_z_loss_objective_and_grads_match_numpy(chunks, impl):
  """train.z_loss: the objective nll + z lse^2 and its gradients against float64 NumPy; the
  cross-entropy beside it is the plain sum and carries no gradient. The logits are offset so
  that lse is far from 0 (the term matters)."""
  rng = np.random.default_rng(1)
  b, t, d, v, z = 3, 8, 16, 37, 0.05
  x = rng.standard_normal((b, t, d)).astype(np.float32)
  x[..., 0] = 4.0  # with w[:, 0] = 1: every logit + 4, lse ~ 8
  w = (0.5 * rng.standard_normal((v, d))).astype(np.float32)
  w[:, 0] = 1.0
  targets = rng.integers(0, v, (b, t)).astype(np.int32)
  targets[rng.random((b, t)) < 0.3] = -1

  def f(x, w):
    return loss_lib.lm_head_objective(x, w, targets, dtype="float32", rules=RULES,
                                      chunks=chunks, impl=impl, z_loss=z)

  (objective, nll), (dx, dw) = jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True))(x, w)
  want, want_dx, want_dw = numpy_loss_and_grads(x, w, targets, z)
  want_nll = numpy_loss_and_grads(x, w, targets)[0]
  assert want - want_nll > 0.1 * want  # the z term is a large part of the objective
  np.testing.assert_allclose(float(objective), want, rtol=1e-5)
  np.testing.assert_allclose(float(nll), want_nll, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(dx), want_dx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dw), want_dw, rtol=1e-5, atol=1e-5)
  # The cross-entropy output is a metric: no gradient flows through it.
  dx_nll = jax.grad(lambda x: f(x, w)[1])(x)
  assert not np.any(np.asarray(dx_nll))
  with pytest.raises(ValueError, match="z_loss"):
    loss_lib.lm_head_objective(x, w, targets, dtype="float32", rules=RULES, z_loss=-1.0)


def numpy_lse_and_target(x, t):
  """float64 logsumexp, the logit at max(t, 0), and softmax - onehot (zero where t < 0)."""
  x, t = np.asarray(x, np.float64), np.asarray(t)
  m = x.max(-1, keepdims=True)
  lse = m[..., 0] + np.log(np.exp(x - m).sum(-1))
  safe = np.maximum(t, 0)[..., None]
  grad = np.exp(x - lse[..., None])
  np.put_along_axis(grad, safe, np.take_along_axis(grad, safe, -1) - 1.0, -1)
  grad *= (t >= 0)[..., None]
  return lse, np.take_along_axis(x, safe, -1)[..., 0], grad


@pytest.mark.parametrize("dtype,rows,block_v", [("float32", 2, 16), ("bfloat16", 1, 64),
                                                ("float32", 4, 128)])
def test_lse_kernel_matches_numpy(dtype, rows, block_v):
  """The one-read kernel (interpreted) against float64 NumPy: a vocabulary that is not a
  multiple of the block (masked tail), a row count that is not a multiple of `rows`, logits
  far from zero (the running max must rescale the sum), a row that is -inf but for one and
  an ignored token (id -1: a zero gradient row)."""
  rng = np.random.default_rng(5)
  n, v = 7, 101
  x = (rng.standard_normal((n, v)) * 4 + rng.uniform(-50, 50, (n, 1))).astype(np.float32)
  x[3, :] = -np.inf
  x[3, 60] = 2.0
  x = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))  # the values the kernel reads
  t = rng.integers(0, v, n).astype(np.int32)
  t[3], t[5] = 60, -1
  lse, target, grad = cross_entropy_gpu.lse_and_target(
      jnp.asarray(x, dtype), jnp.asarray(t), grad=True, rows=rows, block_v=block_v,
      interpret=True)
  want_lse, want_target, want_grad = numpy_lse_and_target(x, t)
  np.testing.assert_allclose(np.asarray(lse), want_lse, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(target), want_target.astype(np.float32))
  assert grad.dtype == jnp.dtype(dtype) and not np.asarray(grad[5], np.float32).any()
  tol = 2e-6 if dtype == "float32" else 2**-8  # bf16: one rounding of each gradient
  np.testing.assert_allclose(np.asarray(grad, np.float32), want_grad, rtol=tol, atol=tol)
  # Without grad: the same statistics, two outputs.
  assert len(cross_entropy_gpu.lse_and_target(jnp.asarray(x, dtype), jnp.asarray(t),
                                              rows=rows, block_v=block_v,
                                              interpret=True)) == 2


def test_lse_kernel_rejects_mismatched_targets():
  with pytest.raises(ValueError, match="one target id per row"):
    cross_entropy_gpu.lse_and_target(jnp.zeros((4, 8)), jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match="train.loss_impl='fast'"):
    kernels.lse_and_target(jnp.zeros((1, 4, 8)), jnp.zeros((1, 4), jnp.int32), impl="fast")


@pytest.mark.parametrize("rules,kernel", [("fsdp", True), ("fsdp_tp", False)])
def test_lse_on_a_mesh(rules, kernel):
  """Rows split over fsdp: the kernel per shard under shard_map; the vocabulary split over
  tensor (fsdp_tp): XLA's reductions. Both match NumPy, the gradient included."""
  tensor = 2 if rules == "fsdp_tp" else 1
  mesh = make_mesh(data=1, fsdp=4 // tensor, tensor=tensor, devices=jax.devices()[:4],
                   rules=rules)
  rng = np.random.default_rng(6)
  x = rng.standard_normal((4, 3, 40)).astype(np.float32) * 3
  t = rng.integers(0, 40, (4, 3)).astype(np.int32)
  t[1, 2] = -1
  run = jax.jit(lambda x, t: kernels.lse_and_target(x, t, impl="pallas", grad=True,
                                                    rules=RULE_TABLES[rules]))
  with jax.set_mesh(mesh):
    jaxpr = str(jax.make_jaxpr(run)(x, t))
    got = run(x, t)
  assert ("pallas_call" in jaxpr) == kernel and ("shard_map" in jaxpr) == kernel
  with jax.set_mesh(mesh):  # no rules: the split is unknown, so XLA's form
    assert "pallas_call" not in str(jax.make_jaxpr(
        lambda x, t: kernels.lse_and_target(x, t, impl="pallas"))(x, t))
  for g, want in zip(got, numpy_lse_and_target(x, t)):
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-6, atol=1e-6)


def test_chunked_loss_on_a_mesh_matches_numpy():
  """The chunked loop on a data x fsdp x tensor mesh (vocabulary rows split over `tensor`):
  the loss and both gradients as the float64 equations give them."""
  mesh = make_mesh(data=2, fsdp=2, tensor=2, devices=jax.devices()[:8], rules="fsdp_tp")
  rng = np.random.default_rng(7)
  x = rng.standard_normal((4, 8, 16)).astype(np.float32)
  w = (0.5 * rng.standard_normal((40, 16))).astype(np.float32)
  targets = rng.integers(0, 40, (4, 8)).astype(np.int32)
  targets[rng.random((4, 8)) < 0.2] = -1

  f = lambda x, w: loss_lib.lm_head_cross_entropy(  # noqa: E731
      x, w, targets, dtype="float32", rules=RULE_TABLES["fsdp_tp"], chunks=4)
  with jax.set_mesh(mesh):
    loss, (dx, dw) = jax.device_get(jax.jit(jax.value_and_grad(f, (0, 1)))(x, w))
  want_loss, want_dx, want_dw = numpy_loss_and_grads(x, w, targets)
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
  np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-6)


def test_lse_auto_takes_the_kernel_on_gpu_only(monkeypatch):
  x, t = jnp.zeros((2, 3, 8)), jnp.zeros((2, 3), jnp.int32)
  trace = lambda: str(jax.make_jaxpr(lambda x, t: kernels.lse_and_target(x, t))(x, t))
  assert "pallas_call" not in trace()  # CPU: XLA's reductions
  monkeypatch.setattr(kernels, "target", lambda: ("gpu", None))
  monkeypatch.setattr(cross_entropy_gpu, "lse_and_target",
                      lambda x, t, grad, interpret: (x[:, 0], x[:, 1]))
  assert "pallas_call" not in trace() and "slice" in trace()  # the (stubbed) kernel's path


def test_num_chunks():
  assert loss_lib.num_chunks(8, 32, 256, 1) == 1
  # 64 x 1024 tokens x 50304 logits on one device: 12.3 x CHUNK_LOGITS -> 16 pieces of T.
  assert loss_lib.num_chunks(64, 1024, 50304, 1) == 16
  assert loss_lib.num_chunks(64, 1024, 50304, 256) == 1
  assert loss_lib.num_chunks(1, 7, 2**30, 1) == 7  # at most one position per piece


def test_chunks_must_divide_length():
  x = np.zeros((1, 6, 4), np.float32)
  with pytest.raises(ValueError, match="must divide the sequence length 6"):
    loss_lib.lm_head_cross_entropy(x, np.zeros((5, 4), np.float32), np.zeros((1, 6), np.int32),
                                   dtype="float32", rules=RULES, chunks=4)


def test_train_loss_and_grads_equal_unfused_path():
  """loss_sums (fused head + loss) against the model's own fp32 logits through optax, on the
  tiny float32 config: the same loss and the same gradient for every parameter."""
  cfg = config_lib.load("tiny", ["model.num_layers=1"])
  rng = np.random.default_rng(2)
  params = jax.tree.map(lambda x: (0.2 * rng.standard_normal(x.shape)).astype(x.dtype),
                        jax.eval_shape(lambda: step_lib.init_params(cfg.model)))
  tokens = rng.integers(0, cfg.model.vocab_size, (2, 17)).astype(np.int32)
  targets = tokens[:, 1:].copy()
  targets[0, :5] = -1
  batch = {"inputs": tokens[:, :-1], "targets": targets}

  def unfused(p):
    logits = model_from_params(cfg.model, p)(batch["inputs"])
    keep = targets != -1
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                          jnp.where(keep, targets, 0))
    return jnp.sum(jnp.where(keep, nll, 0.0))

  fused = lambda p: step_lib.loss_sums(p, cfg, batch)[0]  # noqa: E731
  want, want_g = jax.jit(jax.value_and_grad(unfused))(params)
  got, got_g = jax.jit(jax.value_and_grad(fused))(params)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  for (path, g), h in zip(jax.tree_util.tree_leaves_with_path(got_g), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-4, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("setting, platform, scanned", [
    ("auto", "gpu", False), ("auto", "cpu", False), ("auto", "tpu", True),
    (True, "gpu", True), (False, "tpu", False)])
def test_layers_scanned(setting, platform, scanned):
  cfg = config_lib.ModelConfig(scan_layers=setting)
  assert layers_scanned(cfg, platform) is scanned


def test_layers_scanned_follows_the_traced_mesh():
  """auto with no platform given: the devices of the mesh under jax.set_mesh (host CPUs)."""
  cfg = config_lib.ModelConfig()
  mesh = jax.make_mesh((1,), ("fsdp",), devices=jax.devices()[:1])
  with jax.set_mesh(mesh):
    assert layers_scanned(cfg) is False

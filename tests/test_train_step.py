"""The jitted train step: mesh independence, gradient accumulation, AdamW against NumPy, the
loss with ignored targets, and learning on a repeated batch.

Tolerances: the 1-device and 8-device steps and the accumulated and big-batch steps differ only
in the order of fp32 reductions, so losses and gradient norms must agree to 1e-5 relative and
parameters after two steps to 5e-6 absolute. Adam moves parameters by up to lr = 3e-3 per step,
so a wrong shard, a missing all-reduce or a wrong average shows up far above that. These tests
use Adam eps = 1e-4 instead of 1e-8: with 1e-8, Adam's normalised step g / (|g| + eps) turns
1e-9 reduction-order noise on near-zero gradients into differences as large as lr itself.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t6_jax import config as config_lib
from t6_jax import sharding as sharding_lib
from t6_jax.model import model_from_params
from t6_jax.train import step as step_lib

MICRO = ["model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.head_dim=8",
         "model.vocab_size=64", "model.max_seq_len=16", "train.seq_len=16",
         "train.batch_size=8", "train.warmup_steps=2", "train.lr=3e-3", "train.min_lr=3e-3",
         "train.schedule=constant", "train.steps=100", "train.eps=1e-4"]


def micro_cfg(mesh: config_lib.MeshConfig, *extra) -> config_lib.Config:
  return dataclasses.replace(config_lib.load("tiny", MICRO + list(extra)), mesh=mesh)


def make_batch(seed=0, b=8, t=16, vocab=64, ignore_frac=0.15):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (b, t + 1)).astype(np.int32)
  targets = tokens[:, 1:].copy()
  targets[rng.random(targets.shape) < ignore_frac] = -1  # uneven counts per micro-batch
  return {"inputs": tokens[:, :-1], "targets": targets}


def random_host_state(cfg):
  """A start state built in NumPy (no init compile): random params of the right shapes and
  dtypes (the zero-initialised output projections of a fresh init would give exactly zero
  gradients to every attention and MLP input weight on the first step), zero Adam moments."""
  abstract = step_lib.abstract_state(cfg, sharding_lib.mesh_from_config(cfg.mesh,
                                                                       jax.devices()[:1]))
  host = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract)
  rng = np.random.default_rng(1)
  host["params"] = jax.tree.map(
      lambda x: (0.1 * rng.standard_normal(x.shape)).astype(x.dtype), abstract["params"])
  return host


class Setup:
  """A compiled step on a mesh, and a way to get fresh device copies of the start state."""

  def __init__(self, host_state, mesh_cfg, devices, *extra):
    self.cfg = micro_cfg(mesh_cfg, *extra)
    self.mesh = sharding_lib.mesh_from_config(mesh_cfg, devices)
    self.host_state = host_state
    self.shardings = step_lib.state_shardings(self.cfg, self.mesh)
    self.step = step_lib.TrainStep(self.cfg, self.mesh, self.shardings)

  def fresh(self):
    return jax.device_put(self.host_state, self.shardings)

  def put(self, batch):
    return jax.device_put(batch, step_lib.batch_shardings(self.cfg, self.mesh))

  def run(self, batches):
    state, losses = self.fresh(), []
    for b in batches:
      state, m = self.step(state, self.put(b))
      losses.append((float(m["loss"]), float(m["grad_norm"])))
    return jax.device_get(state), np.array(losses)


ONE_DEVICE = config_lib.MeshConfig(data=1, fsdp=1, tensor=1)


@pytest.fixture(scope="module")
def start():
  return random_host_state(micro_cfg(ONE_DEVICE))


@pytest.fixture(scope="module")
def one(start):
  return Setup(start, ONE_DEVICE, jax.devices()[:1])


@pytest.fixture(scope="module")
def eight(start):
  if jax.device_count() < 8:
    pytest.skip("needs 8 (forced host) devices")
  return Setup(start, config_lib.MeshConfig(data=2, fsdp=2, tensor=2, rules="fsdp_tp"),
               jax.devices()[:8])


@pytest.fixture(scope="module")
def accum(start):
  return Setup(start, ONE_DEVICE, jax.devices()[:1], "train.grad_accum=4")


def assert_trees_close(a, b, atol):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=0, atol=atol, err_msg=jax.tree_util.keystr(path))


def test_one_device_equals_eight_devices(one, eight):
  batches = [make_batch(0), make_batch(1)]
  s1, l1 = one.run(batches)
  s8, l8 = eight.run(batches)
  np.testing.assert_allclose(l1, l8, rtol=1e-5)
  assert_trees_close(s1["params"], s8["params"], atol=5e-6)
  assert_trees_close(s1["opt_state"], s8["opt_state"], atol=5e-6)


def test_eight_device_params_sharded_as_rules_say(eight):
  state = eight.fresh()
  p = state["params"]
  # fsdp_tp: embed -> fsdp (2), heads/mlp/vocab -> tensor (2); layers, ranks, head_dim whole.
  expect = {
      ("embed", "wte"): (64 // 2, 32 // 2),
      ("blocks", "attn", "W_A_q"): (2, 32 // 2, 4 // 2, 6),
      ("blocks", "attn", "W_B_q"): (2, 32 // 2, 6, 8),
      ("blocks", "attn", "W_A_k"): (2, 32 // 2, 4 // 2, 2),
      ("blocks", "attn", "c_proj"): (2, 4 // 2, 8, 32 // 2),
      ("blocks", "mlp", "c_fc1"): (2, 32 // 2, 85 // 1),  # 85 is odd: tensor cannot split it
      ("blocks", "mlp", "c_proj"): (2, 85, 32 // 2),
  }
  for path, shard_shape in expect.items():
    x = p
    for key in path:
      x = x[key]
    assert x.addressable_shards[0].data.shape == shard_shape, path
  mu = state["opt_state"][1][0].mu
  assert mu["embed"]["wte"].sharding == p["embed"]["wte"].sharding
  assert state["opt_state"][1][0].count.sharding.spec == jax.sharding.PartitionSpec()
  assert state["opt_state"][1][0].count.sharding.mesh.size == 8


def test_grad_accumulation_equals_big_batch(one, accum):
  batches = [make_batch(2), make_batch(3)]
  s1, l1 = one.run(batches)
  s4, l4 = accum.run(batches)
  np.testing.assert_allclose(l1, l4, rtol=1e-5)
  assert_trees_close(s1["params"], s4["params"], atol=5e-6)


def numpy_cross_entropy(logits, targets):
  logits = logits.astype(np.float64)
  m = logits.max(-1, keepdims=True)
  logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
  keep = targets != -1
  nll = -np.take_along_axis(logp, np.where(keep, targets, 0)[..., None], -1)[..., 0]
  return (nll * keep).sum(), keep.sum()


def test_loss_ignores_targets(one):
  batch = make_batch(4, ignore_frac=0.5)
  params = one.host_state["params"]

  def logits_and_sums(p, b):
    return model_from_params(one.cfg.model, p)(b["inputs"]), step_lib.loss_sums(p, one.cfg, b)

  logits, (got_sum, got_count) = jax.jit(logits_and_sums)(params, batch)
  want_sum, want_count = numpy_cross_entropy(np.asarray(logits), batch["targets"])
  assert int(got_count) == want_count
  np.testing.assert_allclose(float(got_sum), want_sum, rtol=1e-5)


def test_z_loss_step(start, one):
  """train.z_loss (here with 2 micro-batches): the logged loss stays the cross-entropy, z_loss
  is z * mean(logsumexp^2) of the model's logits (float64 NumPy), and the gradient has the
  term (the gradient itself is checked in tests/test_loss.py)."""
  z = 0.01
  zs = Setup(start, ONE_DEVICE, jax.devices()[:1], f"train.z_loss={z}", "train.grad_accum=2")
  batch = make_batch(5)
  _, m = zs.step(zs.fresh(), zs.put(batch))
  _, m0 = one.step(one.fresh(), one.put(batch))
  logits = np.asarray(jax.jit(lambda p, x: model_from_params(one.cfg.model, p)(x))(
      start["params"], batch["inputs"]), np.float64)
  top = logits.max(-1)
  lse = top + np.log(np.exp(logits - top[..., None]).sum(-1))
  keep = batch["targets"] != -1
  assert "z_loss" not in m0
  np.testing.assert_allclose(float(m["loss"]), float(m0["loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(m["z_loss"]), z * (lse * lse * keep).sum() / keep.sum(),
                             rtol=1e-4)
  assert abs(float(m["grad_norm"]) - float(m0["grad_norm"])) > 1e-3 * float(m0["grad_norm"])


def test_optimizer_is_numpy_adamw():
  """Three updates of make_optimizer against NumPy: clipping at the global norm, bias-corrected
  Adam with betas (0.9, 0.95), eps 1e-8, decoupled weight decay lr * wd * p on every
  parameter, and the warmup learning rate."""
  t = config_lib.TrainConfig(lr=1e-2, min_lr=1e-3, warmup_steps=2, steps=10, clip_norm=1.0,
                             weight_decay=0.1)
  opt = step_lib.make_optimizer(t)
  rng = np.random.default_rng(0)
  params = {"a": rng.standard_normal((3, 4)).astype(np.float32),
            "b": {"c": rng.standard_normal(5).astype(np.float32)}}
  state = opt.init(params)
  update = jax.jit(opt.update)
  p_np = jax.tree.map(lambda x: x.astype(np.float64), params)
  m_np = jax.tree.map(np.zeros_like, p_np)
  v_np = jax.tree.map(np.zeros_like, p_np)
  for i, grad_scale in enumerate([3.0, 0.05, 1.0]):  # first one is clipped, second is not
    grads = jax.tree.map(lambda x: (grad_scale * rng.standard_normal(x.shape)).astype(np.float32),
                         params)
    updates, state = update(grads, state, params)
    params = jax.tree.map(lambda p, u: np.asarray(p + u), params, updates)
    g_np = jax.tree.map(lambda x: x.astype(np.float64), grads)
    norm = np.sqrt(sum((g * g).sum() for g in jax.tree.leaves(g_np)))
    g_np = jax.tree.map(lambda g: g * min(1.0, 1.0 / norm), g_np)
    lr = 1e-2 * (i + 1) / 2 if i < 2 else 1e-3 + 0.5 * (1e-2 - 1e-3) * (
        1 + np.cos(np.pi * (i - 2) / 8))
    m_np = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, m_np, g_np)
    v_np = jax.tree.map(lambda v, g: 0.95 * v + 0.05 * g * g, v_np, g_np)
    p_np = jax.tree.map(
        lambda p, m, v: p - lr * ((m / (1 - 0.9 ** (i + 1))) /
                                  (np.sqrt(v / (1 - 0.95 ** (i + 1))) + 1e-8) + 0.1 * p),
        p_np, m_np, v_np)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(p_np)):
      np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_loss_falls_on_repeated_batch(one):
  batch = make_batch(6, ignore_frac=0.0)
  _, losses = one.run([batch] * 25)
  assert losses[-1, 0] < 0.6 * losses[0, 0], losses[:, 0]


def test_non_finite_loss_leaves_state_unchanged(one):
  state = one.fresh()
  state["params"]["embed"]["wte"] = state["params"]["embed"]["wte"].at[0, 0].set(jnp.nan)
  before = jax.device_get(state)
  after, m = one.step(state, one.put(make_batch(7)))
  assert not np.isfinite(float(m["loss"]))
  after = jax.device_get(after)
  assert int(after["step"]) == 1
  for x, y in zip(jax.tree.leaves(before["params"]), jax.tree.leaves(after["params"])):
    np.testing.assert_array_equal(x, y)


def test_compiler_options_by_platform():
  """cuBLAS (XLA's Triton GEMMs off) on GPU meshes only: train.gpu_gemm=cublas, or auto from
  d_model 1024 up; CPU and TPU (AOT) meshes and triton compile with XLA's defaults."""
  class FakeMesh:
    def __init__(self, platform):
      self.devices = np.array([type("Device", (), {"platform": platform})()])
  cublas = {"xla_gpu_enable_triton_gemm": False}
  tiny = config_lib.load("tiny")
  assert tiny.train.gpu_gemm == "auto" and tiny.model.d_model < 1024
  assert step_lib.compiler_options(tiny, FakeMesh("gpu")) is None
  wide = config_lib.load("tiny", ["model.d_model=1024", "model.num_heads=16"])
  assert step_lib.compiler_options(wide, FakeMesh("gpu")) == cublas
  forced = config_lib.load("tiny", ["train.gpu_gemm=cublas"])
  assert step_lib.compiler_options(forced, FakeMesh("gpu")) == cublas
  triton = config_lib.load("tiny", ["model.d_model=1024", "model.num_heads=16",
                                    "train.gpu_gemm=triton"])
  assert step_lib.compiler_options(triton, FakeMesh("gpu")) is None
  for platform in ("cpu", "tpu"):
    assert step_lib.compiler_options(forced, FakeMesh(platform)) is None
  # The option named is one XLA knows (a misspelt one fails any compile, on any backend).
  assert float(jax.jit(lambda x: x + 1, compiler_options=cublas)(1.)) == 2.
  # model.contract_impl=auto: the Pallas contraction on GPU, whoever runs the products.
  impl = lambda cfg, platform: step_lib.settled(cfg, FakeMesh(platform)).model.contract_impl
  assert impl(tiny, "gpu") == "pallas" and impl(triton, "gpu") == "pallas"
  assert impl(wide, "gpu") == "pallas" and impl(forced, "gpu") == "pallas"
  assert impl(forced, "cpu") == "xla" and impl(forced, "tpu") == "xla"
  chosen = config_lib.load("tiny", ["train.gpu_gemm=cublas", "model.contract_impl=xla"])
  assert impl(chosen, "gpu") == "xla"  # an explicit setting stands
  with pytest.raises(config_lib.ConfigError, match="gpu_gemm"):
    config_lib.load("tiny", ["train.gpu_gemm=cutlass"])


def test_tensor_split_pads_heads_and_mlp_inside_the_step():
  """6 heads and 85 MLP units on 4 tensor shards: padded to 8 and 88 inside the step, so each
  shard computes 2 heads and 22 units (the compiled step holds the padded output projection
  split 2 heads a shard), while the state keeps 6 and 85; the losses and updates are one
  device's."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 (forced host) devices")
  extra = ("model.num_heads=6",)
  start = random_host_state(micro_cfg(ONE_DEVICE, *extra))
  one = Setup(start, ONE_DEVICE, jax.devices()[:1], *extra)
  tp = Setup(start, config_lib.MeshConfig(data=2, fsdp=1, tensor=4, rules="fsdp_tp"),
             jax.devices()[:8], *extra)
  batches = [make_batch(0), make_batch(1)]
  s1, l1 = one.run(batches)
  s4, l4 = tp.run(batches)
  assert s4["params"]["blocks"]["attn"]["c_proj"].shape == (2, 6, 8, 32)
  np.testing.assert_allclose(l1, l4, rtol=1e-5)
  assert_trees_close(s1["params"], s4["params"], atol=5e-6)
  text = tp.step.lower(tp.fresh(), tp.put(batches[0])).compile().as_text()
  assert "f32[2,2,8,32]" in text and "f32[2,32,22]" in text

"""model.weight_grad_stream: the projections' weight gradients split out of autodiff into calls
of their own (on GPU placed on a second CUDA stream) must leave the train step's results
unchanged, bit for bit, on one device and on a sharded mesh with scanned, rematerialised
layers. (The LM head's pipelined gradient is checked in test_loss.py.)"""

import dataclasses
import inspect

import jax
import numpy as np
import pytest

from t6_jax import config as config_lib
from t6_jax import sharding as sharding_lib
from t6_jax.train import step as step_lib

MICRO = ["model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.head_dim=8",
         "model.vocab_size=64", "model.max_seq_len=16", "train.seq_len=16",
         "train.batch_size=8", "train.warmup_steps=2", "train.lr=3e-3",
         "train.schedule=constant", "train.steps=100", "model.dtype=bfloat16"]


def run_steps(mesh_cfg, devices, *extra):
  cfg = dataclasses.replace(config_lib.load("tiny", MICRO + list(extra)), mesh=mesh_cfg)
  mesh = sharding_lib.mesh_from_config(mesh_cfg, devices)
  shardings = step_lib.state_shardings(cfg, mesh)
  abstract = step_lib.abstract_state(cfg, mesh)
  rng = np.random.default_rng(1)
  host = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract)
  host["params"] = jax.tree.map(
      lambda x: (0.1 * rng.standard_normal(x.shape)).astype(x.dtype), abstract["params"])
  state = jax.device_put(host, shardings)
  step = step_lib.TrainStep(cfg, mesh, shardings)
  rng = np.random.default_rng(0)
  for _ in range(2):
    tokens = rng.integers(0, 64, (8, 17)).astype(np.int32)
    batch = jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]},
                           step_lib.batch_shardings(cfg, mesh))
    state, metrics = step(state, batch)
  return jax.device_get(state["params"]), float(metrics["loss"])


@pytest.mark.parametrize("mesh_cfg, extra", [
    (config_lib.MeshConfig(data=1, fsdp=1, tensor=1), ["model.attention=tpa"]),
    (config_lib.MeshConfig(data=2, fsdp=2, tensor=2, rules="fsdp_tp"),
     ["model.attention=tpa", "model.scan_layers=true", "model.remat=full"]),
])
def test_weight_grad_stream_leaves_steps_unchanged(mesh_cfg, extra):
  n = mesh_cfg.data * mesh_cfg.fsdp * mesh_cfg.tensor
  if jax.device_count() < n:
    pytest.skip(f"needs {n} (forced host) devices")
  want, want_loss = run_steps(mesh_cfg, jax.devices()[:n], *extra)
  got, got_loss = run_steps(mesh_cfg, jax.devices()[:n], *extra, "model.weight_grad_stream=1")
  assert got_loss == want_loss
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_weight_grad_stream_must_not_be_negative():
  with pytest.raises(config_lib.ConfigError, match="weight_grad_stream"):
    config_lib.load("tiny", ["model.weight_grad_stream=-1"])


@pytest.mark.parametrize("api", ["installed", "function_transform"])
def test_gpu_lowering_places_weight_grad_on_the_stream(api, monkeypatch):
  """On GPU the weight gradient is a call annotated for stream 1 (lowered here as if on a
  GPU; jax >= 0.11.1 spells compute_on as a function transform, earlier jax as a context
  manager, and either must give the annotation)."""
  from jax._src import compute_on as compute_on_src
  from t6_jax import kernels
  from t6_jax.model import wgrad
  monkeypatch.setattr(kernels, "target", lambda: ("gpu", None))
  if api == "function_transform":
    if not hasattr(compute_on_src, "compute_on2"):  # jax >= 0.11.1: the installed one is it
      assert "out_memory_spaces" in inspect.signature(compute_on_src.compute_on).parameters
      pytest.skip("the installed compute_on is the function transform")
    monkeypatch.setattr(wgrad, "compute_on", compute_on_src.compute_on2)
  x = np.ones((2, 3, 4), np.float32)
  w = np.ones((4, 5), np.float32)
  grad = jax.grad(lambda x, w: wgrad.projection("btd,dn->btn", x, w, 1).sum(), (0, 1))
  text = jax.jit(grad).lower(x, w).as_text()
  products = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
  # The forward is not kept (only gradients are asked for): dx on the main stream, dw on 1.
  assert len(products) == 2, text
  assert ['_xla_stream_annotation = "1"' in line for line in products] == [False, True], text

"""AOT compile of the real train step for a small TPU topology (needs libtpu: the `tpu` extra;
skipped without it, except in CI)."""

import dataclasses
import importlib.util
import os

import pytest

from t6_jax import config as config_lib

# CI installs the tpu extra (.ci/run): there a missing libtpu fails instead of skipping.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None and not os.environ.get("CI"),
    reason="libtpu not installed (pip install 't6-jax[tpu]')")

MICRO = ["model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.head_dim=8",
         "model.vocab_size=64", "model.max_seq_len=16", "train.seq_len=16",
         "train.batch_size=8", "mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1"]


def test_aot_compile_tiny_for_v5e_2x2():
  from t6_jax.train import aot
  cfg = config_lib.load("tiny", MICRO)
  report = aot.compile_train_step(cfg, "v5e:2x2")
  assert report.chips == 4 and report.mesh == {"data": 1, "fsdp": 4, "tensor": 1}
  assert "v5 lite" in report.device_kind and report.hbm_bytes == 16 * 2**30
  # params, Adam mu and nu in fp32, split 4 ways (d_model 32 divides by fsdp 4).
  assert report.argument_bytes >= 3 * 4 * report.params / 4
  assert report.fits and report.total_bytes < 2**30
  assert report.model_flops_per_step > 0 and report.min_step_s > 0
  text = report.text()
  assert "memory per chip" in text and "lower bound on step time" in text
  too_small = dataclasses.replace(report, hbm_bytes=1000)
  assert not too_small.fits and "DOES NOT FIT" in too_small.text()


def test_aot_report_says_what_the_step_pads_for_the_tensor_axis():
  """6 heads and 85 MLP units on a tensor axis of 4: the report names the padding inside the
  step; on a tensor axis of 2 the heads divide (85 units pad to 86)."""
  from t6_jax.train import aot
  tp = ["model.num_heads=6", "model.mlp_hidden=85", "mesh.rules=fsdp_tp", "mesh.fsdp=1"]
  report = aot.compile_train_step(config_lib.load("tiny", MICRO + tp + ["mesh.tensor=4"]),
                                  "v5e:2x2")
  assert report.padding == "model.num_heads 6 -> 8 and model.mlp_hidden 85 -> 88"
  assert "padded inside the step: model.num_heads 6 -> 8" in report.text()
  assert aot.compile_train_step(config_lib.load("tiny", MICRO + tp + ["mesh.tensor=2",
                                                                      "mesh.data=2"]),
                                "v5e:2x2").padding == "model.mlp_hidden 85 -> 86"


def test_aot_compile_of_the_real_preset_layers_for_v5p_2x2x2():
  """t6-small's own widths and vocabulary (one layer, 64 tokens), FSDP over 8 chips: the
  compile that fails inside XLA with a libtpu not paired with jax (0.0.52 with jax 0.10.2;
  it takes the full vocabulary to fail), though the tiny step above compiles with it."""
  from t6_jax.train import aot
  cfg = config_lib.load("t6-small", ["model.num_layers=1", "train.seq_len=64",
                                     "train.batch_size=8", "mesh.data=1", "mesh.fsdp=8",
                                     "mesh.tensor=1"])
  report = aot.compile_train_step(cfg, "v5p:2x2x2")
  assert report.chips == 8 and report.mesh == {"data": 1, "fsdp": 8, "tensor": 1}
  assert report.fits and report.model_flops_per_step > 0


def test_a_mesh_over_two_slices_keeps_fsdp_inside_each_slice():
  """Two v5p slices joined over DCN: the data axis's outer factor is the slice, so every
  FSDP group lies inside one slice; a data axis that cannot cross the slices is refused with
  the setting that fixes it."""
  import numpy as np
  from t6_jax import sharding
  from t6_jax.train import aot
  devices = aot.topology_devices("v5p:2x2x1", slices=2)
  assert sharding.slice_count(devices) == 2 and len(devices) == 8
  slice_of = lambda mesh: np.vectorize(lambda d: d.slice_index)(mesh.devices)
  mesh = sharding.make_mesh(data=2, fsdp=-1, devices=devices)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  assert (slice_of(mesh)[:, :, 0] == [[0] * 4, [1] * 4]).all()
  mesh = sharding.make_mesh(data=4, fsdp=2, devices=devices)
  assert (slice_of(mesh)[:, :, 0] == [[0, 0], [0, 0], [1, 1], [1, 1]]).all()
  # Two v5e:4x4 slices with 2 x 8 chips each: 8 is no product of whole 4x4 torus axes.
  mesh = sharding.make_mesh(data=4, fsdp=8, devices=aot.topology_devices("v5e:4x4", slices=2))
  assert (slice_of(mesh)[:, :, 0] == np.repeat([[0], [0], [1], [1]], 8, axis=1)).all()
  with pytest.raises(ValueError, match=r"span 2 TPU slices .* mesh.data=1 is not a multiple "
                                       r"of 2; set mesh.data=2"):
    sharding.make_mesh(data=1, fsdp=-1, devices=devices)


def test_aot_over_two_slices_sends_only_the_gradient_reduction_between_them():
  """The compiled step of two slices: between them only all-reduces (the gradients' average
  over data), about each chip's gradient shard; a mesh whose FSDP axis spans both slices (the
  layout the slice-aware mesh avoids) sends weight gathers over DCN, and the count shows it."""
  import jax
  import numpy as np
  from t6_jax import sharding
  from t6_jax.train import aot, step as step_lib
  cfg = config_lib.load("tiny", MICRO + ["mesh.data=2"])
  report = aot.compile_train_step(cfg, "v5p:2x2x1", slices=2)
  assert report.chips == 8 and report.mesh == {"data": 2, "fsdp": 4, "tensor": 1}
  assert set(report.dcn) == {"ALL_REDUCE"} and report.dcn_exact  # the layer loop counted
  shard_bytes = 4 * report.params / 4  # fp32 gradients split over fsdp=4
  assert shard_bytes <= report.dcn["ALL_REDUCE"][1] < 1.5 * shard_bytes, report.dcn
  assert "2 slices of v5p:2x2x1" in report.text()
  assert "only the gradient reduction over the data axis crosses slices" in report.text()

  devices = aot.topology_devices("v5p:2x2x1", slices=2)
  across = jax.sharding.Mesh(np.asarray(devices).reshape(1, 8, 1), sharding.MESH_AXES)
  cfg = config_lib.load("tiny", MICRO + ["mesh.fsdp=8"])
  state = step_lib.abstract_state(cfg, across)
  batch = step_lib.abstract_batch(cfg, across, ("inputs", "targets"))
  step = step_lib.TrainStep(cfg, across, jax.tree.map(lambda x: x.sharding, state),
                            ("inputs", "targets"))
  assert "ALL_GATHER" in aot.dcn_transfers(step.lower(state, batch).compile().as_text())


def test_unknown_topology_is_a_clear_error():
  from t6_jax.train import aot
  with pytest.raises(ValueError, match="cannot describe TPU topology 'v9x:1x1'"):
    aot.topology_devices("v9x:1x1")


@pytest.mark.parametrize("have, fails", [("0.0.42.1", False), ("0.0.42", False),
                                          ("0.0.52", True), ("0.0.420", True)])
def test_a_libtpu_that_does_not_pair_with_jax_is_named_before_compiling(monkeypatch, have,
                                                                       fails):
  """jax 0.10.2 with libtpu 0.0.52 compiles the tiny step but fails inside XLA on real
  models: the AOT entry points name the pair to install instead."""
  import importlib.metadata

  from t6_jax.train import aot
  requires = ['jaxlib<=0.10.2,>=0.10.2; extra == "tpu"', 'libtpu==0.0.42.*; extra == "tpu"',
              'libtpu>=9; extra == "other"']
  monkeypatch.setattr(importlib.metadata, "requires", lambda name: requires)
  monkeypatch.setattr(importlib.metadata, "version", lambda name: have)
  message = aot.libtpu_mismatch()
  assert (message is not None) == fails
  if fails:
    assert f"libtpu {have} is installed" in message and "libtpu==0.0.42.*" in message
    assert "pip install 'jax[tpu]==" in message
    with pytest.raises(RuntimeError, match="pairs with libtpu==0.0.42"):
      aot.topology_devices("v5e:2x2")

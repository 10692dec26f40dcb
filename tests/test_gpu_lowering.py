"""The GPU train and decode steps, lowered for CUDA on this CPU host: every GPU-only path (the
Pallas Triton kernels compiled, not interpreted; cuDNN's fused attention; the decode kernels)
must trace and lower with the installed jax, on one device and on meshes (kernels under
shard_map), so that an API change in jax shows here rather than on the GPU machine.

Lowering stops before XLA's GPU compiler: what it checks is the program, not its speed. Two
probes of jax's that need a GPU are answered as an H200 would (cuDNN's version; in jax 0.11
the Triton lowering's device info).
"""

import collections
import re

import jax
import numpy as np
import pytest

from t6_jax import config as config_lib
from t6_jax import kernels
from t6_jax import sharding as sharding_lib
from t6_jax.train import step as step_lib


@pytest.fixture
def as_on_a_gpu(monkeypatch):
  """Trace as on an H200: the kernels' dispatch sees "gpu" (the mesh it reads kept)."""
  cudnn = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
  if not hasattr(cudnn, "check_cudnn_version"):
    pytest.skip("this jax probes cuDNN differently")
  monkeypatch.setattr(cudnn, "check_cudnn_version", lambda: 91000)
  try:  # jax >= 0.11: the Triton lowering asks for the device's compute capability
    from jax._src.pallas.triton import gpu_info, pallas_call_registration
  except ImportError:  # jax 0.10 falls back to compute capability 9.0 by itself
    pass
  else:
    h200 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H200)
    monkeypatch.setattr(pallas_call_registration.gpu_info_lib, "get_gpu_info", lambda: h200)
  on_cpu = kernels.target
  monkeypatch.setattr(kernels, "target", lambda: ("gpu", on_cpu()[1]))


def lowered_step_for_cuda(devices, *overrides) -> str:
  cfg = config_lib.load("tiny", ["train.batch_size=8", "train.seq_len=32", "model.max_seq_len=32",
                                 "model.dtype=bfloat16", *overrides])
  mesh = sharding_lib.mesh_from_config(cfg.mesh, devices)
  _, state, shardings = step_lib.init_state(cfg, mesh)
  step = step_lib.TrainStep(cfg, mesh, shardings)
  tokens = np.zeros((8, 33), np.int32)
  batch = sharding_lib.put_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, mesh,
                                 cfg.mesh.rules)
  with jax.set_mesh(mesh):
    return step.jitted.trace(state, batch).lower(lowering_platforms=("cuda",)).as_text()


def custom_calls(text: str) -> collections.Counter:
  return collections.Counter(re.findall(r"custom_call @([\w$.]+)", text))


def kernel_names(text: str) -> set[str]:
  """The Pallas kernels' names in a lowered program."""
  return set(re.findall(r'name = "(\w+)"', text))


@pytest.mark.parametrize("mesh_cfg", ["one device", "data=4 fsdp=2", "data=2 fsdp=2 tensor=2"])
def test_gpu_train_step_lowers_for_cuda(as_on_a_gpu, mesh_cfg):
  overrides = []
  devices = jax.devices()[:1]
  if mesh_cfg != "one device":
    overrides += [f"mesh.{kv}" for kv in mesh_cfg.split()]
    overrides += ["mesh.rules=fsdp_tp"] if "tensor" in mesh_cfg else []
    devices = jax.devices()[:8]
    if len(devices) < 8:
      pytest.skip("needs 8 (forced host) devices")
  text = lowered_step_for_cuda(devices, *overrides)
  calls = custom_calls(text)
  if mesh_cfg == "one device":
    assert calls["__cudnn$fmhaSoftmax"] and calls["__cudnn$fmhaSoftmaxBackward"], calls
  else:  # cuDNN's attention on a mesh: jax's custom partitioning, forward and backward
    assert calls["CustomSPMDPartitioning"] >= 2, calls
  assert calls["__gpu$xla.gpu.triton"] >= 4, calls  # compiled Pallas kernels, not interpreted
  # The loss's and the MLP backward's kernels, per shard on a mesh. Split over `tensor`, XLA's
  # forms run instead: the loss kernel needs whole vocabulary rows, and tiny's hidden shard
  # (170 / 2) is not a multiple of 8.
  names = kernel_names(text)
  for kernel in ("lse_and_target", "swiglu_grad"):
    assert (kernel in names) == ("tensor" not in mesh_cfg), names


@pytest.mark.parametrize("batch", [1, 4])
def test_gpu_decode_step_lowers_for_cuda(as_on_a_gpu, batch):
  """The token loop of generation on one GPU: the factor-attention kernel and the step's
  fused cache writes at any batch, the GEMV kernel for every product at batch 1."""
  from t6_jax.decode import aot
  cfg = config_lib.load("tiny", ["model.dtype=bfloat16"])
  lowered, _ = aot.lower_decode_step(cfg, jax.devices()[:1], batch=batch, context=64,
                                     platforms=("cuda",))
  text = lowered.as_text()
  assert custom_calls(text)["__gpu$xla.gpu.triton"] >= 3, custom_calls(text)
  want = {"tpa_decode", "tpa_step"} | ({"gemv"} if batch == 1 else set())
  assert want <= kernel_names(text), kernel_names(text)

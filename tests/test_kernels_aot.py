"""The TPU kernels, sharded over a mesh, compile for a TPU topology through libtpu (Mosaic
lowering included) without a TPU attached; skipped without libtpu (the `tpu` extra)."""

import importlib.util
import os
import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu not installed (pip install 't6-jax[tpu]')")

BATCH_AXES = ("data", "fsdp")


def v5e_mesh():
  from t6_jax.train.aot import topology_devices
  devices = np.asarray(topology_devices("v5e:2x2")).reshape(1, 2, 2)
  return jax.sharding.Mesh(devices, ("data", "fsdp", "tensor"),
                           axis_types=(jax.sharding.AxisType.Auto,) * 3)


def spec(mesh, shape, dtype, *axes):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P(*axes)))


def test_splash_sharded_train_step_compiles_for_v5e():
  from t6_jax.kernels.sharded import splash_attention_sharded
  mesh = v5e_mesh()
  batch, t_len, heads, kv_heads, dim = 4, 320, 6, 2, 64  # T not a block multiple, GQA

  def loss(q, k, v, seg):
    y = splash_attention_sharded(q, k, v, mesh=mesh, batch_axes=BATCH_AXES,
                                 head_axis="tensor", scale=dim**-0.5, segment_ids_BxT=seg)
    return jnp.sum(y.astype(jnp.float32) ** 2)

  bf16 = jnp.bfloat16
  args = (spec(mesh, (batch, t_len, heads, dim), bf16, BATCH_AXES, None, "tensor"),
          spec(mesh, (batch, t_len, kv_heads, dim), bf16, BATCH_AXES, None, "tensor"),
          spec(mesh, (batch, t_len, kv_heads, dim), bf16, BATCH_AXES, None, "tensor"),
          spec(mesh, (batch, t_len), jnp.int32, BATCH_AXES, None))
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
  hlo = compiled.as_text()
  assert "tpu_custom_call" in hlo
  assert compiled.memory_analysis().temp_size_in_bytes < 64 * 2**20


def test_tpa_decode_sharded_compiles_for_v5e():
  from t6_jax.kernels.sharded import tpa_decode_sharded
  from t6_jax.kernels.tpa_decode_tpu import a_rows, tpa_decode_attention_tpu
  mesh = v5e_mesh()
  layers, batch, slots, heads, rank, dim = 2, 4, 1000, 6, 2, 64
  bf16 = jnp.bfloat16
  # The TPU cache layout: A as (layers, B, tensor shards x a_rows(H/shards, R), S), B as
  # (layers, B, S, R*d_h).
  rows = 2 * a_rows(heads // 2, rank)
  a = spec(mesh, (layers, batch, rows, slots), bf16, None, BATCH_AXES, "tensor", None)
  b = spec(mesh, (layers, batch, slots, rank * dim), bf16, None, BATCH_AXES)
  q = spec(mesh, (batch, heads, dim), jnp.float32, BATCH_AXES, "tensor")
  pad = spec(mesh, (batch,), jnp.int32, BATCH_AXES)

  def step(q, a_k, b_k, a_v, b_v, pad_B, pos):
    return tpa_decode_sharded(tpa_decode_attention_tpu, mesh, BATCH_AXES, "tensor", q, a_k,
                              b_k, a_v, b_v, 1, pad_B, pos, kv_len=slots)

  pos = jax.ShapeDtypeStruct((), jnp.int32)
  compiled = jax.jit(step).lower(q, a, b, a, b, pad, pos).compile()
  hlo = compiled.as_text()
  assert "tpu_custom_call" in hlo
  # The cache is read in place: no relayout copy of an A factor before the kernel.
  assert not [l for l in hlo.splitlines() if " copy(" in l and f"{rows // 2},{slots}]" in l]
  out = compiled.output_shardings
  assert out.spec == P(BATCH_AXES, "tensor")


# The model wired to the kernels, through the real entry points: the TPU target comes from the
# topology's devices, so model.attention_impl=auto takes splash and decode.attention_kernel=auto
# the Mosaic decode kernel, though this host's backend is the CPU.
MICRO = ["model.num_layers=2", "model.d_model=64", "model.num_heads=4", "model.head_dim=16",
         "model.vocab_size=128", "model.max_seq_len=128", "model.dtype=bfloat16",
         "train.seq_len=128", "train.batch_size=8"]


@pytest.mark.parametrize("topology,mesh", [
    ("v5e:2x2", ["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2", "mesh.rules=fsdp_tp"]),
    ("v5p:2x2x1", ["mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1"]),
    ("v5p:2x2x1", ["--aot_slices", "2", "mesh.data=2", "mesh.fsdp=-1", "mesh.tensor=1"]),
])
def test_train_py_aot_compiles_the_step_with_splash(topology, mesh, capsys):
  import train
  assert train.main(["--config", "tiny", "--aot_topology", topology, *MICRO, *mesh]) == 0
  out = capsys.readouterr().out
  if "--aot_slices" in mesh:  # two slices: only the gradient average crosses between them
    assert "AOT compile for 2 slices of v5p:2x2x1: 8 chips" in out, out
    assert "only the gradient reduction over the data axis crosses slices" in out, out
  calls = int(out.split(" TPU kernel calls")[0].rsplit(" ", 1)[1])
  assert calls >= 2  # splash forward and backward kernels


def test_train_step_xla_attention_has_no_kernel():
  from t6_jax import config as config_lib
  from t6_jax.train import aot
  cfg = config_lib.load("tiny", MICRO + ["model.attention_impl=xla", "mesh.fsdp=-1"])
  assert aot.compile_train_step(cfg, "v5e:2x2").kernel_calls == 0


@pytest.mark.parametrize("attention", ["tpa", "tpa_kvonly"])
def test_decode_step_compiles_with_the_mosaic_kernel(attention):
  from t6_jax import config as config_lib
  from t6_jax.decode.aot import compile_decode_step
  from t6_jax.kernels.tpa_decode_tpu import a_rows
  from t6_jax.train.aot import topology_devices
  cfg = config_lib.load("tiny", MICRO + [f"model.attention={attention}", "mesh.data=1",
                                         "mesh.fsdp=2", "mesh.tensor=2", "mesh.rules=fsdp_tp"])
  slots = 1000
  compiled, _ = compile_decode_step(cfg, topology_devices("v5e:2x2"), batch=4, context=slots)
  hlo = compiled.as_text()
  assert 'custom_call_target="tpu_custom_call"' in hlo
  # The cache is stored in the kernel's layout: no relayout copy of an A factor per step.
  rows = a_rows(cfg.model.num_heads // 2, cfg.model.k_rank)
  assert not [l for l in hlo.splitlines() if " copy(" in l and f"{rows},{slots}]" in l]


def test_decode_step_packs_the_projections_outside_the_loop():
  """Scanned layers (TPU) get TPA's factor projections packed before the token loop: no
  concatenation of weights (or pad of the packed matrix) inside the compiled loop."""
  from t6_jax import config as config_lib
  from t6_jax.decode.aot import compile_decode_step
  from t6_jax.train.aot import topology_devices
  cfg = config_lib.load("tiny", MICRO + ["mesh.data=1", "mesh.fsdp=-1"])
  compiled, _ = compile_decode_step(cfg, topology_devices("v5e:2x2"), batch=4, context=256)
  in_loop = [l for l in compiled.as_text().splitlines() if "while/body" in l]
  assert in_loop and not [l for l in in_loop if " concatenate(" in l]


@pytest.mark.parametrize("mesh", [["mesh.data=2", "mesh.tensor=2"],
                                  ["mesh.data=1", "mesh.tensor=4", "model.num_heads=6",
                                   "model.mlp_hidden=85"]])
def test_tensor_parallel_decode_gathers_no_weights(mesh):
  """Weights split over heads, the MLP and the vocabulary (fsdp_tp, fsdp=1) stay where they
  lie in the compiled decode step: no all-gather of a weight (the embedding's rows are looked
  up on the shard that holds them), only the all-reduces of the activations; 6 heads and 85
  MLP units on 4 tensor shards compile padded to 8 and 88."""
  from t6_jax import config as config_lib
  from t6_jax.decode.aot import compile_decode_step
  from t6_jax.train.aot import topology_devices
  cfg = config_lib.load("tiny", MICRO + mesh + ["mesh.fsdp=1", "mesh.rules=fsdp_tp"])
  compiled, _ = compile_decode_step(cfg, topology_devices("v5e:2x2"), batch=4, context=256)
  text = compiled.as_text()
  gathers = [l for l in text.splitlines() if " all-gather(" in l]
  # (the sampler's per-row candidates are gathered: 4 rows of a few values, no weight)
  assert not [l for l in gathers if re.search(r"\[(\d+,)*(64|128)(,\d+)*\]", l.split("=")[1])]
  if "mesh.tensor=4" in mesh:  # each chip holds 2 of the 8 heads and 22 of the 88 units
    held = {(part, l.split("=")[1].split("{")[0].strip()) for l in text.splitlines()
            for part in ("attn", "mlp") if " parameter(" in l and part in l and "c_proj" in l}
    assert held == {("attn", "bf16[2,2,16,64]"), ("mlp", "bf16[2,22,64]")}


def test_aot_steps_decode_rows_count_gathers_and_held_weights(capsys):
  """bench/aot_steps.py decode: under fsdp every weight matrix is gathered in each step (the
  collectives' results add up to at least the block matrices' bytes); held whole (dp) there is
  no collective and each chip holds every weight (bytes from the parameter shapes here)."""
  import json
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
  import aot_steps
  from t6_jax.model.placement import abstract_params
  from t6_jax import config as config_lib
  base = MICRO + ["mesh.fsdp=1"]
  params = abstract_params(config_lib.load("tiny", base).model)
  blocks = 2 * sum(x.size for x in jax.tree.leaves(params["blocks"]))  # bf16
  held = blocks + 4 * sum(x.size for k, v in params.items() if k != "blocks"
                          for x in jax.tree.leaves(v))
  rows = {}
  for name, mesh in (("fsdp", ["mesh.data=1", "mesh.fsdp=-1"]),
                     ("dp", ["mesh.rules=dp", "mesh.data=-1", "mesh.fsdp=1"])):
    aot_steps.main(["decode", "--config", "tiny", "--topology", "v5e:2x2", "--batch", "4",
                    "--context", "256", "--impls", "xla", *MICRO, *mesh])
    rows[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert rows["fsdp"]["collectives"]["all-gather"][1] >= blocks
  assert rows["dp"]["collectives"] == {}
  assert rows["dp"]["weights_gb_per_chip"] * 1e9 == pytest.approx(held)
  assert rows["fsdp"]["weights_gb_per_chip"] * 1e9 < held / 2


def test_decode_aot_refuses_empty_shapes(capsys):
  from t6_jax.decode.aot import main
  for flags, words in [(["--batch", "0"], "--batch 0: give at least 1"),
                       (["--context", "-5"], "--context -5: give at least 1")]:
    with pytest.raises(SystemExit):
      main(["--config", "tiny", "--topology", "v5e:2x2", *flags])
    assert words in capsys.readouterr().err


def test_prefill_compiles_one_pass_with_splash():
  """A prompt longer than a prefill chunk compiles for a TPU topology as one causal pass with
  the splash kernel, without (T, T) scores in memory."""
  from t6_jax import config as config_lib
  from t6_jax.decode.aot import compile_prefill
  from t6_jax.train.aot import topology_devices
  cfg = config_lib.load("tiny", MICRO + ["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2",
                                         "mesh.rules=fsdp_tp", "decode.prefill_chunk=128"])
  compiled, _ = compile_prefill(cfg, topology_devices("v5e:2x2"), batch=4, prompt_len=1024,
                                context=1100)
  assert 'custom_call_target="tpu_custom_call"' in compiled.as_text()
  scores = 4 * cfg.model.num_heads * 1024 * 1024 * 4  # fp32 (B, H, T, T)
  assert compiled.memory_analysis().temp_size_in_bytes < scores / 4

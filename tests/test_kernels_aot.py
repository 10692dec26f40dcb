"""The TPU kernels, sharded over a mesh, compile for a TPU topology through libtpu (Mosaic
lowering included) without a TPU attached; skipped without libtpu (the `tpu` extra)."""

import importlib.util

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

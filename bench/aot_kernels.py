"""Compile-time comparison of XLA attention and the TPU kernels, per chip, for TPU topologies.

Nothing runs on a TPU: each variant is lowered for a topology's devices (libtpu, the `tpu`
extra) and compiled by the TPU compiler on this host. Per variant it prints the per-chip
memory (compiled.memory_analysis()), FLOPs and bytes accessed (compiled.cost_analysis()) and a
roofline time, max(FLOPs / peak FLOP/s, bytes / HBM bandwidth). These are compile-time
estimates, not TPU timings.

  train   attention only, fwd + bwd (jax.grad of a sum), T6-XL shapes: H = 78 materialised
          heads of d_h 64 (TPA materialises one K/V head per query head), causal, bf16;
          batch over all chips (mesh axis data). XLA: jax.nn.dot_product_attention
          (implementation="xla"); splash: t6_jax.kernels splash_attention_sharded.
  decode  one layer of one-token T6-XL decode (R_k = R_v = 2) from the factor cache at a long
          context; XLA: the factor-path einsums (scores from B_k then A_k, softmax, values per
          rank); kernel: tpa_decode_attention_tpu under shard_map.

Splash declares no cost estimate, so XLA's cost analysis counts its custom calls as (almost)
free; for splash the roofline adds an analytic count of the kernel's work (block-causal
FLOPs of the forward and both backward kernels, and the q/k/v/o streams it re-reads per
block). The decode kernel declares its own cost estimate (pl.CostEstimate), so its numbers are
XLA's.

  python bench/aot_kernels.py                       # v5p:2x2x1 and v5e:2x2, T = 4096
  python bench/aot_kernels.py --topologies v5p:2x2x1 --batch_per_chip 2 --seq_len 1024
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from t6_jax.kernels.sharded import splash_attention_sharded, tpa_decode_sharded  # noqa: E402
from t6_jax.kernels.splash_tpu import block_sizes_for, padded_len  # noqa: E402
from t6_jax.kernels.tpa_decode_tpu import a_rows, tpa_decode_attention_tpu  # noqa: E402
from t6_jax.train import flops as flops_lib  # noqa: E402
from t6_jax.train.aot import topology_devices  # noqa: E402

GiB = 2**30
# HBM bandwidth per chip in bytes/s (public spec sheets).
HBM_BANDWIDTH = {"TPU v4": 1.2e12, "TPU v5 lite": 819e9, "TPU v5e": 819e9, "TPU v5": 2.765e12,
                 "TPU v5p": 2.765e12, "TPU v6 lite": 1.64e12, "TPU v6e": 1.64e12}


def bandwidth(kind: str) -> float | None:
  return flops_lib._lookup(HBM_BANDWIDTH, kind)


def data_mesh(topology: str):
  devices = topology_devices(topology)
  return jax.sharding.Mesh(np.asarray(devices), ("data",),
                           axis_types=(jax.sharding.AxisType.Auto,)), devices[0].device_kind


def splash_kernel_cost(batch: int, t_len: int, heads: int, dim: int) -> tuple[float, float]:
  """(FLOPs, HBM bytes) of splash fwd + dq + dkv on one chip's batch, bf16, causal.

  Causal blocks: of nb x nb (q, kv) block pairs, nb (nb + 1) / 2 are visited. Per visited pair
  the forward does 2 matmuls of block^2 d, the backward 5 (recomputed scores, dP, dV, dQ, dK).
  Bytes: each visited pair streams one K and one V block (forward, dq) or one q, o, do block
  (dkv); q, o, do, dq, dk, dv are written or read once more per pass.
  """
  t_pad = padded_len(t_len)
  block = block_sizes_for(t_len).block_q
  nb = t_pad // block
  pairs = nb * (nb + 1) / 2
  per_pair = 2 * block * block * dim
  flops = batch * heads * pairs * per_pair * (2 + 5)
  blk = block * dim * 2  # one bf16 (block, d) tile
  streamed = batch * heads * pairs * blk * (2 + 2 + 3)  # fwd: k, v; dq: k, v; dkv: q, o, do
  once = batch * heads * t_pad * dim * 2 * (4 + 5 + 6)  # each pass's own inputs and outputs
  return flops, streamed + once


def report(name, compiled, kind, extra=(0.0, 0.0)):
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  cost = cost or {}
  xla_flops, xla_bytes = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
  flops, nbytes = xla_flops + extra[0], xla_bytes + extra[1]
  peak, bw, hbm = flops_lib.peak_flops(kind), bandwidth(kind), flops_lib.hbm_bytes(kind)
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
           + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
  t_flops, t_bytes = flops / peak, nbytes / bw
  fits = "fits" if total <= hbm else "DOES NOT FIT"
  print(f"  {name:7s} memory/chip: args {mem.argument_size_in_bytes / GiB:7.3f} GiB, temps "
        f"{mem.temp_size_in_bytes / GiB:7.3f} GiB, total {total / GiB:7.3f} GiB of "
        f"{hbm / GiB:.0f} ({fits})")
  note = f" (XLA {xla_flops:.3g} + kernel {extra[0]:.3g})" if extra[0] else ""
  print(f"  {name:7s} FLOPs/chip {flops:.4g}{note}; bytes/chip {nbytes:.4g}"
        + (f" (XLA {xla_bytes:.3g} + kernel {extra[1]:.3g})" if extra[1] else ""))
  print(f"  {name:7s} roofline {max(t_flops, t_bytes) * 1e3:9.3f} ms "
        f"(compute {t_flops * 1e3:.3f} ms at {peak / 1e12:.0f} TFLOP/s, memory "
        f"{t_bytes * 1e3:.3f} ms at {bw / 1e9:.0f} GB/s)")
  return dict(total=total, flops=flops, bytes=nbytes, t=max(t_flops, t_bytes))


def compile_or_none(fn, args, name):
  t0 = time.time()
  try:
    compiled = jax.jit(fn).lower(*args).compile()
  except Exception as e:  # a variant that does not fit is a result, not a crash
    print(f"  {name:7s} does not compile: {str(e).splitlines()[0][:200]}")
    return None
  print(f"  {name:7s} compiled in {time.time() - t0:.1f} s")
  return compiled


def bench_train(topology, batch_per_chip, t_len, heads, dim):
  mesh, kind = data_mesh(topology)
  chips = mesh.size
  batch = batch_per_chip * chips
  print(f"\n== train attention fwd+bwd on {topology} ({chips} x {kind}): {heads} heads x "
        f"{dim}, T={t_len}, batch {batch_per_chip}/chip, causal, bf16")
  sds = jax.ShapeDtypeStruct((batch, t_len, heads, dim), jnp.bfloat16,
                             sharding=NamedSharding(mesh, P("data")))
  scale = 1 / math.sqrt(dim)

  def xla(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                        implementation="xla")

  def splash(q, k, v):
    return splash_attention_sharded(q, k, v, mesh=mesh, batch_axes="data", head_axis=None,
                                    scale=scale)

  grad = lambda f: jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)),
                            argnums=(0, 1, 2))
  out = {}
  for name, f, extra in (("xla", xla, (0.0, 0.0)),
                         ("splash", splash, splash_kernel_cost(batch_per_chip, t_len, heads,
                                                               dim))):
    compiled = compile_or_none(grad(f), (sds, sds, sds), name)
    if compiled is not None:
      out[name] = report(name, compiled, kind, extra)
  return out


def xla_factor_decode(q_BxHxK, a_k, b_k, a_v, b_v, layer, pad_B, pos):
  """The XLA factor path for one token (the model's attend_factors with a contracted query)."""
  f32 = jnp.float32
  a_k, b_k, a_v, b_v = (x[layer] for x in (a_k, b_k, a_v, b_v))
  qb_BxSxHxR = jnp.einsum("bhk,bsrk->bshr", q_BxHxK.astype(b_k.dtype), b_k,
                          preferred_element_type=f32)
  logits_BxSxH = jnp.einsum("bshr,bshr->bsh", qb_BxSxHxR, a_k.astype(f32))
  s_S = jnp.arange(a_k.shape[1])
  keep_BxSx1 = (((s_S[None] >= pad_B[:, None]) & (s_S[None] <= pos)) | (s_S[None] == pos))
  logits_BxSxH = jnp.where(keep_BxSx1[..., None], logits_BxSxH, -jnp.inf)
  probs_BxSxH = jax.nn.softmax(logits_BxSxH, axis=1)
  y_BxHxK = 0.0
  for u in range(a_v.shape[-1]):
    w_BxSxH = (probs_BxSxH * a_v[..., u].astype(f32)).astype(b_v.dtype)
    y_BxHxK = y_BxHxK + jnp.einsum("bsh,bsk->bhk", w_BxSxH, b_v[:, :, u],
                                   preferred_element_type=f32)
  return y_BxHxK / a_v.shape[-1]


def bench_decode(topology, batch_per_chip, context, heads, dim, rank=2):
  mesh, kind = data_mesh(topology)
  chips = mesh.size
  batch = batch_per_chip * chips
  print(f"\n== decode attention, one layer, on {topology} ({chips} x {kind}): {heads} heads x "
        f"{dim}, R_k = R_v = {rank}, context {context}, batch {batch_per_chip}/chip, bf16 cache")
  layers = 1
  cache_spec = lambda *s: jax.ShapeDtypeStruct(
      s, jnp.bfloat16, sharding=NamedSharding(mesh, P(None, "data")))
  a = cache_spec(layers, batch, context, heads, rank)
  b = cache_spec(layers, batch, context, rank, dim)
  q = jax.ShapeDtypeStruct((batch, heads, dim), jnp.float32,
                           sharding=NamedSharding(mesh, P("data")))
  pad = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=NamedSharding(mesh, P("data")))
  pos = jax.ShapeDtypeStruct((), jnp.int32)

  def kernel(q, a_k, b_k, a_v, b_v, pad_B, pos):
    return tpa_decode_sharded(tpa_decode_attention_tpu, mesh, "data", None, q, a_k, b_k, a_v,
                              b_v, 0, pad_B, pos, kv_len=context)

  def xla(q, a_k, b_k, a_v, b_v, pad_B, pos):
    return xla_factor_decode(q, a_k, b_k, a_v, b_v, 0, pad_B, pos)

  # The kernel reads A as (…, H*R padded to 16, S) and B as (…, S, R*d_h): the TPU cache layout
  # (tpu_a_layout); each variant is given the layout it reads.
  flat_a = cache_spec(layers, batch, a_rows(heads, rank), context)
  flat_b = cache_spec(layers, batch, context, rank * dim)
  out = {}
  for name, f, args in (("xla", xla, (q, a, b, a, b, pad, pos)),
                        ("kernel", kernel, (q, flat_a, flat_b, flat_a, flat_b, pad, pos))):
    compiled = compile_or_none(f, args, name)
    if compiled is not None:
      out[name] = report(name, compiled, kind)
  cache_bytes = batch_per_chip * context * 2 * (heads * rank + rank * dim) * 2
  print(f"  cache bytes per chip and layer: {cache_bytes / 2**20:.1f} MiB "
        f"(the memory-bound floor: {cache_bytes / bandwidth(kind) * 1e3:.3f} ms)")
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--topologies", nargs="+", default=["v5p:2x2x1", "v5e:2x2"])
  p.add_argument("--batch_per_chip", type=int, default=1)
  p.add_argument("--seq_len", type=int, default=4096)
  p.add_argument("--heads", type=int, default=78)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--decode_context", type=int, default=32768)
  p.add_argument("--decode_batch_per_chip", type=int, default=8)
  p.add_argument("--skip_decode", action="store_true")
  args = p.parse_args(argv)
  print("Compile-time estimates from the TPU compiler (memory_analysis / cost_analysis and a "
        "roofline), not TPU timings.")
  for topo in args.topologies:
    bench_train(topo, args.batch_per_chip, args.seq_len, args.heads, args.head_dim)
    if not args.skip_decode:
      bench_decode(topo, args.decode_batch_per_chip, args.decode_context, args.heads,
                   args.head_dim)


if __name__ == "__main__":
  main()

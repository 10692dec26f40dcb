"""A TPA decode step's work between its factor projection and its attention, as one Pallas
(Triton) kernel: the new token's cache entries written in place and the kernel's query rows.

From the packed factor projection y (TPA: A_q, B_q, A_k, B_k, A_v, B_v side by side; TPA-KVonly:
the full query, then the same four), given as fp32 partial sums over K splits (the GEMV
kernel's output at batch 1) or as the product itself (one "split"), for each row b:

  y      = round(sum_s y_s)                       (the compute dtype, as the product returns it)
  B_q, B_k (and TPA-KVonly's query) rotated by RoPE, each op rounded as `layers.apply_rope`
  cache[layer, b, ..., pos] = A_k, B_k, A_v, B_v  (`FactorCacheLayout`, written in place)
  Q[h]   = sum_q A_q[h, q] B_q[q] * log2(e) / (R_q R_k sqrt(d_h))   (TPA-KVonly: q / R_k ...)
  rows   = Q in the cache dtype (and the rounding error as a second array with split_q), padded
           to the decode kernel's head rows and d_h columns (`tpa_decode_gpu.query_rows`)

XLA runs the same work as about nine small kernels (the split sum, two RoPE fusions, four
cache updates, the query contraction, its padding); each is a launch of ~1.2 us on an H200
for a few KB of data, about 10 us per layer at batch 1.

Grid (rows, 5 parts): per row one program builds the query rows and one writes each of A_k,
B_k, A_v, B_v. The parts share nothing, and one program doing them in turn is a chain of
dependent global loads (each a partial-sum gather) that took ~9 us at batch 1 on an H200.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from t6_jax.kernels.tpa_decode_gpu import LOG2E, TUNING, _pow2, query_shape

# Launch settings (bench/decode.py --step_tuning KEY=V sweeps them).
STEP_TUNING = {"num_warps": 4}


def _kernel(layer_ref, pos_ref, y_ref, cos_ref, sin_ref, ak_in, bk_in, av_in, bv_in,
            qhi_ref, qlo_ref, ak_ref, bk_ref, av_ref, bv_ref, *, splits, heads, head_dim,
            q_rank, k_rank, v_rank, rows, kp, scale, compute_dtype, slots):
  del ak_in, bk_in, av_in, bv_in  # aliased to ak_ref .. bv_ref
  b, role = pl.program_id(0), pl.program_id(1)
  layer, pos = layer_ref[0], pos_ref[0]
  in_cache = pos < slots  # a step past the cache's end writes nothing (XLA's update clamps)
  f32 = jnp.float32
  half = head_dim // 2
  rnd = lambda x: x.astype(compute_dtype).astype(f32)  # a value in the compute dtype

  def y_at(idx, ok):
    """round(sum_s y[s, b, idx]) where ok, 0 elsewhere."""
    total = None
    for s in range(splits):
      part = plgpu.load(y_ref.at[s, b, idx], mask=ok, other=0.0).astype(f32)
      total = part if total is None else total + part
    return rnd(total)

  f_F = jnp.arange(_pow2(half), dtype=jnp.int32)
  f_ok = f_F < half

  def rope_tables():
    return (rnd(plgpu.load(cos_ref.at[b, 0, f_F], mask=f_ok, other=0.0).astype(f32)),
            rnd(plgpu.load(sin_ref.at[b, 0, f_F], mask=f_ok, other=0.0).astype(f32)))

  def rotated(first, lead_idx, lead_ok):
    """RoPE of the d_h-long rows starting at first + lead_idx * d_h: (halves x1', x2')."""
    cos_F, sin_F = rope_tables()
    idx = first + lead_idx * head_dim + f_F[None, :]
    ok = lead_ok & f_ok[None, :]
    x1, x2 = y_at(idx, ok), y_at(idx + half, ok)
    return (rnd(rnd(x1 * cos_F[None, :]) + rnd(x2 * sin_F[None, :])),
            rnd(rnd(-x1 * sin_F[None, :]) + rnd(x2 * cos_F[None, :])))

  # Where each part sits in the packed projection.
  q_width = heads * q_rank + q_rank * head_dim if q_rank else heads * head_dim
  ak_off = q_width
  bk_off = ak_off + heads * k_rank
  av_off = bk_off + k_rank * head_dim
  bv_off = av_off + heads * v_rank

  @pl.when(role == 0)
  def _query():
    hp = _pow2(rows)
    h_H = jnp.arange(hp, dtype=jnp.int32)
    if q_rank:  # TPA: Q = A_q B_q, B_q rotated; all q ranks in one 2-D load each
      qp = _pow2(q_rank)
      q_Q = jnp.arange(qp, dtype=jnp.int32)
      a_HxQ = y_at(h_H[:, None] * q_rank + q_Q[None, :],
                   (h_H[:, None] < heads) & (q_Q[None, :] < q_rank))
      r1_QxF, r2_QxF = rotated(heads * q_rank, q_Q[:, None], q_Q[:, None] < q_rank)
      q1 = q2 = jnp.zeros((hp, f_F.shape[0]), f32)
      for q in range(q_rank):  # rank by rank, from registers (a 3-D product would spill)
        a_H = jnp.sum(jnp.where(q_Q[None, :] == q, a_HxQ, 0.0), axis=1)
        q1 += a_H[:, None] * jnp.sum(jnp.where(q_Q[:, None] == q, r1_QxF, 0.0), axis=0)[None]
        q2 += a_H[:, None] * jnp.sum(jnp.where(q_Q[:, None] == q, r2_QxF, 0.0), axis=0)[None]
    else:  # TPA-KVonly: the full query, rotated per head
      q1, q2 = rotated(0, h_H[:, None], h_H[:, None] < heads)
    for ref, lo in ((qhi_ref, False), (qlo_ref, True)):
      if ref is None:
        continue
      for cols, part in ((f_F, q1), (f_F + half, q2)):
        ok = (h_H[:, None] < rows) & f_ok[None, :]
        q = part * scale
        hi = q.astype(qhi_ref.dtype)
        val = (q - hi.astype(f32)).astype(ref.dtype) if lo else hi
        plgpu.store(ref.at[b, h_H[:, None], cols[None, :]], val, mask=ok)
      if kp > head_dim:  # padding columns: zeros
        k_K = jnp.arange(kp, dtype=jnp.int32)
        ok = (h_H[:, None] < rows) & (k_K[None, :] >= head_dim)
        plgpu.store(ref.at[b, h_H[:, None], k_K[None, :]], jnp.zeros((hp, kp), ref.dtype),
                    mask=ok)

  def write_a(ref, offset, rank):
    n = heads * rank
    i_N = jnp.arange(_pow2(n), dtype=jnp.int32)
    a_N = y_at(offset + i_N, i_N < n)
    plgpu.store(ref.at[layer, b, i_N, pos], a_N.astype(ref.dtype), mask=(i_N < n) & in_cache)

  def write_b(ref, offset, rank, rope: bool):
    r_R = jnp.arange(_pow2(rank), dtype=jnp.int32)[:, None]
    ok = (r_R < rank) & f_ok[None, :]
    cols = r_R * head_dim + f_F[None, :]
    if rope:
      x1, x2 = rotated(offset, r_R, r_R < rank)
    else:
      idx = offset + cols
      x1, x2 = y_at(idx, ok), y_at(idx + half, ok)
    plgpu.store(ref.at[layer, b, pos, cols], x1.astype(ref.dtype), mask=ok & in_cache)
    plgpu.store(ref.at[layer, b, pos, cols + half], x2.astype(ref.dtype), mask=ok & in_cache)

  pl.when(role == 1)(lambda: write_a(ak_ref, ak_off, k_rank))
  pl.when(role == 2)(lambda: write_b(bk_ref, bk_off, k_rank, rope=True))
  pl.when(role == 3)(lambda: write_a(av_ref, av_off, v_rank))
  pl.when(role == 4)(lambda: write_b(bv_ref, bv_off, v_rank, rope=False))


ROLES = 5  # programs per row: the query rows, then A_k, B_k, A_v, B_v


def tpa_step(y_SxBxN, cos_BxTxF, sin_BxTxF, a_k, b_k, a_v, b_v, layer, pos, *, heads: int,
             head_dim: int, q_rank: int, compute_dtype, split_q: bool | None = None,
             interpret: bool = False):
  """The new token's entries written into layer `layer`, slot `pos` of the stacked cache (in
  place) and the decode kernel's query rows.

  y_SxBxN: the packed factor projection of one token per row (N = the packed width), summed
    over its leading axis (K-split partial sums, or one slice holding the product).
  cos/sin: RoPE tables (B, 1, d_h/2). a_k, a_v: (layers, B, a_rows, S); b_k, b_v: (layers, B,
    S, R d_h) (`FactorCacheLayout` with one shard). q_rank 0: TPA-KVonly (a full query).
  Returns (q_hi, q_lo or None (split_q, default the decode kernel's TUNING), a_k, b_k, a_v,
  b_v), the query rows (B, rows, kp) shaped as `tpa_decode_gpu.query_shape` says.
  """
  split_q = TUNING["split_q"] if split_q is None else split_q
  rows, kp = query_shape(heads, head_dim)
  splits, batch, width = y_SxBxN.shape
  k_rank, v_rank = b_k.shape[3] // head_dim, b_v.shape[3] // head_dim
  expect = (heads * q_rank + q_rank * head_dim if q_rank else heads * head_dim) + (
      heads + head_dim) * (k_rank + v_rank)
  if width < expect or head_dim % 2:  # (zero columns may follow: `TPA.pack_projection`)
    raise ValueError(f"packed projection width {width} does not fit {heads} heads x "
                     f"{head_dim} with ranks ({q_rank}, {k_rank}, {v_rank}) (expected "
                     f"{expect}, an even d_h)")
  dtype = b_k.dtype
  scale = LOG2E / ((q_rank or 1) * k_rank * math.sqrt(head_dim))
  kernel = functools.partial(_kernel, splits=splits, heads=heads, head_dim=head_dim,
                             q_rank=q_rank, k_rank=k_rank, v_rank=v_rank, rows=rows, kp=kp,
                             scale=scale, compute_dtype=jnp.dtype(compute_dtype),
                             slots=a_k.shape[3])
  if not split_q:
    kernel = functools.partial(
        lambda k, lr, pr, y, c, s, a1, b1, a2, b2, qh, *outs: k(lr, pr, y, c, s, a1, b1, a2,
                                                               b2, qh, None, *outs), kernel)
  scalar = lambda x: jnp.asarray(x, jnp.int32).reshape(1)
  whole = lambda shape: pl.BlockSpec(shape, lambda i, j: (0,) * len(shape))
  caches = [a_k, b_k, a_v, b_v]
  operands = [scalar(layer), scalar(pos), y_SxBxN, cos_BxTxF, sin_BxTxF] + caches
  q_shape = jax.ShapeDtypeStruct((batch, rows, kp), dtype)
  out_shape = [q_shape] * (2 if split_q else 1) + [
      jax.ShapeDtypeStruct(c.shape, c.dtype) for c in caches]
  extra = {} if interpret else {"compiler_params": plgpu.CompilerParams(
      num_warps=STEP_TUNING["num_warps"], num_stages=1)}
  outs = pl.pallas_call(
      kernel,
      grid=(batch, ROLES),
      in_specs=[whole(x.shape) for x in operands],
      out_specs=[whole(s.shape) for s in out_shape],
      out_shape=out_shape,
      input_output_aliases={5 + i: len(out_shape) - 4 + i for i in range(4)},
      interpret=interpret,
      name="tpa_step",
      **extra,
  )(*operands)
  q_hi, q_lo = outs[0], (outs[1] if split_q else None)
  return (q_hi, q_lo, *outs[-4:])

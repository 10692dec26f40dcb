"""One-token TPA decode attention as a Pallas (Triton) kernel, straight from the factor cache.

For one query per row against the stacked cache (layers, B, S, ...) of `Transformer.extend`:

  Q[h]       = sum_q A_q[h, q] B_q[q] / (R_q R_k sqrt(d_h))      (tiny, built outside)
  logit[h,s] = sum_r A_k[s, h, r] <Q[h], B_k[s, r]>               = the FlashTPA logits
  out[h]     = sum_{s,u} alpha[h, s] A_v[s, h, u] B_v[s, u] / R_v

Contracting B_q into Q first is the same sum as the head-shared P = B_q B_k^T followed by
A_q: it costs h d_h R_k MACs per key instead of R_q R_k d_h + h R_q R_k, all on tensor cores,
and it serves TPA-KVonly (a full query) unchanged. Q goes in as a bf16 hi + lo pair so the
logits keep ~16 bits of the fp32 query.

Grid (batch, split): each program walks its share of key blocks (flash-decoding), keeping an
online (max, sum, acc) per head; a small XLA combine merges the splits. The kernel reads the
cache arrays in place, with the layer index as an operand: no per-layer slice is copied.
Triton wants power-of-two tensors, so heads and d_h are padded to powers of two by clamping
the gather indices or masking whole A_k / A_v rows (padded heads compute junk that is sliced
off), and only blocks that hold a valid slot of the row ([pad_B[b], pos]) are read.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

plgpu_load = plgpu.load

NEG = -1e30  # finite "minus infinity": an all-masked block leaves (m, l, acc) unchanged
# Launch settings, the fastest of a sweep on an H200 (T6-small, B=64, S=32k: 1.18 ms per layer
# vs 1.57 ms with block 32 and gathered A rows); "programs" sets the split count (about that
# many programs per call, a few per SM).
TUNING = {"block": 64, "num_warps": 4, "num_stages": 2, "programs": 512, "flat": True}


def _pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _dot(a, b, contract_a: int, contract_b: int):
  """2-D product with fp32 accumulation, contracting the given axes (tensor cores)."""
  return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _kernel(layer_ref, pos_ref, pad_ref, qhi_ref, qlo_ref, ak_ref, bk_ref, av_ref, bv_ref,
            m_ref, l_ref, acc_ref, *, heads, head_dim, k_rank, v_rank, block,
            blocks_per_split, num_slots, flat):
  b, split = pl.program_id(0), pl.program_id(1)
  layer, pos, pad = layer_ref[0], pos_ref[0], pad_ref[b]
  q_hi_HxK, q_lo_HxK = qhi_ref[...], qlo_ref[...]
  hp, kp = q_hi_HxK.shape
  h_H = jnp.minimum(jnp.arange(hp, dtype=jnp.int32), heads - 1)[None, :]
  k_K = jnp.minimum(jnp.arange(kp, dtype=jnp.int32), head_dim - 1)[None, :]
  first = split * blocks_per_split
  lo = jnp.maximum(first, pad // block)
  hi = jnp.minimum(first + blocks_per_split, pos // block + 1)

  def a_factor(ref, s_S, s_ld, rank):
    """A_k or A_v of the block as (S, H, R) fp32 (flat: one contiguous row per slot)."""
    if flat:  # ref is (layers, B, S * H * R): vectorised loads of whole rows, masked
      j_J = jnp.arange(hp * rank, dtype=jnp.int32)
      idx_SxJ = s_S[:, None] * (heads * rank) + j_J[None, :]
      ok_SxJ = (s_S < num_slots)[:, None] & (j_J < heads * rank)[None, :]
      a_SxJ = plgpu_load(ref.at[layer, b, idx_SxJ], mask=ok_SxJ, other=0.0)
      return a_SxJ.astype(jnp.float32).reshape(block, hp, rank)
    return [ref[layer, b, s_ld, h_H, r].astype(jnp.float32) for r in range(rank)]

  def body(t, carry):
    m_H, l_H, acc_HxK = carry
    s_S = t * block + jnp.arange(block, dtype=jnp.int32)
    s_ld = jnp.minimum(s_S, num_slots - 1)[:, None]
    a_k = a_factor(ak_ref, s_S, s_ld, k_rank)
    r_R = jnp.arange(k_rank, dtype=jnp.int32)[None, None, :]
    logits_SxH = jnp.zeros((block, hp), jnp.float32)
    g_SxHxR = jnp.zeros((block, hp, k_rank), jnp.float32)
    for r in range(k_rank):
      b_k_SxK = bk_ref[layer, b, s_ld, r, k_K]
      g_SxH = _dot(b_k_SxK, q_hi_HxK, 1, 1) + _dot(b_k_SxK, q_lo_HxK, 1, 1)
      if flat:
        g_SxHxR = g_SxHxR + jnp.where(r_R == r, g_SxH[:, :, None], 0.0)
      else:
        logits_SxH += a_k[r] * g_SxH
    if flat:
      logits_SxH = jnp.sum(a_k * g_SxHxR, axis=2)
    keep_Sx1 = (((s_S >= pad) & (s_S <= pos)) | (s_S == pos))[:, None]
    logits_SxH = jnp.where(keep_Sx1, logits_SxH, NEG)
    m_new_H = jnp.maximum(m_H, jnp.max(logits_SxH, axis=0))
    p_SxH = jnp.where(keep_Sx1, jnp.exp(logits_SxH - m_new_H[None, :]), 0.0)
    corr_H = jnp.exp(m_H - m_new_H)
    l_H = l_H * corr_H + jnp.sum(p_SxH, axis=0)
    acc_HxK = acc_HxK * corr_H[:, None]
    a_v = a_factor(av_ref, s_S, s_ld, v_rank)
    if flat:
      pa_SxHxU = p_SxH[:, :, None] * a_v
      u_U = jnp.arange(v_rank, dtype=jnp.int32)[None, None, :]
    for u in range(v_rank):
      b_v_SxK = bv_ref[layer, b, s_ld, u, k_K]
      if flat:
        w_SxH = jnp.sum(jnp.where(u_U == u, pa_SxHxU, 0.0), axis=2)
      else:
        w_SxH = p_SxH * a_v[u]
      acc_HxK += _dot(w_SxH.astype(b_v_SxK.dtype), b_v_SxK, 0, 0)
    return m_new_H, l_H, acc_HxK

  init = (jnp.full((hp,), NEG, jnp.float32), jnp.zeros((hp,), jnp.float32),
          jnp.zeros((hp, kp), jnp.float32))
  m_H, l_H, acc_HxK = jax.lax.fori_loop(lo, hi, body, init)
  m_ref[...] = m_H
  l_ref[...] = l_H
  acc_ref[...] = acc_HxK


def tpa_decode_attention(q_BxHxK, a_k, b_k, a_v, b_v, layer, pad_B, pos, *, kv_len: int,
                         block: int | None = None, splits: int | None = None,
                         num_warps: int | None = None, num_stages: int | None = None,
                         flat: bool | None = None, interpret: bool = False):
  """Attention of one query per row against layer `layer` of a stacked TPA factor cache.

  q_BxHxK: the query already contracted and scaled, Q[h] = sum_q A_q[h,q] B_q[q] /
    (R_q R_k sqrt(d_h)) (TPA-KVonly: q / (R_k sqrt(d_h))), any float dtype.
  a_k, a_v: (layers, B, S, H, R_k / R_v); b_k, b_v: (layers, B, S, R_k / R_v, d_h); 16-bit.
  layer: int32 scalar; pad_B: (B,) int32 leading padding slots; pos: int32 scalar, the
    query's own slot. Row b sees slots pad_B[b] .. pos (and always pos itself), below kv_len.
  block / splits / num_warps / num_stages / flat default to the module's TUNING; flat loads
  A_k / A_v as whole contiguous rows (only for power-of-two R_k and R_v).
  Returns fp32 (B, H, d_h): sum_{s,u} alpha[h,s] A_v[s,h,u] B_v[s,u] / R_v.
  """
  tune = dict(TUNING)
  block = tune["block"] if block is None else block
  num_warps = tune["num_warps"] if num_warps is None else num_warps
  num_stages = tune["num_stages"] if num_stages is None else num_stages
  flat = tune["flat"] if flat is None else flat
  num_layers, batch, num_slots, heads, k_rank = a_k.shape
  v_rank, head_dim = b_v.shape[3], b_v.shape[4]
  if b_k.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"the Pallas TPA decode kernel takes a bfloat16/float16 cache, got "
                     f"{b_k.dtype}; use decode.attention_kernel=xla for other cache dtypes")
  num_slots = min(num_slots, kv_len)
  hp, kp = max(16, _pow2(heads)), max(16, _pow2(head_dim))
  flat = flat and _pow2(k_rank) == k_rank and _pow2(v_rank) == v_rank
  block = max(16, min(_pow2(block), _pow2(num_slots)))
  n_blocks = -(-num_slots // block)
  if splits is None:
    splits = max(1, min(n_blocks, -(-tune["programs"] // batch)))
  blocks_per_split = -(-n_blocks // splits)
  splits = -(-n_blocks // blocks_per_split)

  q_BxHxK = jnp.pad(q_BxHxK.astype(jnp.float32),
                    ((0, 0), (0, hp - heads), (0, kp - head_dim)))
  q_hi = q_BxHxK.astype(b_k.dtype)
  q_lo = (q_BxHxK - q_hi.astype(jnp.float32)).astype(b_k.dtype)
  scalar = lambda x: jnp.asarray(x, jnp.int32).reshape(1)
  whole = lambda shape: pl.BlockSpec(shape, lambda b, j: (0,) * len(shape))
  per_row = pl.BlockSpec((None, hp, kp), lambda b, j: (b, 0, 0))
  kernel = functools.partial(
      _kernel, heads=heads, head_dim=head_dim, k_rank=k_rank, v_rank=v_rank, block=block,
      blocks_per_split=blocks_per_split, num_slots=num_slots, flat=flat)
  extra = {}
  if not interpret:
    extra["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  if flat:  # free reshapes (contiguous): one row of H * R numbers per slot
    a_k = a_k.reshape(num_layers, batch, -1)
    a_v = a_v.reshape(num_layers, batch, -1)
  m, l, acc = pl.pallas_call(
      kernel,
      grid=(batch, splits),
      in_specs=[whole((1,)), whole((1,)), whole((batch,)), per_row, per_row,
                whole(a_k.shape), whole(b_k.shape), whole(a_v.shape), whole(b_v.shape)],
      out_specs=[pl.BlockSpec((None, None, hp), lambda b, j: (b, j, 0)),
                 pl.BlockSpec((None, None, hp), lambda b, j: (b, j, 0)),
                 pl.BlockSpec((None, None, hp, kp), lambda b, j: (b, j, 0, 0))],
      out_shape=[jax.ShapeDtypeStruct((batch, splits, hp), jnp.float32),
                 jax.ShapeDtypeStruct((batch, splits, hp), jnp.float32),
                 jax.ShapeDtypeStruct((batch, splits, hp, kp), jnp.float32)],
      interpret=interpret,
      name="tpa_decode",
      **extra,
  )(scalar(layer), scalar(pos), pad_B.astype(jnp.int32), q_hi, q_lo, a_k, b_k, a_v, b_v)
  # Flash-decoding combine of the splits (splits without a valid slot carry m = NEG, l = 0).
  w_BxNxH = jnp.exp(m - jnp.max(m, axis=1, keepdims=True))
  l_BxH = jnp.sum(w_BxNxH * l, axis=1)
  y_BxHxK = jnp.einsum("bnh,bnhk->bhk", w_BxNxH, acc) / (l_BxH[..., None] * v_rank)
  return y_BxHxK[:, :heads, :head_dim]


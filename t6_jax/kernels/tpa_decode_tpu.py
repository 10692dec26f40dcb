"""One-token TPA decode attention as a Pallas TPU (Mosaic) kernel, straight from the factor cache.

The same math as the GPU kernel, for one query per row against layer `layer` of the stacked
cache (layers, B, S, ...):

  logit[h,s] = sum_r A_k[s,h,r] <Q[h], B_k[s,r]>        (Q already contracted and scaled)
  out[h]     = sum_{s,u} alpha[h,s] A_v[s,h,u] B_v[s,u] / R_v

Layout (why it looks like this): TPU vector registers are (8 sublanes, 128 lanes) and the MXU
multiplies 2-D tiles, so the kernel never reshapes a lane axis into (H, R) inside VMEM. Every
cache factor is read as rows of one slot each: A as (S, H*R), B as (S, R*d_h), lane-dense
(a free reshape of the (…, H, R) / (…, R, d_h) cache; a cache already stored flat as
(layers, B, S, H*R) / (layers, B, S, R*d_h) is taken as is, and is the layout a TPU cache
should use: a minor axis of R = 2 would be padded to 128 lanes in HBM). The per-(h, r) structure
goes into small constant matrices instead, so a key block costs three MXU products:

  G    = B_k (S, R_k d_h) @ Qx (R_k d_h, H R_k)      Qx[r d_h + k, h R_k + r'] = Q[h,k] [r = r']
  L    = (G * A_k) (S, H R_k) @ C (H R_k, H R_v)     C[h R_k + r, h' R_v + u] = [h = h']
       = logit[s, h] repeated R_v times per head (the softmax runs in that repeated space)
  acc += B_v^T (R_v d_h, S) @ (p * A_v) (S, H R_v)   acc[u d_h + k, h R_v + u'] (u = u' wanted)

and the wrapper takes the diagonal u = u' of acc (an XLA einsum on a (R_v d_h, H R_v) tile per
row). Products of fp32 values with 16-bit operands run as hi + lo bf16 pairs (about 16 bits of
the fp32 value kept, the same as the GPU kernel); the weights p * A_v go to the cache dtype.

Grid (batch, key blocks): the key-block axis is "arbitrary" and carries the online softmax
(m, l, acc) in VMEM scratch; each block of A_k, B_k, A_v, B_v is streamed from HBM by its
BlockSpec, the layer index, pos and pad coming in as scalar-prefetch operands. Blocks outside a
row's valid slots [pad_B[b], pos] repeat the nearest valid block index (so Pallas issues no new
copy) and skip their compute. Rows are masked per slot (padding, length, the partial last
block); masked rows of the partial block are zeroed before any product, so whatever lies past
the cache end never reaches the result.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

NEG = -1e30  # finite "minus infinity": a masked slot adds exp(NEG - m) = 0
DEFAULT_BLOCK = 512  # slots per key block: 512 x (H R + R d_h) x 2 B per factor, well in VMEM


def _dot(a, b, contract_a: int = 1, contract_b: int = 0):
  prec = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                             precision=prec, preferred_element_type=jnp.float32)


def _split_dot(x_f32, w, contract_x: int = 1, contract_w: int = 0):
  """fp32 x against a w of the MXU dtype: hi + lo parts of x in w's dtype."""
  if w.dtype == jnp.float32:
    return _dot(x_f32, w, contract_x, contract_w)
  hi = x_f32.astype(w.dtype)
  lo = (x_f32 - hi.astype(jnp.float32)).astype(w.dtype)
  return _dot(hi, w, contract_x, contract_w) + _dot(lo, w, contract_x, contract_w)


def _kernel(layer_ref, pos_ref, pad_ref, qhi_ref, qlo_ref, c_ref, ak_ref, bk_ref, av_ref,
            bv_ref, out_ref, m_ref, l_ref, acc_ref, *, block):
  b, j = pl.program_id(0), pl.program_id(1)
  pos, pad = pos_ref[0], pad_ref[b]

  @pl.when(j == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, NEG, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  # lax.div, not //: slot numbers are non-negative, and // lowers through sign(), which asks
  # the default device for its TPU generation (it fails in AOT compiles from a CPU host).
  @pl.when((j >= jax.lax.div(jnp.minimum(pad, pos), block)) & (j <= jax.lax.div(pos, block)))
  def _block():
    s_Sx1 = j * block + jax.lax.broadcasted_iota(jnp.int32, (block, 1), 0)
    keep_Sx1 = ((s_Sx1 >= pad) & (s_Sx1 <= pos)) | (s_Sx1 == pos)
    zero = lambda ref: jnp.where(keep_Sx1, ref[...], jnp.zeros((), ref.dtype))
    b_k = zero(bk_ref)
    g_SxHR = _dot(b_k, qhi_ref[...]) + _dot(b_k, qlo_ref[...])
    x_SxHR = g_SxHR * zero(ak_ref).astype(jnp.float32)
    logits_SxHU = jnp.where(keep_Sx1, _split_dot(x_SxHR, c_ref[...]), NEG)
    m_1xHU = m_ref[...]
    m_new_1xHU = jnp.maximum(m_1xHU, jnp.max(logits_SxHU, axis=0, keepdims=True))
    p_SxHU = jnp.where(keep_Sx1, jnp.exp(logits_SxHU - m_new_1xHU), 0.0)
    corr_1xHU = jnp.exp(m_1xHU - m_new_1xHU)
    l_ref[...] = l_ref[...] * corr_1xHU + jnp.sum(p_SxHU, axis=0, keepdims=True)
    m_ref[...] = m_new_1xHU
    b_v = zero(bv_ref)
    w_SxHU = (p_SxHU * zero(av_ref).astype(jnp.float32)).astype(b_v.dtype)
    acc_ref[...] = acc_ref[...] * corr_1xHU + _dot(b_v, w_SxHU, 0, 0)

  @pl.when(j == pl.num_programs(1) - 1)
  def _finish():
    out_ref[...] = acc_ref[...] / l_ref[...]


def _flat(x, layers: int, batch: int, slots: int):
  """(layers, B, S, X, Y) -> (layers, B, S, X*Y) (free, contiguous); 4-D passes through."""
  return x if x.ndim == 4 else x.reshape(layers, batch, slots, -1)


def tpa_decode_attention_tpu(q_BxHxK, a_k, b_k, a_v, b_v, layer, pad_B, pos, *, kv_len: int,
                             interpret: bool = False, block: int | None = None):
  """Attention of one query per row against layer `layer` of a stacked TPA factor cache.

  q_BxHxK: the query already contracted and scaled, Q[h] = sum_q A_q[h,q] B_q[q] /
    (R_q R_k sqrt(d_h)) (TPA-KVonly: q / (R_k sqrt(d_h))), any float dtype.
  a_k, a_v: (layers, B, S, H, R_k / R_v) or flat (layers, B, S, H*R); b_k, b_v:
    (layers, B, S, R_k / R_v, d_h) or flat (layers, B, S, R*d_h); bfloat16, float16 or float32.
  layer: int32 scalar; pad_B: (B,) int32 leading padding slots; pos: int32 scalar, the
    query's own slot (pos < kv_len). Row b sees slots pad_B[b] .. pos (and always pos itself).
  block: slots per key block (default min(512, S rounded up to 16); a multiple of 16).
  Returns fp32 (B, H, d_h): sum_{s,u} alpha[h,s] A_v[s,h,u] B_v[s,u] / R_v.
  """
  batch, heads, head_dim = q_BxHxK.shape
  layers, _, slots = a_k.shape[:3]
  dtype = b_k.dtype
  if dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
    raise ValueError(f"the TPU TPA decode kernel takes a bfloat16/float16/float32 cache, got "
                     f"{dtype}; use the XLA factor path for other cache dtypes")
  a_k, b_k, a_v, b_v = (_flat(x, layers, batch, slots) for x in (a_k, b_k, a_v, b_v))
  k_rank, v_rank = a_k.shape[3] // heads, a_v.shape[3] // heads
  if (a_k.shape[3] != heads * k_rank or b_k.shape[3] != k_rank * head_dim
      or a_v.shape[3] != heads * v_rank or b_v.shape[3] != v_rank * head_dim):
    raise ValueError(f"cache factors {a_k.shape} {b_k.shape} {a_v.shape} {b_v.shape} do not "
                     f"match a query of {heads} heads x {head_dim}; pass the cache of the "
                     f"same attention layer")
  num_slots = min(slots, kv_len)
  if block is None:
    block = min(DEFAULT_BLOCK, -(-num_slots // 16) * 16)
  if block % 16:
    raise ValueError(f"block={block} must be a multiple of 16 (bf16 sublane tiling)")
  n_blocks = -(-num_slots // block)
  hr_k, hr_v, rk_d, rv_d = heads * k_rank, heads * v_rank, k_rank * head_dim, v_rank * head_dim

  # Qx[b, r d_h + k, h R_k + r'] = Q[b, h, k] [r = r'] as a hi + lo pair of the cache dtype.
  q_BxHxK = q_BxHxK.astype(jnp.float32)
  qx = jnp.einsum("bhk,rs->brkhs", q_BxHxK, jnp.eye(k_rank, dtype=jnp.float32))
  qx = qx.reshape(batch, rk_d, hr_k)
  q_hi = qx.astype(dtype)
  q_lo = (qx - q_hi.astype(jnp.float32)).astype(dtype)
  # C[h R_k + r, h' R_v + u] = [h = h']: sums the R_k terms of a head, repeats it R_v times.
  c = jnp.kron(jnp.eye(heads, dtype=dtype), jnp.ones((k_rank, v_rank), dtype))

  def cache_block(b, j, layer_ref, pos_ref, pad_ref):
    # Clamp to the row's valid blocks: an out-of-range step re-uses a fetched block (no DMA).
    pos = pos_ref[0]
    jj = jnp.clip(j, jax.lax.div(jnp.minimum(pad_ref[b], pos), block), jax.lax.div(pos, block))
    return layer_ref[0], b, jj, 0

  per_row = lambda shape: pl.BlockSpec((None,) + shape, lambda b, j, *_: (b, 0, 0))
  cache = lambda width: pl.BlockSpec((None, None, block, width), cache_block)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3,
      grid=(batch, n_blocks),
      in_specs=[per_row((rk_d, hr_k)), per_row((rk_d, hr_k)),
                pl.BlockSpec((hr_k, hr_v), lambda b, j, *_: (0, 0)),
                cache(hr_k), cache(rk_d), cache(hr_v), cache(rv_d)],
      out_specs=per_row((rv_d, hr_v)),
      scratch_shapes=[pltpu.VMEM((1, hr_v), jnp.float32), pltpu.VMEM((1, hr_v), jnp.float32),
                      pltpu.VMEM((rv_d, hr_v), jnp.float32)],
  )
  scalar = lambda x: jnp.asarray(x, jnp.int32).reshape(1)
  acc_BxUKxHU = pl.pallas_call(
      functools.partial(_kernel, block=block),
      grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct((batch, rv_d, hr_v), jnp.float32),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      interpret=interpret,
      name="tpa_decode_tpu",
  )(scalar(layer), scalar(pos), pad_B.astype(jnp.int32), q_hi, q_lo, c, a_k, b_k, a_v, b_v)
  # out[h, k] = sum_u acc[u d_h + k, h R_v + u] / R_v (the u = u' diagonal).
  acc = acc_BxUKxHU.reshape(batch, v_rank, head_dim, heads, v_rank)
  return jnp.einsum("bukhu->bhk", acc) / v_rank

"""One-token TPA decode attention as a Pallas TPU (Mosaic) kernel, straight from the factor cache.

The same math as the GPU kernel, for one query per row against layer `layer` of the stacked
cache (layers, B, S, ...):

  logit[h,s] = sum_r A_k[s,h,r] <Q[h], B_k[s,r]>        (Q already contracted and scaled)
  out[h]     = sum_{s,u} alpha[h,s] A_v[s,h,u] B_v[s,u] / R_v

Layout (why it looks like this): TPU vector registers are (8 sublanes, 128 lanes), the MXU
multiplies 2-D tiles, and HBM arrays are tiled (8, 128) on their two minor dimensions, so the
kernel never reshapes a lane axis into (H, R) in VMEM and wants lane-dense minor dimensions in
HBM. A factors are read transposed, (layers, B, rows, S): slots on the 128 lanes, the H*R
numbers of a slot on sublanes, rows = H*R rounded up to 16 per tensor shard (`a_rows`,
`tpu_a_layout`; T6-XL: 156 -> 160). Read as (…, S, H*R) rows instead, the TPU compiler
relayouts the whole cache before the kernel on every call (AOT compiles: 3.6x the cache bytes
per call), and a (…, 156, S) array still gets another dimension second-minor (156 is not a
multiple of 8), again with a copy; with 160 rows the cache is read in place. B factors are
read as (…, S, R*d_h) rows (R*d_h = 128 for d_h 64, R 2: lane-dense). A TPU cache should be
stored in these layouts; the standard 5-D cache is accepted and converted here (a copy per
call: correct, not fast).
The per-(h, r) structure goes into small constant matrices, so a key block costs three MXU
products (all shapes 2-D, j the block's slots):

  G^T  = Qx (H R_k, R_k d_h) . B_k (j, R_k d_h)^T     Qx[h R_k + r', r d_h + k] = Q[h,k] [r = r']
  L^T  = C (H R_v, H R_k) @ (G^T * A_k^T)             C[h' R_v + u, h R_k + r] = [h = h']
       = logit[h, j] repeated R_v times per head (the softmax runs in that repeated space)
  acc += (p^T * A_v^T) (H R_v, j) @ B_v (j, R_v d_h)  acc[h R_v + u', u d_h + k] (u = u' wanted)

and the wrapper takes the diagonal u = u' of acc (an XLA einsum on a (H R_v, R_v d_h) tile per
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

import dataclasses
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


def _hi_lo(x_f32, dtype):
  """x as hi + lo in a 16-bit dtype (x itself for fp32)."""
  if dtype == jnp.float32:
    return (x_f32,)
  hi = x_f32.astype(dtype)
  return hi, (x_f32 - hi.astype(jnp.float32)).astype(dtype)


def _kernel(layer_ref, pos_ref, pad_ref, qhi_ref, qlo_ref, c_ref, ak_ref, bk_ref, av_ref,
            bv_ref, out_ref, m_ref, l_ref, acc_ref, *, block, hr_k, hr_v):
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
    keep = lambda s: ((s >= pad) & (s <= pos)) | (s == pos)
    keep_1xS = keep(j * block + jax.lax.broadcasted_iota(jnp.int32, (1, block), 1))
    keep_Sx1 = keep(j * block + jax.lax.broadcasted_iota(jnp.int32, (block, 1), 0))
    # Masked slots and padding rows are zeroed before any product: past the cache end a block
    # holds garbage, and the padding rows of A are never written.
    zero = lambda ref, k: jnp.where(k, ref[...], jnp.zeros((), ref.dtype))
    row_ok = lambda ref, rows: jax.lax.broadcasted_iota(jnp.int32, (ref.shape[0], 1), 0) < rows
    b_k_SxRK = zero(bk_ref, keep_Sx1)
    dtype = b_k_SxRK.dtype
    g_HRxS = _dot(qhi_ref[...], b_k_SxRK, 1, 1) + _dot(qlo_ref[...], b_k_SxRK, 1, 1)
    x_HRxS = g_HRxS * zero(ak_ref, keep_1xS & row_ok(ak_ref, hr_k)).astype(jnp.float32)
    c_HUxHR = c_ref[...]
    logits_HUxS = sum(_dot(c_HUxHR, part) for part in _hi_lo(x_HRxS, dtype))
    logits_HUxS = jnp.where(keep_1xS, logits_HUxS, NEG)
    m_HUx1 = m_ref[...]
    m_new_HUx1 = jnp.maximum(m_HUx1, jnp.max(logits_HUxS, axis=1, keepdims=True))
    p_HUxS = jnp.where(keep_1xS, jnp.exp(logits_HUxS - m_new_HUx1), 0.0)
    corr_HUx1 = jnp.exp(m_HUx1 - m_new_HUx1)
    l_ref[...] = l_ref[...] * corr_HUx1 + jnp.sum(p_HUxS, axis=1, keepdims=True)
    m_ref[...] = m_new_HUx1
    w_HUxS = (p_HUxS * zero(av_ref, keep_1xS & row_ok(av_ref, hr_v)).astype(jnp.float32)
              ).astype(dtype)
    acc_ref[...] = acc_ref[...] * corr_HUx1 + _dot(w_HUxS, zero(bv_ref, keep_Sx1))

  @pl.when(j == pl.num_programs(1) - 1)
  def _finish():
    out_ref[...] = acc_ref[...] / l_ref[...]


A_ROW_TILE = 16  # A's H*R rows are padded to this (bf16 sublane tile)


def a_rows(heads: int, rank: int) -> int:
  """Rows of one tensor shard's A factor in the TPU layout: H*R rounded up to 16.

  With H*R not a multiple of 8 the TPU compiler lays a (…, H*R, S) array out with another
  dimension second-minor (to avoid padding tiles), and every kernel call would start with a
  relayout copy of the cache; padded rows keep the default layout, which the kernel reads.
  """
  return -(-heads * rank // A_ROW_TILE) * A_ROW_TILE


def tpu_a_layout(a, shards: int = 1):
  """A factor (layers, B, S, H, R) -> the kernel's layout (layers, B, shards * rows, S) (a copy).

  shards: the tensor shards the heads will be split over; each shard's H/shards heads get
  their own a_rows(H/shards, R) rows (zero padding after them), so a split of the rows
  dimension into `shards` equal parts gives every shard its own heads.
  """
  layers, batch, slots, heads, rank = a.shape
  local = heads // shards
  a = a.reshape(layers, batch, slots, shards, local * rank)
  a = jnp.pad(a, [(0, 0)] * 4 + [(0, a_rows(local, rank) - local * rank)])
  return jnp.swapaxes(a.reshape(layers, batch, slots, -1), 2, 3)


def standard_a_layout(a_BxRowsxS, heads: int, rank: int, shards: int = 1):
  """The inverse of `tpu_a_layout` for one layer: (B, shards * rows, S) -> (B, S, H, R)."""
  batch, _, slots = a_BxRowsxS.shape
  local = heads // shards
  a = a_BxRowsxS.reshape(batch, shards, -1, slots)[:, :, :local * rank]
  return jnp.moveaxis(a.reshape(batch, heads, rank, slots), 3, 1)


def kernel_operands(a_k, b_k, a_v, b_v, heads: int, head_dim: int):
  """The cache factors as both decode kernels read them: A as (layers, B, a_rows(H, R), S)
  (converted from the standard (layers, B, S, H, R), a copy, or taken as stored), B as
  (layers, B, S, R * d_h) (a free reshape). Raises when they do not fit a query of `heads`
  heads of `head_dim`."""
  if a_k.ndim == 5:
    if a_k.shape[3] != heads or a_v.shape[3] != heads:
      raise ValueError(f"cache A factors {a_k.shape} {a_v.shape} do not match a query of "
                       f"{heads} heads x {head_dim}; pass the cache of the same attention layer")
    a_k, a_v = tpu_a_layout(a_k), tpu_a_layout(a_v)
  if b_k.ndim == 5:
    b_k, b_v = (x.reshape(*x.shape[:3], -1) for x in (b_k, b_v))
  slots = a_k.shape[3]
  k_rank, v_rank = b_k.shape[3] // head_dim, b_v.shape[3] // head_dim
  if (b_k.shape[3] != k_rank * head_dim or b_v.shape[3] != v_rank * head_dim
      or a_k.shape[2] != a_rows(heads, k_rank) or a_v.shape[2] != a_rows(heads, v_rank)
      or b_k.shape[2] != slots or b_v.shape[2] != slots or a_v.shape[3] != slots):
    raise ValueError(f"cache factors (A as layers, B, rows, S) {a_k.shape} {b_k.shape} "
                     f"{a_v.shape} {b_v.shape} do not match a query of {heads} heads x "
                     f"{head_dim}; pass the cache of the same attention layer (A through "
                     f"tpu_a_layout)")
  return a_k, b_k, a_v, b_v


@dataclasses.dataclass(frozen=True)
class FactorCacheLayout:
  """A TPA factor cache stored the way this kernel reads it in place (see the module doc):
  A_k / A_v as (layers, B, shards * a_rows(H / shards, R), S), B_k / B_v as (layers, B, S,
  R * d_h). k_rank / v_rank: R of A_k / A_v; shards: the tensor shards the kernel splits the heads over. The cache writes new
  entries straight into it (`to_cache`) and the XLA paths read a layer back in the standard
  (B, S, H, R) / (B, S, R, d_h) form (`from_cache`, a copy per call of those paths only)."""

  heads: int
  head_dim: int
  k_rank: int
  v_rank: int
  shards: int = 1

  def shape(self, name: str, standard: tuple[int, ...]) -> tuple[int, ...]:
    """The stored shape of entry `name` whose standard shape is (layers, B, S, X, Y)."""
    layers, batch, slots, x, y = standard
    if name.startswith("a_"):
      return (layers, batch, self.shards * a_rows(self.heads // self.shards, y), slots)
    return (layers, batch, slots, x * y)

  def slot_axis(self, name: str) -> int:
    """Axis of the stored entry (with the layers axis) that holds the cache slots."""
    return 3 if name.startswith("a_") else 2

  def to_cache(self, name: str, x):
    """One layer's new entries (B, T, H, R) / (B, T, R, d_h) in the stored form (B, rows, T) /
    (B, T, R*d_h)."""
    if name.startswith("a_"):
      return tpu_a_layout(x[None], self.shards)[0]
    return x.reshape(*x.shape[:2], -1)

  def from_cache(self, name: str, x):
    """One layer of the stored entry back in the standard form (B, S, H, R) / (B, S, R, d_h)."""
    if name.startswith("a_"):
      rank = self.k_rank if name == "a_k" else self.v_rank
      return standard_a_layout(x, self.heads, rank, self.shards)
    return x.reshape(*x.shape[:2], -1, self.head_dim)


def tpa_decode_attention_tpu(q_BxHxK, a_k, b_k, a_v, b_v, layer, pad_B, pos, *, kv_len: int,
                             interpret: bool = False, block: int | None = None):
  """Attention of one query per row against layer `layer` of a stacked TPA factor cache.

  q_BxHxK: the query already contracted and scaled, Q[h] = sum_q A_q[h,q] B_q[q] /
    (R_q R_k sqrt(d_h)) (TPA-KVonly: q / (R_k sqrt(d_h))), any float dtype.
  a_k, a_v: (layers, B, S, H, R_k / R_v) (converted here, a copy) or the TPU layout
    (layers, B, a_rows(H, R), S) of `tpu_a_layout` (read in place); b_k, b_v:
    (layers, B, S, R_k / R_v, d_h) or (layers, B, S, R*d_h) (both read in place).
    bfloat16, float16 or float32 (all four the same dtype).
  interpret: True (or a pltpu.InterpretParams) runs the kernel in the Pallas interpreter
    (CPU tests).
  layer: int32 scalar; pad_B: (B,) int32 leading padding slots; pos: int32 scalar, the
    query's own slot (pos < kv_len). Row b sees slots pad_B[b] .. pos (and always pos itself).
  block: slots per key block, a multiple of 128 (default min(512, S rounded up to 128)).
  Returns fp32 (B, H, d_h): sum_{s,u} alpha[h,s] A_v[s,h,u] B_v[s,u] / R_v.
  """
  batch, heads, head_dim = q_BxHxK.shape
  dtype = b_k.dtype
  if dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
    raise ValueError(f"the TPU TPA decode kernel takes a bfloat16/float16/float32 cache, got "
                     f"{dtype}; use the XLA factor path for other cache dtypes")
  a_k, b_k, a_v, b_v = kernel_operands(a_k, b_k, a_v, b_v, heads, head_dim)
  slots = a_k.shape[3]
  k_rank, v_rank = b_k.shape[3] // head_dim, b_v.shape[3] // head_dim
  num_slots = min(slots, kv_len)
  if block is None:
    block = min(DEFAULT_BLOCK, -(-num_slots // 128) * 128)
  if block % 128:
    raise ValueError(f"block={block} must be a multiple of 128 (slots lie on the lanes)")
  n_blocks = -(-num_slots // block)
  hr_k, hr_v, rk_d, rv_d = heads * k_rank, heads * v_rank, k_rank * head_dim, v_rank * head_dim
  rows_k, rows_v = a_k.shape[2], a_v.shape[2]

  # Qx[b, h R_k + r', r d_h + k] = Q[b, h, k] [r = r'] as a hi + lo pair of the cache dtype.
  q_BxHxK = q_BxHxK.astype(jnp.float32)
  qx = jnp.einsum("bhk,rs->bhsrk", q_BxHxK, jnp.eye(k_rank, dtype=jnp.float32))
  qx = jnp.pad(qx.reshape(batch, hr_k, rk_d), ((0, 0), (0, rows_k - hr_k), (0, 0)))
  q_hi = qx.astype(dtype)
  q_lo = (qx - q_hi.astype(jnp.float32)).astype(dtype)
  # C[h' R_v + u, h R_k + r] = [h = h']: sums the R_k terms of a head, repeats it R_v times.
  c = jnp.kron(jnp.eye(heads, dtype=dtype), jnp.ones((v_rank, k_rank), dtype))
  c = jnp.pad(c, ((0, rows_v - hr_v), (0, rows_k - hr_k)))

  def valid_block(b, j, pos_ref, pad_ref):
    # Clamp to the row's valid blocks: an out-of-range step re-uses a fetched block (no DMA).
    pos = pos_ref[0]
    return jnp.clip(j, jax.lax.div(jnp.minimum(pad_ref[b], pos), block), jax.lax.div(pos, block))

  def a_block(b, j, layer_ref, pos_ref, pad_ref):
    return layer_ref[0], b, 0, valid_block(b, j, pos_ref, pad_ref)

  def b_block(b, j, layer_ref, pos_ref, pad_ref):
    return layer_ref[0], b, valid_block(b, j, pos_ref, pad_ref), 0

  per_row = lambda shape: pl.BlockSpec((None,) + shape, lambda b, j, *_: (b, 0, 0))
  a_spec = lambda rows: pl.BlockSpec((None, None, rows, block), a_block)
  b_spec = lambda width: pl.BlockSpec((None, None, block, width), b_block)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3,
      grid=(batch, n_blocks),
      in_specs=[per_row((rows_k, rk_d)), per_row((rows_k, rk_d)),
                pl.BlockSpec((rows_v, rows_k), lambda b, j, *_: (0, 0)),
                a_spec(rows_k), b_spec(rk_d), a_spec(rows_v), b_spec(rv_d)],
      out_specs=per_row((rows_v, rv_d)),
      scratch_shapes=[pltpu.VMEM((rows_v, 1), jnp.float32),
                      pltpu.VMEM((rows_v, 1), jnp.float32),
                      pltpu.VMEM((rows_v, rv_d), jnp.float32)],
  )
  scalar = lambda x: jnp.asarray(x, jnp.int32).reshape(1)
  # What XLA's cost analysis should count for the custom call (every slot of every row read;
  # the hi + lo products counted twice).
  keys = batch * num_slots
  itemsize = jnp.dtype(dtype).itemsize
  cost = pl.CostEstimate(
      flops=int(keys * 2 * (2 * rk_d * rows_k + 2 * rows_k * rows_v + rv_d * rows_v)),
      transcendentals=int(keys * rows_v),
      bytes_accessed=int(keys * (rows_k + rk_d + rows_v + rv_d) * itemsize
                         + batch * (2 * rk_d * rows_k * itemsize + rv_d * rows_v * 4)))
  acc_BxHUxUK = pl.pallas_call(
      functools.partial(_kernel, block=block, hr_k=hr_k, hr_v=hr_v),
      grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct((batch, rows_v, rv_d), jnp.float32),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      interpret=interpret,
      cost_estimate=cost,
      name="tpa_decode_tpu",
  )(scalar(layer), scalar(pos), pad_B.astype(jnp.int32), q_hi, q_lo, c, a_k, b_k, a_v, b_v)
  # out[h, k] = sum_u acc[h R_v + u, u d_h + k] / R_v (the u = u' diagonal).
  acc = acc_BxHUxUK[:, :hr_v].reshape(batch, heads, v_rank, v_rank, head_dim)
  return jnp.einsum("bhuuk->bhk", acc) / v_rank

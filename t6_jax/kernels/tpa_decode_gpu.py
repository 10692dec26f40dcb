"""One-token TPA decode attention as a Pallas (Triton) kernel, straight from the factor cache.

For one query per row against the stacked cache of `Transformer.extend`:

  Q[h]       = sum_q A_q[h, q] B_q[q] / (R_q R_k sqrt(d_h))      (tiny, built outside)
  logit[h,s] = sum_r A_k[s, h, r] <Q[h], B_k[s, r]>               = the FlashTPA logits
  out[h]     = sum_{s,u} alpha[h, s] A_v[s, h, u] B_v[s, u] / R_v

Contracting B_q into Q first is the same sum as the head-shared P = B_q B_k^T followed by
A_q: it costs h d_h R_k MACs per key instead of R_q R_k d_h + h R_q R_k, all on tensor cores,
and it serves TPA-KVonly (a full query) unchanged.

Cache layout (`FactorCacheLayout`, shared with the TPU kernel): A_k / A_v as (layers, B, rows,
S) with row h R + r holding A[., h, r] for every slot, B_k / B_v as (layers, B, S, R d_h). So
every operand of a key block is a plain 2-D tile: A of rank r as (heads, block) (one contiguous
run of slots per head row, 16-byte loads), B of rank r as (block, d_h). Heads are the M rows
of both products, as queries are in flash attention:

  G_r^T   = Q (H, d_h) . B_k,r (block, d_h)^T          logits = sum_r A_k,r * G_r^T
  acc    += (p * A_v,u) (H, block) @ B_v,u (block, d_h)   for each value rank u

Triton wants power-of-two tiles: the heads go in chunks of 64 rows, then one of the next power
of two for the rest (T6-small's 34 heads: 64 rows; T6-XL's 78: 64 + 16, not 128; rows past the
last head repeat it and are sliced off), and the B tiles of a block are loaded once for all
chunks. With 64 rows and 4 warps each warp owns whole head rows (the softmax reductions stay in
a warp) and the products run as Hopper warpgroup MMAs. Q enters in base 2 (the softmax runs on
exp2) and in bf16, the precision of the XLA factor path (which rounds B_q to the cache dtype);
split_q=True passes a bf16 hi + lo pair instead (about 16 bits of the fp32 query: on sharp
attention ~15x less error, at 9% (T6-small) to 45% (T6-XL) more time on an H200).

Grid (batch, split): each program walks its share of key blocks (flash-decoding), keeping an
online (max, sum, acc) per head; a second small kernel (`combine`) merges the splits. The
split count fills the GPU: about `per_sm` programs per SM over the whole grid. The kernel reads
the cache arrays in place, with the layer index as an operand (no per-layer slice is copied),
and only the blocks that hold a valid slot of the row ([pad_B[b], pos]). Only a block that
runs past the cache end masks its loads; the others load unmasked, fully vectorised tiles.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from t6_jax.kernels.tpa_decode_tpu import kernel_operands

NEG = -1e30  # finite "minus infinity": a masked slot adds exp2(NEG - m) = 0
LOG2E = math.log2(math.e)
# Launch settings, the fastest of a sweep on an H200 (bench/decode_kernel.py --sweep, at every
# shape swept: T6-small B=4..64 S=8k..32k, T6-XL B=16 S=2k and B=1 S=262k; the cache read at
# 3.55 TB/s for T6-small B=16 S=32k, 4.08 at B=64, 3.19 for T6-XL B=1 S=262k): slots per key
# block, warps, pipeline stages, programs per SM (sets the split count), the head chunk rows,
# and whether Q goes in as a bf16 hi + lo pair. One program per SM with three stages in flight
# beat two programs with two stages by 5-13%. max_splits (0: none) caps the split count, so
# that a whole-step run can try fewer, longer programs (bench/decode.py --decode_tuning).
TUNING = {"block": 64, "num_warps": 4, "num_stages": 3, "per_sm": 1, "head_tile": 64,
          "split_q": False, "max_splits": 0}
COMBINE_KERNEL_SPLITS = 32  # up to this many splits `combine` merges them, else XLA
DEFAULT_SMS = 132  # an H200's SMs, when no GPU is attached (interpret mode, AOT)


def _pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def head_chunks(heads: int, head_tile: int | None) -> tuple[tuple[int, int], ...]:
  """(first head, rows) of each head chunk: chunks of head_tile rows, then one of the next
  power of two (at least 16) for the heads left (T6-small's 34 -> 64, T6-XL's 78 -> 64 + 16);
  head_tile None: one chunk of the next power of two."""
  if head_tile is None:
    return ((0, max(16, _pow2(heads))),)
  if head_tile < 16 or _pow2(head_tile) != head_tile:
    raise ValueError(f"head_tile={head_tile} must be a power of two >= 16")
  chunks = [(first, head_tile) for first in range(0, heads - head_tile + 1, head_tile)]
  left = heads - head_tile * len(chunks)
  if left:
    chunks.append((head_tile * len(chunks), max(16, _pow2(left))))
  return tuple(chunks)


@functools.lru_cache(maxsize=None)
def num_sms() -> int:
  """Streaming multiprocessors of the local GPU (DEFAULT_SMS without one)."""
  try:
    device = jax.local_devices(backend="gpu")[0]
  except RuntimeError:
    return DEFAULT_SMS
  return int(getattr(device, "core_count", 0) or DEFAULT_SMS)


def _dot(a, b, contract_a: int, contract_b: int):
  """2-D product with fp32 accumulation, contracting the given axes (tensor cores)."""
  return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _kernel(layer_ref, pos_ref, pad_ref, qhi_ref, qlo_ref, ak_ref, bk_ref, av_ref, bv_ref,
            m_ref, l_ref, acc_ref, *, heads, head_dim, kp, k_rank, v_rank, chunks, block,
            blocks_per_split, tail, slots):
  b, split = pl.program_id(0), pl.program_id(1)
  layer, pos, pad = layer_ref[0], pos_ref[0], pad_ref[b]
  k_1xK = jnp.arange(kp, dtype=jnp.int32)[None, :]
  if kp != head_dim:  # padded d_h columns repeat the last one (sliced off)
    k_1xK = jnp.minimum(k_1xK, head_dim - 1)
  # Row of head h in an A factor of rank R: h R + r (clamped: padding heads repeat the last).
  heads_Hx1 = [jnp.minimum(h0 + jnp.arange(rows, dtype=jnp.int32), heads - 1)[:, None]
               for h0, rows in chunks]
  queries = [(qhi_ref[b, pl.ds(h0, rows), :],
              None if qlo_ref is None else qlo_ref[b, pl.ds(h0, rows), :])
             for h0, rows in chunks]
  div = jax.lax.div  # slots are non-negative: no floor-division fix-ups
  first = split * blocks_per_split
  pos_block = div(pos, block)
  lo = jnp.maximum(first, div(jnp.minimum(pad, pos), block))
  hi = jnp.minimum(first + blocks_per_split, pos_block + 1)

  def body(t, carry, masked: bool):
    s0 = t * block
    s_Sx1 = s0 + jnp.arange(block, dtype=jnp.int32)[:, None]
    s_1xS = s0 + jnp.arange(block, dtype=jnp.int32)[None, :]

    def load(ref, idx, ok):
      if not masked:
        return ref[idx]
      return plgpu.load(ref.at[idx], mask=ok, other=0.0)

    ok_SxK = jnp.broadcast_to(s_Sx1 < slots, (block, kp)) if masked else None
    b_k = [load(bk_ref, (layer, b, s_Sx1, r * head_dim + k_1xK), ok_SxK) for r in range(k_rank)]
    b_v = [load(bv_ref, (layer, b, s_Sx1, u * head_dim + k_1xK), ok_SxK) for u in range(v_rank)]
    keep_1xS = ((s_1xS >= pad) & (s_1xS <= pos)) | (s_1xS == pos)
    out = []
    for (m_H, l_H, acc_HxK), (q_hi, q_lo), h_Hx1 in zip(carry, queries, heads_Hx1):
      ok_HxS = jnp.broadcast_to(s_1xS < slots, (h_Hx1.shape[0], block)) if masked else None
      logits_HxS = None
      for r in range(k_rank):
        g_HxS = _dot(q_hi, b_k[r], 1, 1)
        if q_lo is not None:
          g_HxS += _dot(q_lo, b_k[r], 1, 1)
        a_HxS = load(ak_ref, (layer, b, h_Hx1 * k_rank + r, s_1xS), ok_HxS).astype(jnp.float32)
        logits_HxS = a_HxS * g_HxS if logits_HxS is None else logits_HxS + a_HxS * g_HxS
      # Every block walked holds a valid slot, so m_new is a real logit and masked slots
      # get exp2(NEG - m_new) = 0.
      logits_HxS = jnp.where(keep_1xS, logits_HxS, NEG)
      m_new_H = jnp.maximum(m_H, jnp.max(logits_HxS, axis=1))
      p_HxS = jnp.exp2(logits_HxS - m_new_H[:, None])
      corr_H = jnp.exp2(m_H - m_new_H)
      l_H = l_H * corr_H + jnp.sum(p_HxS, axis=1)
      acc_HxK = acc_HxK * corr_H[:, None]
      for u in range(v_rank):
        a_HxS = load(av_ref, (layer, b, h_Hx1 * v_rank + u, s_1xS), ok_HxS)
        w_HxS = (p_HxS * a_HxS.astype(jnp.float32)).astype(a_HxS.dtype)
        acc_HxK += _dot(w_HxS, b_v[u], 1, 0)
      out.append((m_new_H, l_H, acc_HxK))
    return tuple(out)

  carry = tuple((jnp.full((rows,), NEG, jnp.float32), jnp.zeros((rows,), jnp.float32),
                 jnp.zeros((rows, kp), jnp.float32)) for _, rows in chunks)
  # Blocks before the query's own are whole (only the cache's last block can run past its
  # end, and no block after the query's is walked): a loop of unmasked, vectorised loads
  # whose slots all precede the query. Then the query's own block, if this program walks it
  # (masked when it is a short last block). Measured 4-8% faster on an H200 than splitting
  # the walk at the cache's last block.
  carry = jax.lax.fori_loop(lo, jnp.minimum(hi, pos_block),
                            functools.partial(body, masked=False), carry)
  carry = jax.lax.fori_loop(jnp.maximum(lo, pos_block), hi,
                            functools.partial(body, masked=tail), carry)
  for (h0, rows), (m_H, l_H, acc_HxK) in zip(chunks, carry):
    m_ref[b, split, pl.ds(h0, rows)] = m_H
    l_ref[b, split, pl.ds(h0, rows)] = l_H
    acc_ref[b, split, pl.ds(h0, rows), :] = acc_HxK


def _splits(batch: int, n_blocks: int, per_sm: int, max_splits: int = 0) -> tuple[int, int]:
  """(splits, blocks per split): about per_sm programs per SM over the whole grid, rounded
  down so the grid fits one wave of that many programs, and at most max_splits (if > 0)."""
  splits = max(1, min(n_blocks, per_sm * num_sms() // batch))
  if max_splits > 0:
    splits = min(splits, max_splits)
  blocks_per_split = -(-n_blocks // splits)
  return -(-n_blocks // blocks_per_split), blocks_per_split


def query_shape(heads: int, head_dim: int, head_tile: int | None | str = "default"):
  """(rows, kp): the padded shape of one batch row of the kernel's query (the head chunks'
  rows, d_h rounded up to a power of two >= 16)."""
  head_tile = TUNING["head_tile"] if head_tile == "default" else head_tile
  return sum(r for _, r in head_chunks(heads, head_tile)), max(16, _pow2(head_dim))


def query_rows(q_BxHxK, rows: int, kp: int, dtype, split_q: bool):
  """The contracted, scaled query as the kernel takes it: in base 2 (its softmax runs on
  exp2), padded to (rows, kp) with zeros, in the cache dtype (and with split_q the rounding
  error as a second array)."""
  _, heads, head_dim = q_BxHxK.shape
  q_BxHxK = jnp.pad(q_BxHxK.astype(jnp.float32) * LOG2E,
                    ((0, 0), (0, rows - heads), (0, kp - head_dim)))
  q_hi = q_BxHxK.astype(dtype)
  q_lo = (q_BxHxK - q_hi.astype(jnp.float32)).astype(dtype) if split_q else None
  return q_hi, q_lo


def tpa_decode_attention(q_BxHxK, a_k, b_k, a_v, b_v, layer, pad_B, pos, *, kv_len: int,
                         block: int | None = None, splits: int | None = None,
                         num_warps: int | None = None, num_stages: int | None = None,
                         per_sm: int | None = None, head_tile: int | None | str = "default",
                         split_q: bool | None = None, interpret: bool = False):
  """Attention of one query per row against layer `layer` of a stacked TPA factor cache.

  q_BxHxK: the query already contracted and scaled, Q[h] = sum_q A_q[h,q] B_q[q] /
    (R_q R_k sqrt(d_h)) (TPA-KVonly: q / (R_k sqrt(d_h))), any float dtype.
  a_k, a_v: the cache layout (layers, B, a_rows(H, R), S) of `FactorCacheLayout` (read in
    place), or the standard (layers, B, S, H, R_k / R_v) (converted here: a copy per call);
    b_k, b_v: (layers, B, S, R*d_h) or (layers, B, S, R, d_h) (both read in place). 16-bit.
  layer: int32 scalar; pad_B: (B,) int32 leading padding slots; pos: int32 scalar, the
    query's own slot. Row b sees slots pad_B[b] .. pos (and always pos itself), below kv_len.
  block / num_warps / num_stages / per_sm / head_tile / split_q default to the module's
  TUNING; splits (default: from per_sm and the GPU's SMs) overrides the number of splits.
  Returns fp32 (B, H, d_h): sum_{s,u} alpha[h,s] A_v[s,h,u] B_v[s,u] / R_v.
  """
  split_q = TUNING["split_q"] if split_q is None else split_q
  _, heads, head_dim = q_BxHxK.shape
  rows, kp = query_shape(heads, head_dim, head_tile)
  q_hi, q_lo = query_rows(q_BxHxK, rows, kp, b_k.dtype, split_q)
  return tpa_decode_rows(q_hi, q_lo, a_k, b_k, a_v, b_v, layer, pad_B, pos, heads=heads,
                         head_dim=head_dim, kv_len=kv_len, block=block, splits=splits,
                         num_warps=num_warps, num_stages=num_stages, per_sm=per_sm,
                         head_tile=head_tile, interpret=interpret)


def tpa_decode_rows(q_hi, q_lo, a_k, b_k, a_v, b_v, layer, pad_B, pos, *, heads: int,
                    head_dim: int, kv_len: int, block: int | None = None,
                    splits: int | None = None, num_warps: int | None = None,
                    num_stages: int | None = None, per_sm: int | None = None,
                    head_tile: int | None | str = "default", out_dtype=jnp.float32,
                    merge: bool = True, interpret: bool = False):
  """`tpa_decode_attention` from the query as `query_rows` gives it (q_lo None: no low half),
  e.g. as `tpa_step_gpu.tpa_step` writes it. Returns (B, H, d_h) in out_dtype; merge=False
  returns the splits unmerged, (m, l (B, splits, rows), acc (B, splits, rows, kp)), for a
  consumer that merges them itself (`merge_splits`, the GEMV kernel's "combine" prologue)."""
  tune = dict(TUNING)
  block = tune["block"] if block is None else block
  num_warps = tune["num_warps"] if num_warps is None else num_warps
  num_stages = tune["num_stages"] if num_stages is None else num_stages
  per_sm = tune["per_sm"] if per_sm is None else per_sm
  head_tile = tune["head_tile"] if head_tile == "default" else head_tile
  split_q = q_lo is not None
  batch = q_hi.shape[0]
  if b_k.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"the Pallas TPA decode kernel takes a bfloat16/float16 cache, got "
                     f"{b_k.dtype}; use decode.attention_kernel=xla for other cache dtypes")
  a_k, b_k, a_v, b_v = kernel_operands(a_k, b_k, a_v, b_v, heads, head_dim)
  slots = a_k.shape[3]
  k_rank, v_rank = b_k.shape[3] // head_dim, b_v.shape[3] // head_dim
  num_slots = min(slots, kv_len)
  chunks = head_chunks(heads, head_tile)
  rows, kp = query_shape(heads, head_dim, head_tile)
  if q_hi.shape != (batch, rows, kp):
    raise ValueError(f"query rows {q_hi.shape}, expected {(batch, rows, kp)} (query_shape)")
  block = max(16, min(_pow2(block), _pow2(num_slots)))
  n_blocks = -(-num_slots // block)
  if splits is None:
    splits, blocks_per_split = _splits(batch, n_blocks, per_sm, tune["max_splits"])
  else:
    blocks_per_split = -(-n_blocks // max(1, min(splits, n_blocks)))
    splits = -(-n_blocks // blocks_per_split)
  full_blocks = slots // block

  scalar = lambda x: jnp.asarray(x, jnp.int32).reshape(1)
  whole = lambda shape: pl.BlockSpec(shape, lambda b, j: (0,) * len(shape))
  kernel = functools.partial(
      _kernel, heads=heads, head_dim=head_dim, kp=kp, k_rank=k_rank, v_rank=v_rank,
      chunks=chunks, block=block, blocks_per_split=blocks_per_split,
      tail=full_blocks < n_blocks, slots=slots)
  if not split_q:
    kernel = functools.partial(lambda k, lr, pr, dr, qh, *refs: k(lr, pr, dr, qh, None, *refs),
                               kernel)
  extra = {}
  if not interpret:
    extra["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  operands = [scalar(layer), scalar(pos), pad_B.astype(jnp.int32), q_hi] + (
      [q_lo] if split_q else []) + [a_k, b_k, a_v, b_v]
  m, l, acc = pl.pallas_call(
      kernel,
      grid=(batch, splits),
      in_specs=[whole(x.shape) for x in operands],
      out_specs=[whole((batch, splits, rows)), whole((batch, splits, rows)),
                 whole((batch, splits, rows, kp))],
      out_shape=[jax.ShapeDtypeStruct((batch, splits, rows), jnp.float32),
                 jax.ShapeDtypeStruct((batch, splits, rows), jnp.float32),
                 jax.ShapeDtypeStruct((batch, splits, rows, kp), jnp.float32)],
      interpret=interpret,
      name="tpa_decode",
      **extra,
  )(*operands)
  if not merge:
    return m, l, acc
  return merge_splits(m, l, acc, heads=heads, head_dim=head_dim, v_rank=v_rank,
                      out_dtype=out_dtype, interpret=interpret)


def merge_splits(m, l, acc, *, heads: int, head_dim: int, v_rank: int, out_dtype=jnp.float32,
                 interpret: bool = False):
  """(B, H, d_h) in out_dtype from the kernel's unmerged splits: the `combine` kernel up to
  COMBINE_KERNEL_SPLITS splits, XLA's reductions past that."""
  if acc.shape[1] <= COMBINE_KERNEL_SPLITS:
    return combine(m, l, acc, heads=heads, head_dim=head_dim, v_rank=v_rank,
                   out_dtype=out_dtype, interpret=interpret)
  # Many splits (long context at a small batch): XLA's parallel reductions are faster than
  # the combine kernel's walk over them (T6-XL at 262k: 7.55 vs 6.87 ms a step on an H200).
  w_BxNxH = jnp.exp2(m - jnp.max(m, axis=1, keepdims=True))
  l_BxH = jnp.sum(w_BxNxH * l, axis=1)
  y_BxHxK = jnp.einsum("bnh,bnhk->bhk", w_BxNxH, acc) / (l_BxH[..., None] * v_rank)
  return y_BxHxK[:, :heads, :head_dim].astype(out_dtype)


def _combine_kernel(m_ref, l_ref, acc_ref, y_ref, *, splits, heads, head_dim, v_rank,
                    head_rows, chunk, kp):
  b, j = pl.program_id(0), pl.program_id(1)
  h_H = j * head_rows + jnp.arange(head_rows, dtype=jnp.int32)
  k_K = jnp.arange(kp, dtype=jnp.int32)

  def body(c, carry):  # `chunk` splits at a time, rescaled online as in the kernel's walk
    m_H, l_H, acc_HxK = carry
    s_Sx1 = c * chunk + jnp.arange(chunk, dtype=jnp.int32)[:, None]
    ok_SxH = (s_Sx1 < splits) & (h_H[None, :] < heads)
    m_SxH = plgpu.load(m_ref.at[b, s_Sx1, h_H[None, :]], mask=ok_SxH, other=NEG)
    l_SxH = plgpu.load(l_ref.at[b, s_Sx1, h_H[None, :]], mask=ok_SxH, other=0.0)
    ok_SxHxK = ok_SxH[:, :, None] & (k_K < head_dim)[None, None, :]
    acc_SxHxK = plgpu.load(acc_ref.at[b, s_Sx1[:, :, None], h_H[None, :, None],
                                      k_K[None, None, :]], mask=ok_SxHxK, other=0.0)
    m_new_H = jnp.maximum(m_H, jnp.max(m_SxH, axis=0))
    corr_H = jnp.exp2(m_H - m_new_H)
    w_SxH = jnp.exp2(m_SxH - m_new_H[None, :])
    l_H = l_H * corr_H + jnp.sum(w_SxH * l_SxH, axis=0)
    acc_HxK = acc_HxK * corr_H[:, None] + jnp.sum(w_SxH[:, :, None] * acc_SxHxK, axis=0)
    return m_new_H, l_H, acc_HxK

  carry = (jnp.full((head_rows,), NEG, jnp.float32), jnp.zeros((head_rows,), jnp.float32),
           jnp.zeros((head_rows, kp), jnp.float32))
  _, l_H, acc_HxK = jax.lax.fori_loop(0, pl.cdiv(splits, chunk), body, carry)
  y_HxK = acc_HxK / (jnp.maximum(l_H, 1e-30)[:, None] * v_rank)
  ok_HxK = (h_H[:, None] < heads) & (k_K[None, :] < head_dim)
  plgpu.store(y_ref.at[b, h_H[:, None], k_K[None, :]], y_HxK.astype(y_ref.dtype), mask=ok_HxK)


def combine(m, l, acc, *, heads: int, head_dim: int, v_rank: int, out_dtype=jnp.float32,
            head_rows: int = 16, chunk: int = 8, interpret: bool = False):
  """The flash-decoding combine of the kernel's splits as one small kernel (XLA runs it as
  three reductions and a slice): (B, H, d_h) in out_dtype from m, l (B, splits, rows) and acc
  (B, splits, rows, kp). Splits without a valid slot carry m = NEG, l = 0."""
  batch, splits, rows, kp = acc.shape
  kernel = functools.partial(_combine_kernel, splits=splits, heads=heads, head_dim=head_dim,
                             v_rank=v_rank, head_rows=head_rows, chunk=chunk, kp=kp)
  whole = lambda shape: pl.BlockSpec(shape, lambda b, j: (0,) * len(shape))
  extra = {} if interpret else {"compiler_params": plgpu.CompilerParams(num_warps=4,
                                                                        num_stages=2)}
  return pl.pallas_call(
      kernel,
      grid=(batch, pl.cdiv(heads, head_rows)),
      in_specs=[whole(m.shape), whole(l.shape), whole(acc.shape)],
      out_specs=whole((batch, heads, head_dim)),
      out_shape=jax.ShapeDtypeStruct((batch, heads, head_dim), out_dtype),
      interpret=interpret,
      name="tpa_decode_combine",
      **extra,
  )(m, l, acc)

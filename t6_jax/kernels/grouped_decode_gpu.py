"""One-token decode attention for MHA / MQA / GQA and MLA as a Pallas (Triton) kernel.

One query per row against layer `layer` of the stacked decode cache (layers, B, S, G, D) of
`Transformer.extend`, G key/value heads each serving J query heads:

  logit[g,j,s] = scale * sum_i <q_i[g,j], key_i[s,g]>      (key parts i: GQA k; MLA latent
                                                             and rope key)
  out[g,j]     = sum_s alpha[g,j,s] value[s,g]              (GQA v; MLA the latent again)

Grid (batch, kv head x split): each program holds the J queries of one KV head (padded to 16
rows for the tensor cores) and walks its share of the key blocks (flash-decoding), keeping an
online (max, sum, acc) per query head; a small XLA combine merges the splits. Every cache byte
of the layer is read once per step, in place (the layer index is an operand: no per-layer
slice is copied, no K/V is repeated to the query heads, logits never leave the chip). MLA
reads its latent block once for both the logits and the values. Only blocks holding a valid
slot of the row ([pad_B[b], pos]) are read.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# The TPA decode kernel's finite minus infinity, base-2 softmax constant and helpers.
from t6_jax.kernels.tpa_decode_gpu import LOG2E, NEG, _dot, _pow2

# Launch settings; "programs" sets the split count (about that many programs per call).
TUNING = {"block": 64, "num_warps": 4, "num_stages": 2, "programs": 512,
          "wide_block": 32, "wide_warps": 8}
# A program whose (J, V) accumulator holds at least this many fp32 numbers (MLA-XL: 64 padded
# heads x a 512-wide latent) takes wide_block / wide_warps instead, against register spills:
# MLA-XL, batch 1, 262k context on an H200: 27.8 ms per step at 4 warps and 64-slot blocks,
# 36.0 at 4 warps and 32-slot blocks, 16.6 at 8 warps and 32-slot blocks.
WIDE_ACCUMULATOR = 32768


def _kernel(layer_ref, pos_ref, pad_ref, *refs, n_keys, value_key, key_dims, value_dim,
            scale, block, blocks_per_split, splits, full_blocks, num_slots):
  q_refs, k_refs = refs[:n_keys], refs[n_keys:2 * n_keys]
  v_ref = None if value_key is not None else refs[2 * n_keys]
  m_ref, l_ref, acc_ref = refs[-3:]
  b, j = pl.program_id(0), pl.program_id(1)
  g, split = j // splits, j % splits
  layer, pos, pad = layer_ref[0], pos_ref[0], pad_ref[b]
  qs = [r[...] for r in q_refs]
  jp = qs[0].shape[0]
  div = jax.lax.div  # slots are non-negative: no floor-division fix-ups
  first = split * blocks_per_split
  lo = jnp.maximum(first, div(jnp.minimum(pad, pos), block))
  hi = jnp.minimum(first + blocks_per_split, div(pos, block) + 1)

  def columns(width, dim):
    """Feature columns 0..width-1; padded ones (width > dim) repeat the last real column
    (the query's padded columns are zero; padded output columns are sliced off). Unpadded
    columns stay a plain range, so Triton sees contiguous rows and issues wide loads."""
    c = jnp.arange(width, dtype=jnp.int32)
    return (c if width == dim else jnp.minimum(c, dim - 1))[None, :]

  cols = [columns(q.shape[1], d) for q, d in zip(qs, key_dims)]
  vp = acc_ref.shape[-1]
  v_cols = columns(vp, value_dim) if value_key is None else None

  def body(t, carry, masked: bool):
    m_J, l_J, acc_JxV = carry
    s_Sx1 = t * block + jnp.arange(block, dtype=jnp.int32)[:, None]
    s_1xS = t * block + jnp.arange(block, dtype=jnp.int32)[None, :]

    def load(ref, c_1xC):
      if not masked:  # a block wholly inside the cache: plain loads
        return ref[layer, b, s_Sx1, g, c_1xC]
      ok = jnp.broadcast_to(s_Sx1 < num_slots, (block, c_1xC.shape[1]))
      return plgpu.load(ref.at[layer, b, s_Sx1, g, c_1xC], mask=ok, other=0.0)

    keys = [load(ref, c) for ref, c in zip(k_refs, cols)]
    logits_JxS = _dot(qs[0], keys[0], 1, 1)
    for q, key in zip(qs[1:], keys[1:]):
      logits_JxS += _dot(q, key, 1, 1)
    keep_1xS = ((s_1xS >= pad) & (s_1xS <= pos)) | (s_1xS == pos)
    # Every block walked holds a valid slot: m_new is a real logit, masked slots add 0.
    logits_JxS = jnp.where(keep_1xS, logits_JxS * scale, NEG)
    m_new_J = jnp.maximum(m_J, jnp.max(logits_JxS, axis=1))
    p_JxS = jnp.exp2(logits_JxS - m_new_J[:, None])
    corr_J = jnp.exp2(m_J - m_new_J)
    l_J = l_J * corr_J + jnp.sum(p_JxS, axis=1)
    value_SxV = keys[value_key] if value_key is not None else load(v_ref, v_cols)
    acc_JxV = acc_JxV * corr_J[:, None] + _dot(p_JxS.astype(value_SxV.dtype), value_SxV, 1, 0)
    return m_new_J, l_J, acc_JxV

  init = (jnp.full((jp,), NEG, jnp.float32), jnp.zeros((jp,), jnp.float32),
          jnp.zeros((jp, vp), jnp.float32))
  carry = jax.lax.fori_loop(lo, jnp.minimum(hi, full_blocks),
                            functools.partial(body, masked=False), init)
  if full_blocks * block < num_slots:  # the block that runs past the cache end
    carry = jax.lax.fori_loop(jnp.maximum(lo, full_blocks), hi,
                              functools.partial(body, masked=True), carry)
  m_J, l_J, acc_JxV = carry
  m_ref[...] = m_J
  l_ref[...] = l_J
  acc_ref[...] = acc_JxV


def grouped_decode_attention(queries, keys, layer, pad_B, pos, *, kv_len: int, scale: float,
                             values=None, value_key: int | None = None,
                             block: int | None = None, splits: int | None = None,
                             num_warps: int | None = None, num_stages: int | None = None,
                             interpret: bool = False):
  """Attention of the J query heads of each of G KV heads, one token per row, against layer
  `layer` of a stacked cache.

  queries: list of (B, G, J, D_i), one per key part; keys: list of caches (layers, B, S, G,
    D_i) (16-bit, or float32), the logits summing the parts' dot products;
  values: a cache (layers, B, S, G, D_v), or value_key: the index of the key part that is also
    the value (MLA's latent);
  layer: int32 scalar; pad_B: (B,) int32 leading padding slots; pos: int32 scalar, the query's
    own slot. Row b sees slots pad_B[b] .. pos (and always pos itself), below kv_len.
  block / splits / num_warps / num_stages default to the module's TUNING (wide_block /
  wide_warps for an accumulator of WIDE_ACCUMULATOR numbers or more).
  Returns fp32 (B, G, J, D_v): softmax(scale * logits) @ values.
  """
  if (values is None) == (value_key is None):
    raise ValueError("give exactly one of values (a cache) and value_key (a key part)")
  tune = dict(TUNING)
  num_stages = tune["num_stages"] if num_stages is None else num_stages
  _, batch, num_slots, kv_heads, _ = keys[0].shape
  dtype = keys[0].dtype
  if dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
    raise ValueError(f"the grouped decode kernel takes a bfloat16/float16/float32 cache, got "
                     f"{dtype}; use decode.attention_kernel=xla")
  group = queries[0].shape[2]
  num_slots = min(num_slots, kv_len)
  jp = max(16, _pow2(group))
  key_dims = [k.shape[-1] for k in keys]
  value_dim = keys[value_key].shape[-1] if values is None else values.shape[-1]
  vp = max(16, _pow2(value_dim))  # padded value width (MLA: the latent's, its key width)
  wide = jp * vp >= WIDE_ACCUMULATOR
  if block is None:
    block = tune["wide_block" if wide else "block"]
  if num_warps is None:
    num_warps = tune["wide_warps" if wide else "num_warps"]
  block = max(16, min(_pow2(block), _pow2(num_slots)))
  n_blocks = -(-num_slots // block)
  if splits is None:
    splits = max(1, min(n_blocks, -(-tune["programs"] // (batch * kv_heads))))
  blocks_per_split = -(-n_blocks // splits)
  splits = -(-n_blocks // blocks_per_split)

  qs = [jnp.pad(q.astype(dtype), ((0, 0), (0, 0), (0, jp - group),
                                  (0, max(16, _pow2(d)) - d)))
        for q, d in zip(queries, key_dims)]
  scalar = lambda x: jnp.asarray(x, jnp.int32).reshape(1)
  whole = lambda shape: pl.BlockSpec(shape, lambda b, j: (0,) * len(shape))
  q_specs = [pl.BlockSpec((None, None, jp, q.shape[-1]), lambda b, j: (b, j // splits, 0, 0))
             for q in qs]
  caches = list(keys) + ([] if values is None else [values])
  # Logits in base 2 (exp2 in the kernel), so the combine's m is in base 2 too.
  kernel = functools.partial(
      _kernel, n_keys=len(keys), value_key=value_key, key_dims=key_dims, value_dim=value_dim,
      scale=scale * LOG2E, block=block, blocks_per_split=blocks_per_split,
      splits=splits, full_blocks=num_slots // block, num_slots=num_slots)
  extra = {}
  if not interpret:
    extra["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  programs = kv_heads * splits
  m, l, acc = pl.pallas_call(
      kernel,
      grid=(batch, programs),
      in_specs=[whole((1,)), whole((1,)), whole((batch,))] + q_specs
               + [whole(c.shape) for c in caches],
      out_specs=[pl.BlockSpec((None, None, jp), lambda b, j: (b, j, 0)),
                 pl.BlockSpec((None, None, jp), lambda b, j: (b, j, 0)),
                 pl.BlockSpec((None, None, jp, vp), lambda b, j: (b, j, 0, 0))],
      out_shape=[jax.ShapeDtypeStruct((batch, programs, jp), jnp.float32),
                 jax.ShapeDtypeStruct((batch, programs, jp), jnp.float32),
                 jax.ShapeDtypeStruct((batch, programs, jp, vp), jnp.float32)],
      interpret=interpret,
      name="grouped_decode",
      **extra,
  )(scalar(layer), scalar(pos), pad_B.astype(jnp.int32), *qs, *caches)
  # Flash-decoding combine of the splits (splits without a valid slot carry m = NEG, l = 0).
  m = m.reshape(batch, kv_heads, splits, jp)
  l = l.reshape(batch, kv_heads, splits, jp)
  acc = acc.reshape(batch, kv_heads, splits, jp, vp)
  w = jnp.exp2(m - jnp.max(m, axis=2, keepdims=True))
  l_BxGxJ = jnp.sum(w * l, axis=2)
  y = jnp.einsum("bgnj,bgnjv->bgjv", w, acc) / l_BxGxJ[..., None]
  return y[:, :, :group, :value_dim]

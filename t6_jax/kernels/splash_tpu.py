"""Training and prefill attention on TPU through the splash attention kernel (Pallas Mosaic).

`splash_attention` takes the model's (B, T, H, K) layout and runs
`jax.experimental.pallas.ops.tpu.splash_attention` per batch row (vmap), forward and gradient
(splash's own custom VJP: flash-style dq and dk/dv kernels, nothing of size T x T in HBM).

How the model's shapes map onto the kernel:
  * Heads go first: splash wants (H, T, K) per row, so q/k/v are transposed to (B, H, T, K)
    (one copy each, the same as every TPU flash kernel).
  * Grouped K/V (GQA/MQA, G | H): splash's MHA variant takes K/V with G heads and serves query
    head h from KV head h // (H / G), so K/V are never repeated in HBM. G == 1 uses the same
    path with one KV head (equivalent to the MQA variant, and it shards the same way).
  * Any head count (34, 47, 61, 78): heads are a grid axis, no power-of-two requirement.
  * Value width != key width (MLA, qk 192 / v 128): splash takes a separate value head dim,
    so nothing is padded or split; the output has the value width.
  * Length: splash needs T to be a multiple of its blocks, whose key block must be a multiple
    of 128 lanes. T is padded up to a multiple of 128 (`padded_len`); padded positions get a
    segment id of their own. Causal: real queries never see the padded tail (it lies after
    them). Non-causal: the padding's own segment id hides it from real queries. Padded query
    rows see at least themselves (no empty softmax row) and are sliced off.
  * Packed rows (documents, `segment_ids_BxT`): splash's SegmentIds, ANDed with the causal
    mask, the same as the model's `segment_mask`. Every query keeps its own position, so no
    row is empty.
  * The scale multiplies q before the kernel (splash applies none).
Block sizes come from `block_sizes_for` (largest of 512/256/128 that divides the padded length,
the same for forward, dq and dkv).
"""

from __future__ import annotations

import concurrent.futures
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash

LANES = 128  # splash's key block must be a multiple of the 128-lane vector width
PAD_SEGMENT = np.iinfo(np.int32).min  # segment id of padded positions: no real row uses it


def padded_len(t_len: int) -> int:
  """The sequence length splash runs at: T rounded up to a multiple of 128."""
  return -(-t_len // LANES) * LANES


def block_sizes_for(t_len: int) -> splash.BlockSizes:
  """Blocks for a (padded) length: the largest of 512, 256, 128 dividing it, for every pass.

  512 keeps the MXU busy and the per-block mask bookkeeping small at T = 1k..32k while the
  q/k/v/o blocks plus the fp32 scratch stay far below VMEM (512 x 192 x 4 B = 384 KiB for the
  widest, MLA, head); shorter rows fall back to the largest block that divides them.
  """
  t_pad = padded_len(t_len)
  block = next(b for b in (512, 256, LANES) if t_pad % b == 0)
  return splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                           block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                           block_q_dq=block, block_kv_dq=block)


@functools.lru_cache(maxsize=64)
def _kernel(heads: int, t_pad: int, causal: bool, block_sizes: splash.BlockSizes,
            interpret: bool):
  """The splash kernel for one row of `heads` heads (mask preprocessing runs once per shape)."""
  shape = (t_pad, t_pad)
  one = splash.CausalMask(shape) if causal else splash.FullMask(shape)
  mask = splash.MultiHeadMask([one] * heads)
  # The mask tables must be concrete constants (this is cached across traces), even when the
  # first call happens inside a jit or shard_map trace, and under a `jax.set_mesh` of
  # compile-only TPU devices (AOT) they cannot be placed on the mesh: build them in a fresh
  # thread, whose trace and mesh contexts are empty, on the default device.
  def build():
    with jax.ensure_compile_time_eval():
      return splash.make_splash_mha(mask, block_sizes=block_sizes, head_shards=1,
                                    q_seq_shards=1, interpret=interpret)

  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    return pool.submit(build).result()


def splash_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxV, *, scale: float, causal: bool = True,
                     segment_ids_BxT=None, interpret: bool = False, block_sizes=None):
  """Softmax attention of (B, T, H, K) queries over (B, T, G, K) keys / (B, T, G, V) values.

  Self-attention (S == T). G must divide H (query head h uses KV head h // (H / G)).
  segment_ids_BxT: int32 document ids of packed rows (None: one document per row); a query
    sees keys of its own document only (and, if causal, not after itself).
  block_sizes: a splash BlockSizes (default `block_sizes_for(T)`).
  Returns (B, T, H, V) in q's dtype. Differentiable in q, k, v.
  """
  batch, t_len, heads, k_dim = q_BxTxHxK.shape
  kv_heads = k_BxSxGxK.shape[2]
  if k_BxSxGxK.shape[1] != t_len or v_BxSxGxV.shape[1] != t_len:
    raise ValueError(f"splash_attention is self-attention: q has {t_len} positions, k/v "
                     f"{k_BxSxGxK.shape[1]}/{v_BxSxGxV.shape[1]}; use the XLA path for "
                     f"queries against a cache")
  if heads % kv_heads:
    raise ValueError(f"{kv_heads} KV heads do not divide {heads} query heads; use a KV head "
                     f"count that divides the query heads")
  dtype = q_BxTxHxK.dtype
  t_pad = padded_len(t_len)
  if block_sizes is None:
    block_sizes = block_sizes_for(t_len)
  blocks = (block_sizes.block_q, block_sizes.block_kv, block_sizes.block_q_dkv,
            block_sizes.block_kv_dkv, block_sizes.block_q_dq, block_sizes.block_kv_dq)
  if any(b is not None and t_pad % b for b in blocks):
    raise ValueError(f"splash block sizes {blocks} must divide the padded length {t_pad} "
                     f"(T={t_len} rounded up to 128); leave block_sizes=None to pick them")
  if segment_ids_BxT is None and (t_pad != t_len and not causal):
    segment_ids_BxT = jnp.zeros((batch, t_len), jnp.int32)
  q_BxHxTxK = jnp.swapaxes((q_BxTxHxK * scale).astype(dtype), 1, 2)
  k_BxGxTxK = jnp.swapaxes(k_BxSxGxK.astype(dtype), 1, 2)
  v_BxGxTxV = jnp.swapaxes(v_BxSxGxV.astype(dtype), 1, 2)
  if t_pad != t_len:
    pad = [(0, 0), (0, 0), (0, t_pad - t_len), (0, 0)]
    q_BxHxTxK, k_BxGxTxK, v_BxGxTxV = (jnp.pad(x, pad) for x in
                                       (q_BxHxTxK, k_BxGxTxK, v_BxGxTxV))
  kernel = _kernel(heads, t_pad, causal, block_sizes, interpret)
  if segment_ids_BxT is None:
    y_BxHxTxV = jax.vmap(kernel)(q_BxHxTxK, k_BxGxTxK, v_BxGxTxV)
  else:
    seg_BxT = jnp.pad(segment_ids_BxT.astype(jnp.int32), ((0, 0), (0, t_pad - t_len)),
                      constant_values=PAD_SEGMENT)
    run = lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(q=s, kv=s))
    y_BxHxTxV = jax.vmap(run)(q_BxHxTxK, k_BxGxTxK, v_BxGxTxV, seg_BxT)
  return jnp.swapaxes(y_BxHxTxV[:, :, :t_len], 1, 2).astype(dtype)

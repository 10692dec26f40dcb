"""The gradient of TPA's packed factor projection, assembled in one pass (Pallas Triton).

In training the six factor projections run as one GEMM whose (tokens, N) output is split
into the factors, and B_q and B_k are turned by RoPE. The backward needs the gradient of the
whole (padded) output: XLA builds it as one concatenation of the six factor gradients (with
RoPE's transpose on two of them and zero padding columns), which runs at about 1.4 TB/s on
an H200 (narrow pieces of 68 to 384 columns). Here each program writes whole rows of the
padded gradient from its rows of every piece:

  rotated piece (R chunks of d_h = 2F columns): d[x1] = d1 cos - d2 sin, d[x2] = d1 sin + d2 cos
  other pieces: copied; padding columns: zeros.

On an H200 at T6-small batch 64 it takes 93 us a layer against XLA's 171 us concatenation
(bench/train_profile.py; docs/benchmarks_log.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from t6_jax.kernels.tpa_decode_gpu import _pow2

TUNING = {"rows": 16, "num_warps": 4}
MAX_ELEMENTS = 2 ** 31 - 2 ** 20  # int32 offsets


def _kernel(*refs, m, widths, rotate, half, width, rows):
  n = len(widths)
  piece_refs, cos_ref, sin_ref, out_ref = refs[:n], refs[n], refs[n + 1], refs[n + 2]
  f32 = jnp.float32
  r_R = pl.program_id(0) * rows + jnp.arange(rows, dtype=jnp.int32)
  ok_R = r_R < m
  offset = 0
  for ref, w, turn in zip(piece_refs, widths, rotate):
    if turn:  # (chunks, 2 half) columns: the pairs RoPE turned together
      chunks = w // (2 * half)
      r3 = r_R[:, None, None]
      c3 = jnp.arange(_pow2(chunks), dtype=jnp.int32)[None, :, None]
      j3 = jnp.arange(half, dtype=jnp.int32)[None, None, :]
      ok = ok_R[:, None, None] & (c3 < chunks)
      col1 = c3 * (2 * half) + j3
      d1 = plgpu.load(ref.at[r3, col1], mask=ok, other=0.0).astype(f32)
      d2 = plgpu.load(ref.at[r3, col1 + half], mask=ok, other=0.0).astype(f32)
      ok_t = ok_R[:, None, None] & (j3 < half)
      cos = plgpu.load(cos_ref.at[r3, j3], mask=ok_t, other=0.0).astype(ref.dtype).astype(f32)
      sin = plgpu.load(sin_ref.at[r3, j3], mask=ok_t, other=0.0).astype(ref.dtype).astype(f32)
      plgpu.store(out_ref.at[r3, offset + col1], (d1 * cos - d2 * sin).astype(out_ref.dtype),
                  mask=ok)
      plgpu.store(out_ref.at[r3, offset + col1 + half],
                  (d1 * sin + d2 * cos).astype(out_ref.dtype), mask=ok)
    else:
      c_C = jnp.arange(_pow2(w), dtype=jnp.int32)[None, :]
      ok = ok_R[:, None] & (c_C < w)
      x = plgpu.load(ref.at[r_R[:, None], c_C], mask=ok, other=0.0)
      plgpu.store(out_ref.at[r_R[:, None], offset + c_C], x.astype(out_ref.dtype), mask=ok)
    offset += w
  if width > offset:
    c_C = jnp.arange(_pow2(width - offset), dtype=jnp.int32)[None, :]
    ok = ok_R[:, None] & (c_C < width - offset)
    plgpu.store(out_ref.at[r_R[:, None], offset + c_C],
                jnp.zeros((rows, _pow2(width - offset)), out_ref.dtype), mask=ok)


def packed_grad(pieces_MxW, rotate, cos_MxF, sin_MxF, width: int, *, rows: int | None = None,
                num_warps: int | None = None, interpret: bool = False):
  """(M, width) gradient of the packed projection's output from the gradients of its pieces
  (M, w_i) in column order (rotate[i]: piece i was turned by RoPE with the (M, F) cos/sin
  tables, its columns whole chunks of 2F), RoPE's transpose applied and zeros after the
  last piece, in the pieces' dtype."""
  m = pieces_MxW[0].shape[0]
  widths = tuple(p.shape[1] for p in pieces_MxW)
  half = cos_MxF.shape[1]
  if any(p.shape[0] != m for p in pieces_MxW) or cos_MxF.shape != (m, half) or (
      sin_MxF.shape != cos_MxF.shape) or sum(widths) > width:
    raise ValueError(f"pieces {[p.shape for p in pieces_MxW]}, cos {cos_MxF.shape}, sin "
                     f"{sin_MxF.shape}, width {width}: need (M, w_i), (M, F) and sum(w_i) <= "
                     f"width")
  if any(t and w % (2 * half) for w, t in zip(widths, rotate)):
    raise ValueError(f"rotated pieces must be whole chunks of {2 * half} columns: {widths}")
  if m * width > MAX_ELEMENTS:
    raise ValueError(f"{m * width} elements: the kernel's int32 offsets take at most "
                     f"{MAX_ELEMENTS}")
  rows = rows or TUNING["rows"]
  extra = {}
  if not interpret:
    extra["compiler_params"] = plgpu.CompilerParams(
        num_warps=num_warps or TUNING["num_warps"], num_stages=1)
  operands = (*pieces_MxW, cos_MxF, sin_MxF)
  whole = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))
  return pl.pallas_call(
      functools.partial(_kernel, m=m, widths=widths, rotate=tuple(rotate), half=half,
                        width=width, rows=rows),
      grid=(pl.cdiv(m, rows),),
      in_specs=[whole(x.shape) for x in operands],
      out_specs=whole((m, width)),
      out_shape=jax.ShapeDtypeStruct((m, width), pieces_MxW[0].dtype),
      interpret=interpret,
      name="tpa_packed_grad",
      **extra,
  )(*operands)

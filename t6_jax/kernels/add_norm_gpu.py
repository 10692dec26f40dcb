"""A block's residual add and the pre-norm after it, forward and backward, as Pallas (Triton)
kernels, one pass over the rows each way.

  s = x + y,   n = s r,   r = (mean(s^2) + eps)^(-1/2)              (forward)
  dx = ds + r (dn - n' mean(dn n')),   n' = s r,   dy = dx          (backward)

x and s are the fp32 residual stream, y a sublayer's output and n the next sublayer's input
in the compute dtype. XLA's GPU compiler runs the forward as a reduction (the add and the
sum of squares) and an elementwise kernel (the normalised copy), and the backward as a
reduction (mean(dn n') reads s and dn) and an elementwise kernel that reads them again:
each pass reads the (tokens, D) rows once here instead. Programs take `rows` whole rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from t6_jax.kernels.tpa_decode_gpu import _pow2

TUNING = {"elements": 4096, "num_warps": 4}  # row elements per program (whole rows)
MAX_ELEMENTS = 2 ** 31 - 2 ** 20  # int32 offsets


def _tiles(m, d, rows):
  i = pl.program_id(0)
  r_R = i * rows + jnp.arange(rows, dtype=jnp.int32)
  c_D = jnp.arange(_pow2(d), dtype=jnp.int32)
  ok = (r_R[:, None] < m) & (c_D[None, :] < d)
  return (r_R[:, None], c_D[None, :]), ok


def _forward_kernel(x_ref, y_ref, s_ref, n_ref, *, m, d, rows, eps):
  idx, ok = _tiles(m, d, rows)
  s = plgpu.load(x_ref.at[idx], mask=ok, other=0.0).astype(jnp.float32) + plgpu.load(
      y_ref.at[idx], mask=ok, other=0.0).astype(jnp.float32)
  r = jax.lax.rsqrt(jnp.sum(s * s, axis=1, keepdims=True) / d + eps)
  plgpu.store(s_ref.at[idx], s.astype(s_ref.dtype), mask=ok)
  plgpu.store(n_ref.at[idx], (s * r).astype(n_ref.dtype), mask=ok)


def _backward_kernel(s_ref, dn_ref, ds_ref, dx_ref, dy_ref, *, m, d, rows, eps):
  idx, ok = _tiles(m, d, rows)
  s = plgpu.load(s_ref.at[idx], mask=ok, other=0.0).astype(jnp.float32)
  dn = plgpu.load(dn_ref.at[idx], mask=ok, other=0.0).astype(jnp.float32)
  r = jax.lax.rsqrt(jnp.sum(s * s, axis=1, keepdims=True) / d + eps)
  n = s * r
  dx = plgpu.load(ds_ref.at[idx], mask=ok, other=0.0).astype(jnp.float32) + r * (
      dn - n * (jnp.sum(dn * n, axis=1, keepdims=True) / d))
  plgpu.store(dx_ref.at[idx], dx.astype(dx_ref.dtype), mask=ok)
  plgpu.store(dy_ref.at[idx], dx.astype(dy_ref.dtype), mask=ok)


def _call(kernel, operands, out_dtypes, eps, interpret, elements=None, num_warps=None):
  m, d = operands[0].shape
  rows = max(1, (elements or TUNING["elements"]) // _pow2(d))
  extra = {}
  if not interpret:
    extra["compiler_params"] = plgpu.CompilerParams(
        num_warps=num_warps or TUNING["num_warps"], num_stages=1)
  whole = pl.BlockSpec((m, d), lambda i: (0, 0))
  return pl.pallas_call(
      functools.partial(kernel, m=m, d=d, rows=rows, eps=eps),
      grid=(pl.cdiv(m, rows),),
      in_specs=[whole] * len(operands),
      out_specs=[whole] * len(out_dtypes),
      out_shape=[jax.ShapeDtypeStruct((m, d), t) for t in out_dtypes],
      interpret=interpret,
      name=kernel.__name__.strip("_"),
      **extra,
  )(*operands)


def add_norm(x_MxD, y_MxD, *, eps: float, interpret: bool = False, **tuning):
  """(s = x + y in x's dtype, rms_norm(s) in y's dtype) of (M, D) rows."""
  if x_MxD.shape != y_MxD.shape or x_MxD.ndim != 2:
    raise ValueError(f"x {x_MxD.shape}, y {y_MxD.shape}: need one (M, D) shape")
  if x_MxD.size > MAX_ELEMENTS:
    raise ValueError(f"{x_MxD.size} elements: the kernel's int32 offsets take at most "
                     f"{MAX_ELEMENTS}")
  return _call(_forward_kernel, (x_MxD, y_MxD), (x_MxD.dtype, y_MxD.dtype), eps, interpret,
               **tuning)


def add_norm_grad(s_MxD, dn_MxD, ds_MxD, y_dtype, *, eps: float, interpret: bool = False,
                  **tuning):
  """(dx in s's dtype, dy in y_dtype) of `add_norm` from its saved sum s and the cotangents
  of its two outputs (ds of s, dn of the normalised rows)."""
  return _call(_backward_kernel, (s_MxD, dn_MxD, ds_MxD), (s_MxD.dtype, y_dtype), eps,
               interpret, **tuning)

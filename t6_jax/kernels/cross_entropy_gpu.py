"""The loss's per-token statistics of a chunk of logits (and their gradient) as a Pallas (Triton)
kernel.

For logits x (N, V) (the compute dtype) and target ids t (N,), per row n, in fp32:

  lse[n]    = log sum_v exp(x[n, v])        (online: a running max m and sum s over V blocks,
                                             s <- s exp(m - m') + sum exp(x - m'))
  target[n] = x[n, t[n]]
  and with grad: dx[n, v] = exp(x[n, v] - lse[n]) - [v == t[n]]  (x's dtype; a second pass)

XLA computes the same pair as two reductions over the logits (the max, then the sum of exp)
plus a gather: two reads of the chunk where this kernel makes one; its gradient is a third.
On an H200 one T6-small chunk (4096 x 50304 bf16) takes 262 us in XLA and 151 us here, or
with the gradient 524 and 369 us (bench/cross_entropy.py; docs/benchmarks_log.md).

Grid (row blocks,): program i reduces rows [i rows, (i+1) rows), block_v logits per step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from t6_jax.kernels.tpa_decode_gpu import NEG

# Rows per program, logits per loop step, warps, pipeline stages: the fastest of a sweep on
# an H200 (bench/cross_entropy.py) at T6-small's chunk, 4096 x 50304 bf16 (2.7-3.0 TB/s),
# with the gradient as without it.
TUNING = {"rows": 1, "block_v": 4096, "num_warps": 4, "num_stages": 3}
MAX_ELEMENTS = 2**31 - 1  # the kernel's offsets are int32


def _kernel(x_ref, t_ref, lse_ref, target_ref, *grad_ref, n_len, v_len, rows, block_v):
  r_R = pl.program_id(0) * rows + jnp.arange(rows, dtype=jnp.int32)
  ok_R = r_R < n_len
  f32 = jnp.float32

  def logits(step):
    v_V = step * block_v + jnp.arange(block_v, dtype=jnp.int32)
    ok = ok_R[:, None] & (v_V[None, :] < v_len)
    x_RxV = plgpu.load(x_ref.at[r_R[:, None], v_V[None, :]], mask=ok, other=-jnp.inf)
    return v_V, ok, x_RxV.astype(f32)

  def body(step, carry):
    m_R, s_R = carry
    x_RxV = logits(step)[2]
    new_R = jnp.maximum(m_R, jnp.max(x_RxV, axis=1))
    s_R = s_R * jnp.exp(m_R - new_R) + jnp.sum(jnp.exp(x_RxV - new_R[:, None]), axis=1)
    return new_R, s_R

  # A finite start for the max: exp(m - m') stays exp(0) = 1, never exp(nan), before the
  # first finite logit.
  steps = pl.cdiv(v_len, block_v)
  m_R, s_R = jax.lax.fori_loop(0, steps, body,
                               (jnp.full((rows,), NEG, f32), jnp.zeros((rows,), f32)))
  lse_R = m_R + jnp.log(s_R)
  plgpu.store(lse_ref.at[r_R], lse_R, mask=ok_R)
  t_R = plgpu.load(t_ref.at[r_R], mask=ok_R, other=0)
  safe_R = jnp.maximum(t_R, 0)
  plgpu.store(target_ref.at[r_R],
              plgpu.load(x_ref.at[r_R, safe_R], mask=ok_R, other=0.0).astype(f32), mask=ok_R)
  if not grad_ref:
    return
  # d nll / d logits = softmax - onehot(target), zero for an ignored target (id < 0): a
  # second read of the row (from HBM mostly: no setting swept kept it in L2).
  (grad_ref,) = grad_ref
  keep_R = t_R >= 0

  def grad(step, carry):
    v_V, ok, x_RxV = logits(step)
    p_RxV = jnp.exp(x_RxV - lse_R[:, None])
    p_RxV = jnp.where(v_V[None, :] == safe_R[:, None], p_RxV - 1.0, p_RxV)
    p_RxV = jnp.where(keep_R[:, None], p_RxV, 0.0)
    plgpu.store(grad_ref.at[r_R[:, None], v_V[None, :]], p_RxV.astype(grad_ref.dtype), mask=ok)
    return carry

  jax.lax.fori_loop(0, steps, grad, 0)


def lse_and_target(x_NxV, t_N, *, grad: bool = False, rows: int | None = None,
                   block_v: int | None = None, num_warps: int | None = None,
                   num_stages: int | None = None, interpret: bool = False):
  """(lse (N,), x[n, t[n]] (N,)), both fp32, from logits x (N, V) and ids t (N,) < V.

  grad=True: also d nll / d x = softmax(x) - onehot(t) in x's dtype (N, V), a second pass
  over each row; ids t < 0 (ignored tokens) get a zero row and the logit at id 0.
  Settings default to TUNING; interpret runs the Pallas interpreter (CPU tests)."""
  n_len, v_len = x_NxV.shape
  if t_N.shape != (n_len,):
    raise ValueError(f"targets of shape {t_N.shape} do not match logits of shape "
                     f"{x_NxV.shape}; pass one target id per row")
  if n_len * v_len > MAX_ELEMENTS:
    raise ValueError(f"{n_len} x {v_len} logits exceed the kernel's int32 offsets; use smaller "
                     f"chunks (train/loss.py CHUNK_LOGITS)")
  tune = dict(TUNING, **{k: v for k, v in dict(rows=rows, block_v=block_v, num_warps=num_warps,
                                                 num_stages=num_stages).items() if v})
  kernel = functools.partial(_kernel, n_len=n_len, v_len=v_len, rows=tune["rows"],
                             block_v=tune["block_v"])
  whole = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))  # noqa: E731
  extra = {} if interpret else {"compiler_params": plgpu.CompilerParams(
      num_warps=tune["num_warps"], num_stages=tune["num_stages"])}
  stat = jax.ShapeDtypeStruct((n_len,), jnp.float32)
  out_shape = [stat, stat] + ([jax.ShapeDtypeStruct(x_NxV.shape, x_NxV.dtype)] if grad else [])
  return pl.pallas_call(
      kernel,
      grid=(pl.cdiv(n_len, tune["rows"]),),
      in_specs=[whole(x_NxV.shape), whole(t_N.shape)],
      out_specs=[whole(o.shape) for o in out_shape],
      out_shape=out_shape,
      interpret=interpret,
      name="lse_and_target",
      **extra,
  )(x_NxV, t_N.astype(jnp.int32))

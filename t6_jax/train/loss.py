"""Token cross-entropy fused with the tied LM head, over chunks of the sequence.

The logits of a step (B x T x V, V = 50304) are the largest activation of the model: 3.3 GB in
bf16 at batch 32 x 1024, twice that in fp32, and autodiff keeps them for the backward pass.
`lm_head_cross_entropy` never holds more than one chunk of them. Its forward, when
differentiated, computes each chunk's logits, its loss and at once the gradient of that loss
with respect to the hidden states and the head's weight, so the backward pass only scales
those by the incoming cotangent: the same three GEMMs per chunk as the unfused head (logits,
dX, dW), no recomputation, and no logits kept between the passes.

Each chunk's per-token statistics (the logsumexp over the vocabulary and the target's logit)
and its logit gradient come from `kernels.lse_and_target` (train.loss_impl): on GPU a
Pallas kernel, where XLA's two reductions read the chunk twice before the gradient's pass.

Semantics are the unfused path's: logits = x @ W^T computed in the compute dtype, cast to
fp32, log-softmax in fp32; the logit gradient softmax - onehot goes back into the two
backward GEMMs in the compute dtype, as the transpose of that cast would send it. dW is
accumulated over chunks in fp32.

`lm_head_objective` adds the auxiliary z-loss (train.z_loss): z * logsumexp^2 per counted
token, which keeps the softmax normaliser near 1 and the logits from drifting (a stabiliser
for large runs). Its logit gradient, 2 z lse softmax, joins the cross-entropy's in the same
pass: (softmax - onehot) (1 + 2 z lse) + 2 z lse onehot, from the kernel's softmax - onehot.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from t6_jax import kernels
from t6_jax.sharding import Rules, constrain

IGNORE = -1  # target id that contributes no loss
CHUNK_LOGITS = 2**28  # logits elements per device per chunk: 0.5 GiB in bf16


def num_chunks(batch: int, seq_len: int, vocab: int, devices: int) -> int:
  """Fewest chunks along T (a divisor of seq_len) whose per-device logits fit CHUNK_LOGITS.

  Tokens shard over the batch axes and the vocab over `tensor`, so one device holds about
  1/devices of a chunk's logits whatever the rules."""
  need = -(-batch * seq_len * vocab // max(devices, 1) // CHUNK_LOGITS)
  for n in range(max(need, 1), seq_len + 1):
    if seq_len % n == 0:
      return n
  return seq_len


def _mesh_devices() -> int:
  mesh = jax.sharding.get_abstract_mesh()
  return max(int(getattr(mesh, "size", 0) or 0), 1)


def lm_head_cross_entropy(x_BxTxD, w_VxD, targets_BxT, *, dtype, rules: Rules,
                          chunks: int | None = None, impl: str = "auto"):
  """Sum over counted tokens of -log softmax(x W^T)[target] (fp32 scalar); targets equal to
  IGNORE count nothing. x: final hidden states, w: the tied embedding table (V, D).
  chunks: pieces of T (must divide it); default: `num_chunks` for the mesh traced under.
  impl: who computes each chunk's logsumexp and logit gradient (`kernels.lse_and_target`,
  train.loss_impl)."""
  return lm_head_objective(x_BxTxD, w_VxD, targets_BxT, dtype=dtype, rules=rules,
                           chunks=chunks, impl=impl)[0]


def lm_head_objective(x_BxTxD, w_VxD, targets_BxT, *, dtype, rules: Rules,
                      chunks: int | None = None, impl: str = "auto", z_loss: float = 0.0):
  """(objective, cross-entropy), fp32 sums over counted tokens: the objective is the summed
  cross-entropy plus z_loss * logsumexp^2 of each token (the same value when z_loss is 0).
  The cross-entropy is the metric beside it, without a gradient (stop_gradient). Arguments
  as `lm_head_cross_entropy`."""
  b, t, _ = x_BxTxD.shape
  if chunks is None:
    chunks = num_chunks(b, t, w_VxD.shape[0], _mesh_devices())
  if t % chunks:
    raise ValueError(f"chunks={chunks} must divide the sequence length {t}")
  if z_loss < 0:
    raise ValueError(f"z_loss={z_loss} must be >= 0 (train.z_loss)")
  objective, nll = _fused(jnp.dtype(dtype), rules, chunks, impl, float(z_loss), x_BxTxD, w_VxD,
                          targets_BxT)
  return objective, jax.lax.stop_gradient(nll)


def _chunked(x_BxTxD, targets_BxT, chunks):
  """(chunks, B, T/chunks, ...) views of x and targets, the scanned axis first."""
  b, t = targets_BxT.shape
  split = lambda a: jnp.moveaxis(a.reshape((b, chunks, t // chunks) + a.shape[2:]), 1, 0)  # noqa
  return split(x_BxTxD), split(targets_BxT)


def _head_weight(w_VxD, dtype, rules):
  # Gathered over `embed` once, outside the chunk loop, not once per chunk.
  return constrain(w_VxD.astype(dtype), ("vocab", None), rules)


def _chunk_logits(x_BxCxD, w_VxD, dtype, rules):
  logits_BxCxV = jnp.einsum("bcd,vd->bcv", x_BxCxD.astype(dtype), w_VxD)
  return constrain(logits_BxCxV, ("batch", "length", "act_vocab"), rules)


def _chunk_nll(logits_BxCxV, targets_BxC, impl, rules, z_loss: float, grad: bool = False):
  """nll per token, objective per token (nll + z_loss lse^2; fp32, ignored tokens zero) [, d
  objective / d logits in the logits' dtype]."""
  stats = kernels.lse_and_target(logits_BxCxV, targets_BxC, impl=impl, rules=rules, grad=grad)
  counted_BxC = targets_BxC != IGNORE
  nll_BxC = jnp.where(counted_BxC, stats[0] - stats[1], 0.0)
  if not z_loss:
    return (nll_BxC, nll_BxC) + ((stats[2],) if grad else ())
  lse_BxC = jnp.where(counted_BxC, stats[0], 0.0)
  objective_BxC = nll_BxC + z_loss * lse_BxC * lse_BxC
  if not grad:
    return nll_BxC, objective_BxC
  # softmax - onehot from the kernel (zero rows for ignored tokens, whose lse is set to 0):
  # d/dlogits of z lse^2 is 2 z lse softmax = 2 z lse ((softmax - onehot) + onehot).
  dnll_BxCxV = stats[2]
  scale_BxCx1 = (2.0 * z_loss * lse_BxC)[..., None]
  onehot_BxCxV = jnp.arange(dnll_BxCxV.shape[-1], dtype=jnp.int32) == targets_BxC[..., None]
  dobj_BxCxV = (dnll_BxCxV.astype(jnp.float32) * (1.0 + scale_BxCx1)
                + jnp.where(onehot_BxCxV, scale_BxCx1, 0.0))
  return nll_BxC, objective_BxC, dobj_BxCxV.astype(dnll_BxCxV.dtype)


def _loss(dtype, rules, chunks, impl, z_loss, x_BxTxD, w_VxD, targets_BxT):
  w_VxD = _head_weight(w_VxD, dtype, rules)
  xs = _chunked(x_BxTxD, targets_BxT, chunks)

  def body(totals, chunk):
    x_BxCxD, targets_BxC = chunk
    nll_BxC, obj_BxC = _chunk_nll(_chunk_logits(x_BxCxD, w_VxD, dtype, rules), targets_BxC,
                                  impl, rules, z_loss)
    return (totals[0] + jnp.sum(obj_BxC), totals[1] + jnp.sum(nll_BxC)), None

  zero = jnp.zeros((), jnp.float32)
  return jax.lax.scan(body, (zero, zero), xs)[0]


# (objective, nll): the backward pass takes the objective's cotangent only (the public
# `lm_head_objective` returns the nll behind stop_gradient).
_fused = jax.custom_vjp(_loss, nondiff_argnums=(0, 1, 2, 3, 4))


def _loss_and_grads(dtype, rules, chunks, impl, z_loss, x_BxTxD, w_VxD, targets_BxT):
  w_c_VxD = _head_weight(w_VxD, dtype, rules)
  xs = _chunked(x_BxTxD, targets_BxT, chunks)

  def body(carry, chunk):
    total, total_nll, dw_VxD = carry
    x_BxCxD, targets_BxC = chunk
    # d objective / d logits: softmax - onehot(target) (with z-loss, its term as well), zero
    # on ignored tokens.
    nll_BxC, obj_BxC, dlogits_BxCxV = _chunk_nll(
        _chunk_logits(x_BxCxD, w_c_VxD, dtype, rules), targets_BxC, impl, rules, z_loss,
        grad=True)
    dlogits_BxCxV = constrain(dlogits_BxCxV, ("batch", "length", "act_vocab"), rules)
    dx_BxCxD = jnp.einsum("bcv,vd->bcd", dlogits_BxCxV, w_c_VxD,
                          preferred_element_type=jnp.float32)
    dw_VxD = dw_VxD + jnp.einsum("bcv,bcd->vd", dlogits_BxCxV, x_BxCxD.astype(dtype),
                                 preferred_element_type=jnp.float32)
    return ((total + jnp.sum(obj_BxC), total_nll + jnp.sum(nll_BxC), dw_VxD),
            dx_BxCxD.astype(x_BxTxD.dtype))

  zero, dw0 = jnp.zeros((), jnp.float32), jnp.zeros(w_VxD.shape, jnp.float32)
  (total, total_nll, dw_VxD), dx_NxBxCxD = jax.lax.scan(body, (zero, zero, dw0), xs)
  dx_BxTxD = jnp.moveaxis(dx_NxBxCxD, 0, 1).reshape(x_BxTxD.shape)
  dw_VxD = constrain(dw_VxD.astype(w_VxD.dtype), ("vocab", "embed"), rules)
  return (total, total_nll), (dx_BxTxD, dw_VxD)


def _fwd(dtype, rules, chunks, impl, z_loss, x_BxTxD, w_VxD, targets_BxT):
  return _loss_and_grads(dtype, rules, chunks, impl, z_loss, x_BxTxD, w_VxD, targets_BxT)


def _bwd(dtype, rules, chunks, impl, z_loss, residuals, g):
  del dtype, rules, chunks, impl, z_loss
  dx_BxTxD, dw_VxD = residuals
  g_objective = g[0]  # the nll output is a metric (stop_gradient where it leaves the module)
  return g_objective * dx_BxTxD, g_objective * dw_VxD, None  # integer targets: no cotangent


_fused.defvjp(_fwd, _bwd)

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
  b, t, _ = x_BxTxD.shape
  if chunks is None:
    chunks = num_chunks(b, t, w_VxD.shape[0], _mesh_devices())
  if t % chunks:
    raise ValueError(f"chunks={chunks} must divide the sequence length {t}")
  return _fused(jnp.dtype(dtype), rules, chunks, impl, x_BxTxD, w_VxD, targets_BxT)


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


def _chunk_nll(logits_BxCxV, targets_BxC, impl, rules, grad: bool = False):
  """nll per token (fp32, ignored tokens zero) [, d nll / d logits in the logits' dtype]."""
  stats = kernels.lse_and_target(logits_BxCxV, targets_BxC, impl=impl, rules=rules, grad=grad)
  nll_BxC = jnp.where(targets_BxC != IGNORE, stats[0] - stats[1], 0.0)
  return (nll_BxC, stats[2]) if grad else nll_BxC


def _loss(dtype, rules, chunks, impl, x_BxTxD, w_VxD, targets_BxT):
  w_VxD = _head_weight(w_VxD, dtype, rules)
  xs = _chunked(x_BxTxD, targets_BxT, chunks)

  def body(total, chunk):
    x_BxCxD, targets_BxC = chunk
    nll_BxC = _chunk_nll(_chunk_logits(x_BxCxD, w_VxD, dtype, rules), targets_BxC, impl,
                         rules)
    return total + jnp.sum(nll_BxC), None

  return jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)[0]


_fused = jax.custom_vjp(_loss, nondiff_argnums=(0, 1, 2, 3))


def _loss_and_grads(dtype, rules, chunks, impl, x_BxTxD, w_VxD, targets_BxT):
  w_c_VxD = _head_weight(w_VxD, dtype, rules)
  xs = _chunked(x_BxTxD, targets_BxT, chunks)

  def body(carry, chunk):
    total, dw_VxD = carry
    x_BxCxD, targets_BxC = chunk
    # d nll / d logits = softmax - onehot(target), zero on ignored tokens.
    nll_BxC, dlogits_BxCxV = _chunk_nll(_chunk_logits(x_BxCxD, w_c_VxD, dtype, rules),
                                        targets_BxC, impl, rules, grad=True)
    dlogits_BxCxV = constrain(dlogits_BxCxV, ("batch", "length", "act_vocab"), rules)
    dx_BxCxD = jnp.einsum("bcv,vd->bcd", dlogits_BxCxV, w_c_VxD,
                          preferred_element_type=jnp.float32)
    dw_VxD = dw_VxD + jnp.einsum("bcv,bcd->vd", dlogits_BxCxV, x_BxCxD.astype(dtype),
                                 preferred_element_type=jnp.float32)
    return (total + jnp.sum(nll_BxC), dw_VxD), dx_BxCxD.astype(x_BxTxD.dtype)

  dw0 = jnp.zeros(w_VxD.shape, jnp.float32)
  (total, dw_VxD), dx_NxBxCxD = jax.lax.scan(body, (jnp.zeros((), jnp.float32), dw0), xs)
  dx_BxTxD = jnp.moveaxis(dx_NxBxCxD, 0, 1).reshape(x_BxTxD.shape)
  dw_VxD = constrain(dw_VxD.astype(w_VxD.dtype), ("vocab", "embed"), rules)
  return total, (dx_BxTxD, dw_VxD)


def _fwd(dtype, rules, chunks, impl, x_BxTxD, w_VxD, targets_BxT):
  return _loss_and_grads(dtype, rules, chunks, impl, x_BxTxD, w_VxD, targets_BxT)


def _bwd(dtype, rules, chunks, impl, residuals, g):
  del dtype, rules, chunks, impl
  dx_BxTxD, dw_VxD = residuals
  return g * dx_BxTxD, g * dw_VxD, None  # integer targets: no cotangent


_fused.defvjp(_fwd, _bwd)

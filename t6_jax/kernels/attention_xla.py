"""Softmax attention through jax.nn.dot_product_attention: XLA, or cuDNN's fused kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from t6_jax.kernels.mask import Mask


def cudnn_takes(dtype, head_width: int) -> bool:
  """Whether cuDNN's flash kernel takes heads of this dtype and width."""
  return (jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_width <= 128
          and head_width % 8 == 0)


def cudnn_fits(q_BxTxHxK: jax.Array, keep) -> bool:
  """Shapes and dtypes cuDNN's flash kernel takes (and no materialised mask to pass)."""
  return keep is None and cudnn_takes(q_BxTxHxK.dtype, q_BxTxHxK.shape[-1])


def dot_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxV, mask: Mask, *, scale: float,
                  implementation: str):
  """jax.nn.dot_product_attention with `implementation` xla or cudnn.

  G may divide H (grouped queries: KV head j serves query heads j*H/G ... (j+1)*H/G - 1).
  A value width different from the key width (MLA) is zero-padded to share the kernel. A
  causal mask with queries at key positions 0..T-1 goes in as `is_causal` (fused kernels
  skip the masked blocks); any other mask is materialised.
  """
  k_dim, v_dim = q_BxTxHxK.shape[-1], v_BxSxGxV.shape[-1]
  if v_dim < k_dim:
    v_BxSxGxV = jnp.pad(v_BxSxGxV, [(0, 0)] * 3 + [(0, k_dim - v_dim)])
  elif v_dim > k_dim:
    pad = [(0, 0)] * 3 + [(0, v_dim - k_dim)]
    q_BxTxHxK, k_BxSxGxK = jnp.pad(q_BxTxHxK, pad), jnp.pad(k_BxSxGxK, pad)
  keep = attention_keep(mask, q_BxTxHxK.shape[1], k_BxSxGxK.shape[1])
  out = jax.nn.dot_product_attention(
      q_BxTxHxK, k_BxSxGxK, v_BxSxGxV, mask=None if keep is None else keep[:, None],
      scale=scale, is_causal=mask.aligned_causal, implementation=implementation)
  return out[..., :v_dim]


def attention_keep(mask: Mask, t_len: int, s_len: int):
  """The boolean (B or 1, T, S) dot_product_attention takes beside `is_causal`, or None."""
  return mask.keep(t_len, s_len, include_causal=not mask.aligned_causal)

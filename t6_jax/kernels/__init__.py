"""Attention kernels, one file per kernel and backend, behind one dispatch.

The model calls these two entry points with its settings and never asks the backend itself:

  attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxV, mask, *, scale, impl) -> (B, T, H, V)
      impl (model.attention_impl): auto | xla | cudnn  (attention_xla.py)
  use_decode_kernel(setting, attention, t_len, cache_dtype) -> bool
  tpa_decode(q_BxHxK, a_k, b_k, a_v, b_v, layer, pad_B, pos, *, kv_len) -> fp32 (B, H, d_h)
      one-token TPA decode straight from the stacked factor cache (tpa_decode_gpu.py,
      Pallas/Triton; interpreted off GPU)

`Mask` (mask.py) describes what each query may see for every path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from t6_jax.kernels import attention_xla, tpa_decode_gpu
from t6_jax.kernels.mask import Mask, cache_mask, training_mask  # noqa: F401

ATTENTION_IMPLS = ("auto", "xla", "cudnn")
DECODE_KERNELS = ("auto", "xla", "pallas")
FACTOR_ATTENTIONS = ("tpa", "tpa_kvonly")  # attention types with a factor cache


def attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxV, mask: Mask, *, scale: float,
              impl: str = "auto"):
  """Softmax attention of T queries over S keys (G KV heads serving H query heads).

  auto takes cuDNN's flash kernel on GPU where it fits (jax's own default, the XLA path,
  materialises (B, H, T, S) scores), else XLA.
  """
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"model.attention_impl={impl!r}; use {', '.join(ATTENTION_IMPLS)}")
  if impl == "auto":
    keep = attention_xla.attention_keep(mask, q_BxTxHxK.shape[1], k_BxSxGxK.shape[1])
    fused = (jax.default_backend() == "gpu" and mask.aligned_causal
             and attention_xla.cudnn_fits(q_BxTxHxK, keep))
    impl = "cudnn" if fused else "xla"
  return attention_xla.dot_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxV, mask, scale=scale,
                                     implementation=impl)


def use_decode_kernel(setting: str, attention: str, t_len: int, cache_dtype) -> bool:
  """Whether decode.attention_kernel=`setting` runs `tpa_decode` for a step of t_len tokens.

  Only one-token steps of factor-cache attentions take it. auto: one GPU (a sharded cache
  would need the kernel under shard_map) and a 16-bit cache (the kernel's only input);
  pallas always (a float32 cache then raises the kernel's own error).
  """
  if setting not in DECODE_KERNELS:
    raise ValueError(f"decode.attention_kernel={setting!r}; use {', '.join(DECODE_KERNELS)}")
  if setting == "xla" or t_len != 1 or attention not in FACTOR_ATTENTIONS:
    return False
  if setting == "pallas":
    return True
  return (jax.default_backend() == "gpu" and jax.device_count() == 1
          and jnp.dtype(cache_dtype) in (jnp.bfloat16, jnp.float16))


def tpa_decode(q_BxHxK, a_k, b_k, a_v, b_v, layer, pad_B, pos, *, kv_len: int, **tuning):
  """One query per row against layer `layer` of a stacked TPA factor cache (see
  tpa_decode_gpu.tpa_decode_attention for the operands); interpreted off GPU."""
  return tpa_decode_gpu.tpa_decode_attention(
      q_BxHxK, a_k, b_k, a_v, b_v, layer, pad_B, pos, kv_len=kv_len,
      interpret=jax.default_backend() != "gpu", **tuning)

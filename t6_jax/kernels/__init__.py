"""Attention kernels, one file per kernel and backend, behind one dispatch.

The model calls these entry points with its settings and its sharding rules and never asks the
backend itself; the dispatch reads the TARGET platform from the mesh the program is traced
under (`jax.set_mesh`: its devices' platform, which is "tpu" when compiling ahead of time for
a TPU topology on a CPU host), else from the default backend (no mesh, one device):

  attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxV, mask, *, scale, impl, rules) -> (B, T, H, V)
      impl (model.attention_impl): auto | xla | cudnn | splash
        auto: splash on TPU, cuDNN's flash kernel on GPU where it fits, XLA otherwise.
        splash: the TPU splash kernel (splash_tpu.py), interpreted off TPU (CPU tests).
        Splash takes causal self-attention with segment ids; anything else (queries against
        a cache at an offset, explicit keep masks) stays on XLA (attention_xla.py).
        On a mesh of more than one device splash runs under `jax.shard_map` (sharded.py):
        batch over the rules' batch axes, heads over the tensor axis.
  fused_causal(impl, dtype, head_width) -> bool: whether `attention` runs causal
      self-attention of that kind through a fused kernel (no (T, T) scores held)
  decode_kernel(setting, attention, cache_dtype, rules) -> "triton" | "mosaic" | None
  use_decode_kernel(setting, attention, t_len, cache_dtype, rules) -> bool
  decode_cache_layout(setting, model_cfg, cache_dtype, *, batch, rules)
      -> FactorCacheLayout | None: the decode kernels' cache layout when one will read it
  tpa_decode(q_BxHxK, a_k, b_k, a_v, b_v, layer, pad_B, pos, *, kv_len, rules, kernel)
      -> fp32 (B, H, d_h): one-token TPA decode straight from the stacked factor cache,
      Triton on GPU (tpa_decode_gpu.py), Mosaic on TPU (tpa_decode_tpu.py; interpreted
      off TPU), under `jax.shard_map` on a mesh.
  tpa_step(y_SxBxN, cos, sin, a_k, b_k, a_v, b_v, layer, pos, ...) and
  tpa_decode_rows(q_hi, q_lo, a_k, b_k, a_v, b_v, layer, pad_B, pos, ...): the Triton
      decode step on one device in two kernels: the new entries written and the query rows
      built from the factor projection (tpa_step_gpu.py), then the attention from those rows.
  gemv(x_K, w, *, layout) / gemv_partials: one row times a matrix (gemv_gpu.py), the
      products of a batch-1 decode step, where gemv_applies() (one GPU, no mesh).
  grouped_decode(queries, keys, layer, pad_B, pos, *, kv_len, scale, values | value_key,
                 rules, cache_axes)
      -> fp32 (B, G, J, D_v): one-token MHA/MQA/GQA/MLA decode straight from the stacked
      cache (grouped_decode_gpu.py, Triton), interpreted off GPU, under `jax.shard_map` on a
      mesh (batch over the rules' batch axes, KV heads or their query heads over tensor).

  tpa_contract(pairs, *, impl, rules) -> [(..., H, d_h) per pair]
      impl (model.contract_impl): auto | xla | pallas. TPA's per-token factor contraction
      sum_r A[h, r] B[r] / R of (A (B, T, H, R), B (B, T, R, d_h)) pairs; xla: XLA's einsum
      (also auto: GPU train and eval steps resolve auto first, `train.step.settled`, to
      the kernels); pallas: the Pallas Triton kernels
      (tpa_contract_gpu.py; pairs of one length in one launch), interpreted off GPU, under
      `jax.shard_map` on a mesh that splits only the batch; where the rules split heads
      (tensor parallelism) the einsum runs.

  lse_and_target(logits_BxCxV, targets_BxC, *, impl, rules, grad) -> fp32 (lse, target
      logit) [, the logits' gradient softmax - onehot]
      impl (train.loss_impl): auto | xla | pallas. The cross-entropy's per-token statistics
      of a chunk of logits (and its gradient): XLA's two reductions, a gather and an
      elementwise pass, or the Pallas Triton kernel (cross_entropy_gpu.py; auto on GPU),
      which reads each row once for the statistics and again for the gradient, interpreted
      off GPU, under `jax.shard_map` on a mesh that does not split the vocabulary (else
      XLA's).

  swiglu(g, u, *, impl, rules) -> silu(g) * u, the MLP's hidden activation
      impl (model.swiglu_impl): auto | xla | pallas. The forward is XLA's one elementwise
      kernel; the backward's two gradients come from one pass (swiglu_gpu.py; auto on GPU),
      interpreted off GPU, per shard on a mesh, where XLA runs two passes that each read
      dh and g.

  add_rms_norm(x, y, *, eps, impl, rules) -> (x + y, rms_norm(x + y)): a block's residual
      add and the pre-norm after it; impl (model.norm_impl): auto | xla | pallas, the
      kernels of add_norm_gpu.py (one pass over the rows forward and one backward; auto on
      GPU), interpreted off GPU, per shard on a mesh that does not split d_model.
      add_rms_norm_takes_kernel(shape, *, impl, rules) says whether it does here.

  unpack_factors(y, widths, rotate, cos, sin, rope_fn, *, impl, rules) -> TPA's packed
      factor projection split into its factors, RoPE applied to some; with impl
      (model.contract_impl, resolved) pallas the backward writes the packed gradient in one
      pass (tpa_unpack_gpu.py), else XLA's concatenation.

`Mask` (mask.py) describes what each query may see for every path.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from t6_jax.config import LOSS_IMPLS
from t6_jax.kernels import (add_norm_gpu, attention_xla, cross_entropy_gpu, gemv_gpu,
                            grouped_decode_gpu, swiglu_gpu, tpa_contract_gpu, tpa_decode_gpu,
                            tpa_decode_tpu, tpa_step_gpu, tpa_unpack_gpu)
from t6_jax.kernels.mask import Mask, cache_mask, training_mask  # noqa: F401
from t6_jax.kernels.sharded import (grouped_decode_sharded, splash_attention_sharded,
                                    tpa_decode_sharded)
from t6_jax.kernels.splash_tpu import splash_attention
from t6_jax.kernels.tpa_decode_tpu import FactorCacheLayout  # noqa: F401
from t6_jax.sharding import Rules, logical_to_spec, spec_axes

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")
DECODE_KERNELS = ("auto", "xla", "pallas")
CONTRACT_IMPLS = ("auto", "xla", "pallas")  # auto here: xla (train steps resolve it first)
FACTOR_ATTENTIONS = ("tpa", "tpa_kvonly")  # attention types with a factor cache
# The grouped (K/V or latent) decode kernel, which `auto` takes for all four on GPU: measured
# on an H200 at 32k context (docs/benchmarks_log.md), GQA/MLA 1.7-5.4x their XLA paths, MHA 1.4x
# (batch 16) and 3.0x (batch 64).
GROUPED_ATTENTIONS = ("mha", "mqa", "gqa", "mla")
FAST_CACHE_DTYPES = {"gpu": (jnp.bfloat16, jnp.float16),
                     "tpu": (jnp.bfloat16, jnp.float16, jnp.float32)}


def target():
  """(platform, mesh) of the program being traced: the platform of the surrounding mesh's
  devices (else the default backend), and that mesh when it has more than one device (the
  kernels then run under shard_map) or None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return jax.default_backend(), None
  device = mesh.abstract_device
  platform = jax.default_backend() if device is None else device.platform
  return platform, (mesh if math.prod(mesh.shape.values()) > 1 else None)


def _split_axes(names, shape, rules: Rules, mesh):
  """Per dimension, the mesh axes (a tuple, maybe empty) that split it under `rules` (the same
  choice `sharding.constrain` makes for these logical names and this shape)."""
  return spec_axes(logical_to_spec(names, rules, shape, mesh))


def splash_expresses(mask: Mask, t_len: int, s_len: int) -> bool:
  """Whether splash can run this mask: self-attention (S == T, queries at key positions
  0..T-1), causal or not, with at most one set of segment ids, and no explicit keep array."""
  return (t_len == s_len and mask.q_start is None and mask.keep_BxTxS is None
          and mask.kv_segment_ids_BxS is None)


def _splash_heads_split(heads: int, kv_heads: int, tp: int) -> bool:
  """sharded.splash_attention_sharded's head split: KV heads split like the query heads, or
  every shard's query heads inside one KV group."""
  local = heads // tp
  return heads % tp == 0 and (kv_heads % tp == 0 or (heads // kv_heads) % local == 0)


def attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxV, mask: Mask, *, scale: float,
              impl: str = "auto", rules: Rules | None = None):
  """Softmax attention of T queries over S keys (G KV heads serving H query heads).

  rules: the model's sharding rules (which mesh axes split the batch and the heads), needed
  to run splash per shard on a mesh; None: batch and heads are not split.
  """
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"model.attention_impl={impl!r}; use {', '.join(ATTENTION_IMPLS)}")
  platform, mesh = target()
  t_len, s_len = q_BxTxHxK.shape[1], k_BxSxGxK.shape[1]
  if impl == "auto":
    if platform == "tpu":
      impl = "splash"
    else:
      keep = attention_xla.attention_keep(mask, t_len, s_len)
      fused = (platform == "gpu" and mask.aligned_causal
               and attention_xla.cudnn_fits(q_BxTxHxK, keep))
      impl = "cudnn" if fused else "xla"
  if impl == "splash" and splash_expresses(mask, t_len, s_len):
    interpret = platform != "tpu"
    if mesh is None or rules is None:
      return splash_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxV, scale=scale,
                              causal=mask.causal, segment_ids_BxT=mask.segment_ids_BxT,
                              interpret=interpret)
    batch_axes, _, head_axes, _ = _split_axes(("batch", None, "act_heads", None),
                                              q_BxTxHxK.shape, rules, mesh)
    tp = math.prod(mesh.shape[a] for a in head_axes)
    if not _splash_heads_split(q_BxTxHxK.shape[2], k_BxSxGxK.shape[2], tp):
      head_axes = ()  # heads stay whole on every tensor shard (repeated work, still correct)
    return splash_attention_sharded(
        q_BxTxHxK, k_BxSxGxK, v_BxSxGxV, mesh=mesh, batch_axes=batch_axes,
        head_axis=head_axes or None, scale=scale, causal=mask.causal,
        segment_ids_BxT=mask.segment_ids_BxT, interpret=interpret)
  if impl == "splash":
    impl = "xla"  # a cache offset, explicit keep mask or S != T: splash cannot express it
  return attention_xla.dot_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxV, mask, scale=scale,
                                     implementation=impl)


def fused_causal(impl: str, dtype, head_width: int) -> bool:
  """Whether `attention(..., impl=impl)` runs causal self-attention (the training mask) of
  this dtype and head width through a fused kernel on the target, holding no (T, T) scores:
  splash on TPU, cuDNN's flash kernel on GPU."""
  platform, _ = target()
  if platform == "tpu":
    return impl in ("auto", "splash")
  return (platform == "gpu" and impl in ("auto", "cudnn")
          and attention_xla.cudnn_takes(dtype, head_width))


def decode_kernel(setting: str, attention: str, cache_dtype,
                  rules: Rules | None = None) -> str | None:
  """The one-token decode kernel decode.attention_kernel=`setting` runs on the target:
  "triton" (GPU), "mosaic" (TPU; interpreted on other platforms) or None (the XLA factor
  path).

  auto: the platform's kernel on GPU (16-bit caches) and TPU (16-bit and float32 caches), XLA
  elsewhere; pallas: the kernel always (Mosaic, interpreted, off GPU and TPU; a cache dtype
  the kernel does not take raises the kernel's own error). MHA/MQA/GQA/MLA have the Triton
  grouped kernel: auto takes it on GPU for MQA/GQA/MLA with a 16-bit cache, pallas for all
  four anywhere (interpreted off GPU); on TPU under auto they stay on XLA. On a mesh of
  several devices it runs per shard (`grouped_decode`), which needs `rules` (the model's
  sharding rules; None there: XLA), and MLA stays on XLA where the rules put its latent's
  features on a mesh axis of more than one device (`grouped_decode_shards`).
  """
  if setting not in DECODE_KERNELS:
    raise ValueError(f"decode.attention_kernel={setting!r}; use {', '.join(DECODE_KERNELS)}")
  if setting == "xla":
    return None
  if attention in GROUPED_ATTENTIONS:
    platform, mesh = target()
    if setting == "auto" and (platform != "gpu"
                              or jnp.dtype(cache_dtype) not in FAST_CACHE_DTYPES["gpu"]):
      return None
    if mesh is not None and not grouped_decode_shards(attention, rules, mesh):
      return None
    return "triton"
  if attention not in FACTOR_ATTENTIONS:
    return None
  platform, _ = target()
  if setting == "auto" and jnp.dtype(cache_dtype) not in FAST_CACHE_DTYPES.get(platform, ()):
    return None
  return "triton" if platform == "gpu" else "mosaic"


def grouped_decode_shards(attention: str, rules: Rules | None, mesh) -> bool:
  """Whether the grouped kernel can run per shard of `mesh` under `rules`, reading each
  shard's cache in place: always for MHA/MQA/GQA (KV heads the tensor size does not divide
  are replicated over it, as their cache is); for MLA only where the rules keep the latent's
  features whole (fsdp_tp puts `kv_lora` on tensor: every head needs the whole latent, so a
  shard could read its part only after gathering the layer's cache on every step)."""
  if rules is None:
    return False
  return attention != "mla" or all(mesh.shape.get(a, 1) == 1
                                   for a in rules.mesh_axes("kv_lora"))


def use_decode_kernel(setting: str, attention: str, t_len: int, cache_dtype,
                      rules: Rules | None = None) -> bool:
  """Whether decode.attention_kernel=`setting` runs a decode kernel for a step of t_len tokens
  (one-token steps only: prefill chunks and multi-token extends take the XLA paths)."""
  return t_len == 1 and decode_kernel(setting, attention, cache_dtype, rules) is not None


def decode_head_shards(rules: Rules | None, batch: int, heads: int) -> int:
  """Tensor shards the decode kernel splits the heads over on the current mesh (1: none)."""
  platform, mesh = target()
  del platform
  if mesh is None or rules is None:
    return 1
  _, head_axes, _ = _split_axes(("batch", "act_heads", None), (batch, heads, 1), rules, mesh)
  return math.prod(mesh.shape[a] for a in head_axes)


def decode_cache_layout(setting: str, cfg, cache_dtype, *, batch: int, rules: Rules | None):
  """The cache layout the decode kernel reads in place: a `FactorCacheLayout` when the Mosaic
  or the Triton kernel will decode (A factors transposed to (rows, S), rows padded per tensor
  shard; B factors flat), else None (the standard (layers, B, S, ...) entries of the XLA
  paths, and the caches of the grouped kernel, which reads them as they are)."""
  if cfg.attention not in FACTOR_ATTENTIONS or decode_kernel(setting, cfg.attention,
                                                             cache_dtype) is None:
    return None
  return FactorCacheLayout(heads=cfg.num_heads, head_dim=cfg.head_dim, k_rank=cfg.k_rank,
                           v_rank=cfg.v_rank,
                           shards=decode_head_shards(rules, batch, cfg.num_heads))


def tpa_decode(q_BxHxK, a_k, b_k, a_v, b_v, layer, pad_B, pos, *, kv_len: int,
               kernel: str, rules: Rules | None = None, **tuning):
  """One query per row against layer `layer` of a stacked TPA factor cache with `kernel`
  ("triton" or "mosaic", from `decode_kernel`; see tpa_decode_gpu.tpa_decode_attention and
  tpa_decode_tpu.tpa_decode_attention_tpu for the operands), interpreted off its platform, and
  under shard_map on a mesh (batch over the rules' batch axes, heads over the tensor axis)."""
  platform, mesh = target()
  if kernel == "triton":
    fn, interpret = tpa_decode_gpu.tpa_decode_attention, platform != "gpu"
  else:
    fn, interpret = tpa_decode_tpu.tpa_decode_attention_tpu, platform != "tpu"
  if mesh is None or rules is None:
    return fn(q_BxHxK, a_k, b_k, a_v, b_v, layer, pad_B, pos, kv_len=kv_len,
              interpret=interpret, **tuning)
  batch_axes, head_axes, _ = _split_axes(("batch", "act_heads", None), q_BxHxK.shape, rules,
                                         mesh)
  return tpa_decode_sharded(fn, mesh, batch_axes, head_axes or None, q_BxHxK, a_k, b_k, a_v,
                            b_v, layer, pad_B, pos, kv_len=kv_len, interpret=interpret,
                            **tuning)


def gemv_applies() -> bool:
  """Whether one-row products (a batch-1 decode step) run the GEMV kernel: on one GPU, not
  under a mesh of several devices (`layers.dense`, `layers.packed_partials`)."""
  return target() == ("gpu", None)


def _interpret(platform: str = "gpu") -> bool:
  """Whether a kernel written for `platform` runs in the Pallas interpreter here: off it."""
  return target()[0] != platform


def gemv(x_K, w, *, layout: str = "kn", **tuning):
  """fp32 x_K (K,) times w ((K, N) for layout "kn", (N, K) for "nk") by the Pallas GEMV kernel
  (`gemv_gpu.gemv`; interpreted off GPU): the one-row products of a batch-1 decode step.
  Differentiable: the backward pass is the two outer/inner products in XLA."""
  return _gemv(layout, _interpret(), tuple(sorted(tuning.items())), x_K, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _gemv(layout, interpret, tuning, x_K, w):
  return gemv_gpu.gemv(x_K, w, layout=layout, interpret=interpret, **dict(tuning))


def _gemv_fwd(layout, interpret, tuning, x_K, w):
  return _gemv(layout, interpret, tuning, x_K, w), (x_K, w)


def _gemv_bwd(layout, interpret, tuning, res, g_N):
  x_K, w = res
  w32 = w.astype(jnp.float32)
  dx_K = w32 @ g_N if layout == "kn" else g_N @ w32
  dw = jnp.outer(x_K.astype(jnp.float32), g_N) if layout == "kn" else jnp.outer(
      g_N, x_K.astype(jnp.float32))
  return dx_K.astype(x_K.dtype), dw.astype(w.dtype)


_gemv.defvjp(_gemv_fwd, _gemv_bwd)


def gemv_partials(x, w, *, layout: str = "kn", prologue: tuple | None = None,
                  tickets_for: int = 0):
  """`gemv` without the final sum over its K splits: fp32 (splits, N) partial sums (not
  differentiable), for a consumer that sums them itself (`tpa_step`, an XLA fusion), with
  an optional `prologue` computing x inside the kernel (`gemv_gpu.gemv`: the block's
  pre-norm, the MLP's silu(gate) * up). tickets_for=N: also return the tickets of a later
  `gemv_residual` with N outputs, written by this kernel (no memset before that one)."""
  zeros = gemv_gpu.ticket_slots(tickets_for) if tickets_for else 0
  return gemv_gpu.gemv(x, w, layout=layout, reduce=False, prologue=prologue, zeros=zeros,
                       interpret=_interpret())


def gemv_residual(x, w, r, *, layout: str = "kn", prologue: tuple | None = None,
                  tickets=None):
  """r + x times w (the product rounded to w's dtype; r's dtype) by the GEMV kernel, its K
  splits summed and added to the residual stream r inside the kernel (`gemv_gpu.gemv`'s
  residual epilogue), where XLA would run two kernels after it (the sum, then the add). Not
  differentiable; `prologue` as for `gemv_partials`, `tickets` from its tickets_for."""
  return gemv_gpu.gemv(x, w, layout=layout, prologue=prologue, residual=r, tickets=tickets,
                       interpret=_interpret())


def tpa_step(y_SxBxN, cos_BxTxF, sin_BxTxF, a_k, b_k, a_v, b_v, layer, pos, **kw):
  """`tpa_step_gpu.tpa_step` (interpreted off GPU): a one-token step's cache writes and the
  Triton decode kernel's query rows in one kernel, on one device."""
  return tpa_step_gpu.tpa_step(y_SxBxN, cos_BxTxF, sin_BxTxF, a_k, b_k, a_v, b_v, layer, pos,
                               interpret=_interpret(), **kw)


def tpa_decode_rows(q_hi, q_lo, a_k, b_k, a_v, b_v, layer, pad_B, pos, **kw):
  """`tpa_decode_gpu.tpa_decode_rows` (interpreted off GPU), on one device."""
  return tpa_decode_gpu.tpa_decode_rows(q_hi, q_lo, a_k, b_k, a_v, b_v, layer, pad_B, pos,
                                        interpret=_interpret(), **kw)


def merge_splits(m, l, acc, **kw):
  """`tpa_decode_gpu.merge_splits` (interpreted off GPU): the attention output from the
  decode kernel's unmerged splits (`tpa_decode_rows(..., merge=False)`)."""
  return tpa_decode_gpu.merge_splits(m, l, acc, interpret=_interpret(), **kw)


def tpa_contract(pairs, *, impl: str = "xla", rules: Rules | None = None):
  """[(A (B, T, H, R_i), B (B, T, R_i, d_h)), ...] -> [sum_r A B / R_i of shape (B, T, H, d_h),
  ...] in the factors' dtype, by the Pallas kernels or XLA's einsum (model.contract_impl;
  auto, which a GPU train step resolves by `train.step.settled`, is the einsum here).

  The kernels take pairs of one dtype; pairs with the same leading axes (TPA's q, k and v in
  training) share one launch. The einsum runs where the rules split anything but the batch on
  the current mesh, and for arrays too large for the kernels' int32 offsets.
  """
  if impl not in CONTRACT_IMPLS:
    raise ValueError(f"model.contract_impl={impl!r}; use {', '.join(CONTRACT_IMPLS)}")
  platform, mesh = target()
  dtype = jnp.dtype(pairs[0][0].dtype)
  one_dtype = all(a.dtype == dtype and b.dtype == dtype for a, b in pairs)
  fits = max(math.prod(a.shape[:-1]) * b.shape[-1]
             for a, b in pairs) <= tpa_contract_gpu.MAX_ELEMENTS
  kernel = impl == "pallas" and one_dtype and fits
  batch_axes = ()
  if kernel and mesh is not None and rules is not None:
    for a, b in pairs:
      a_axes = _split_axes(("batch", "length", "act_heads", None), a.shape, rules, mesh)
      b_axes = _split_axes(("batch", "length", None, None), b.shape, rules, mesh)
      if any(a_axes[1:]) or any(b_axes[1:]) or a_axes[0] != b_axes[0]:
        kernel = False
      batch_axes = a_axes[0]
  if not kernel:
    return [tpa_contract_gpu.contract_einsum(a, b) for a, b in pairs]
  interpret = platform != "gpu"
  groups: dict[tuple, list[int]] = {}  # leading axes -> pair indices, one launch each
  for i, (a, _) in enumerate(pairs):
    groups.setdefault(a.shape[:-2], []).append(i)
  outs = [None] * len(pairs)
  for idx in groups.values():
    group = [pairs[i] for i in idx]
    if batch_axes:
      got = tpa_contract_gpu.tpa_contract_sharded(group, mesh=mesh, batch_axes=batch_axes,
                                                  interpret=interpret)
    else:
      got = tpa_contract_gpu.tpa_contract(group, interpret=interpret)
    for i, o in zip(idx, got):
      outs[i] = o
  return outs


def lse_and_target(logits_BxCxV, targets_BxC, *, impl: str = "auto",
                   rules: Rules | None = None, grad: bool = False):
  """(logsumexp over V, the logit at each target id), both fp32 (B, C), of a chunk of logits
  (B, C, V) and its target ids (B, C); an id < 0 (an ignored token) reads the logit at 0.
  grad=True: also d nll / d logits = softmax - onehot(target) in the logits' dtype, zero
  rows for ignored tokens. impl (train.loss_impl): pallas, the kernel (`cross_entropy_gpu`:
  one read for the statistics, a second for the gradient; interpreted off GPU), per shard on
  a mesh; xla, XLA's reductions and elementwise pass; auto, the kernel on GPU. XLA's form
  runs wherever the rules split the vocabulary (a row's sum would need other shards), on a
  mesh without rules, and where the chunk exceeds the kernel's offsets.
  """
  if impl not in LOSS_IMPLS:
    raise ValueError(f"train.loss_impl={impl!r}; use {', '.join(LOSS_IMPLS)}")
  platform, mesh = target()
  kernel = impl == "pallas" or (impl == "auto" and platform == "gpu")
  axes = [(), (), ()]
  if kernel and mesh is not None:
    if rules is None:  # how the logits split over the mesh is unknown
      kernel = False
    else:
      axes = _split_axes(("batch", "length", "act_vocab"), logits_BxCxV.shape, rules, mesh)
      kernel = not axes[2]
  shards = math.prod(mesh.shape[a] for a in axes[0] + axes[1]) if mesh is not None else 1
  if kernel and logits_BxCxV.size // shards > cross_entropy_gpu.MAX_ELEMENTS:
    kernel = False
  if not kernel:
    return _lse_and_target_xla(logits_BxCxV, targets_BxC, grad)
  interpret = platform != "gpu"

  def local(x_BxCxV, t_BxC):
    b, c, v = x_BxCxV.shape
    outs = cross_entropy_gpu.lse_and_target(x_BxCxV.reshape(b * c, v), t_BxC.reshape(b * c),
                                            grad=grad, interpret=interpret)
    return tuple(o.reshape((b, c) + o.shape[1:]) for o in outs)

  if not any(axes[0] + axes[1]):
    return local(logits_BxCxV, targets_BxC)
  rows = P(axes[0] or None, axes[1] or None)
  out_specs = (rows, rows) + ((P(*rows, None),) if grad else ())
  return jax.shard_map(local, mesh=mesh, in_specs=(P(*rows, None), rows),
                       out_specs=out_specs, check_vma=False)(logits_BxCxV, targets_BxC)


def _gpu_kernel_plan(setting: str, impl: str, shape, names, rules: Rules | None,
                     max_elements: int, whole_last: bool = False):
  """Where an elementwise or row-wise GPU kernel runs (`swiglu`, `add_rms_norm`): None for
  XLA's form, else (interpret, mesh, spec, split of the last axis), the kernel per shard
  under shard_map with `spec` on a mesh (mesh and spec None without one). impl (the model
  setting `setting`): pallas, the kernel (interpreted off GPU); auto, the kernel on GPU;
  xla, None. XLA's form on a mesh without rules (the split is unknown), where whole_last
  and the rules split the last axis (a row would need other shards), and past the kernel's
  int32 offsets (max_elements per shard)."""
  if impl not in ("auto", "xla", "pallas"):
    raise ValueError(f"model.{setting}={impl!r}; use auto, xla or pallas")
  platform, mesh = target()
  if not (impl == "pallas" or (impl == "auto" and platform == "gpu")):
    return None
  if mesh is None:
    return (platform != "gpu", None, None, 1) if math.prod(shape) <= max_elements else None
  if rules is None:
    return None
  axes = _split_axes(names, shape, rules, mesh)
  split = lambda a: math.prod(mesh.shape[x] for x in a)  # noqa: E731
  if (whole_last and axes[-1]) or math.prod(shape) // split(
      [x for a in axes for x in a]) > max_elements:
    return None
  return platform != "gpu", mesh, P(*(a or None for a in axes)), split(axes[-1])


def swiglu(g, u, *, impl: str = "auto", rules: Rules | None = None):
  """silu(g) * u, differentiable. impl (model.swiglu_impl): xla, XLA's autodiff; pallas, the
  backward's dg and du from one pass of `swiglu_gpu` (interpreted off GPU), per shard on a
  mesh (any split: the op is elementwise); auto, pallas on GPU where the hidden width is a
  multiple of 8. XLA's form where the rules are unknown on a mesh and past the kernel's
  int32 offsets."""
  plan = _gpu_kernel_plan("swiglu_impl", impl, g.shape, ("batch", "length", "act_mlp"), rules,
                          swiglu_gpu.MAX_ELEMENTS)
  # auto: not where a shard's hidden width is not a multiple of 8 (T6-medium's 2730 unless
  # the MLP pads it, `swiglu_padding`): XLA pads such GEMM widths for cuBLAS and fuses the
  # padding into its own elementwise kernels, but would copy the operands unpadded for this
  # kernel and pad its outputs again (measured on an H200: t6-medium 5% slower).
  if plan is None or (impl == "auto" and (g.shape[-1] // plan[3]) % 8):
    return jax.nn.silu(g) * u
  return _swiglu(*plan[:3], g, u)


def swiglu_padding(width: int, *, impl: str = "auto") -> int:
  """Zero hidden units the MLP adds to its width `width` so that `swiglu` takes the kernel:
  up to a multiple of 8 where impl (model.swiglu_impl) picks it on this platform (auto: on
  GPU), else 0. XLA pads such GEMM widths itself anyway (for cuBLAS)."""
  kernel = impl == "pallas" or (impl == "auto" and target()[0] == "gpu")
  return -width % 8 if kernel else 0


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _swiglu(interpret, mesh, spec, g, u):
  return jax.nn.silu(g) * u


def _swiglu_fwd(interpret, mesh, spec, g, u):
  return _swiglu(interpret, mesh, spec, g, u), (g, u)


def _swiglu_bwd(interpret, mesh, spec, res, dh):
  fn = functools.partial(swiglu_gpu.swiglu_grad, interpret=interpret)
  return _per_shard(mesh, spec, 2, fn, dh, *res)


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def add_rms_norm(x_BxTxD, y_BxTxD, *, eps: float, impl: str = "auto",
                 rules: Rules | None = None):
  """(s = x + y in x's dtype, the parameter-free RMSNorm of s in y's dtype), differentiable:
  a block's residual add and the next sublayer's pre-norm. impl (model.norm_impl): xla, two
  XLA kernels each way; pallas, `add_norm_gpu`'s one pass each way (interpreted off GPU),
  per shard on a mesh; auto, pallas on GPU. XLA's form where the rules split d_model (a
  row's norm would need other shards), on a mesh without rules, and past the kernel's int32
  offsets."""
  plan = _add_norm_plan(x_BxTxD.shape, impl, rules)
  if plan is None:
    s = x_BxTxD + y_BxTxD.astype(x_BxTxD.dtype)
    s32 = s.astype(jnp.float32)
    n = s32 * jax.lax.rsqrt(jnp.mean(s32 * s32, axis=-1, keepdims=True) + eps)
    return s, n.astype(y_BxTxD.dtype)
  return _add_norm(eps, *plan[:3], x_BxTxD, y_BxTxD)


def add_rms_norm_takes_kernel(shape, *, impl: str = "auto", rules: Rules | None = None) -> bool:
  """Whether `add_rms_norm` of (B, T, D) arrays of `shape` runs the kernel here (else XLA's
  two kernels each way)."""
  return _add_norm_plan(shape, impl, rules) is not None


def _add_norm_plan(shape, impl, rules):
  return _gpu_kernel_plan("norm_impl", impl, shape, ("batch", "length", "act_embed"), rules,
                          add_norm_gpu.MAX_ELEMENTS, whole_last=True)


def _rows(fn, *arrays_BxTxD):
  """fn on the (B T, D) rows of (B, T, D) arrays, its outputs shaped back."""
  b, t, d = arrays_BxTxD[0].shape
  return tuple(o.reshape(b, t, d) for o in fn(*(a.reshape(b * t, d) for a in arrays_BxTxD)))


def _per_shard(mesh, spec, n_out, fn, *arrays):
  if spec is None:
    return fn(*arrays)
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * len(arrays),
                       out_specs=(spec,) * n_out, check_vma=False)(*arrays)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _add_norm(eps, interpret, mesh, spec, x_BxTxD, y_BxTxD):
  fwd = lambda x, y: _rows(functools.partial(add_norm_gpu.add_norm, eps=eps,
                                             interpret=interpret), x, y)
  return _per_shard(mesh, spec, 2, fwd, x_BxTxD, y_BxTxD)


def _add_norm_fwd(eps, interpret, mesh, spec, x_BxTxD, y_BxTxD):
  s, n = _add_norm(eps, interpret, mesh, spec, x_BxTxD, y_BxTxD)
  return (s, n), s


def _add_norm_bwd(eps, interpret, mesh, spec, s, cotangents):
  ds, dn = cotangents  # dn in n's dtype, which is y's: dy's
  bwd = lambda s, dn, ds: _rows(functools.partial(
      add_norm_gpu.add_norm_grad, y_dtype=dn.dtype, eps=eps, interpret=interpret), s, dn, ds)
  return _per_shard(mesh, spec, 2, bwd, s, dn, ds)


_add_norm.defvjp(_add_norm_fwd, _add_norm_bwd)


def unpack_factors(y_BxTxN, widths, rotate, cos_BxTxF, sin_BxTxF, rope_fn, *,
                   impl: str = "xla", rules: Rules | None = None):
  """The packed factor projection's output (B, T, N >= sum(widths)) split into pieces
  (B, T, w_i) in column order, piece i turned by rope_fn(x (B, T, chunks, 2F), cos, sin)
  where rotate[i]. Differentiable; with impl (model.contract_impl, resolved) pallas the
  backward assembles the (B, T, N) gradient in one pass (`tpa_unpack_gpu`, interpreted off
  GPU; per shard where the rules keep N whole), else XLA's concatenation."""
  # Only the resolved setting takes the kernel: `auto` left unresolved (prefill) is XLA's.
  plan = None if impl != "pallas" else _gpu_kernel_plan(
      "contract_impl", impl, y_BxTxN.shape, ("batch", "length", None), rules,
      tpa_unpack_gpu.MAX_ELEMENTS, whole_last=True)
  if plan is None:
    return _unpack_forward(tuple(widths), tuple(rotate), rope_fn, y_BxTxN, cos_BxTxF,
                           sin_BxTxF)
  return _unpack(tuple(widths), tuple(rotate), rope_fn, *plan[:3], y_BxTxN, cos_BxTxF,
                 sin_BxTxF)


def _unpack_forward(widths, rotate, rope_fn, y_BxTxN, cos_BxTxF, sin_BxTxF):
  pieces, offset = [], 0
  b, t, _ = y_BxTxN.shape
  two_f = 2 * cos_BxTxF.shape[-1]
  for w, turn in zip(widths, rotate):
    piece = y_BxTxN[..., offset:offset + w]
    if turn:
      piece = rope_fn(piece.reshape(b, t, w // two_f, two_f), cos_BxTxF,
                      sin_BxTxF).reshape(b, t, w)
    pieces.append(piece)
    offset += w
  return tuple(pieces)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4, 5))
def _unpack(widths, rotate, rope_fn, interpret, mesh, spec, y_BxTxN, cos_BxTxF, sin_BxTxF):
  return _unpack_forward(widths, rotate, rope_fn, y_BxTxN, cos_BxTxF, sin_BxTxF)


def _unpack_fwd(widths, rotate, rope_fn, interpret, mesh, spec, y_BxTxN, cos_BxTxF,
                sin_BxTxF):
  out = _unpack(widths, rotate, rope_fn, interpret, mesh, spec, y_BxTxN, cos_BxTxF,
                sin_BxTxF)
  return out, (cos_BxTxF, sin_BxTxF, y_BxTxN.shape[-1])


def _unpack_bwd(widths, rotate, rope_fn, interpret, mesh, spec, res, d_pieces):
  cos_BxTxF, sin_BxTxF, width = res

  def local(cos, sin, *pieces):
    b, t, f = cos.shape
    dy = tpa_unpack_gpu.packed_grad([p.reshape(b * t, -1) for p in pieces], rotate,
                                    cos.reshape(b * t, f), sin.reshape(b * t, f), width,
                                    interpret=interpret)
    return (dy.reshape(b, t, width),)

  (dy,) = _per_shard(mesh, spec, 1, local, cos_BxTxF, sin_BxTxF, *d_pieces)
  return dy, jnp.zeros_like(cos_BxTxF), jnp.zeros_like(sin_BxTxF)


_unpack.defvjp(_unpack_fwd, _unpack_bwd)


def _lse_and_target_xla(logits_BxCxV, targets_BxC, grad: bool):
  logits32 = logits_BxCxV.astype(jnp.float32)
  keep_BxC = targets_BxC >= 0
  safe_BxC = jnp.where(keep_BxC, targets_BxC, 0)
  lse_BxC = jax.nn.logsumexp(logits32, axis=-1)
  target_BxC = jnp.take_along_axis(logits32, safe_BxC[..., None], axis=-1)[..., 0]
  if not grad:
    return lse_BxC, target_BxC
  probs = jnp.exp(logits32 - lse_BxC[..., None])
  onehot = jax.nn.one_hot(safe_BxC, logits32.shape[-1], dtype=jnp.float32)
  dlogits = ((probs - onehot) * keep_BxC[..., None]).astype(logits_BxCxV.dtype)
  return lse_BxC, target_BxC, dlogits


def grouped_decode(queries, keys, layer, pad_B, pos, *, kv_len: int, scale: float,
                   values=None, value_key: int | None = None, rules: Rules | None = None,
                   cache_axes=None, **tuning):
  """One query per row and KV head group against layer `layer` of a stacked MHA/MQA/GQA or
  MLA cache (grouped_decode_gpu.grouped_decode_attention), interpreted off GPU.

  On a mesh (with `rules`) it runs per shard under shard_map, each shard's cache in place:
  the batch over the axes that split the cache's rows, the G KV heads over the axes that
  split them (the cache's own split), or else, where the KV heads stay whole (fewer than the
  tensor size, MQA's one), each group's J query heads over the query heads' tensor axes when
  they divide J, every shard reading the whole (replicated) K/V of its rows; otherwise the
  heads are whole on every shard (repeated work, still correct). cache_axes (needed with
  rules): the logical names of each cache operand (keys, then values), as the cache is
  sharded; their slot and feature axes must not be split (`grouped_decode_shards`).
  """
  platform, mesh = target()
  fn = functools.partial(grouped_decode_gpu.grouped_decode_attention,
                         interpret=platform != "gpu", **tuning)
  if mesh is None or rules is None:
    return fn(queries, keys, layer, pad_B, pos, kv_len=kv_len, scale=scale, values=values,
              value_key=value_key)
  caches = list(keys) + ([] if values is None else [values])
  if cache_axes is None or len(cache_axes) != len(caches):
    raise ValueError(f"grouped_decode on a mesh needs the logical axes of each of its "
                     f"{len(caches)} cache operands (cache_axes)")
  splits = [_split_axes(names, c.shape, rules, mesh) for c, names in zip(caches, cache_axes)]
  batch_axes, group_axes = splits[0][1], splits[0][3]
  for split, names in zip(splits, cache_axes):
    layers, rows, slots, kv_heads, features = split
    if (rows, kv_heads) != (batch_axes, group_axes) or layers or slots or features:
      raise ValueError(f"the grouped decode kernel reads caches split only by rows and KV "
                       f"heads, alike; {names} is split as {split} under "
                       f"mesh.rules={rules.name}; use decode.attention_kernel=xla")
  batch, groups, group = queries[0].shape[:3]
  head_axes = ()
  if not group_axes:
    _, q_head_axes, _ = _split_axes(("batch", "act_heads", None), (batch, groups * group, 1),
                                    rules, mesh)
    if group % math.prod(mesh.shape[a] for a in q_head_axes) == 0:
      head_axes = q_head_axes
  return grouped_decode_sharded(fn, mesh, batch_axes, group_axes, head_axes, queries, keys,
                                layer, pad_B, pos, kv_len=kv_len, scale=scale, values=values,
                                value_key=value_key)

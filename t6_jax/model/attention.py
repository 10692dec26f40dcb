"""The attention types behind one interface: TPA (T6), TPA-KVonly, MHA/MQA/GQA and MLA.

Every type splits its work into three steps so that training, prefill and cached decoding
share the same math:

  queries(x, rope)   -> what each query position contributes (type-specific pytree)
  entries(x, rope)   -> what each key position contributes: exactly what a decode cache stores
                        (TPA: A_k, RoPE-rotated B_k, A_v, B_v; MHA family: rotated K, V;
                        MLA: normalised latent and rotated shared rope key)
  attend(q, entries, mask) -> per-head outputs (B, T, H, Dv), then `out` projects to d_model.

`ENTRY_AXES` gives each entry's logical axis names so a cache shards like the activations.
Shapes in names: B batch, T query length, S key length, D d_model, H heads, G KV heads,
K head dim, Q/R ranks of the query/key-value factors, L latent.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from t6_jax.config import ModelConfig
from t6_jax.model.layers import (RMSNorm, apply_rope, fan_in_param, param, uniform_init,
                                 zeros_init)
from t6_jax.model.tpa_decode_kernel import query_for_kernel, tpa_decode_attention
from t6_jax.sharding import constrain


@dataclasses.dataclass(frozen=True)
class Mask:
  """Which keys each query may see.

  causal: key index s is hidden from query index t when s > t (queries and keys are the same
    positions, as in training and prefill).
  keep_BxTxS: an extra boolean mask ANDed in (documents of packed rows; valid cache slots).
  """

  causal: bool = True
  keep_BxTxS: jax.Array | None = None


jax.tree_util.register_dataclass(Mask, data_fields=["keep_BxTxS"], meta_fields=["causal"])


def segment_mask(segment_ids_BxT: jax.Array | None) -> Mask:
  if segment_ids_BxT is None:
    return Mask(causal=True)
  same_BxTxS = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
  return Mask(causal=True, keep_BxTxS=same_BxTxS)


def dot_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxV, mask: Mask, scale: float, impl: str):
  """Softmax attention through jax.nn.dot_product_attention (fused kernels where available).

  G may divide H (grouped queries: KV head j serves query heads j*H/G ... (j+1)*H/G - 1).
  A value width different from the key width (MLA) is zero-padded to share the kernel.
  """
  k_dim, v_dim = q_BxTxHxK.shape[-1], v_BxSxGxV.shape[-1]
  if v_dim < k_dim:
    v_BxSxGxV = jnp.pad(v_BxSxGxV, [(0, 0)] * 3 + [(0, k_dim - v_dim)])
  elif v_dim > k_dim:
    pad = [(0, 0)] * 3 + [(0, v_dim - k_dim)]
    q_BxTxHxK, k_BxSxGxK = jnp.pad(q_BxTxHxK, pad), jnp.pad(k_BxSxGxK, pad)
  keep = None if mask.keep_BxTxS is None else mask.keep_BxTxS[:, None, :, :]
  implementation = impl
  if impl == "auto":
    # jax's own default is the XLA path, which materialises (B, H, T, S) scores; on GPU the
    # cuDNN flash kernel avoids that for the shapes and dtypes it takes.
    fused_ok = (jax.default_backend() == "gpu" and keep is None
                and q_BxTxHxK.dtype in (jnp.bfloat16, jnp.float16)
                and q_BxTxHxK.shape[-1] <= 128 and q_BxTxHxK.shape[-1] % 8 == 0)
    implementation = "cudnn" if fused_ok else "xla"
  out = jax.nn.dot_product_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxV, mask=keep, scale=scale,
                                     is_causal=mask.causal, implementation=implementation)
  return out[..., :v_dim]


class Attention(nnx.Module):
  """Shared plumbing: the output projection and the full (training / prefill) call."""

  ENTRY_AXES: dict[str, tuple[str, ...]] = {}

  def __call__(self, x_BxTxD, rope, mask: Mask):
    q = self.queries(x_BxTxD, rope)
    return self.out(self.attend(q, self.entries(x_BxTxD, rope), mask))

  def out(self, y_BxTxHxV):
    y_BxTxHxV = constrain(y_BxTxHxV, ("batch", "length", "act_heads", None))
    return jnp.einsum("bthv,hvd->btd", y_BxTxHxV, self.c_proj[...].astype(self.dtype))

  def _proj(self, x, w, spec):
    return jnp.einsum(spec, x.astype(self.dtype), w[...].astype(self.dtype))


class TPA(Attention):
  """Tensor Product Attention (T6) and its K/V-only variant (`tpa_kvonly`).

  Q, K, V are contracted from contextual factors: Q[h] = (1/R_q) sum_r A_q[h, r] B_q[r],
  with RoPE applied to the rows of B_q and B_k before the contraction.
  """

  ENTRY_AXES = {
      "a_k": ("batch", "cache_length", "act_heads", "kv_rank"),
      "b_k": ("batch", "cache_length", "kv_rank", "head_dim"),
      "a_v": ("batch", "cache_length", "act_heads", "kv_rank"),
      "b_v": ("batch", "cache_length", "kv_rank", "head_dim"),
  }

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, h, k = cfg.d_model, cfg.num_heads, cfg.head_dim
    self.cfg = cfg
    self.dtype = jnp.dtype(cfg.dtype)
    self.factor_q = cfg.attention == "tpa"

    def a_factor(rank, rank_axis):  # Xavier on the (d, h, R) view
      bound = math.sqrt(6.0 / (rank * (h + d)))
      return param(rngs, uniform_init(bound), (d, h, rank), ("embed", "heads", rank_axis), cfg)

    def b_factor(rank, rank_axis):  # Xavier on the (d, R, d_h) view
      bound = math.sqrt(6.0 / (k * (rank + d)))
      return param(rngs, uniform_init(bound), (d, rank, k), ("embed", rank_axis, "head_dim"),
                   cfg)

    if self.factor_q:
      self.W_A_q = a_factor(cfg.q_rank, "q_rank")
      self.W_B_q = b_factor(cfg.q_rank, "q_rank")
    else:  # full query projection, Xavier-uniform on (d, h*d_h)
      self.c_q = param(rngs, uniform_init(math.sqrt(6.0 / (d + h * k))), (d, h, k),
                       ("embed", "heads", "head_dim"), cfg)
    self.W_A_k = a_factor(cfg.k_rank, "kv_rank")
    self.W_B_k = b_factor(cfg.k_rank, "kv_rank")
    self.W_A_v = a_factor(cfg.v_rank, "kv_rank")
    self.W_B_v = b_factor(cfg.v_rank, "kv_rank")
    self.c_proj = param(rngs, zeros_init, (h, k, d), ("heads", "head_dim", "embed"), cfg)
    self.subln = RMSNorm(k, 1e-5, "head_dim", cfg, rngs) if cfg.head_norm else None

  def queries(self, x_BxTxD, rope):
    if not self.factor_q:
      return {"q": apply_rope(self._proj(x_BxTxD, self.c_q, "btd,dhk->bthk"), *rope)}
    a_q_BxTxHxQ = self._proj(x_BxTxD, self.W_A_q, "btd,dhq->bthq")
    b_q_BxTxQxK = apply_rope(self._proj(x_BxTxD, self.W_B_q, "btd,dqk->btqk"), *rope)
    return {"a_q": a_q_BxTxHxQ, "b_q": b_q_BxTxQxK}

  def entries(self, x_BxTxD, rope):
    return {
        "a_k": self._proj(x_BxTxD, self.W_A_k, "btd,dhr->bthr"),
        "b_k": apply_rope(self._proj(x_BxTxD, self.W_B_k, "btd,drk->btrk"), *rope),
        "a_v": self._proj(x_BxTxD, self.W_A_v, "btd,dhr->bthr"),
        "b_v": self._proj(x_BxTxD, self.W_B_v, "btd,drk->btrk"),
    }

  def materialize_q(self, q):
    if "q" in q:
      return q["q"]
    return jnp.einsum("bthq,btqk->bthk", q["a_q"], q["b_q"]) / self.cfg.q_rank

  def materialize_kv(self, e):
    k_BxSxHxK = jnp.einsum("bshr,bsrk->bshk", e["a_k"], e["b_k"]) / self.cfg.k_rank
    v_BxSxHxK = jnp.einsum("bshr,bsrk->bshk", e["a_v"], e["b_v"]) / self.cfg.v_rank
    return k_BxSxHxK, v_BxSxHxK

  def attend(self, q, e, mask: Mask):
    q_BxTxHxK = constrain(self.materialize_q(q), ("batch", "length", "act_heads", None))
    k_BxSxHxK, v_BxSxHxK = self.materialize_kv(e)
    y_BxTxHxK = dot_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask,
                              1.0 / math.sqrt(self.cfg.head_dim), self.cfg.attention_impl)
    return self.head_norm(y_BxTxHxK)

  def head_norm(self, y_BxTxHxK):
    return y_BxTxHxK if self.subln is None else self.subln(y_BxTxHxK)

  def attend_factors(self, q, e, mask: Mask):
    """`attend` computed straight from the factors, never materialising K or V (decoding).

    The FlashTPA dataflow of REFERENCE.md section 1, for T queries against S cached keys:
      P[t,q,s,r]  = <B_q[t,q], B_k[s,r]>                    head-shared, reads B_k once
      logit[t,h,s] = sum_r A_k[s,h,r] sum_q A_q[t,h,q] P[t,q,s,r] / (sqrt(d_h) R_q R_k)
      out[t,h]    = sum_{s,u} (alpha[t,h,s] A_v[s,h,u]) B_v[s,u] / R_v
    FLOPs per cached key: R_q R_k d_h + h R_q R_k + h R_v d_h (vs 2 h d_h materialised).
    TPA-KVonly has a full query: its logits are sum_r A_k[s,h,r] <Q[t,h], B_k[s,r]>.
    """
    cfg = self.cfg
    f32 = jnp.float32
    a_k_BxSxHxR, b_k_BxSxRxK = e["a_k"], e["b_k"]
    # Everything stays in the cache's own (S, H) order: transposing A_k / A_v to (H, S) each
    # step would copy the biggest cache entries (measured 1.45x slower on an H200).
    if "q" in q:
      qb_BxTxSxHxR = jnp.einsum("bthk,bsrk->btshr", q["q"], b_k_BxSxRxK.astype(q["q"].dtype),
                                preferred_element_type=f32)
      logits_BxTxSxH = jnp.einsum("btshr,bshr->btsh", qb_BxTxSxHxR, a_k_BxSxHxR.astype(f32))
      scale = 1.0 / (math.sqrt(cfg.head_dim) * cfg.k_rank)
    else:
      # Head-shared P: one batched GEMM over the cached B_k rows (R_q x R_k per key).
      p_BxTxSxRxQ = jnp.einsum("bsrk,btqk->btsrq", b_k_BxSxRxK,
                               q["b_q"].astype(b_k_BxSxRxK.dtype), preferred_element_type=f32)
      logits_BxTxSxH = jnp.einsum("bshr,btsrq,bthq->btsh", a_k_BxSxHxR.astype(f32),
                                  p_BxTxSxRxQ, q["a_q"].astype(f32))
      scale = 1.0 / (math.sqrt(cfg.head_dim) * cfg.q_rank * cfg.k_rank)
    s_len, t_len = a_k_BxSxHxR.shape[1], logits_BxTxSxH.shape[1]
    keep_BxTxSx1 = jnp.ones((1, t_len, s_len, 1), bool)
    if mask.causal:
      keep_BxTxSx1 = jnp.tril(jnp.ones((t_len, s_len), bool))[None, :, :, None]
    if mask.keep_BxTxS is not None:
      keep_BxTxSx1 = keep_BxTxSx1 & mask.keep_BxTxS[..., None]
    logits_BxTxSxH = jnp.where(keep_BxTxSx1, logits_BxTxSxH * scale, -jnp.inf)
    probs_BxTxSxH = jax.nn.softmax(logits_BxTxSxH, axis=2)
    # out[h] = sum_u sum_s (alpha[h, s] A_v[s, h, u]) B_v[s, u]: one GEMM per value rank, each
    # contracting S in place (no (H, S, R) copy).
    y_BxTxHxK = 0.0
    for u in range(cfg.v_rank):
      w_BxTxSxH = (probs_BxTxSxH * e["a_v"][:, None, :, :, u].astype(f32)).astype(e["b_v"].dtype)
      y_BxTxHxK = y_BxTxHxK + jnp.einsum("btsh,bsk->bthk", w_BxTxSxH, e["b_v"][:, :, u, :],
                                         preferred_element_type=f32)
    y_BxTxHxK = y_BxTxHxK / cfg.v_rank
    return self.head_norm(y_BxTxHxK.astype(self.dtype))

  def attend_factors_kernel(self, q, cache, layer, pad_B, pos, kv_len: int):
    """`attend_factors` for one query token (T == 1) by the Pallas kernel, reading layer
    `layer` of the stacked cache {name: (layers, B, S, ...)} in place (tpa_decode_kernel)."""
    cfg = self.cfg
    q_BxHxK = query_for_kernel(q, cfg.q_rank, cfg.k_rank, cfg.head_dim)
    y_BxHxK = tpa_decode_attention(
        q_BxHxK, cache["a_k"], cache["b_k"], cache["a_v"], cache["b_v"], layer, pad_B, pos,
        kv_len=kv_len, interpret=jax.default_backend() != "gpu")
    return self.head_norm(y_BxHxK[:, None].astype(self.dtype))


class GQA(Attention):
  """Multi-head attention with G KV heads: MHA (G = H), GQA (G | H) and MQA (G = 1)."""

  ENTRY_AXES = {
      "k": ("batch", "cache_length", "act_kv_heads", "head_dim"),
      "v": ("batch", "cache_length", "act_kv_heads", "head_dim"),
  }

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, h, g, k = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim
    self.cfg = cfg
    self.dtype = jnp.dtype(cfg.dtype)
    self.c_q = fan_in_param(rngs, d, (d, h, k), ("embed", "heads", "head_dim"), cfg)
    self.c_k = fan_in_param(rngs, d, (d, g, k), ("embed", "kv_heads", "head_dim"), cfg)
    self.c_v = fan_in_param(rngs, d, (d, g, k), ("embed", "kv_heads", "head_dim"), cfg)
    self.c_proj = param(rngs, zeros_init, (h, k, d), ("heads", "head_dim", "embed"), cfg)

  def queries(self, x_BxTxD, rope):
    return apply_rope(self._proj(x_BxTxD, self.c_q, "btd,dhk->bthk"), *rope)

  def entries(self, x_BxTxD, rope):
    return {"k": apply_rope(self._proj(x_BxTxD, self.c_k, "btd,dgk->btgk"), *rope),
            "v": self._proj(x_BxTxD, self.c_v, "btd,dgk->btgk")}

  def attend(self, q_BxTxHxK, e, mask: Mask):
    q_BxTxHxK = constrain(q_BxTxHxK, ("batch", "length", "act_heads", None))
    return dot_attention(q_BxTxHxK, e["k"], e["v"], mask, 1.0 / math.sqrt(self.cfg.head_dim),
                         self.cfg.attention_impl)


class MLA(Attention):
  """Multi-head latent attention (DeepSeek-V2 style, REFERENCE.md section 3)."""

  ENTRY_AXES = {
      "latent": ("batch", "cache_length", "kv_lora"),
      "k_pe": ("batch", "cache_length", "head_dim"),
  }

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, h = cfg.d_model, cfg.num_heads
    n, r, v = cfg.mla_nope_dim, cfg.mla_rope_dim, cfg.mla_v_dim
    ql, kl = cfg.mla_q_lora, cfg.mla_kv_lora
    self.cfg = cfg
    self.dtype = jnp.dtype(cfg.dtype)
    self.q_a = fan_in_param(rngs, d, (d, ql), ("embed", "q_lora"), cfg)
    self.q_a_norm = RMSNorm(ql, 1e-6, "q_lora", cfg, rngs)
    # q_b (and kv_a, kv_b) of the reference are stored split by role, same numbers.
    self.q_b_nope = fan_in_param(rngs, ql, (ql, h, n), ("q_lora", "heads", "head_dim"), cfg)
    self.q_b_rope = fan_in_param(rngs, ql, (ql, h, r), ("q_lora", "heads", "head_dim"), cfg)
    self.kv_a_latent = fan_in_param(rngs, d, (d, kl), ("embed", "kv_lora"), cfg)
    self.kv_a_rope = fan_in_param(rngs, d, (d, r), ("embed", "head_dim"), cfg)
    self.kv_a_norm = RMSNorm(kl, 1e-6, "kv_lora", cfg, rngs)
    self.kv_b_nope = fan_in_param(rngs, kl, (kl, h, n), ("kv_lora", "heads", "head_dim"), cfg)
    self.kv_b_v = fan_in_param(rngs, kl, (kl, h, v), ("kv_lora", "heads", "head_dim"), cfg)
    self.c_proj = param(rngs, zeros_init, (h, v, d), ("heads", "head_dim", "embed"), cfg)

  def queries(self, x_BxTxD, rope):
    c_BxTxQl = self.q_a_norm(self._proj(x_BxTxD, self.q_a, "btd,dl->btl"))
    q_nope_BxTxHxN = self._proj(c_BxTxQl, self.q_b_nope, "btl,lhn->bthn")
    q_pe_BxTxHxR = apply_rope(self._proj(c_BxTxQl, self.q_b_rope, "btl,lhr->bthr"), *rope)
    return jnp.concatenate([q_nope_BxTxHxN, q_pe_BxTxHxR], axis=-1)

  def entries(self, x_BxTxD, rope):
    return {"latent": self.kv_a_norm(self._proj(x_BxTxD, self.kv_a_latent, "btd,dl->btl")),
            "k_pe": apply_rope(self._proj(x_BxTxD, self.kv_a_rope, "btd,dr->btr"), *rope)}

  def attend(self, q_BxTxHxE, e, mask: Mask):
    k_nope_BxSxHxN = self._proj(e["latent"], self.kv_b_nope, "bsl,lhn->bshn")
    v_BxSxHxV = self._proj(e["latent"], self.kv_b_v, "bsl,lhv->bshv")
    k_pe_BxSxHxR = jnp.broadcast_to(e["k_pe"][:, :, None, :].astype(k_nope_BxSxHxN.dtype),
                                    k_nope_BxSxHxN.shape[:3] + e["k_pe"].shape[-1:])
    k_BxSxHxE = jnp.concatenate([k_nope_BxSxHxN, k_pe_BxSxHxR], axis=-1)
    q_BxTxHxE = constrain(q_BxTxHxE, ("batch", "length", "act_heads", None))
    scale = 1.0 / math.sqrt(self.cfg.mla_nope_dim + self.cfg.mla_rope_dim)
    return dot_attention(q_BxTxHxE, k_BxSxHxE, v_BxSxHxV, mask, scale, self.cfg.attention_impl)

  def attend_factors(self, q_BxTxHxE, e, mask: Mask):
    """`attend` in the latent space (decoding): kv_b is absorbed into the query and the output
    instead of expanding every cached latent to per-head K/V each step.

      logit[t,h,s] = <q_nope[t,h] kv_b_nope[:,h]^T, latent[s]> + <q_pe[t,h], k_pe[s]>
      out[t,h]     = (sum_s alpha[t,h,s] latent[s]) kv_b_v[:,h]
    FLOPs per cached key: h (kv_lora + d_r) + h kv_lora (vs h kv_lora (d_n + d_v) expanding).
    """
    cfg, f32 = self.cfg, jnp.float32
    n = cfg.mla_nope_dim
    q_nope_BxTxHxN, q_pe_BxTxHxR = q_BxTxHxE[..., :n], q_BxTxHxE[..., n:]
    q_lat_BxTxHxL = self._proj(q_nope_BxTxHxN, self.kv_b_nope, "bthn,lhn->bthl")
    logits_BxTxHxS = (
        jnp.einsum("bthl,bsl->bths", q_lat_BxTxHxL, e["latent"].astype(self.dtype),
                   preferred_element_type=f32)
        + jnp.einsum("bthr,bsr->bths", q_pe_BxTxHxR, e["k_pe"].astype(self.dtype),
                     preferred_element_type=f32)) / math.sqrt(n + cfg.mla_rope_dim)
    s_len, t_len = e["latent"].shape[1], q_BxTxHxE.shape[1]
    keep_BxTx1xS = jnp.ones((1, t_len, 1, s_len), bool)
    if mask.causal:
      keep_BxTx1xS = jnp.tril(jnp.ones((t_len, s_len), bool))[None, :, None, :]
    if mask.keep_BxTxS is not None:
      keep_BxTx1xS = keep_BxTx1xS & mask.keep_BxTxS[:, :, None, :]
    probs_BxTxHxS = jax.nn.softmax(jnp.where(keep_BxTx1xS, logits_BxTxHxS, -jnp.inf), axis=-1)
    ctx_BxTxHxL = jnp.einsum("bths,bsl->bthl", probs_BxTxHxS.astype(self.dtype),
                             e["latent"].astype(self.dtype), preferred_element_type=f32)
    return self._proj(ctx_BxTxHxL, self.kv_b_v, "bthl,lhv->bthv")


def make_attention(cfg: ModelConfig, rngs: nnx.Rngs) -> Attention:
  if cfg.attention in ("tpa", "tpa_kvonly"):
    return TPA(cfg, rngs)
  if cfg.attention in ("mha", "mqa", "gqa"):
    return GQA(cfg, rngs)
  if cfg.attention == "mla":
    return MLA(cfg, rngs)
  raise ValueError(f"unknown attention type {cfg.attention!r}")

"""An independent float64 NumPy forward of the reference model, for every attention type.

Written from docs/model.md sections 1-5 and the state-dict layout of section 7 only: it takes
the reference's PyTorch state dict (numpy arrays keyed by the reference names, nn.Linear
weights stored (out, in)) plus the few dimensions the shapes do not say, and never imports
t6_jax. Tests compare the JAX model (after conversion) against it.

`Dims` names the attention type and its sizes; `random_state_dict` builds a random reference
checkpoint with non-zero output projections and learned norm weights != 1, so a comparison
exercises every weight.
"""

from __future__ import annotations

import dataclasses

import numpy as np

F32_EPS = float(np.finfo(np.float32).eps)  # torch's rms_norm default eps for fp32 inputs


@dataclasses.dataclass(frozen=True)
class Dims:
  attention: str  # tpa | tpa_kvonly | mha | mqa | gqa | mla
  vocab: int = 64
  layers: int = 2
  d: int = 32
  heads: int = 4
  head_dim: int = 6  # d_h (tpa, tpa_kvonly, gqa, mqa); mha uses d / heads; mla: d_n
  q_rank: int = 3
  k_rank: int = 2
  v_rank: int = 2
  kv_heads: int = 2  # gqa (mqa: 1, mha: heads)
  q_lora: int = 24
  kv_lora: int = 16
  rope_dim: int = 4  # mla d_r
  v_dim: int = 10  # mla d_v
  head_norm: bool = False  # tpa/tpa_kvonly: per-head RMSNorm (subln)
  mlp_hidden: int = 0  # 0: floor(8 d / 3)

  @property
  def hidden(self) -> int:
    return self.mlp_hidden or (8 * self.d) // 3

  @property
  def dh(self) -> int:
    return self.d // self.heads if self.attention == "mha" else self.head_dim

  @property
  def g(self) -> int:
    return {"mha": self.heads, "mqa": 1}.get(self.attention, self.kv_heads)


# --------------------------------------------------------------------------------------------
# Building blocks


def bf16_round(x32: np.ndarray) -> np.ndarray:
  """float32 -> nearest bfloat16 (ties to even), returned as float32 values."""
  bits = np.ascontiguousarray(x32, dtype=np.float32).view(np.uint32).astype(np.uint64)
  bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
  return bits.astype(np.uint32).view(np.float32)


def rope_tables(positions: np.ndarray, dim: int, bf16: bool, base: float = 10000.0):
  """cos/sin (T, dim/2) as torch builds them in fp32: inv_freq and angles in fp32."""
  expo = (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)).astype(np.float32)
  inv_freq = (1.0 / (base ** expo.astype(np.float64)).astype(np.float32)).astype(np.float32)
  angle = (positions.astype(np.float32)[:, None] * inv_freq[None, :]).astype(np.float32)
  cos = np.cos(angle.astype(np.float64)).astype(np.float32)
  sin = np.sin(angle.astype(np.float64)).astype(np.float32)
  if bf16:
    cos, sin = bf16_round(cos), bf16_round(sin)
  return cos.astype(np.float64), sin.astype(np.float64)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
  """Half-split RoPE over the last axis of x (T, ..., dim); tables (T, dim/2)."""
  shape = (cos.shape[0],) + (1,) * (x.ndim - 2) + (cos.shape[1],)
  cos, sin = cos.reshape(shape), sin.reshape(shape)
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], axis=-1)


def rms_norm(x: np.ndarray, eps: float = F32_EPS, weight: np.ndarray | None = None):
  y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
  return y if weight is None else y * weight


def linear(x: np.ndarray, w_out_in: np.ndarray) -> np.ndarray:
  return x @ w_out_in.T


def causal_attention(q_THK, k_SHK, v_SHV, scale: float) -> np.ndarray:
  """Softmax attention per head with a causal mask; returns (T, H, V)."""
  scores_HTS = np.einsum("thk,shk->hts", q_THK, k_SHK) * scale
  t = q_THK.shape[0]
  scores_HTS = np.where(np.tril(np.ones((t, t), bool))[None], scores_HTS, -np.inf)
  scores_HTS = scores_HTS - scores_HTS.max(-1, keepdims=True)
  p_HTS = np.exp(scores_HTS)
  p_HTS /= p_HTS.sum(-1, keepdims=True)
  return np.einsum("hts,shv->thv", p_HTS, v_SHV)


def factor_decode_attention(a_q, b_q, q_full, cache, layer: int, pad, pos: int,
                            head_dim: int) -> np.ndarray:
  """One query per row against layer `layer` of a stacked TPA factor cache, from the factors
  (docs/model.md section 3), in float64: logits sum_r A_k[s,h,r] <Q[h], B_k[s,r]> with
  Q[h] = sum_q A_q[h,q] B_q[q] / R_q (TPA; through P = B_q B_k^T) or the full query q_full
  (TPA-KVonly), scaled by 1 / (sqrt(d_h) R_k); row b sees slots pad[b] .. pos and always pos;
  out[h] = sum_{s,u} alpha[h,s] A_v[s,h,u] B_v[s,u] / R_v. Returns (B, H, d_h)."""
  a_k, b_k, a_v, b_v = (np.asarray(np.asarray(x, np.float32), np.float64)[layer]
                        for x in cache)
  k_rank, v_rank = b_k.shape[2], b_v.shape[2]
  if q_full is None:
    p = np.einsum("bsrk,bqk->bsqr", b_k, b_q)
    logits = np.einsum("bshr,bhq,bsqr->bhs", a_k, a_q, p) / (
        np.sqrt(head_dim) * a_q.shape[2] * k_rank)
  else:
    logits = np.einsum("bshr,bhk,bsrk->bhs", a_k, q_full, b_k) / (np.sqrt(head_dim) * k_rank)
  s = np.arange(a_k.shape[1])
  keep = ((s[None] >= pad[:, None]) & (s[None] <= pos)) | (s[None] == pos)
  logits = np.where(keep[:, None], logits, -np.inf)
  alpha = np.exp(logits - logits.max(-1, keepdims=True))
  alpha /= alpha.sum(-1, keepdims=True)
  return np.einsum("bhs,bshu,bsuk->bhk", alpha, a_v, b_v) / v_rank


def tpa_contract(a_NxHxR, b_NxRxK, dout_NxHxK=None):
  """TPA's per-token factor contraction (docs/model.md section 3) in float64 over any leading
  axes N: out[n,h,k] = sum_r A[n,h,r] B[n,r,k] / R; with the output gradient dout, also
  (dA, dB): dA[n,h,r] = sum_k dout[n,h,k] B[n,r,k] / R, dB[n,r,k] = sum_h dout[n,h,k]
  A[n,h,r] / R."""
  a, b = (np.asarray(np.asarray(x, np.float32), np.float64) for x in (a_NxHxR, b_NxRxK))
  rank = a.shape[-1]
  out = np.einsum("...hr,...rk->...hk", a, b) / rank
  if dout_NxHxK is None:
    return out
  dout = np.asarray(np.asarray(dout_NxHxK, np.float32), np.float64)
  return (out, np.einsum("...hk,...rk->...hr", dout, b) / rank,
          np.einsum("...hk,...hr->...rk", dout, a) / rank)


# --------------------------------------------------------------------------------------------
# Attention types (one sequence: x is (T, d))


def tpa_attention(sd, pre, x, dims: Dims, cos, sin):
  t, h, k = x.shape[0], dims.heads, dims.head_dim

  def factors(name, rank):
    a_THR = linear(x, sd[f"{pre}c_qkv.W_A_{name}.weight"]).reshape(t, h, rank)  # head-major
    b_TRK = linear(x, sd[f"{pre}c_qkv.W_B_{name}.weight"]).reshape(t, rank, k)  # rank-major
    return a_THR, b_TRK

  if dims.attention == "tpa":
    a_q, b_q = factors("q", dims.q_rank)
    q = np.einsum("thr,trk->thk", a_q, rope(b_q, cos, sin)) / dims.q_rank
  else:  # tpa_kvonly: full query projection, RoPE on q
    q = rope(linear(x, sd[f"{pre}c_qkv.c_q.weight"]).reshape(t, h, k), cos, sin)
  a_k, b_k = factors("k", dims.k_rank)
  a_v, b_v = factors("v", dims.v_rank)
  key = np.einsum("thr,trk->thk", a_k, rope(b_k, cos, sin)) / dims.k_rank
  val = np.einsum("thr,trk->thk", a_v, b_v) / dims.v_rank
  y = causal_attention(q, key, val, 1.0 / np.sqrt(k))
  if dims.head_norm:
    y = rms_norm(y, 1e-5, sd[f"{pre}subln.weight"])
  return linear(y.reshape(t, h * k), sd[f"{pre}c_proj.weight"])


def gqa_attention(sd, pre, x, dims: Dims, cos, sin):
  t, h, g, k = x.shape[0], dims.heads, dims.g, dims.dh
  q = rope(linear(x, sd[f"{pre}c_q.weight"]).reshape(t, h, k), cos, sin)
  key = rope(linear(x, sd[f"{pre}c_k.weight"]).reshape(t, g, k), cos, sin)
  val = linear(x, sd[f"{pre}c_v.weight"]).reshape(t, g, k)
  group = h // g  # KV head j serves query heads j*group ... (j+1)*group - 1
  key, val = np.repeat(key, group, axis=1), np.repeat(val, group, axis=1)
  y = causal_attention(q, key, val, 1.0 / np.sqrt(k))
  return linear(y.reshape(t, h * k), sd[f"{pre}c_proj.weight"])


def mla_attention(sd, pre, x, dims: Dims, cos, sin):
  t, h = x.shape[0], dims.heads
  n, r, v, kl = dims.head_dim, dims.rope_dim, dims.v_dim, dims.kv_lora
  c_q = rms_norm(linear(x, sd[f"{pre}q_a_proj.weight"]), 1e-6, sd[f"{pre}q_a_layernorm.weight"])
  q = linear(c_q, sd[f"{pre}q_b_proj.weight"]).reshape(t, h, n + r)
  q = np.concatenate([q[..., :n], rope(q[..., n:], cos, sin)], axis=-1)
  c_kv = linear(x, sd[f"{pre}kv_a_proj_with_mqa.weight"])
  latent, k_pe = c_kv[:, :kl], rope(c_kv[:, kl:], cos, sin)
  kv = linear(rms_norm(latent, 1e-6, sd[f"{pre}kv_a_layernorm.weight"]),
              sd[f"{pre}kv_b_proj.weight"]).reshape(t, h, n + v)
  key = np.concatenate([kv[..., :n], np.broadcast_to(k_pe[:, None, :], (t, h, r))], axis=-1)
  y = causal_attention(q, key, kv[..., n:], 1.0 / np.sqrt(n + r))
  return linear(y.reshape(t, h * v), sd[f"{pre}c_proj.weight"])


ATTENTION = {"tpa": tpa_attention, "tpa_kvonly": tpa_attention, "mha": gqa_attention,
             "mqa": gqa_attention, "gqa": gqa_attention, "mla": mla_attention}


def forward(sd: dict, tokens_BxT: np.ndarray, dims: Dims, bf16_rope: bool = True,
            positions_BxT: np.ndarray | None = None) -> np.ndarray:
  """Logits (B, T, V) in float64 of the reference model with state dict `sd`."""
  sd = {key: np.asarray(value, np.float64) for key, value in sd.items()}
  wte = sd["transformer.wte.weight"]
  rope_dim = dims.rope_dim if dims.attention == "mla" else dims.dh
  out = []
  for row, tokens in enumerate(np.asarray(tokens_BxT)):
    positions = (np.arange(len(tokens)) if positions_BxT is None
                 else np.asarray(positions_BxT)[row])
    cos, sin = rope_tables(positions, rope_dim, bf16_rope)
    x = wte[tokens]
    for i in range(dims.layers):
      pre = f"transformer.h.{i}."
      x = x + ATTENTION[dims.attention](sd, pre + "attn.", rms_norm(x), dims, cos, sin)
      hn = rms_norm(x)
      a = linear(hn, sd[pre + "mlp.c_fc1.weight"])
      silu = a / (1.0 + np.exp(-a))
      x = x + linear(silu * linear(hn, sd[pre + "mlp.c_fc2.weight"]), sd[pre + "mlp.c_proj.weight"])
    out.append(rms_norm(x) @ wte.T)
  return np.stack(out)


# --------------------------------------------------------------------------------------------
# Random reference checkpoints


def state_dict_shapes(dims: Dims) -> dict[str, tuple[int, ...]]:
  """Every key of the reference state dict with its (out, in) shape (docs/model.md section 7)."""
  d, h, k = dims.d, dims.heads, dims.dh
  shapes = {"transformer.wte.weight": (dims.vocab, d)}
  for i in range(dims.layers):
    a = f"transformer.h.{i}.attn."
    if dims.attention in ("tpa", "tpa_kvonly"):
      if dims.attention == "tpa":
        shapes[a + "c_qkv.W_A_q.weight"] = (h * dims.q_rank, d)
        shapes[a + "c_qkv.W_B_q.weight"] = (dims.q_rank * k, d)
      else:
        shapes[a + "c_qkv.c_q.weight"] = (h * k, d)
      for name, rank in (("k", dims.k_rank), ("v", dims.v_rank)):
        shapes[a + f"c_qkv.W_A_{name}.weight"] = (h * rank, d)
        shapes[a + f"c_qkv.W_B_{name}.weight"] = (rank * k, d)
      shapes[a + "c_proj.weight"] = (d, h * k)
      if dims.head_norm:
        shapes[a + "subln.weight"] = (k,)
    elif dims.attention in ("mha", "mqa", "gqa"):
      shapes[a + "c_q.weight"] = (h * k, d)
      shapes[a + "c_k.weight"] = (dims.g * k, d)
      shapes[a + "c_v.weight"] = (dims.g * k, d)
      shapes[a + "c_proj.weight"] = (d, h * k)
    else:
      n, r, v = dims.head_dim, dims.rope_dim, dims.v_dim
      shapes[a + "q_a_proj.weight"] = (dims.q_lora, d)
      shapes[a + "q_a_layernorm.weight"] = (dims.q_lora,)
      shapes[a + "q_b_proj.weight"] = (h * (n + r), dims.q_lora)
      shapes[a + "kv_a_proj_with_mqa.weight"] = (dims.kv_lora + r, d)
      shapes[a + "kv_a_layernorm.weight"] = (dims.kv_lora,)
      shapes[a + "kv_b_proj.weight"] = (h * (n + v), dims.kv_lora)
      shapes[a + "c_proj.weight"] = (d, h * v)
    m = f"transformer.h.{i}.mlp."
    shapes[m + "c_fc1.weight"] = (dims.hidden, d)
    shapes[m + "c_fc2.weight"] = (dims.hidden, d)
    shapes[m + "c_proj.weight"] = (d, dims.hidden)
  return shapes


def random_state_dict(dims: Dims, seed: int = 0) -> dict[str, np.ndarray]:
  """fp32 weights, uniform +-sqrt(3/fan_in) (unit-variance outputs) so attention is not flat;
  norm weights 1 + noise, output projections non-zero."""
  rng = np.random.default_rng(seed)
  sd = {}
  for key, shape in state_dict_shapes(dims).items():
    if len(shape) == 1:  # learned norm weights
      w = 1.0 + 0.3 * rng.standard_normal(shape)
    else:
      w = rng.uniform(-1, 1, shape) * np.sqrt(3.0 / shape[1])
      if key.endswith("c_proj.weight"):
        w *= 0.5  # keep the residual stream from growing too fast over the layers
    sd[key] = w.astype(np.float32)
  return sd

"""Training FLOPs per token for each attention type, device peaks and MFU.

Counted: every matmul of the forward pass at 2 FLOPs per multiply-add, times 3 for training
(forward + backward through activations + backward through weights). Elementwise work (norms,
RoPE, softmax, SiLU) and remat recomputation are not counted, as is usual for MFU. Attention
scores count the full T x T square (no causal halving), as the reference's 12*L*h*d_h*T does.

Per token and layer, forward (d model width, h heads, d_h head dim, T sequence length,
F MLP hidden, V vocab):
  tpa:        2*d*(R_q+R_k+R_v)*(h+d_h)          six factor projections
            + 2*h*d_h*(R_q+R_k+R_v)              contraction of A and B into Q, K, V
            + 4*h*d_h*T                          Q K^T and P V at the real head count
            + 2*h*d_h*d                          output projection
  tpa_kvonly: 2*d*h*d_h + 2*d*(R_k+R_v)*(h+d_h) + 2*h*d_h*(R_k+R_v) + 4*h*d_h*T + 2*h*d_h*d
  mha/gqa/mqa: 2*d*h*d_h + 4*d*g*d_h + 4*h*d_h*T + 2*h*d_h*d        (g KV heads)
  mla:        2*d*q_lora + 2*q_lora*h*(n+r) + 2*d*(kv_lora+r) + 2*kv_lora*h*(n+v)
            + 2*h*(n+r)*T + 2*h*v*T + 2*h*v*d
  every block: MLP 6*d*F.    Once per token: LM head 2*d*V (the embedding lookup is free).
Training FLOPs per token = 3 * (L * per_layer + 2*d*V).
"""

from __future__ import annotations

from t6_jax.config import ModelConfig
from t6_jax.model.sizes import param_count

# Dense bf16 peak FLOP/s per device (without sparsity), matched against device_kind.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,  # v5p reports itself as "TPU v5"
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
}

# High-bandwidth memory per device in bytes.
HBM_BYTES = {
    "H200": 141e9,
    "H100": 80e9,
    "A100": 80e9,
    "TPU v4": 32 * 2**30,
    "TPU v5 lite": 16 * 2**30,
    "TPU v5e": 16 * 2**30,
    "TPU v5p": 95 * 2**30,
    "TPU v5": 95 * 2**30,
    "TPU v6 lite": 32 * 2**30,
    "TPU v6e": 32 * 2**30,
}


def _lookup(table: dict, device_kind: str):
  """Longest key contained in device_kind ('TPU v5 lite' wins over 'TPU v5')."""
  hits = [k for k in table if k.lower() in device_kind.lower()]
  return table[max(hits, key=len)] if hits else None


def peak_flops(device_kind: str) -> float | None:
  """bf16 peak FLOP/s of one device, or None where unknown (CPU: report TFLOP/s only)."""
  return _lookup(PEAK_FLOPS, device_kind)


def hbm_bytes(device_kind: str) -> float | None:
  return _lookup(HBM_BYTES, device_kind)


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
  """Forward FLOPs of one layer's attention for one token (projections included)."""
  d, h, k, t = cfg.d_model, cfg.num_heads, cfg.head_dim, seq_len
  if cfg.attention == "tpa":
    ranks = cfg.q_rank + cfg.k_rank + cfg.v_rank
    return 2 * d * ranks * (h + k) + 2 * h * k * ranks + 4 * h * k * t + 2 * h * k * d
  if cfg.attention == "tpa_kvonly":
    ranks = cfg.k_rank + cfg.v_rank
    return (2 * d * h * k + 2 * d * ranks * (h + k) + 2 * h * k * ranks + 4 * h * k * t
            + 2 * h * k * d)
  if cfg.attention in ("mha", "mqa", "gqa"):
    g = cfg.kv_heads
    return 2 * d * h * k + 4 * d * g * k + 4 * h * k * t + 2 * h * k * d
  if cfg.attention == "mla":
    ql, kl = cfg.mla_q_lora, cfg.mla_kv_lora
    n, r, v = cfg.mla_nope_dim, cfg.mla_rope_dim, cfg.mla_v_dim
    return (2 * d * ql + 2 * ql * h * (n + r) + 2 * d * (kl + r) + 2 * kl * h * (n + v)
            + 2 * h * (n + r) * t + 2 * h * v * t + 2 * h * v * d)
  raise ValueError(f"no FLOP count for attention type {cfg.attention!r}")


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
  per_layer = attention_flops_per_token(cfg, seq_len) + 6 * cfg.d_model * cfg.mlp_dim
  return cfg.num_layers * per_layer + 2 * cfg.d_model * cfg.vocab_size


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
  """Model FLOPs of one training token (forward + backward), counted for the attention type."""
  return 3 * forward_flops_per_token(cfg, seq_len)


def reference_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
  """The reference's formula 6*N + 12*L*h*d_h*T (N all parameters, tied embedding once)."""
  return (6 * param_count(cfg) +
          12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len)


def mfu(flops_per_token: float, tokens_per_s: float, num_devices: int,
        device_kind: str) -> float | None:
  peak = peak_flops(device_kind)
  if peak is None:
    return None
  return flops_per_token * tokens_per_s / (num_devices * peak)

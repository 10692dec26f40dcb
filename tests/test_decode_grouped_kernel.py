"""The grouped decode kernel for MHA/MQA/GQA/MLA (Pallas Triton, interpret mode on CPU) against
float64 NumPy, and wired into generation: greedy tokens with decode.attention_kernel=pallas
equal the XLA path and the argmax of the teacher-forced forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t6_jax import config as config_lib
from t6_jax import kernels
from t6_jax.decode import generate
from t6_jax.kernels.grouped_decode_gpu import grouped_decode_attention
from t6_jax.model import init_params, model_from_params

PROMPTS = [[3, 17, 250, 9, 41], [7, 7, 100, 2, 64, 33, 201, 5], [99], [1, 2, 3]]
NEW = 5
MAX_LEN = 20


def as_f64(x):
  return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def numpy_decode(q_parts, key_parts, value, layer, pad, pos, scale):
  """float64: one query per row and head group, masked softmax over slots pad..pos (and pos)."""
  logits = sum(np.einsum("bgjd,bsgd->bgjs", as_f64(q), as_f64(k)[layer])
               for q, k in zip(q_parts, key_parts)) * scale
  s = np.arange(logits.shape[-1])
  keep = ((s[None] >= pad[:, None]) & (s[None] <= pos)) | (s[None] == pos)
  logits = np.where(keep[:, None, None], logits, -np.inf)
  alpha = np.exp(logits - logits.max(-1, keepdims=True))
  alpha /= alpha.sum(-1, keepdims=True)
  return np.einsum("bgjs,bsgv->bgjv", alpha, as_f64(value)[layer])


@pytest.mark.parametrize("kind,groups,group,dims,block,splits", [
    ("gqa", 2, 3, (24,), 16, None),      # d 24 and J 3 padded, several splits
    ("mha", 4, 1, (16,), 32, 1),         # one query head per KV head
    ("mla", 1, 5, (32, 8), 16, 2),       # latent + rope key; the latent is also the value
])
def test_kernel_matches_numpy(kind, groups, group, dims, block, splits):
  layers, batch, slots = 2, 3, 40
  rng = np.random.default_rng(groups * 10 + group)
  rnd = lambda *s: rng.standard_normal(s).astype(np.float32)
  qs = [jnp.asarray(rnd(batch, groups, group, d), jnp.bfloat16) for d in dims]
  keys = [jnp.asarray(rnd(layers, batch, slots, groups, d), jnp.bfloat16) for d in dims]
  if kind == "mla":
    values, value_key, value = None, 0, keys[0]
  else:
    values = jnp.asarray(rnd(layers, batch, slots, groups, dims[0]), jnp.bfloat16)
    value_key, value = None, values
  pad, pos, layer, scale = np.array([0, 7, 30]), 33, 1, 0.2
  got = grouped_decode_attention(qs, keys, jnp.int32(layer), jnp.asarray(pad), jnp.int32(pos),
                                 kv_len=slots, scale=scale, values=values,
                                 value_key=value_key, block=block, splits=splits,
                                 interpret=True)
  want = numpy_decode(qs, keys, value, layer, pad, pos, scale)
  assert got.shape == want.shape
  # The attention weights go through bf16 for the value product (as in the XLA path).
  np.testing.assert_allclose(np.asarray(got), want, atol=4e-3 * np.abs(want).max())
  assert np.abs(want[2]).max() > 0  # the padding row sees slots 30..33


def tiny(attention: str, kernel: str):
  return config_lib.load("tiny", [
      f"model.attention={attention}", "model.dtype=float32",
      "model.num_kv_heads=2", "model.mla_q_lora=24", "model.mla_kv_lora=16",
      "model.mla_nope_dim=8", "model.mla_rope_dim=8", "model.mla_v_dim=12",
      "decode.cache_dtype=float32", "model.rope_bf16_tables=false",
      f"decode.attention_kernel={kernel}"])


def random_params(cfg):
  """N(0, 1/d) weights (zero-initialised output projections would hide attention)."""
  shapes = jax.eval_shape(lambda: init_params(cfg.model, 0))
  rng = np.random.default_rng(1)
  std = cfg.model.d_model ** -0.5
  return jax.tree.map(lambda x: jnp.asarray(std * rng.standard_normal(x.shape), x.dtype),
                      shapes)


@pytest.mark.parametrize("attention", ["mha", "mqa", "gqa", "mla"])
def test_kernel_tokens_equal_xla_and_teacher_forced(attention):
  params = random_params(tiny(attention, "xla"))
  want = generate(params, tiny(attention, "xla"), PROMPTS, max_new_tokens=NEW,
                  max_len=MAX_LEN)
  got = generate(params, tiny(attention, "pallas"), PROMPTS, max_new_tokens=NEW,
                 max_len=MAX_LEN)
  assert got == want
  seqs = [p + o for p, o in zip(PROMPTS, got)]
  tokens = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
  for b, s in enumerate(seqs):
    tokens[b, :len(s)] = s
  cfg = tiny(attention, "xla").model
  argmax = np.asarray(jnp.argmax(model_from_params(cfg, params)(jnp.asarray(tokens)), -1))
  for b, (p, o) in enumerate(zip(PROMPTS, got)):
    assert argmax[b, len(p) - 1:len(p) - 1 + NEW].tolist() == o, (attention, b)


def test_grouped_kernel_choice(monkeypatch):
  """auto: the kernel on one GPU with a 16-bit cache for MQA/GQA/MLA; XLA for MHA, on CPU/TPU,
  for a float32 cache and on a mesh of several devices; pallas: the kernel (interpreted off
  GPU) on one device."""
  choice = kernels.decode_kernel
  assert choice("auto", "gqa", "bfloat16") is None  # this CPU
  assert choice("pallas", "mla", "bfloat16") == "triton"
  assert choice("xla", "mha", "bfloat16") is None
  monkeypatch.setattr(kernels, "target", lambda: ("gpu", None))
  for attention in ("mqa", "gqa", "mla"):
    assert choice("auto", attention, "bfloat16") == "triton"
    assert choice("auto", attention, "float32") is None
  assert choice("auto", "mha", "bfloat16") is None  # XLA is fast for one head per KV head
  assert choice("pallas", "mha", "bfloat16") == "triton"
  monkeypatch.setattr(kernels, "target", lambda: ("tpu", None))
  assert choice("auto", "gqa", "bfloat16") is None
  monkeypatch.setattr(kernels, "target", lambda: ("gpu", object()))
  assert choice("pallas", "gqa", "bfloat16") is None

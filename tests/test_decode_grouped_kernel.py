"""The grouped decode kernel for MHA/MQA/GQA/MLA (Pallas Triton, interpret mode on CPU) against
float64 NumPy, under shard_map on 8 forced CPU devices against its direct call, and wired
into generation: greedy tokens with decode.attention_kernel=pallas equal the XLA path and the
argmax of the teacher-forced forward, on one device and on meshes."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from t6_jax import config as config_lib
from t6_jax import kernels
from t6_jax.decode import generate
from t6_jax.kernels.grouped_decode_gpu import grouped_decode_attention
from t6_jax.model import model_from_params
from t6_jax.sharding import RULES, logical_to_spec, make_mesh

from test_decode_kernel_wired import random_params

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


def tiny(attention: str, kernel: str, rules: str = "fsdp"):
  return config_lib.load("tiny", [
      f"model.attention={attention}", "model.dtype=float32",
      "model.num_kv_heads=2", "model.mla_q_lora=24", "model.mla_kv_lora=16",
      "model.mla_nope_dim=8", "model.mla_rope_dim=8", "model.mla_v_dim=12",
      "decode.cache_dtype=float32", "model.rope_bf16_tables=false",
      f"decode.attention_kernel={kernel}", f"mesh.rules={rules}"])


@pytest.fixture(scope="module", params=["mha", "mqa", "gqa", "mla"])
def one_device(request):
  """(attention, params, greedy tokens of the XLA path on one device)."""
  attention = request.param
  params = random_params(tiny(attention, "xla"))
  return attention, params, generate(params, tiny(attention, "xla"), PROMPTS,
                                     max_new_tokens=NEW, max_len=MAX_LEN)


def test_kernel_tokens_equal_xla_and_teacher_forced(one_device):
  attention, params, want = one_device
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


# The splits (batch, KV heads, query heads per KV head) the sharded kernel runs with per mesh;
# None: MLA stays on XLA where fsdp_tp splits its latent's features over tensor.
MESH_SPLITS = {
    "fsdp_tp": {"mha": (("data", "fsdp"), ("tensor",), ()),
                "gqa": (("data", "fsdp"), ("tensor",), ()),
                "mqa": (("data", "fsdp"), (), ("tensor",)),  # one KV head: its 4 query heads
                "mla": None},
    "fsdp": dict.fromkeys(["mha", "gqa", "mqa", "mla"], (("data", "fsdp"), (), ())),
}


def test_kernel_tokens_on_meshes_equal_one_device(one_device, monkeypatch):
  """data=2 fsdp=2 tensor=2 (fsdp_tp) and a batch-only data=2 fsdp=2 mesh of 4 devices: the
  tokens of the XLA path on one device, with the kernel under shard_map split as MESH_SPLITS
  says (recorded while the decode step is traced: these settings are compiled only here)."""
  attention, params, want = one_device
  seen = []
  sharded = kernels.grouped_decode_sharded

  def spy(fn, mesh, batch_axes, group_axes, head_axes, *args, **kwargs):
    seen.append((tuple(batch_axes), tuple(group_axes), tuple(head_axes)))
    return sharded(fn, mesh, batch_axes, group_axes, head_axes, *args, **kwargs)

  monkeypatch.setattr(kernels, "grouped_decode_sharded", spy)
  meshes = {"fsdp_tp": make_mesh(data=2, fsdp=2, tensor=2),
            "fsdp": make_mesh(data=2, fsdp=2, tensor=1, devices=jax.devices()[:4])}
  for rules, mesh in meshes.items():
    seen.clear()
    got = generate(params, tiny(attention, "pallas", rules), PROMPTS, max_new_tokens=NEW,
                   max_len=MAX_LEN, mesh=mesh)
    assert got == want, (attention, rules)
    split = MESH_SPLITS[rules][attention]
    assert set(seen) == (set() if split is None else {split}), (attention, rules)


@pytest.mark.parametrize("groups,group", [
    (2, 3),  # KV heads split over tensor with the cache
    (1, 4),  # MQA: the query heads of the one KV head split, the cache whole on each shard
    (3, 1),  # 3 KV heads of one query head each: heads whole on every shard (repeated work)
])
def test_sharded_kernel_equals_direct_call_and_reads_the_cache_in_place(groups, group):
  """kernels.grouped_decode on the fsdp_tp mesh, the cache placed as the rules shard it,
  equals the direct call; no collective of the compiled program moves a cache-length array."""
  layers, batch, slots, dim = 2, 4, 40, 16
  rng = np.random.default_rng(groups + group)
  rnd = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  q = rnd(batch, groups, group, dim)
  k, v = rnd(layers, batch, slots, groups, dim), rnd(layers, batch, slots, groups, dim)
  pad_B = jnp.asarray([0, 3, 11, 30], jnp.int32)
  call = lambda q, k, v, rules=None, axes=None: kernels.grouped_decode(
      [q], [k], 1, pad_B, 33, kv_len=slots, scale=0.25, values=v, rules=rules, cache_axes=axes)
  want = call(q, k, v)
  mesh, rules = make_mesh(data=2, fsdp=2, tensor=2), RULES["fsdp_tp"]
  axes = ("layers", "batch", "cache_length", "act_kv_heads", "head_dim")
  place = lambda x, names: jax.device_put(
      x, NamedSharding(mesh, logical_to_spec(names, rules, x.shape, mesh)))
  k, v = place(k, axes), place(v, axes)
  q = place(q, ("batch", None, "act_heads", None))
  with jax.set_mesh(mesh):
    fn = jax.jit(lambda q, k, v: call(q, k, v, rules, [axes, axes]))
    got = fn(q, k, v)
    hlo = fn.lower(q, k, v).compile().as_text()
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
  moved = re.findall(r"= (\S+) (?:all-gather|all-reduce|all-to-all|collective-permute)\(", hlo)
  assert not [m for m in moved if re.search(rf"[\[,]{slots}[\],]", m)], moved


def test_grouped_kernel_choice(monkeypatch):
  """auto: the kernel on GPU with a 16-bit cache; XLA on CPU/TPU and for a float32 cache;
  pallas: the kernel (interpreted off GPU). On a mesh of several devices it needs the rules,
  and MLA stays on XLA where they split its latent's features."""
  choice = kernels.decode_kernel
  assert choice("auto", "gqa", "bfloat16") is None  # this CPU
  assert choice("pallas", "mla", "bfloat16") == "triton"
  assert choice("xla", "mha", "bfloat16") is None
  monkeypatch.setattr(kernels, "target", lambda: ("gpu", None))
  for attention in ("mha", "mqa", "gqa", "mla"):
    assert choice("auto", attention, "bfloat16") == "triton"
    assert choice("auto", attention, "float32") is None
  assert choice("pallas", "mha", "bfloat16") == "triton"
  monkeypatch.setattr(kernels, "target", lambda: ("tpu", None))
  assert choice("auto", "gqa", "bfloat16") is None
  tp = make_mesh(data=2, fsdp=2, tensor=2)
  monkeypatch.setattr(kernels, "target", lambda: ("gpu", tp))
  assert choice("pallas", "gqa", "bfloat16") is None  # no rules: the split is unknown
  for attention in ("mqa", "gqa"):
    assert choice("auto", attention, "bfloat16", RULES["fsdp_tp"]) == "triton"
  assert choice("auto", "mla", "bfloat16", RULES["fsdp_tp"]) is None  # kv_lora over tensor
  dp = make_mesh(data=2, fsdp=4)
  monkeypatch.setattr(kernels, "target", lambda: ("gpu", dp))
  assert choice("auto", "mla", "bfloat16", RULES["fsdp_tp"]) == "triton"  # tensor = 1
  assert choice("auto", "mla", "bfloat16", RULES["fsdp"]) == "triton"

"""Cached decoding: greedy decoding equals the argmax of the teacher-forced forward for every
attention type, factor-path TPA attention equals the materialised path and a float64 NumPy
computation, cache sizes of docs/model.md, 8 devices == 1, ragged == alone, chunked
prefill, sampling filters and error cases."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t6_jax import config as config_lib
from t6_jax.decode import (DecodeWeights, cache_bytes, cache_bytes_per_token, decode,
                           generate, prefill, prepare_decode, sample_logits)
from t6_jax.model import inference_params, init_params, layers, model_from_params
from t6_jax.model.attention import TPA, FullQueries, Mask, TPAQueries
from t6_jax.sharding import RULES, make_mesh

ATTENTIONS = ("tpa", "tpa_kvonly", "mha", "mqa", "gqa", "mla")
# Ragged batch (4 rows so the batch splits over data x fsdp = 4 devices).
PROMPTS = [[3, 17, 250, 9, 41], [7, 7, 100, 2, 64, 33, 201, 5], [99], [1, 2, 3]]
NEW = 7
MAX_LEN = 24


def tiny_cfg(attention: str, *extra: str) -> config_lib.Config:
  return config_lib.load("tiny", [
      f"model.attention={attention}", "model.num_kv_heads=2", "model.mla_q_lora=24",
      "model.mla_kv_lora=16", "model.mla_nope_dim=8", "model.mla_rope_dim=8",
      "model.mla_v_dim=12", "model.head_norm=" + str(attention == "tpa").lower(),
      "model.rope_bf16_tables=false", "decode.cache_dtype=float32", *extra])


@functools.lru_cache(maxsize=None)
def tiny_params(cfg):
  """Random params from NumPy in the layout of init_params (no RNG compile on the CPU): norm
  weights near 1, everything else N(0, 1/d) -- output projections included, so attention and
  MLP move the logits (zero-initialised ones would make every model repeat its last token)."""
  shapes = jax.eval_shape(lambda: init_params(cfg.model, 0))
  rng = np.random.default_rng(0)
  std = cfg.model.d_model ** -0.5

  def fill(path, x):
    if getattr(path[-1], "key", None) == "weight":  # RMSNorm weights
      return jnp.asarray(1 + 0.1 * rng.standard_normal(x.shape), x.dtype)
    return jnp.asarray(std * rng.standard_normal(x.shape), x.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module", params=ATTENTIONS)
def decoded(request):
  cfg = tiny_cfg(request.param)
  params = tiny_params(cfg)
  return cfg, params, generate(params, cfg, PROMPTS, max_new_tokens=NEW, max_len=MAX_LEN)


def teacher_forced_argmax(cfg, params, seqs):
  """argmax of the full forward at every position, all rows right-padded into one batch."""
  width = max(map(len, seqs))
  tokens = np.zeros((len(seqs), width), np.int32)
  for b, s in enumerate(seqs):
    tokens[b, :len(s)] = s
  fwd = jax.jit(lambda p, t: model_from_params(cfg.model, p)(t))
  return np.asarray(jnp.argmax(fwd(params, jnp.asarray(tokens)), axis=-1))


def test_greedy_equals_teacher_forced_argmax(decoded):
  cfg, params, out = decoded
  assert [len(o) for o in out] == [NEW] * len(PROMPTS)
  seqs = [p + o for p, o in zip(PROMPTS, out)]
  argmax = teacher_forced_argmax(cfg, params, seqs)
  for b, (p, o) in enumerate(zip(PROMPTS, out)):
    assert argmax[b, len(p) - 1:len(p) - 1 + NEW].tolist() == o, (cfg.model.attention, b)
  # Not a degenerate model: the rows do not all just repeat their last token.
  assert any(len(set(o)) > 1 for o in out)


# --------------------------------------------------------------------------------------------
# Factor-path TPA attention


def numpy_tpa_attention(q, e, keep, cfg):
  """float64: contract Q, K, V from the factors, then masked softmax attention."""
  f = {k: np.asarray(v, np.float64) for k, v in {**q, **e}.items()}
  if "q" in f:
    q_BTHK = f["q"]
  else:
    q_BTHK = np.einsum("bthq,btqk->bthk", f["a_q"], f["b_q"]) / cfg.q_rank
  k_BSHK = np.einsum("bshr,bsrk->bshk", f["a_k"], f["b_k"]) / cfg.k_rank
  v_BSHK = np.einsum("bshr,bsrk->bshk", f["a_v"], f["b_v"]) / cfg.v_rank
  logits = np.einsum("bthk,bshk->bths", q_BTHK, k_BSHK) / np.sqrt(cfg.head_dim)
  logits = np.where(np.asarray(keep)[:, :, None, :], logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum("bths,bshk->bthk", w, v_BSHK)


@pytest.mark.parametrize("attention,ranks", [("tpa", (6, 2, 2)), ("tpa", (4, 3, 1)),
                                             ("tpa_kvonly", (1, 2, 3))])
def test_factor_attention_equals_materialised(attention, ranks):
  cfg = dataclasses.replace(tiny_cfg(attention).model, q_rank=ranks[0], k_rank=ranks[1],
                            v_rank=ranks[2], head_norm=False)
  from flax import nnx
  attn = nnx.eval_shape(lambda: TPA(cfg, nnx.Rngs(0), RULES["fsdp"]))  # no weights read
  rng = np.random.default_rng(0)
  b, t, s, h, k = 2, 3, 11, cfg.num_heads, cfg.head_dim

  def rnd(*shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)
  q = {"q": rnd(b, t, h, k)} if attention == "tpa_kvonly" else {
      "a_q": rnd(b, t, h, ranks[0]), "b_q": rnd(b, t, ranks[0], k)}
  e = {"a_k": rnd(b, s, h, ranks[1]), "b_k": rnd(b, s, ranks[1], k),
       "a_v": rnd(b, s, h, ranks[2]), "b_v": rnd(b, s, ranks[2], k)}
  keep = jnp.asarray(rng.random((b, t, s)) < 0.6).at[:, :, 4].set(True)
  mask = Mask(causal=False, keep_BxTxS=keep)
  both = jax.jit(lambda q, e, mask: (attn.attend_factors(q, e, mask), attn.attend(q, e, mask)))
  factor, materialised = (np.asarray(y, np.float64) for y in both(typed(q), e, mask))
  want = numpy_tpa_attention(q, e, keep, cfg)
  scale = np.abs(want).max()
  assert np.abs(factor - materialised).max() <= 1e-5 * scale
  assert np.abs(factor - want).max() <= 1e-5 * scale
  assert np.abs(materialised - want).max() <= 1e-5 * scale


def typed(q: dict):
  return FullQueries(q["q"]) if "q" in q else TPAQueries(q["a_q"], q["b_q"])


@pytest.mark.parametrize("attention", ["tpa", "tpa_kvonly"])
def test_factor_attention_with_fewer_queries_than_keys(attention):
  """T = 3 queries at key positions 6..8 of S = 11 keys, causal with segments: the one mask
  helper offsets the causal part by the query start (a plain tril would not)."""
  cfg = dataclasses.replace(tiny_cfg(attention).model, head_norm=False)
  from flax import nnx
  attn = nnx.eval_shape(lambda: TPA(cfg, nnx.Rngs(0), RULES["fsdp"]))
  rng = np.random.default_rng(1)
  b, t, s, h, k, start = 2, 3, 11, cfg.num_heads, cfg.head_dim, 6

  def rnd(*shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)
  q = {"q": rnd(b, t, h, k)} if attention == "tpa_kvonly" else {
      "a_q": rnd(b, t, h, cfg.q_rank), "b_q": rnd(b, t, cfg.q_rank, k)}
  e = {"a_k": rnd(b, s, h, cfg.k_rank), "b_k": rnd(b, s, cfg.k_rank, k),
       "a_v": rnd(b, s, h, cfg.v_rank), "b_v": rnd(b, s, cfg.v_rank, k)}
  kv_seg = np.array([[0] * 4 + [1] * 7, [0] * 8 + [1] * 3], np.int32)
  q_seg = kv_seg[:, start:start + t]
  mask = Mask(causal=True, q_start=jnp.int32(start), segment_ids_BxT=jnp.asarray(q_seg),
              kv_segment_ids_BxS=jnp.asarray(kv_seg))
  # Built independently: key s visible to query i when s <= start + i, same segment.
  keep = np.zeros((b, t, s), bool)
  for bb in range(b):
    for i in range(t):
      for j in range(s):
        keep[bb, i, j] = j <= start + i and kv_seg[bb, j] == q_seg[bb, i]
  np.testing.assert_array_equal(np.broadcast_to(np.asarray(mask.keep(t, s)), keep.shape), keep)
  both = jax.jit(lambda q, e, mask: (attn.attend_factors(q, e, mask), attn.attend(q, e, mask)))
  factor, materialised = (np.asarray(y, np.float64) for y in both(typed(q), e, mask))
  want = numpy_tpa_attention(q, e, keep, cfg)
  scale = np.abs(want).max()
  assert np.abs(factor - want).max() <= 1e-5 * scale
  assert np.abs(materialised - want).max() <= 1e-5 * scale


def test_materialising_decode_path_gives_same_tokens():
  cfg = tiny_cfg("tpa", "decode.factor_attention=false")
  params = tiny_params(tiny_cfg("tpa"))
  factor = generate(params, tiny_cfg("tpa"), PROMPTS, max_new_tokens=NEW, max_len=MAX_LEN)
  assert generate(params, cfg, PROMPTS, max_new_tokens=NEW, max_len=MAX_LEN) == factor


# --------------------------------------------------------------------------------------------
# Cache sizes (docs/model.md), checked against the cache arrays' shapes


@pytest.mark.parametrize("preset,per_layer", [
    ("t6-small", 392), ("tpa_kvonly-small", 344), ("mha-small", 1536), ("mqa-small", 128),
    ("gqa-small", 256), ("mla-small", 288)])
def test_cache_bytes_per_token(preset, per_layer):
  cfg = config_lib.load(preset).model
  assert cache_bytes_per_token(cfg, "bfloat16") == per_layer * 12 * 2
  assert cache_bytes_per_token(cfg, "float32") == per_layer * 12 * 4
  # The formula is what the real cache arrays take.
  assert cache_bytes_per_token(cfg, "bfloat16") == cache_bytes(cfg, 1, 1, "bfloat16")


def test_t6_small_cache_is_9408_bytes_per_token():
  assert cache_bytes_per_token(config_lib.load("t6-small").model) == 9408
  assert cache_bytes_per_token(config_lib.load("mha-small").model) == 36864


# --------------------------------------------------------------------------------------------
# Batches, meshes, chunks


@pytest.fixture(scope="module")
def tpa_run():
  cfg = tiny_cfg("tpa")
  params = tiny_params(cfg)
  return cfg, params, generate(params, cfg, PROMPTS, max_new_tokens=NEW, max_len=MAX_LEN)


def test_ragged_batch_equals_each_prompt_alone(tpa_run):
  cfg, params, out = tpa_run
  for p, o in zip(PROMPTS, out):
    assert generate(params, cfg, [p], max_new_tokens=NEW, max_len=MAX_LEN) == [o]


def test_prefill_then_decode_api(tpa_run):
  cfg, params, out = tpa_run
  tokens = np.zeros((len(PROMPTS), 10), np.int32)  # right-padded, as users hold them
  for b, p in enumerate(PROMPTS):
    tokens[b, :len(p)] = p
  cache, logits = prefill(cfg, params, tokens, [len(p) for p in PROMPTS], max_len=MAX_LEN)
  assert cache.max_len == MAX_LEN and int(cache.length) == 8
  assert np.asarray(cache.pad_B).tolist() == [8 - len(p) for p in PROMPTS]
  assert np.asarray(jnp.argmax(logits, -1)).tolist() == [o[0] for o in out]
  new, cache = decode(cfg, params, cache, logits, steps=NEW)
  assert np.asarray(new).tolist() == out and int(cache.length) == 8 + NEW - 1


def test_inference_params_give_the_same_tokens_in_half_the_memory():
  """Parameters held as decoding reads them (`inference_params`: block matrices in the bf16
  compute dtype, the embedding and norms as stored) give the fp32 parameters' tokens, greedy
  and sampled, in about half their bytes."""
  cfg = tiny_cfg("tpa", "model.dtype=bfloat16")
  params = tiny_params(cfg)
  held = inference_params(cfg.model, params)
  nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(held["blocks"]) if x.ndim > 2)
  assert held["embed"]["wte"].dtype == jnp.float32
  assert nbytes(held["blocks"]) < 0.51 * nbytes(params["blocks"])
  for sampling in (dict(), dict(temperature=0.9, top_p=0.9, seed=3)):
    assert (generate(held, cfg, PROMPTS, max_new_tokens=NEW, max_len=MAX_LEN, **sampling)
            == generate(params, cfg, PROMPTS, max_new_tokens=NEW, max_len=MAX_LEN, **sampling))


def test_prepared_weights_give_the_same_tokens(tpa_run):
  """Weights prepared once (`prepare_decode`) and read by several calls of the token loop give
  the tokens of parameters prepared inside each call; batch 1 (output-major packing) too; a
  batch the weights were not prepared for gets a clear error."""
  cfg, params, out = tpa_run
  tokens = np.zeros((len(PROMPTS), 10), np.int32)
  for b, p in enumerate(PROMPTS):
    tokens[b, :len(p)] = p
  lengths = [len(p) for p in PROMPTS]
  weights = prepare_decode(cfg, params, len(PROMPTS))
  assert isinstance(weights, DecodeWeights) and not weights.one_row
  for steps in (NEW, 3):  # two calls reading the same prepared weights
    cache, logits = prefill(cfg, params, tokens, lengths, max_len=MAX_LEN)
    new, _ = decode(cfg, weights, cache, logits, steps=steps)
    assert np.asarray(new).tolist() == [o[:steps] for o in out]
  one = prepare_decode(cfg, params, 1)
  assert one.one_row
  cache, logits = prefill(cfg, params, tokens[1:2], lengths[1:2], max_len=MAX_LEN)
  new, _ = decode(cfg, one, cache, logits, steps=NEW)
  assert np.asarray(new).tolist() == [out[1]]
  cache, logits = prefill(cfg, params, tokens, lengths, max_len=MAX_LEN)
  with pytest.raises(ValueError, match="one_row=True.*batch"):
    decode(cfg, one, cache, logits, steps=2)
  other = config_lib.apply_overrides(cfg, ["model.rope_base=500"])
  cache, logits = prefill(cfg, params, tokens, lengths, max_len=MAX_LEN)
  with pytest.raises(ValueError, match="another model config"):
    decode(other, weights, cache, logits, steps=2)


def test_prepared_weights_hold_one_copy_and_pad_on_gpu(tpa_run, monkeypatch, request):
  """The packed matrices replace the separate ones (prepared weights are as large as the
  parameters, not twice); with the zero columns a GPU's loop gets for a batch
  (`layers.decode_padding`: the tiny MLP's 170 hidden units to 192 and the packed
  projection's 200 columns to 256, none at batch 1) the
  tokens are the same."""
  cfg, params, out = tpa_run
  size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  for batch in (1, len(PROMPTS)):
    assert size(prepare_decode(cfg, params, batch).arrays) == size(params)
  monkeypatch.setattr(layers, "PAD_DECODE_WIDTHS_ON", ("gpu", "cpu"))
  jax.clear_caches()  # the jitted preparation traced above without the padding
  request.addfinalizer(jax.clear_caches)  # and none of what follows is kept for later tests
  tokens = np.zeros((len(PROMPTS), 10), np.int32)
  for b, p in enumerate(PROMPTS):
    tokens[b, :len(p)] = p
  lengths = [len(p) for p in PROMPTS]
  for rows in (slice(None), slice(1, 2)):  # a batch, and batch 1 (output-major packing)
    weights = prepare_decode(cfg, params, len(PROMPTS[rows]))
    # MLP: 3 matrices x 22 zero units; the packed projection: 200 columns to 256
    extra = 0 if rows.start else cfg.model.num_layers * cfg.model.d_model * (3 * 22 + 56)
    assert size(weights.arrays) == size(params) + extra
    cache, logits = prefill(cfg, params, tokens[rows], lengths[rows], max_len=MAX_LEN)
    new, _ = decode(cfg, weights, cache, logits, steps=NEW)
    assert np.asarray(new).tolist() == out[rows]


@pytest.mark.parametrize("attention", ["tpa", "gqa", "mla"])
def test_scanned_layers_decode_from_packed_stacks(tpa_run, attention):
  """With the layers scanned (TPU's form) the loop's weights are packed once, still stacked
  (`Transformer.in_compute_dtype`), and give the unrolled model's tokens, prepared or not."""
  cfg, params, out = tpa_run
  scanned = config_lib.apply_overrides(cfg, ["model.scan_layers=true"])
  if attention != "tpa":  # (the MLP's packing under the scan, with other attention types)
    cfg = tiny_cfg(attention)
    params = tiny_params(cfg)
    scanned = config_lib.apply_overrides(cfg, ["model.scan_layers=true"])
    assert (generate(params, scanned, PROMPTS, max_new_tokens=NEW, max_len=MAX_LEN)
            == generate(params, cfg, PROMPTS, max_new_tokens=NEW, max_len=MAX_LEN))
    return
  assert generate(params, scanned, PROMPTS, max_new_tokens=NEW, max_len=MAX_LEN) == out
  weights = prepare_decode(scanned, params, 1)
  state = jax.tree.unflatten(weights.treedef, weights.arrays)
  assert "packed_proj" in state["blocks"]["attn"] and "W_A_q" not in state["blocks"]["attn"]
  assert state["blocks"]["mlp"]["packed_fc"].shape[0] == cfg.model.num_layers
  tokens = np.asarray([PROMPTS[1]], np.int32)
  cache, logits = prefill(scanned, params, tokens, [len(PROMPTS[1])], max_len=MAX_LEN)
  assert np.asarray(decode(scanned, weights, cache, logits, steps=NEW)[0]).tolist() == [out[1]]


def test_eight_devices_give_the_same_tokens(tpa_run):
  cfg, params, out = tpa_run
  assert len(jax.devices()) == 8
  sharded_cfg = config_lib.apply_overrides(cfg, ["mesh.rules=fsdp_tp"])
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  assert generate(params, sharded_cfg, PROMPTS, max_new_tokens=NEW, max_len=MAX_LEN,
                  mesh=mesh) == out


@pytest.mark.parametrize("attention", ["tpa", "tpa_kvonly", "mla", "gqa"])
def test_heads_and_mlp_padded_to_split_over_tensor(attention):
  """6 heads and 85 MLP units on 4 tensor shards: padded with zeros to 8 and 88 (GQA's heads,
  tied to their KV heads, stay); the padded model gives the unpadded model's logits exactly,
  and (TPA) on the 2 x 4 mesh its tokens on one device."""
  from t6_jax.model.placement import config_for_mesh, pad_params
  cfg = tiny_cfg(attention, "model.num_heads=6", "model.mlp_hidden=85", "mesh.rules=fsdp_tp")
  params = tiny_params(cfg)
  mesh = make_mesh(data=2, fsdp=1, tensor=4)
  padded = config_for_mesh(cfg.model, mesh, "fsdp_tp")
  assert (padded.num_heads, padded.mlp_dim) == (6 if attention == "gqa" else 8, 88)
  assert config_for_mesh(cfg.model, make_mesh(data=8, fsdp=1, tensor=1), "fsdp_tp") == cfg.model
  assert config_for_mesh(cfg.model, None, "fsdp_tp") == cfg.model
  held = pad_params(params, cfg.model, padded, mesh, "fsdp_tp")
  assert held["blocks"]["mlp"]["c_proj"].sharding.spec[1] == "tensor"
  if attention == "tpa":
    on_mesh = generate(held, dataclasses.replace(cfg, model=padded), PROMPTS,
                       max_new_tokens=NEW, max_len=MAX_LEN, mesh=mesh)
    assert on_mesh == generate(params, cfg, PROMPTS, max_new_tokens=NEW, max_len=MAX_LEN)
  tokens = jnp.asarray([PROMPTS[1]])
  np.testing.assert_array_equal(
      np.asarray(model_from_params(padded, jax.device_get(held))(tokens)),
      np.asarray(model_from_params(cfg.model, params)(tokens)))


def test_chunked_prefill_equals_one_chunk(tpa_run):
  cfg, params, out = tpa_run
  chunked = config_lib.apply_overrides(cfg, ["decode.prefill_chunk=4"])
  assert generate(params, chunked, PROMPTS, max_new_tokens=NEW, max_len=MAX_LEN) == out


# --------------------------------------------------------------------------------------------
# Sampling and stop tokens


def test_top_k_1_equals_greedy(tpa_run):
  cfg, params, out = tpa_run
  assert generate(params, cfg, PROMPTS, max_new_tokens=NEW, max_len=MAX_LEN, temperature=1.5,
                  top_k=1, seed=3) == out


def test_sampling_depends_on_seed_only(tpa_run):
  cfg, params, _ = tpa_run
  kw = dict(max_new_tokens=NEW, max_len=MAX_LEN, temperature=1.0, top_p=0.9)
  a = generate(params, cfg, PROMPTS, seed=1, **kw)
  assert generate(params, cfg, PROMPTS, seed=1, **kw) == a
  assert generate(params, cfg, PROMPTS, seed=2, **kw) != a


def test_stop_tokens_end_each_row(tpa_run):
  cfg, params, out = tpa_run
  stop = out[1][2]
  got = generate(params, cfg, PROMPTS, max_new_tokens=NEW, max_len=MAX_LEN, stop_tokens=(stop,))
  for o, g in zip(out, got):
    want = o[:o.index(stop)] if stop in o else o
    assert g == want


@pytest.mark.parametrize("cap", [0, 4])  # the whole-vocabulary sort; the top-4 candidates
def test_sample_logits_filters_against_numpy(cap):
  p_V = np.asarray([0.05, 0.4, 0.1, 0.3, 0.15, 0.0, 0.0])  # two rows of padding (valid 5)
  logits = jnp.log(jnp.asarray(p_V[None], jnp.float32))
  keys = jax.random.split(jax.random.key(0), 4000)
  draw = jax.jit(jax.vmap(
      lambda key, k, p: sample_logits(logits, key, jnp.float32(1.0), k, p, greedy=False,
                                      use_filters=True, valid_vocab=5, top_k_cap=cap)[0],
      in_axes=(0, None, None)))

  def frequencies(top_k=0, top_p=1.0):
    ids = np.asarray(draw(keys, jnp.int32(top_k), jnp.float32(top_p)))
    return np.bincount(ids, minlength=7) / len(ids)

  def expected(top_k=0, top_p=1.0):  # float64: the smallest prefix reaching top_p, at most k
    order = np.argsort(-p_V, kind="stable")
    before = np.concatenate([[0.0], np.cumsum(p_V[order])[:-1]])  # mass ranked above each
    n_keep = min(int(np.sum(before < top_p)), top_k or 7)
    want = np.zeros(7)
    want[order[:n_keep]] = p_V[order[:n_keep]]
    return want / want.sum()

  # top_p away from the cumulative masses 0.4, 0.7, 0.85 (float32 rounding decides ties)
  cases = [dict(top_k=2), dict(top_p=0.75), dict(top_p=0.35), dict(top_p=0.45),
           dict(top_k=2, top_p=0.75), dict(top_k=3, top_p=0.9)]
  if not cap:
    cases.append({})
  for case in cases:
    got, want = frequencies(**case), expected(**case)
    assert set(np.nonzero(got)[0]) == set(np.nonzero(want)[0]), case
    np.testing.assert_allclose(got, want, atol=0.03, err_msg=str(case))


def test_cut_by_search_equals_numpy_ranking():
  from t6_jax.decode.generate import cut_by_search, cut_by_sort
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 300)).astype(np.float32) * 3
  x[1, ::7] = x[1, 0]  # ties
  x[2, 250:] = -np.inf  # padding past the tokenizer's vocabulary
  x[3] = np.round(x[3])  # many ties
  for k, p in [(300, 0.9), (300, 0.5), (5, 0.99), (1, 0.9), (40, 0.2), (300, 0.999)]:
    want = []
    for row in x.astype(np.float64):  # float64: the n-th largest logit, as documented
      ranked = np.sort(row)[::-1]
      prob = np.exp(ranked - ranked[0]) / np.exp(ranked - ranked[0]).sum()
      before = np.concatenate([[0.0], np.cumsum(prob)[:-1]])
      want.append(ranked[min(int(np.sum(before < p)), k) - 1])
    for cut in (cut_by_search, cut_by_sort):
      got = np.asarray(jax.jit(cut)(jnp.asarray(x), jnp.int32(k), jnp.float32(p)))[:, 0]
      np.testing.assert_array_equal(got, np.float32(want), err_msg=f"{cut.__name__} {k} {p}")


def test_filter_candidates_bucket_top_k():
  from t6_jax.decode.generate import filter_candidates
  assert filter_candidates(0, 50304) == 0  # top-p alone: the whole vocabulary
  assert filter_candidates(40, 50304) == filter_candidates(64, 50304) == 64
  assert filter_candidates(65, 50304) == 128
  assert filter_candidates(40, 200) == 0  # not much smaller than the vocabulary


def test_gpu_sorts_few_rows_and_filters_many(monkeypatch):
  import importlib
  g = importlib.import_module("t6_jax.decode.generate")
  monkeypatch.setattr(g.jax, "default_backend", lambda: "gpu")
  few, many = g.GPU_CANDIDATES_FROM_BATCH - 1, g.GPU_CANDIDATES_FROM_BATCH
  assert g.filter_candidates(50, 50304, few) == 0 and g.filter_candidates(50, 50304, many) == 64
  few, many = g.GPU_BISECTION_FROM_BATCH - 1, g.GPU_BISECTION_FROM_BATCH
  assert g._sort_is_faster(few, candidates=False) and not g._sort_is_faster(many, candidates=False)
  monkeypatch.setattr(g.jax, "default_backend", lambda: "cpu")
  assert not g._sort_is_faster(1, candidates=False) and g.filter_candidates(50, 50304, 1) == 64


# --------------------------------------------------------------------------------------------
# Errors


def test_errors_name_the_problem():
  cfg = tiny_cfg("tpa")
  params = tiny_params(cfg)
  with pytest.raises(ValueError, match="longest prompt has 20 tokens but the cache holds 24"):
    generate(params, cfg, [list(range(1, 21))], max_new_tokens=8, max_len=24)
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    generate(params, cfg, [[1, 2], []], max_new_tokens=2, max_len=24)
  with pytest.raises(ValueError, match="token id 256 outside the model's vocab \\[0, 256\\)"):
    generate(params, cfg, [[1, 256]], max_new_tokens=2, max_len=24)
  with pytest.raises(ValueError, match="token id -3"):
    generate(params, cfg, [[-3]], max_new_tokens=2, max_len=24)
  with pytest.raises(ValueError, match="no prompts"):
    generate(params, cfg, [], max_new_tokens=2, max_len=24)
  with pytest.raises(ValueError, match="decode.cache_dtype='int8'"):
    generate(params, config_lib.apply_overrides(cfg, ["decode.cache_dtype=int8"]), [[1]],
             max_new_tokens=2, max_len=24)
  with pytest.raises(ValueError, match="top_p"):
    generate(params, cfg, [[1]], max_new_tokens=2, max_len=24, temperature=1.0, top_p=0.0)

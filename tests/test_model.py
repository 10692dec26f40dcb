"""The model against its specification (docs/model.md): parameter counts, forward parity with
an independent float64 NumPy forward (tests/numpy_ref.py) for every attention type, causality
by gradient, RoPE relative-position invariance, and the initialisation."""

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import numpy_ref as ref
from t6_jax import config as config_lib
from t6_jax.convert import layout
from t6_jax.model import init_params, model_from_params
from t6_jax.kernels import training_mask
from t6_jax.model.layers import dense, packed_partials, rms_norm
from t6_jax.model.sizes import param_count

ATTENTIONS = ("tpa", "tpa_kvonly", "mha", "mqa", "gqa", "mla")

# The paper's sizes (docs/model.md), exact (tied embedding counted once).
PAPER_COUNTS = {
    "tpa": (124_342_272, 353_992_704, 773_698_560, 1_555_814_400),
    "tpa_kvonly": (124_379_136, 353_157_120, 773_053_440, 1_559_500_800),
    "mha": (123_568_128, 353_452_032, 772_131_840, 1_554_892_800),
    "mqa": (123_568_128, 353_452_032, 772_131_840, 1_554_892_800),
    "gqa": (123_568_128, 353_452_032, 772_131_840, 1_554_892_800),
    "mla": (123_085_824, 417_976_320, 909_321_216, 1_810_065_408),
}
SIZES = ("small", "medium", "large", "xl")
PRESET = {"tpa": "t6"}


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_paper_param_counts(attention):
  for size, want in zip(SIZES, PAPER_COUNTS[attention]):
    cfg = config_lib.load(f"{PRESET.get(attention, attention)}-{size}").model
    assert cfg.attention == attention
    assert param_count(cfg) == want, f"{attention}-{size}"


def test_every_paper_preset_is_counted():
  presets = {f[:-5] for f in os.listdir(config_lib.CONFIG_DIR) if f.endswith(".yaml")}
  counted = {f"{PRESET.get(a, a)}-{s}" for a in ATTENTIONS for s in SIZES}
  assert counted <= presets
  assert presets - counted <= {"tiny", "demo"}, presets - counted


# --------------------------------------------------------------------------------------------
# Forward parity with the NumPy reference, through the converter's mapping


def dims_for(attention: str) -> ref.Dims:
  # h * d_h != d for every type but mha, so a transposed output projection cannot pass.
  return ref.Dims(attention, head_norm=attention == "tpa")


@functools.lru_cache(maxsize=None)
def converted(attention: str, bf16: bool, seed: int = 1):
  """(reference state dict, our config, jitted forward(tokens, positions)) for random weights."""
  dims = dims_for(attention)
  sd = ref.random_state_dict(dims, seed)
  cfg = layout.model_config(sd, {"n_head": dims.heads})
  cfg = dataclasses.replace(cfg, dtype="float32", rope_bf16_tables=bf16)
  params = jax.tree.map(jnp.asarray, layout.params_from_torch(sd, cfg))

  @jax.jit
  def forward(tokens, positions):
    return model_from_params(cfg, params)(tokens, positions)

  return sd, cfg, params, forward


def tokens_for(dims, batch=2, length=12, seed=0):
  return np.random.default_rng(seed).integers(0, dims.vocab, (batch, length)).astype(np.int32)


def rel_err(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16_rope_tables", "fp32_rope_tables"])
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_forward_matches_numpy_reference(attention, bf16):
  sd, cfg, _, forward = converted(attention, bf16)
  dims = dims_for(attention)
  assert cfg.attention == attention
  tokens = tokens_for(dims)
  positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  ours = np.asarray(forward(tokens, positions))
  golden = ref.forward(sd, tokens, dims, bf16_rope=bf16)
  assert ours.dtype == np.float32 and ours.shape == golden.shape
  assert rel_err(ours, golden) < 1e-5
  # The bf16 rounding of the RoPE tables is visible above that tolerance: the setting matters.
  assert rel_err(ours, ref.forward(sd, tokens, dims, bf16_rope=not bf16)) > 1e-4


@pytest.mark.parametrize("attention,one_row", [("tpa", False), ("tpa", True),
                                               ("tpa_kvonly", False), ("mla", True)])
def test_per_layer_decode_model_matches_numpy_reference(attention, one_row):
  """`in_compute_dtype(per_layer=True)` (what a decode loop runs: per-layer blocks, TPA's
  projections and the MLP's input projections packed, output-major with `one_row`) computes
  the same forward as the equations."""
  sd, cfg, params, _ = converted(attention, False)
  dims = dims_for(attention)
  tokens = tokens_for(dims)
  positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)

  @jax.jit
  def forward(tokens, positions):
    model = model_from_params(cfg, params).in_compute_dtype(per_layer=True, one_row=one_row)
    assert isinstance(model.blocks, nnx.List) and len(model.blocks) == cfg.num_layers
    assert hasattr(model.blocks[0].attn, "packed_proj") == attention.startswith("tpa")
    d, f = cfg.d_model, cfg.mlp_dim
    assert model.blocks[0].mlp.packed_fc.shape == ((2 * f, d) if one_row else (d, 2 * f))
    return model(tokens, positions)

  golden = ref.forward(sd, tokens, dims, bf16_rope=False)
  assert rel_err(forward(tokens, positions), golden) < 1e-5


# --------------------------------------------------------------------------------------------
# Causality and RoPE


def logits_from_embeddings(cfg, params, x_TxD):
  """Logits (T, V) as a function of the embedded inputs of one sequence."""
  model = model_from_params(cfg, params)
  t = x_TxD.shape[0]
  rope = model.rope(jnp.arange(t)[None])
  mask = training_mask(None)
  x, _ = model.apply_blocks(x_TxD[None], lambda block, x, _: block(x, rope, mask))
  return model.embed.logits(rms_norm(x))[0]


@pytest.mark.parametrize("attention", ["tpa", "mla"])
def test_causal_by_gradient(attention):
  _, cfg, params, _ = converted(attention, False)
  dims = dims_for(attention)
  x_TxD = params["embed"]["wte"][tokens_for(dims, batch=1)[0]]
  probe_V = jax.random.normal(jax.random.key(0), (dims.vocab,))
  jac_TxTxD = jax.jit(jax.jacrev(
      lambda x: logits_from_embeddings(cfg, params, x) @ probe_V))(x_TxD)
  size_TxT = np.asarray(jnp.abs(jac_TxTxD).max(-1))
  t = size_TxT.shape[0]
  future = np.triu(np.ones((t, t), bool), k=1)
  assert np.all(size_TxT[future] == 0), "an output depends on a later input"
  assert np.all(size_TxT[~future] > 1e-6), "an output ignores an earlier input"


@pytest.mark.parametrize("attention", ["tpa", "mla"])
def test_rope_depends_only_on_relative_position(attention):
  _, _, _, forward = converted(attention, False)
  tokens = tokens_for(dims_for(attention))
  base = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  ours = np.asarray(forward(tokens, base), np.float64)
  for shift in (3, 17):
    assert rel_err(forward(tokens, base + shift), ours) < 2e-5
  # ... and positions do matter: stretching them changes the outputs.
  assert rel_err(forward(tokens, 2 * base), ours) > 1e-3


# --------------------------------------------------------------------------------------------
# Initialisation (docs/model.md). The bounds do not depend on the PRNG; "rbg" keys
# compile in a quarter of threefry's time on CPU, which dominates these tests otherwise.


def check_uniform(w, bound, name):
  w = np.asarray(w, np.float64)
  assert np.abs(w).max() <= bound * (1 + 1e-6), f"{name}: max |w| {np.abs(w).max()} > {bound}"
  assert np.abs(w).max() >= bound * 0.98, f"{name}: max |w| {np.abs(w).max()} << {bound}"
  assert abs(w.mean()) < 0.02 * bound, f"{name}: mean {w.mean()}"
  assert abs(w.std() / (bound / math.sqrt(3)) - 1) < 0.02, f"{name}: std {w.std()}"


def test_init_t6_small_factor_bounds():
  # One layer of T6-small at its real widths (the bounds depend on d, h, d_h and the ranks).
  cfg = config_lib.load("t6-small", ["model.num_layers=1", "model.vocab_size=64"]).model
  with jax.default_prng_impl("rbg"):
    params = init_params(cfg, seed=0)
  attn = params["blocks"]["attn"]
  published = {"W_A_q": 0.0353, "W_A_k": 0.0612, "W_A_v": 0.0612, "W_B_q": 0.01101,
               "W_B_k": 0.01103, "W_B_v": 0.01103}
  d, h, k = 768, 34, 64
  for name, value in published.items():
    rank = 6 if name.endswith("q") else 2
    bound = (math.sqrt(6 / (rank * (h + d))) if "_A_" in name
             else math.sqrt(6 / (k * (rank + d))))
    assert round(bound, 5 if "_B_" in name else 4) == value
    check_uniform(attn[name], bound, name)
  assert not np.any(np.asarray(attn["c_proj"])), "attention W_O must start at zero"
  assert not np.any(np.asarray(params["blocks"]["mlp"]["c_proj"])), "MLP W_3 must start at zero"
  check_uniform(params["blocks"]["mlp"]["c_fc1"], 1 / math.sqrt(d), "c_fc1")
  check_uniform(params["blocks"]["mlp"]["c_fc2"], 1 / math.sqrt(d), "c_fc2")
  check_uniform(params["embed"]["wte"], 1 / math.sqrt(d), "wte")
  assert params["blocks"]["mlp"]["c_fc1"].shape == (1, d, 2048)


@jax.default_prng_impl("rbg")
def test_init_baselines():
  small = ["model.num_layers=1", "model.vocab_size=64"]
  kv = init_params(config_lib.load("tpa_kvonly-small", small).model)["blocks"]["attn"]
  check_uniform(kv["c_q"], math.sqrt(6 / (768 + 22 * 64)), "tpa_kvonly c_q (Xavier)")
  check_uniform(kv["W_A_k"], math.sqrt(6 / (2 * (22 + 768))), "tpa_kvonly W_A_k")
  assert not np.any(np.asarray(kv["c_proj"]))
  gqa = init_params(config_lib.load("gqa-small", small).model)["blocks"]["attn"]
  for name in ("c_q", "c_k", "c_v"):
    check_uniform(gqa[name], 1 / math.sqrt(768), f"gqa {name}")
  assert gqa["c_k"].shape == (1, 768, 2, 64) and not np.any(np.asarray(gqa["c_proj"]))
  mla = init_params(config_lib.load("mla-small", small).model)["blocks"]["attn"]
  check_uniform(mla["q_a"], 1 / math.sqrt(768), "mla q_a")
  check_uniform(mla["kv_a_latent"], 1 / math.sqrt(768), "mla kv_a")
  check_uniform(np.concatenate([mla["q_b_nope"], mla["q_b_rope"]], -1), 1 / math.sqrt(512),
                "mla q_b")
  check_uniform(np.concatenate([mla["kv_b_nope"], mla["kv_b_v"]], -1), 1 / math.sqrt(256),
                "mla kv_b")
  assert np.all(np.asarray(mla["q_a_norm"]["weight"]) == 1)
  assert np.all(np.asarray(mla["kv_a_norm"]["weight"]) == 1)
  assert not np.any(np.asarray(mla["c_proj"]))


@pytest.mark.parametrize("spec,x_shape,w_shape", [
    ("btd,dn->btn", (1, 1, 8), (8, 5)),            # one row: padded to two, then cut
    ("bthv,hvd->btd", (1, 1, 3, 4), (3, 4, 6)),
    ("btd,vd->btv", (1, 1, 4), (7, 4)),            # the LM head's orientation (w is N x K)
    ("btd,dhr->bthr", (1, 1, 5), (5, 3, 2)),       # several kept axes
    ("btd,dn->btn", (2, 3, 8), (8, 5)),            # several rows: the plain product
])
@pytest.mark.parametrize("kernel", [False, True], ids=["gemm", "gemv_kernel"])
def test_dense_equals_the_float64_product(spec, x_shape, w_shape, kernel):
  """`dense` (a one-row product as a GEMM with a zero second row, or by the GEMV kernel,
  interpreted here) is the einsum, for one row and for several."""
  rng = np.random.default_rng(0)
  x, w = rng.normal(size=x_shape), rng.normal(size=w_shape)
  got = dense(spec, jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), kernel=kernel)
  assert got.shape == np.einsum(spec, x, w).shape and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), np.einsum(spec, x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("output_major", [False, True])
@pytest.mark.parametrize("splits,want_splits", [(4, 4), (3, 1)])  # 3 does not divide K = 8
def test_packed_partials_of_several_rows_sum_to_the_product(output_major, splits,
                                                             want_splits):
  """Several rows: `splits` fp32 partials over equal K ranges whose sum is the float64
  product (one partial, the product itself, when the split count does not divide K)."""
  rng = np.random.default_rng(1)
  x, w = rng.normal(size=(3, 1, 8)), rng.normal(size=(8, 5))
  stored = w.T if output_major else w
  got, _ = packed_partials(jnp.asarray(x, jnp.float32), jnp.asarray(stored, jnp.float32),
                           output_major, splits=splits)
  assert got.shape == (want_splits, 3, 5)
  np.testing.assert_allclose(np.asarray(got, np.float64).sum(axis=0), x[:, 0] @ w,
                             rtol=1e-5, atol=1e-5)

"""The Pallas TPA factor-contraction kernels (interpret mode on CPU) against float64 NumPy,
forward and both factor gradients, their dispatch (model.contract_impl), and the model's loss
and gradients with the kernels against the einsum path."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_ref as ref
from t6_jax import config as config_lib
from t6_jax import kernels
from t6_jax.kernels import tpa_contract_gpu
from t6_jax.kernels.tpa_contract_gpu import slab_tokens, tpa_contract
from t6_jax.model import init_params, model_from_params
from t6_jax.sharding import RULES, make_mesh


def factors(rng, lead, heads, ranks, head_dim, dtype):
  rnd = lambda *s: jnp.asarray(rng.standard_normal(lead + s), dtype)
  return [(rnd(heads, r), rnd(r, head_dim)) for r in ranks]


def grads_of(fn, pairs, douts):
  """(outputs, gradients of sum(out * dout) for every factor) of a contraction function."""
  flat = [x for pair in pairs for x in pair]

  def loss(flat):
    outs = fn(list(zip(flat[0::2], flat[1::2])))
    total = sum(jnp.sum(o.astype(jnp.float32) * d) for o, d in zip(outs, douts))
    return total, outs

  (_, outs), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(flat)
  return outs, grads


def test_slab_tokens():
  assert [slab_tokens(34, r) for r in (64, 128, 256)] == [1, 3, 7]
  assert slab_tokens(78, 64) == 1  # more heads than rows: still one token a program
  # A bound on the block diagonal's columns: q (rank 6) two tokens, k / v (rank 2) three.
  assert [slab_tokens(34, 128, r, 16) for r in (6, 2)] == [2, 3]
  assert [slab_tokens(34, 64, r, 16) for r in (6, 2)] == [1, 1]
  assert slab_tokens(34, 128, 17, 16) == 1
  with pytest.raises(ValueError, match="rows=512"):
    tpa_contract(factors(np.random.default_rng(0), (2,), 3, (2,), 8, jnp.float32),
                 interpret=True, fwd={"rows": 512})


@pytest.mark.parametrize("heads,ranks,head_dim,tune", [
    (5, (6, 2, 1), 16, {"rows": 16}),    # 3 tokens a program, 14 tokens: a short last slab
    (3, (2,), 24, {"rows": 8}),          # d_h padded to 32, rows 6 of 16, columns 4 of 16
    (12, (6, 2, 2), 16, {"rows": 64}),   # 5 tokens: rows 60 of 64, q columns 30 of 32
    (34, (6, 2, 2), 64, {"rows": 256}),  # T6-small's heads, 7 tokens a program (backward:
                                         # 2 of q and 7 of k, v within 16 columns)
    (34, (6, 2, 2), 64, {"rows": 128, "cols": 6}),  # the columns bound: one token of q, 3 of k
    (47, (6, 2, 2), 64, {"rows": 32}),   # more heads than rows: one token, 47 of 64 rows
])
def test_kernels_match_numpy(heads, ranks, head_dim, tune):
  rng = np.random.default_rng(heads + head_dim)
  lead = (2, 7)
  pairs = factors(rng, lead, heads, ranks, head_dim, jnp.float32)
  douts = [jnp.asarray(rng.standard_normal(lead + (heads, head_dim)), jnp.float32)
           for _ in ranks]
  run = lambda ps: tpa_contract(ps, interpret=True, fwd=tune, bwd=tune)
  outs, grads = grads_of(run, pairs, douts)
  for i, ((a, b), dout) in enumerate(zip(pairs, douts)):
    want, want_da, want_db = ref.tpa_contract(a, b, dout)
    assert outs[i].shape == want.shape and outs[i].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(outs[i]), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grads[2 * i]), want_da, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grads[2 * i + 1]), want_db, rtol=1e-5, atol=1e-5)


def test_bf16_kernels_round_once_from_fp32():
  """16-bit factors: fp32 accumulation, one rounding of the result (within bf16's 2^-8)."""
  rng = np.random.default_rng(0)
  pairs = factors(rng, (3, 5), 34, (6, 2), 64, jnp.bfloat16)
  douts = [jnp.asarray(rng.standard_normal((3, 5, 34, 64)), jnp.float32) for _ in range(2)]
  outs, grads = grads_of(lambda ps: tpa_contract(ps, interpret=True), pairs, douts)
  for i, ((a, b), dout) in enumerate(zip(pairs, douts)):
    # The kernels see the output gradient in the factors' dtype.
    dout16 = np.asarray(dout.astype(jnp.bfloat16))
    for got, want in zip((outs[i], grads[2 * i], grads[2 * i + 1]),
                         ref.tpa_contract(a, b, dout16)):
      assert got.dtype == jnp.bfloat16
      np.testing.assert_allclose(np.asarray(got, np.float64), want,
                                 rtol=2**-8, atol=2**-8 * np.abs(want).max())


def test_dispatch_setting():
  rng = np.random.default_rng(1)
  pairs = factors(rng, (2, 6), 3, (2, 2), 8, jnp.bfloat16)
  uses_kernel = lambda impl: "pallas_call" in str(
      jax.make_jaxpr(lambda ps: kernels.tpa_contract(ps, impl=impl))(pairs))
  assert config_lib.load("t6-small").model.contract_impl == "auto"  # the default
  assert not uses_kernel("xla")
  assert not uses_kernel("auto")  # outside a GPU train step: XLA's einsum
  assert uses_kernel("pallas")
  for bad in ("triton", "cuda"):
    with pytest.raises(ValueError, match=f"contract_impl='{bad}'"):
      kernels.tpa_contract(pairs, impl=bad)
  with pytest.raises(config_lib.ConfigError, match="contract_impl"):
    config_lib.load("tiny", ["model.contract_impl=triton"])
  want = [tpa_contract_gpu.contract_einsum(a, b) for a, b in pairs]
  for got, w in zip(kernels.tpa_contract(pairs, impl="pallas"), want):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(w, np.float32),
                               rtol=2**-7, atol=2**-7 * float(jnp.abs(w).max()))


def test_on_gpu_pallas_compiles_the_kernels_and_mixed_dtypes_take_the_einsum(monkeypatch):
  calls = []
  monkeypatch.setattr(kernels, "target", lambda: ("gpu", None))
  monkeypatch.setattr(tpa_contract_gpu, "tpa_contract",
                      lambda pairs, interpret: calls.append(interpret) or ["kernel"] * len(pairs))
  rng = np.random.default_rng(2)
  q, k, v = factors(rng, (2, 4), 3, (6, 2, 2), 8, jnp.bfloat16)
  assert kernels.tpa_contract([q, k, v], impl="pallas") == ["kernel"] * 3
  assert calls == [False]  # one launch, compiled (not interpreted)
  assert kernels.tpa_contract([q, k, v], impl="xla")[0].shape == (2, 4, 3, 8)
  mixed = [(q[0], q[1].astype(jnp.float32))]
  assert kernels.tpa_contract(mixed, impl="pallas")[0].shape == (2, 4, 3, 8)
  assert calls == [False]


def test_queries_against_a_longer_cache_take_two_launches():
  """q (T positions) and k, v (S cached positions): two launches, same results."""
  rng = np.random.default_rng(3)
  q = factors(rng, (2, 3), 4, (6,), 8, jnp.float32)[0]
  k, v = factors(rng, (2, 9), 4, (2, 2), 8, jnp.float32)
  jaxpr = str(jax.make_jaxpr(lambda ps: kernels.tpa_contract(ps, impl="pallas"))([q, k, v]))
  assert jaxpr.count("pallas_call") == 2
  for got, (a, b) in zip(kernels.tpa_contract([q, k, v], impl="pallas"), [q, k, v]):
    np.testing.assert_allclose(np.asarray(got), ref.tpa_contract(a, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rules,kernel", [("fsdp", True), ("fsdp_tp", False)])
def test_on_a_mesh(rules, kernel):
  """Batch split only (fsdp): the kernels per shard under shard_map; heads split over tensor
  (fsdp_tp): the einsum. Both match NumPy, gradients included."""
  tensor = 2 if rules == "fsdp_tp" else 1
  mesh = make_mesh(data=1, fsdp=4 // tensor, tensor=tensor, devices=jax.devices()[:4],
                   rules=rules)
  rng = np.random.default_rng(4)
  pairs = factors(rng, (4, 5), 6, (6, 2), 8, jnp.float32)
  douts = [jnp.asarray(rng.standard_normal((4, 5, 6, 8)), jnp.float32) for _ in range(2)]
  run = lambda ps: kernels.tpa_contract(ps, impl="pallas", rules=RULES[rules])
  with jax.set_mesh(mesh):
    jaxpr = str(jax.make_jaxpr(run)(pairs))
    outs, grads = grads_of(run, pairs, douts)
  assert ("pallas_call" in jaxpr) == kernel and ("shard_map" in jaxpr) == kernel
  for i, ((a, b), dout) in enumerate(zip(pairs, douts)):
    for got, want in zip((outs[i], grads[2 * i], grads[2 * i + 1]),
                         ref.tpa_contract(a, b, dout)):
      np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention,dtype", [("tpa", "float32"), ("tpa_kvonly", "float32"),
                                             ("tpa", "bfloat16")])
def test_model_loss_and_grads_kernel_vs_einsum(attention, dtype):
  """A tiny model (5 heads, R_q 6): the loss and every parameter gradient with the kernels
  equal the einsum path's (float32: to rounding; bfloat16: to the einsum's extra rounding of
  the bf16 product before dividing by R)."""
  cfg = config_lib.load("tiny", [f"model.attention={attention}", "model.num_layers=1",
                                 "model.num_heads=5", f"model.dtype={dtype}"]).model
  rng = np.random.default_rng(5)
  shapes = jax.eval_shape(lambda: init_params(cfg, 0))
  params = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape) / 8, x.dtype),
                        shapes)
  tokens = jnp.asarray(rng.integers(0, 256, (2, 24)), jnp.int32)
  targets = jnp.roll(tokens, -1, axis=1)

  def loss(params, impl):
    model = model_from_params(dataclasses.replace(cfg, contract_impl=impl), params)
    logits = model(tokens).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))

  step = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  assert "pallas_call" in str(jax.make_jaxpr(loss, static_argnums=1)(params, "pallas"))
  (l_k, g_k), (l_x, g_x) = step(params, "pallas"), step(params, "xla")
  tol = 1e-5 if dtype == "float32" else 2e-2
  np.testing.assert_allclose(float(l_k), float(l_x), rtol=tol)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(g_k), jax.tree.leaves(g_x)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w),
                               atol=tol * max(1e-3, float(np.abs(w).max())), rtol=tol,
                               err_msg=jax.tree_util.keystr(path))

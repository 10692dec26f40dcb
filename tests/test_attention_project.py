"""TPA's one-GEMM projection (`TPA.project`) against its separate projections, and the
fallback to separate GEMMs where the rules shard heads (tensor parallelism).

float32 throughout: the concatenated GEMM sums the same products as the separate ones, so
every output agrees to 1e-5 relative (a wrong split offset or reshape is off by O(1))."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t6_jax import config as config_lib
from t6_jax.model.attention import TPA, Attention
from t6_jax.model.layers import rope_tables
from t6_jax.sharding import rules_table


@pytest.mark.parametrize("attention", ["tpa", "tpa_kvonly"])
def test_one_gemm_projection_equals_separate(attention):
  cfg = config_lib.load("tiny", [f"model.attention={attention}"]).model
  attn = TPA(cfg, nnx.Rngs(0), rules_table("fsdp"))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, cfg.d_model)), jnp.float32)
  rope = rope_tables(jnp.broadcast_to(jnp.arange(5), (2, 5)), cfg.head_dim, 1e4, False)
  q, e = jax.jit(attn.project)(x, rope)
  want_q, want_e = Attention.project(attn, x, rope)
  assert type(q) is type(want_q) and sorted(e) == sorted(want_e)
  for got, want in zip(jax.tree.leaves((q, e)), jax.tree.leaves((want_q, want_e))):
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_tensor_parallel_rules_keep_separate_gemms(monkeypatch):
  cfg = config_lib.load("tiny").model
  attn = TPA(cfg, nnx.Rngs(0), rules_table("fsdp_tp"))
  called = []
  monkeypatch.setattr(Attention, "project",
                      lambda self, x, rope: called.append(True) or (None, None))
  attn.project(jnp.zeros((1, 2, cfg.d_model)), None)
  assert called

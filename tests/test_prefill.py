"""The one-pass prefill (`Transformer.prefill`: rows rotated so the aligned causal mask of
training is exact) stores the same cache and gives the same last logits as prompts run chunk
by chunk against the cache (`Transformer.extend`), for every attention type, ragged rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t6_jax.decode.cache import init_cache
from t6_jax.decode.generate import left_align, one_pass_prefill
from t6_jax.model import model_from_params

from test_decode import ATTENTIONS, PROMPTS, tiny_cfg, tiny_params

WIDTH = 12  # prompts of 1..8 tokens, left-padded to 12: every row has padding
CHUNK = 5


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_one_pass_equals_chunks(attention):
  cfg = tiny_cfg(attention)
  model = model_from_params(cfg.model, tiny_params(cfg), "fsdp")
  tokens, pad = left_align(PROMPTS, WIDTH)
  tokens, pad = jnp.asarray(tokens), jnp.asarray(pad)
  empty = init_cache(cfg.model, len(PROMPTS), 16, "float32", "fsdp").entries

  @jax.jit
  def one_pass(entries):
    return model.prefill(tokens, entries, pad)

  @jax.jit
  def chunks(entries):
    for start in range(0, WIDTH, CHUNK):
      stop = min(WIDTH, start + CHUNK)
      logits, entries = model.extend(tokens[:, start:stop], entries, pad, start, kv_len=stop)
    return logits, entries

  logits_a, entries_a = one_pass(empty)
  logits_b, entries_b = chunks(empty)
  np.testing.assert_allclose(logits_a, logits_b, rtol=2e-5, atol=2e-5)
  for name in entries_a:
    for b, p in enumerate(np.asarray(pad)):  # the prompt's slots; padding slots are never read
      np.testing.assert_allclose(entries_a[name][:, b, p:WIDTH], entries_b[name][:, b, p:WIDTH],
                                 rtol=2e-5, atol=2e-5, err_msg=f"{name}, row {b}")
    assert np.all(np.asarray(entries_a[name][:, :, WIDTH:]) == 0)  # nothing past the prompts


def test_one_pass_choice():
  cfg = tiny_cfg("tpa").model
  assert one_pass_prefill(cfg, 8, 8)
  assert not one_pass_prefill(cfg, 9, 8)  # CPU, longer than a chunk: chunks (no fused kernel)

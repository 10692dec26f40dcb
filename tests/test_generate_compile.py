"""Generation compiles once per prompt bucket, and the early-stopping loop (scanned chunks
between exit tests) gives the tokens and cache length of the plain scan."""

import jax.numpy as jnp
import numpy as np

from t6_jax import config as config_lib
from t6_jax.decode import decode, generate, prefill
from t6_jax.decode.generate import cache_length, compile_seconds, stop_check_every
from test_decode import tiny_cfg, tiny_params


def test_two_prompt_lengths_of_one_bucket_compile_once():
  cfg = tiny_cfg("gqa")
  params = tiny_params(cfg)
  kw = dict(max_new_tokens=4, stop_tokens=(255,))
  short, long = [[5, 6, 7, 8, 9]], [[1, 2, 3, 4, 5, 6, 7]]  # both in the bucket of 8
  assert cache_length(cfg, 5, 4) == cache_length(cfg, 7, 4)
  generate(params, cfg, short, max_len=cache_length(cfg, 5, 4), **kw)
  before = compile_seconds()
  generate(params, cfg, long, max_len=cache_length(cfg, 7, 4), **kw)
  assert compile_seconds() == before  # no new program: prefill and token loop reused
  generate(params, cfg, [list(range(1, 10))], max_len=cache_length(cfg, 9, 4), **kw)
  assert compile_seconds() > before  # the next bucket (16) compiles its own


def test_cache_length_buckets():
  cfg = config_lib.load("tiny", ["decode.max_len=16", "decode.prefill_chunk=512"])
  assert cache_length(cfg, 3, 4) == 16  # at least decode.max_len
  assert cache_length(cfg, 1000, 256) == cache_length(cfg, 600, 256) == 1024 + 256
  assert cache_length(cfg, 1030, 256) == 1536 + 256  # multiples of the prefill chunk


def test_stop_check_chunks():
  assert stop_check_every(3) == 3
  assert stop_check_every(255) == 5  # 51 chunks, no token wasted
  assert stop_check_every(11) == 6   # 2 chunks, 1 token past the end
  for n in range(1, 200):
    k = stop_check_every(n)
    assert 1 <= k <= 8 and -(-n // k) * k - n < max(k, 1)


def test_early_stopping_loop_equals_scan_in_a_full_cache():
  """11 model steps in chunks of 6: the extra step at the end runs past the cache (19 slots:
  8 prompt + 11 new), and must not change the tokens or the returned length."""
  cfg = tiny_cfg("gqa")
  params = tiny_params(cfg)
  prompts = [[3, 17, 250, 9, 41], [7, 7, 100, 2, 64, 33, 201, 5]]
  tokens = np.zeros((2, 8), np.int32)
  for b, p in enumerate(prompts):
    tokens[b, :len(p)] = p
  outs = []
  for stop in ((), (255,)):
    cache, logits = prefill(cfg, params, tokens, [len(p) for p in prompts], max_len=19)
    new, cache = decode(cfg, params, cache, logits, steps=12, stop_tokens=stop)
    outs.append((np.asarray(new).tolist(), int(cache.length)))
  assert 255 not in sum(outs[0][0], [])
  assert outs[1] == outs[0] and outs[0][1] == 19

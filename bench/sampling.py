"""The cost of one sampling step of the decode loop, by form: greedy, temperature, top-p through
the backend's cut, top-k + top-p through `lax.top_k` candidates, and the top-p cut alone by
sort and by bisection.

  python bench/sampling.py                          # 50,304 logits, batch 1, 16 and 64
  python bench/sampling.py --batches 1 --vocab 32000

Each form runs --steps sampling steps inside one jitted `fori_loop` over fixed fp32 logits
(each step's token perturbs the next step's logits, so no step can be skipped), best of
--repeats; reports us per step. `t6_jax.decode.generate.sample_logits` picks its forms by
backend and rows a step (docs/decoding.md), and this shows why. Prints only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from t6_jax import cli  # noqa: E402

cli.quiet_startup()  # no libtpu start-up (or its profiler plugin) on a host without a TPU

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from t6_jax.decode.generate import (candidate_count, cut_by_search, cut_by_sort,  # noqa: E402
                                    sample_logits)

TEMPERATURE, TOP_P, TOP_K = 0.8, 0.95, 50


def forms(vocab: int) -> dict:
  """name -> fn(logits_BxV, key) -> token ids (B,)."""
  def sampler(greedy, filters, top_k, cap):
    return lambda x, key: sample_logits(x, key, TEMPERATURE, top_k, TOP_P, greedy=greedy,
                                        use_filters=filters, top_k_cap=cap)

  def cut_only(cut):
    return lambda x, key: jnp.argmax(x >= cut(x, jnp.int32(vocab), jnp.float32(TOP_P)), axis=-1)

  cap = candidate_count(TOP_K)  # the candidates path, timed on every backend
  return {"greedy": sampler(True, False, 0, 0),
          "temperature": sampler(False, False, 0, 0),
          f"top-p {TOP_P} (the cut sample_logits picks)": sampler(False, True, 0, 0),
          f"top-k {TOP_K} + top-p, {cap} candidates": sampler(False, True, TOP_K, cap),
          "top-p cut alone: sort": cut_only(cut_by_sort),
          "top-p cut alone: bisection": cut_only(cut_by_search)}


def time_form(fn, batch: int, vocab: int, steps: int, repeats: int) -> float:
  """Seconds per sampling step."""
  logits_BxV = jax.random.normal(jax.random.key(0), (batch, vocab), jnp.float32) * 3

  @jax.jit
  def loop(logits_BxV, key):
    def body(_, carry):
      tok_B, key = carry
      key, sub = jax.random.split(key)
      x_BxV = logits_BxV + tok_B[:, None].astype(jnp.float32) * 1e-9
      return fn(x_BxV, sub).astype(jnp.int32), key
    return jax.lax.fori_loop(0, steps, body, (jnp.zeros((batch,), jnp.int32), key))[0]

  key = jax.random.key(1)
  loop(logits_BxV, key).block_until_ready()  # compile
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    loop(logits_BxV, key).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return best / steps


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batches", default="1,16,64", help="comma-separated rows per step")
  p.add_argument("--vocab", type=int, default=50304)
  p.add_argument("--steps", type=int, default=50, help="sampling steps per timed loop")
  p.add_argument("--repeats", type=int, default=5, help="timed loops (best is kept)")
  args = p.parse_args(argv)
  batches = [int(b) for b in args.batches.split(",")]
  table = forms(args.vocab)
  print(f"sampling over {args.vocab:,} fp32 logits on {jax.devices()[0].device_kind} "
        f"(jax {jax.__version__}); us per step, best of {args.repeats} loops of {args.steps}\n")
  print("| form | " + " | ".join(f"batch {b}" for b in batches) + " |")
  print("|---|" + "---|" * len(batches))
  for name, fn in table.items():
    cells = [f"{1e6 * time_form(fn, b, args.vocab, args.steps, args.repeats):.1f}"
             for b in batches]
    print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

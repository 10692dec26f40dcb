"""Prefill speed: a long prompt into an empty decode cache, tokens/s per model.

  python bench/prefill.py --models t6-small,mha-small,gqa-small --batches 1 --lengths 32768

Random bf16 weights; the prompt's tokens are random. Each (model, batch, length) compiles the
jitted prefill of `t6_jax.decode` (the one pass of `Transformer.prefill` where a fused
attention kernel runs it, else chunks against the cache), runs it once to warm up, then times
`--repeats` calls and keeps the best. Prints a markdown table; --out appends it to a file.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default="t6-small,mha-small,gqa-small")
  p.add_argument("--batches", default="1")
  p.add_argument("--lengths", default="32768")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--tiny", action="store_true",
                 help="tiny configs; --models then names attention types (a CPU smoke test)")
  p.add_argument("--out", default="", help="markdown file to append the table to")
  p.add_argument("overrides", nargs="*", metavar="section.key=value")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  from t6_jax import cli
  cli.quiet_startup()
  import jax
  import numpy as np

  from t6_jax import config as config_lib
  from t6_jax.decode import prefill
  from t6_jax.decode.generate import one_pass_prefill, prefill_chunk
  from t6_jax.model import init_params

  rows = []
  for name in args.models.split(","):
    for batch in map(int, args.batches.split(",")):
      for length in map(int, args.lengths.split(",")):
        over = [f"decode.max_len={length + 64}", f"model.max_seq_len={length + 64}",
                "decode.cache_dtype=bfloat16", *args.overrides]
        if args.tiny:
          cfg = config_lib.load("tiny", [f"model.attention={name}", *over])
        else:
          cfg = config_lib.load(name, over)
        params = jax.jit(lambda: init_params(cfg.model, 0))()
        params = jax.tree.map(lambda x: x.astype(cfg.model.dtype) if x.ndim > 1 else x, params)
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, cfg.model.vocab_size, (batch, length), dtype=np.int32)
        lengths = [length] * batch
        chunk = prefill_chunk(cfg, batch, cfg.decode.max_len)
        t0 = time.perf_counter()
        cache, logits = prefill(cfg, params, tokens, lengths)
        jax.block_until_ready(logits)
        compile_s = time.perf_counter() - t0
        best = float("inf")
        for _ in range(args.repeats):
          t0 = time.perf_counter()
          cache, logits = prefill(cfg, params, tokens, lengths)
          jax.block_until_ready(logits)
          best = min(best, time.perf_counter() - t0)
        del cache
        one = one_pass_prefill(cfg.model, length, chunk)
        rows.append((name, batch, length, "one pass" if one else f"chunks of {chunk}",
                     1e3 * best, batch * length / best, compile_s))
        print(f"{name} B={batch} T={length}: {1e3 * best:.1f} ms, "
              f"{batch * length / best:,.0f} tokens/s ({rows[-1][3]}; first call "
              f"{compile_s:.1f} s)", flush=True)
  date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  lines = ["", f"`python bench/prefill.py --models {args.models} --batches {args.batches} "
           f"--lengths {args.lengths}` on {jax.devices()[0].device_kind} (jax "
           f"{jax.__version__}, {date}); best of {args.repeats} calls after a first "
           f"(compiling) call.", "",
           "| model | batch | prompt tokens | path | ms | tokens/s | first call s |",
           "|---|---|---|---|---|---|---|"]
  lines += [f"| {n} | {b} | {t:,} | {p} | {ms:.1f} | {tps:,.0f} | {c:.1f} |"
            for n, b, t, p, ms, tps, c in rows]
  print("\n".join(lines))
  if args.out:
    with open(args.out, "a") as f:
      f.write("\n".join(lines) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Throughput of continuation scoring (what the multiple-choice tasks spend their time on).

  python -m t6_jax.eval.bench --config t6-small --requests 4096 --rows 64
  python -m t6_jax.eval.bench --config mha-small --requests 4096 --rows 64

Random params and random requests shaped like HellaSwag's (context 40-120 tokens, continuation
10-40), scored over all devices. Prints the compile time, requests/s and scored tokens/s of a
second pass (compiled), and how many programs were compiled.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m t6_jax.eval.bench", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="t6-small")
  parser.add_argument("--requests", type=int, default=4096)
  parser.add_argument("--rows", type=int, default=64, help="sequences per forward")
  parser.add_argument("--context", default="40,120", help="context length range (tokens)")
  parser.add_argument("--continuation", default="10,40", help="continuation length range")
  parser.add_argument("overrides", nargs="*", metavar="section.key=value")
  args = parser.parse_args(argv)

  from t6_jax import config as config_lib
  from t6_jax.eval.scoring import Scorer
  from t6_jax.model import init_params
  from t6_jax.sharding import make_mesh

  cfg = config_lib.load(args.config, args.overrides)
  mesh = make_mesh(data=1, fsdp=-1, tensor=1)
  shapes = jax.eval_shape(lambda: init_params(cfg.model, seed=0))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.02, s.shape), s.dtype), shapes)
  (c0, c1), (x0, x1) = (map(int, args.context.split(",")),
                        map(int, args.continuation.split(",")))
  pairs = [(rng.integers(0, cfg.model.vocab_size, rng.integers(c0, c1 + 1)).tolist(),
            rng.integers(0, cfg.model.vocab_size, rng.integers(x0, x1 + 1)).tolist())
           for _ in range(args.requests)]
  scored = sum(len(x) for _, x in pairs)
  scorer = Scorer(cfg, params, mesh=mesh, rows=args.rows)
  print(f"{args.config}: {cfg.model.attention}, {jax.device_count()} x "
        f"{jax.devices()[0].device_kind}, rows {scorer.rows}, buckets {scorer.buckets}")
  start = time.perf_counter()
  scorer.loglikelihood(pairs)
  first = time.perf_counter() - start
  start = time.perf_counter()
  scorer.loglikelihood(pairs)
  second = time.perf_counter() - start
  print(f"first pass (with compiles) {first:.1f} s; compiled pass {second:.2f} s: "
        f"{args.requests / second:,.0f} requests/s, {scored / second:,.0f} scored tokens/s; "
        f"{scorer.compiled_shapes()} programs compiled")
  return 0


if __name__ == "__main__":
  sys.exit(main())

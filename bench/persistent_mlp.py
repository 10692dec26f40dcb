"""A decode step's MLP sublayer at batch 1 as the step runs it, two GEMV kernels, against one
persistent kernel doing both products with a grid-wide barrier between them.

  python bench/persistent_mlp.py                         # one GPU: T6-XL's MLP, both forms
  python bench/persistent_mlp.py --per_sm 1,2 --num_warps 4,8
  python bench/persistent_mlp.py --config tiny --check   # any host: the persistent form's
                                                         # values against the two kernels
  python bench/persistent_mlp.py --lower                 # any host: lower both for CUDA

The step's MLP at batch 1 (`layers.Mlp` on the GEMV path) is two kernels, with one kernel
boundary (launch, ramp, tail) between them, one of about six in a T6-XL layer;
`kernels/mlp_gpu.py` runs it as one persistent kernel of `--per_sm` programs per SM that meet
at a grid-wide barrier between the two products. Both forms compute the same values in the
same order, so their outputs must be equal bit for bit (checked in every run).

Reports us per sublayer for each form and the saving per boundary. Prints only. Off GPU,
--check runs both in interpret mode with one persistent program (the barrier then passes at
once), which tests the indexing, not the barrier.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from t6_jax import cli  # noqa: E402
from timing import best_seconds, lowered_for_cuda  # noqa: E402

cli.quiet_startup()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from t6_jax import config as config_lib  # noqa: E402
from t6_jax.kernels.mlp_gpu import persistent_mlp, two_kernels  # noqa: E402
from t6_jax.kernels.tpa_decode_gpu import num_sms  # noqa: E402
from t6_jax.model.layers import RMS_EPS  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="t6-xl", help="preset whose d_model and MLP width to use")
  p.add_argument("--per_sm", default="1,2",
                 help="persistent programs per SM, comma-separated (each a run)")
  p.add_argument("--num_warps", default="4", help="persistent kernel warps, comma-separated")
  p.add_argument("--reps", type=int, default=48, help="sublayers chained per timed call")
  p.add_argument("--check", action="store_true",
                 help="interpret mode, one persistent program: compare values, no timing")
  p.add_argument("--lower", action="store_true",
                 help="only lower both forms for CUDA (no GPU needed) and report")
  args = p.parse_args(argv)
  args.per_sm = [int(v) for v in args.per_sm.split(",")]
  args.num_warps = [int(v) for v in args.num_warps.split(",")]
  return args


def chained(fn, r_D, w_in, w_out, *, reps):
  return lax.fori_loop(0, reps, lambda _, r: fn(r, w_in, w_out, eps=RMS_EPS), r_D)


def main(argv=None) -> int:
  args = parse_args(argv)
  cfg = config_lib.load(args.config).model
  d, f = cfg.d_model, cfg.mlp_dim
  keys = jax.random.split(jax.random.key(0), 3)
  r_D = jax.random.normal(keys[0], (d,), jnp.float32).astype(jnp.bfloat16)
  w_in = (jax.random.normal(keys[1], (2 * f, d), jnp.float32) / d**0.5).astype(jnp.bfloat16)
  w_out = (jax.random.normal(keys[2], (f, d), jnp.float32) / f**0.5).astype(jnp.bfloat16)
  mib = (w_in.size + w_out.size) * 2 / 2**20
  print(f"{args.config}: d_model {d}, MLP width {f}, {mib:.1f} MiB of weights a sublayer")
  if args.check:
    want = np.asarray(two_kernels(r_D, w_in, w_out, eps=RMS_EPS, interpret=True), np.float32)
    got = np.asarray(persistent_mlp(r_D, w_in, w_out, eps=RMS_EPS, interpret=True),
                     np.float32)
    print(f"check (interpret, 1 program): max |persistent - two kernels| = "
          f"{np.max(np.abs(got - want)):.3g}")
    return 0 if np.array_equal(got, want) else 1
  sms = num_sms()  # (an H200's 132 off GPU)
  if args.lower:
    specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (r_D, w_in, w_out)]
    for name, fn in [("two kernels", two_kernels)] + [
        (f"persistent, {p} per SM, {w} warps",
         functools.partial(persistent_mlp, per_sm=p, num_warps=w))
        for p in args.per_sm for w in args.num_warps]:
      text = lowered_for_cuda(jax.jit(functools.partial(chained, fn, reps=args.reps)), *specs)
      print(f"{name}: lowered for CUDA ({len(text):,} characters)")
    return 0
  base = jax.jit(functools.partial(chained, two_kernels, reps=args.reps))
  want = np.asarray(jax.block_until_ready(base(r_D, w_in, w_out)), np.float32)
  base_us = best_seconds(base, (r_D, w_in, w_out))[0] / args.reps * 1e6
  print(f"two kernels: {base_us:.2f} us a sublayer ({mib * 2**20 / base_us / 1e6:.2f} TB/s)",
        flush=True)
  for per_sm in args.per_sm:
    for warps in args.num_warps:
      fn = jax.jit(functools.partial(chained, functools.partial(
          persistent_mlp, per_sm=per_sm, num_warps=warps), reps=args.reps))
      us, out = best_seconds(fn, (r_D, w_in, w_out))
      us = us / args.reps * 1e6
      same = np.array_equal(np.asarray(out, np.float32), want)
      print(f"persistent, {per_sm} per SM ({per_sm * sms} programs), {warps} warps: {us:.2f} us "
            f"a sublayer, {base_us - us:+.2f} us against two kernels"
            f"{'' if same else '  DIFFERENT from the two kernels'}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

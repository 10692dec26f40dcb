"""A decode step's MLP sublayer at batch 1 as the step runs it, two GEMV kernels, against one
persistent kernel doing both products with a grid-wide barrier between them.

  python bench/persistent_mlp.py                         # one GPU: T6-XL's MLP, both forms
  python bench/persistent_mlp.py --per_sm 1,2 --num_warps 4,8
  python bench/persistent_mlp.py --config tiny --check   # any host: the persistent form's
                                                         # values against the two kernels
  python bench/persistent_mlp.py --lower                 # any host: lower both for CUDA

The step's MLP at batch 1 (`layers.Mlp` on the GEMV path) is two kernels: the packed (gate |
up) product with the block's pre-norm computed inside it, written as fp32 K-split partial
sums, then the output projection, whose prologue forms silu(gate) * up from those partials and
whose epilogue adds its product to the residual stream (`gemv_gpu.gemv`). Between them sits
one kernel boundary (launch, ramp, tail), one of about six in a T6-XL layer. The persistent
form launches `--per_sm` programs per SM, all resident at once; each runs its share of the
first product's programs (the same `gemv_gpu._program` code with the same launch settings),
the programs meet at a barrier (an atomic counter, acquire-release at GPU scope, spun on), and
then run the second product's programs. Both forms compute the same values in the same order,
so their outputs must be equal bit for bit (checked in every run).

Measured on an H200 (2026-12-06 UTC): the persistent form was slower at every setting, at best
25.0 us against 21.2-22.1 (4 programs per SM; docs/benchmarks_log.md), so the step keeps the
two kernels.

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
from grid_barrier import grid_barrier  # noqa: E402

cli.quiet_startup()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as plgpu  # noqa: E402

from t6_jax import config as config_lib  # noqa: E402
from t6_jax.kernels import gemv_gpu  # noqa: E402
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


def _stage(program, programs, tune, refs, kw):
  """This persistent program's share of one product's (column tile, K split) programs."""
  total = tune["n_tiles"] * tune["splits"]

  def body(i, carry):
    v = program + i * programs
    pl.when(v < total)(lambda: gemv_gpu._program(v // tune["splits"], v % tune["splits"],
                                                 *refs, **kw))
    return carry

  lax.fori_loop(0, pl.cdiv(total, programs), body, jnp.int32(0))


def _persistent_kernel(r_ref, w1_ref, w2_ref, tickets_in, counter_in, part1_ref, part2_ref,
                       r_out_ref, ticket_ref, counter_ref, *, programs, t1, t2, kw1, kw2,
                       interpret):
  del tickets_in, counter_in  # aliased to ticket_ref, counter_ref (zeros in)
  program = pl.program_id(0)
  _stage(program, programs, t1, (r_ref, w1_ref, part1_ref), kw1)
  # Every program's partials are stored before any program reads them. (The interpreter
  # runs one program, which needs no wait, and cannot run the spin loop.)
  if not interpret:
    grid_barrier(counter_ref, programs)
  _stage(program, programs, t2,
         (part1_ref, w2_ref, r_ref, ticket_ref, part2_ref, r_out_ref, ticket_ref), kw2)


def two_kernels(r_D, w_in_NxD, w_out_FxD, *, interpret=False):
  """The step's form: `Mlp.__call__` on the GEMV path, prenorm and residual."""
  d = r_D.shape[0]
  parts, tickets = gemv_gpu.gemv(r_D, w_in_NxD, layout="nk", reduce=False,
                                 prologue=("rms_norm", RMS_EPS),
                                 zeros=gemv_gpu.ticket_slots(d), interpret=interpret)
  return gemv_gpu.gemv(parts, w_out_FxD, layout="kn", prologue=("swiglu",), residual=r_D,
                       tickets=tickets, interpret=interpret)


def persistent(r_D, w_in_NxD, w_out_FxD, *, programs, num_warps, interpret=False):
  """The same sublayer as one kernel of `programs` programs."""
  d, n2, f = r_D.shape[0], w_in_NxD.shape[0], w_out_FxD.shape[0]
  t1 = gemv_gpu.settings("nk", d, n2)
  t2 = gemv_gpu.settings("kn", f, d)
  kw1 = gemv_gpu.program_kwargs(t1, "nk", d, n2, prologue=("rms_norm", RMS_EPS), x_splits=1,
                                residual=False, zeros=0, interpret=interpret)
  kw2 = gemv_gpu.program_kwargs(t2, "kn", f, d, prologue=("swiglu",), x_splits=t1["splits"],
                                residual=True, zeros=0, interpret=interpret, x_volatile=True)
  tickets = jnp.zeros((gemv_gpu.ticket_slots(d),), jnp.int32)
  counter = jnp.zeros((1,), jnp.int32)
  operands = (r_D, w_in_NxD, w_out_FxD, tickets, counter)
  out_shape = [jax.ShapeDtypeStruct((t1["splits"], n2), jnp.float32),
               jax.ShapeDtypeStruct((t2["splits"], d), jnp.float32),
               jax.ShapeDtypeStruct((d,), r_D.dtype),
               jax.ShapeDtypeStruct(tickets.shape, jnp.int32),
               jax.ShapeDtypeStruct(counter.shape, jnp.int32)]
  whole = lambda shape: pl.BlockSpec(shape, lambda p: (0,) * len(shape))
  extra = {} if interpret else {"compiler_params": plgpu.CompilerParams(
      num_warps=num_warps, num_stages=max(t1["num_stages"], t2["num_stages"]))}
  outs = pl.pallas_call(
      functools.partial(_persistent_kernel, programs=programs, t1=t1, t2=t2, kw1=kw1,
                        kw2=kw2, interpret=interpret),
      grid=(programs,),
      in_specs=[whole(x.shape) for x in operands],
      out_specs=[whole(s.shape) for s in out_shape],
      out_shape=out_shape,
      input_output_aliases={3: 3, 4: 4},
      interpret=interpret,
      name="persistent_mlp",
      **extra,
  )(*operands)
  return outs[2]


def chained(fn, r_D, w_in, w_out, *, reps):
  return lax.fori_loop(0, reps, lambda _, r: fn(r, w_in, w_out), r_D)


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
    want = np.asarray(two_kernels(r_D, w_in, w_out, interpret=True), np.float32)
    got = np.asarray(persistent(r_D, w_in, w_out, programs=1, num_warps=4, interpret=True),
                     np.float32)
    print(f"check (interpret, 1 program): max |persistent - two kernels| = "
          f"{np.max(np.abs(got - want)):.3g}")
    return 0 if np.array_equal(got, want) else 1
  sms = 132 if args.lower else num_sms()
  if args.lower:
    specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (r_D, w_in, w_out)]
    for name, fn in [("two kernels", two_kernels)] + [
        (f"persistent, {p} per SM, {w} warps",
         functools.partial(persistent, programs=p * sms, num_warps=w))
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
          persistent, programs=per_sm * sms, num_warps=warps), reps=args.reps))
      us, out = best_seconds(fn, (r_D, w_in, w_out))
      us = us / args.reps * 1e6
      same = np.array_equal(np.asarray(out, np.float32), want)
      print(f"persistent, {per_sm} per SM ({per_sm * sms} programs), {warps} warps: {us:.2f} us "
            f"a sublayer, {base_us - us:+.2f} us against two kernels"
            f"{'' if same else '  DIFFERENT from the two kernels'}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

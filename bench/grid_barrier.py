"""What one persistent kernel per decode layer could save at batch 1: a grid-wide barrier
inside a Pallas (Triton) kernel against the boundary between two kernels.

  python bench/grid_barrier.py                      # one GPU: both modes, 16 and 4 MiB stages
  python bench/grid_barrier.py --mib 27 --stages 8
  python bench/grid_barrier.py --lower              # any host: lower both modes for CUDA only

A batch-1 decode step at T6-XL is a chain of about six dependent kernels a layer, four of
which stream a weight matrix (4.5-27 MB); each kernel boundary costs a launch, a ramp and a
tail that leave SMs idle (about 2.5 us beyond the bytes for a 16 MiB stream on an H200).
Merging a layer's kernels into one persistent kernel trades each boundary for a barrier across
its programs. This measures both forms of the same work: --stages stages, each streaming its
own --mib array (summed, so the loads stay) and then handing one vector to the next stage.
  chain       one kernel per stage (XLA launches them back to back, as in the decode loop);
  persistent  one kernel of one program per SM for all stages, the programs meeting at a
              barrier after each stage (an atomic counter, acquire-release at GPU scope,
              spun on; every program must be resident at once, hence one per SM).
Reports us per stage and TB/s for each mode, and checks the hand-off: the last stage's
vector must equal the number of stages run. Prints only; nothing is written. The persistent
kernel cannot run in interpret mode (its programs would spin one after another): off GPU use
--lower.
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

cli.quiet_startup()  # no libtpu start-up (or its profiler plugin) on a host without a TPU

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as plgpu  # noqa: E402

ROWS, COLS = 64, 128  # one tile: 64 x 128 bf16 = 16 KB
MODES = ("chain", "persistent")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--modes", default="chain,persistent,chain,persistent",
                 help=f"comma-separated, each of {', '.join(MODES)} (repeats allowed)")
  p.add_argument("--mib", default="16,4", help="array size per stage, MiB, comma-separated")
  p.add_argument("--stages", type=int, default=16, help="stages in the chain")
  p.add_argument("--programs", type=int, default=0,
                 help="programs per kernel (0: one per SM of the GPU, 132 when lowering)")
  p.add_argument("--num_warps", type=int, default=4)
  p.add_argument("--num_stages", type=int, default=3, help="Triton pipeline stages")
  p.add_argument("--reps", type=int, default=20, help="chains per timed call")
  p.add_argument("--lower", action="store_true",
                 help="only lower each mode for CUDA (no GPU needed) and report")
  args = p.parse_args(argv)
  args.modes = args.modes.split(",")
  bad = [m for m in args.modes if m not in MODES]
  if bad:
    p.error(f"--modes {','.join(bad)}: use {', '.join(MODES)}")
  args.mib = [int(m) for m in args.mib.split(",")]
  if args.stages < 1 or min(args.mib) < 1:
    p.error("--stages and every --mib must be at least 1")
  return args


def _stream(w_ref, stage, program, tiles):
  """The sum over this program's `tiles` tiles of w[stage], (COLS,) fp32."""
  cols_C = jnp.arange(COLS, dtype=jnp.int32)

  def tile(i, acc_C):
    rows_R = (program * tiles + i) * ROWS + jnp.arange(ROWS, dtype=jnp.int32)
    w_RxC = plgpu.load(w_ref.at[stage, rows_R[:, None], cols_C[None, :]])
    return acc_C + jnp.sum(w_RxC.astype(jnp.float32), axis=0)

  return lax.fori_loop(0, tiles, tile, jnp.zeros((COLS,), jnp.float32))


def _chain_kernel(dep_ref, w_ref, part_ref, out_ref, *, stage, tiles):
  program = pl.program_id(0)
  cols_C = jnp.arange(COLS, dtype=jnp.int32)
  plgpu.store(part_ref.at[program, cols_C], _stream(w_ref, stage, program, tiles))

  @pl.when(program == 0)
  def _():
    plgpu.store(out_ref.at[cols_C], plgpu.load(dep_ref.at[cols_C]) + 1.0)


def grid_barrier(counter_ref, target):
  """Wait until `target` arrivals have been counted in counter_ref (int32 (1,), zeros at the
  kernel's start), this program's included. Every thread's stores come before the arrival
  (CTA barrier, then a release by the acquire-release atomic); then spin on the counter. All
  programs must be resident at once, or the spin never ends."""
  plgpu.debug_barrier()
  arrived = plgpu.atomic_add(counter_ref, (0,), jnp.int32(1)) + 1
  lax.while_loop(lambda n: n < target,
                 lambda n: plgpu.atomic_add(counter_ref, (0,), jnp.int32(0)), arrived)
  plgpu.debug_barrier()


def _persistent_kernel(dep_ref, w_ref, counter_in, part_ref, out_ref, counter_ref, *, stages,
                       tiles, programs):
  del counter_in  # aliased to counter_ref (zeros in)
  program = pl.program_id(0)
  cols_C = jnp.arange(COLS, dtype=jnp.int32)
  for stage in range(stages):
    plgpu.store(part_ref.at[stage, program, cols_C], _stream(w_ref, stage, program, tiles))

    @pl.when(program == stage % programs)
    def _():  # the hand-off: the previous stage's vector (another program's store) + 1
      if stage == 0:
        prev_C = plgpu.load(dep_ref.at[cols_C])
      else:
        prev_C = plgpu.load(out_ref.at[stage - 1, cols_C], volatile=True)
      plgpu.store(out_ref.at[stage, cols_C], prev_C + 1.0)

    grid_barrier(counter_ref, (stage + 1) * programs)


def chain_mode(dep, w, *, programs, num_warps, num_stages):
  stages, rows, _ = w.shape
  tiles = rows // (programs * ROWS)
  params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  whole = lambda shape: pl.BlockSpec(shape, lambda p: (0,) * len(shape))
  for stage in range(stages):
    _, dep = pl.pallas_call(
        functools.partial(_chain_kernel, stage=stage, tiles=tiles),
        grid=(programs,),
        in_specs=[whole(dep.shape), whole(w.shape)],
        out_specs=[whole((programs, COLS)), whole((COLS,))],
        out_shape=[jax.ShapeDtypeStruct((programs, COLS), jnp.float32),
                   jax.ShapeDtypeStruct((COLS,), jnp.float32)],
        compiler_params=params, name="grid_barrier_chain",
    )(dep, w)
  return dep


def persistent_mode(dep, w, *, programs, num_warps, num_stages):
  stages, rows, _ = w.shape
  tiles = rows // (programs * ROWS)
  whole = lambda shape: pl.BlockSpec(shape, lambda p: (0,) * len(shape))
  counter = jnp.zeros((1,), jnp.int32)
  _, out, _ = pl.pallas_call(
      functools.partial(_persistent_kernel, stages=stages, tiles=tiles, programs=programs),
      grid=(programs,),
      in_specs=[whole(dep.shape), whole(w.shape), whole(counter.shape)],
      out_specs=[whole((stages, programs, COLS)), whole((stages, COLS)), whole((1,))],
      out_shape=[jax.ShapeDtypeStruct((stages, programs, COLS), jnp.float32),
                 jax.ShapeDtypeStruct((stages, COLS), jnp.float32),
                 jax.ShapeDtypeStruct((1,), jnp.int32)],
      input_output_aliases={2: 2},
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      name="grid_barrier_persistent",
  )(dep, w, counter)
  return out[-1]


def repeated(mode_fn, w, dep, *, reps, **kw):
  return lax.fori_loop(0, reps, lambda _, d: mode_fn(d, w, **kw), dep)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.programs:
    programs = args.programs
  elif args.lower:
    programs = 132
  else:
    from t6_jax.kernels.tpa_decode_gpu import num_sms
    programs = num_sms()
  fns = {"chain": chain_mode, "persistent": persistent_mode}
  for mib in args.mib:
    tiles = max(1, mib * 2**20 // (programs * ROWS * COLS * 2))
    shape = (args.stages, programs * tiles * ROWS, COLS)
    stage_bytes = programs * tiles * ROWS * COLS * 2
    dep = jnp.zeros((COLS,), jnp.float32)
    w = None
    for mode in args.modes:
      f = jax.jit(functools.partial(repeated, fns[mode], reps=args.reps, programs=programs,
                                    num_warps=args.num_warps, num_stages=args.num_stages))
      if args.lower:
        spec = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
        text = lowered_for_cuda(f, spec, dep)
        print(f"{mode}, {mib} MiB stages: lowered for CUDA ({len(text):,} characters)")
        continue
      if w is None:
        w = jnp.ones(shape, jnp.bfloat16)
      best, out = best_seconds(f, (w, dep))
      us = best / (args.reps * args.stages) * 1e6
      want = args.reps * args.stages
      ok = ("" if float(out[0]) == want else
            f"  WRONG: the hand-off gave {float(out[0])}, not {want}")
      print(f"{mode}, {stage_bytes / 2**20:.1f} MiB stages, {programs} programs: {us:.2f} us "
            f"per stage ({stage_bytes / us / 1e6:.2f} TB/s){ok}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

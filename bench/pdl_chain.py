"""How much of a weight-streaming kernel's launch cost programmatic dependent launch hides.

  python bench/pdl_chain.py                         # one H200: the modes below side by side
  python bench/pdl_chain.py --stages 4,8 --modes plain,late
  python bench/pdl_chain.py --lower                 # any host: lower the kernels for CUDA only

A batch-1 decode step is a chain of dependent kernels that each stream a weight matrix
(16-27 MB at T6-XL) and read a small vector the kernel before wrote. Hopper's programmatic
dependent launch (PDL) lets a kernel start while the one ahead of it drains: it may issue its
weight loads and only then wait (`griddepcontrol.wait`) for the data it depends on. Pallas
Triton kernels cannot ask for such a launch; Mosaic GPU kernels can (jax 0.11 launches a
kernel that uses `griddepcontrol_wait` with the attribute).

This times a chain of --kernels Mosaic GPU kernels, each its own --mib array (so nothing is
served from L2), each streaming it by TMA into shared memory with --stages chunks of 16 KB in
flight per program, then reading the previous kernel's (128,) output and writing its own
(+1: the chain's result checks the order). Modes:
  plain   no PDL instructions (an ordinary launch);
  early   signals its dependents at its start and waits before any load;
  late    signals at its start, issues its first --stages chunks, then waits.
Reports us per kernel and the array bytes per second. Prints only; nothing is written.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from t6_jax import cli  # noqa: E402
from timing import best_seconds  # noqa: E402

cli.quiet_startup()  # no libtpu start-up (or its profiler plugin) on a host without a TPU

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: E402

ROWS, COLS = 64, 128  # one TMA chunk: 64 x 128 bf16 = 16 KB
MODES = ("plain", "early", "late")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--modes", default="plain,early,late,plain,late",
                 help=f"comma-separated, each of {', '.join(MODES)} (repeats allowed)")
  p.add_argument("--stages", default="4", help="chunks in flight per program, comma-separated")
  p.add_argument("--mib", type=int, default=16, help="array size per kernel, MiB")
  p.add_argument("--programs", type=int, default=128, help="programs per kernel")
  p.add_argument("--kernels", type=int, default=16, help="kernels in the chain")
  p.add_argument("--reps", type=int, default=20, help="chains per timed call")
  p.add_argument("--lower", action="store_true",
                 help="only lower each mode for CUDA (no GPU needed) and report")
  args = p.parse_args(argv)
  modes = args.modes.split(",")
  bad = [m for m in modes if m not in MODES]
  if bad:
    p.error(f"--modes {','.join(bad)}: use {', '.join(MODES)}")
  chunk_bytes = ROWS * COLS * 2
  if (args.mib * 2**20) % (args.programs * chunk_bytes):
    p.error(f"--mib {args.mib} is not a whole number of 16 KB chunks per program for "
            f"--programs {args.programs}")
  args.modes = modes
  args.stages = [int(s) for s in args.stages.split(",")]
  args.chunks = args.mib * 2**20 // (args.programs * chunk_bytes)
  if max(args.stages) > args.chunks:
    p.error(f"--stages {max(args.stages)} exceeds the {args.chunks} chunks of each program")
  return args


def _kernel(dep_ref, w_ref, out_ref, w_smem, w_bar, d_smem, d_bar, o_smem, *, mode, stages,
            chunks):
  p = lax.axis_index("programs")
  if mode != "plain":
    plgpu.griddepcontrol_launch_dependents()
  if mode == "early":
    plgpu.griddepcontrol_wait()
  for i in range(stages):
    plgpu.copy_gmem_to_smem(w_ref.at[p, i], w_smem.at[i], w_bar.at[i])
  if mode == "late":
    plgpu.griddepcontrol_wait()
  plgpu.copy_gmem_to_smem(dep_ref, d_smem, d_bar.at[0])  # the previous kernel's output
  plgpu.barrier_wait(d_bar.at[0])

  def chunk(i, carry):
    slot = lax.rem(i, stages)
    plgpu.barrier_wait(w_bar.at[slot])
    @pl.when(i + stages < chunks)
    def _():
      plgpu.copy_gmem_to_smem(w_ref.at[p, i + stages], w_smem.at[slot], w_bar.at[slot])
    return carry
  lax.fori_loop(0, chunks, chunk, 0)

  @pl.when(p == 0)
  def _():
    o_smem[...] = d_smem[...] + 1.0
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, out_ref)
    plgpu.wait_smem_to_gmem(0)


def stream(dep, w, *, mode: str, stages: int):
  """One kernel: streams w (programs, chunks, 64, 128) bf16, returns dep (128,) f32 + 1."""
  programs, chunks = w.shape[:2]
  return plgpu.kernel(
      functools.partial(_kernel, mode=mode, stages=stages, chunks=chunks),
      out_type=jax.ShapeDtypeStruct((COLS,), jnp.float32),
      scratch_types=[plgpu.SMEM((stages, ROWS, COLS), jnp.bfloat16),
                     plgpu.Barrier(num_barriers=stages),
                     plgpu.SMEM((COLS,), jnp.float32), plgpu.Barrier(num_barriers=1),
                     plgpu.SMEM((COLS,), jnp.float32)],
      grid=(programs,), grid_names=("programs",),
  )(dep, w)


def chain(ws, dep, *, mode: str, stages: int, reps: int):
  def one(_, d):
    for w in ws:
      d = stream(d, w, mode=mode, stages=stages)
    return d
  return lax.fori_loop(0, reps, one, dep)


def main(argv=None) -> int:
  args = parse_args(argv)
  shape = (args.programs, args.chunks, ROWS, COLS)
  dep = jnp.zeros((COLS,), jnp.float32)
  ws = None
  for stages in args.stages:
    for mode in args.modes:
      f = jax.jit(functools.partial(chain, mode=mode, stages=stages, reps=args.reps))
      if args.lower:
        spec = [jax.ShapeDtypeStruct(shape, jnp.bfloat16)] * args.kernels
        text = f.trace(spec, dep).lower(lowering_platforms=("cuda",)).as_text()
        print(f"{mode}, {stages} stages: lowered for CUDA ({len(text):,} characters)")
        continue
      if ws is None:
        ws = [jnp.full(shape, i, jnp.bfloat16) for i in range(args.kernels)]
      best, out = best_seconds(f, (ws, dep))
      us = best / (args.reps * args.kernels) * 1e6
      want = args.reps * args.kernels
      ok = "" if float(out[0]) == want else f"  WRONG: chain gave {float(out[0])}, not {want}"
      print(f"{mode}, {stages} stages: {us:.2f} us per {args.mib} MiB kernel "
            f"({args.mib * 2**20 / us / 1e6:.2f} TB/s){ok}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

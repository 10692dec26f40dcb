"""The loss's per-token statistics of one chunk of logits: the Pallas kernel against XLA's form.

  python bench/cross_entropy.py                                 # T6-small's chunk at batch 64
  python bench/cross_entropy.py --sweep rows=1,2,4 block_v=2048,4096,8192 num_warps=4,8

For a (tokens, vocab) chunk of bf16 logits (the chunk `train/loss.py` cuts at batch 64 x 1024
on one device: 4096 x 50304), times the logsumexp over the vocabulary and the target's logit
(`kernels.lse_and_target`): XLA's two reductions and gather against the one-read kernel
(`cross_entropy_gpu`), --calls per timed loop inside one jitted `fori_loop` (best of 3
repeats), and checks both against a float64 NumPy logsumexp; --grad adds the logits'
gradient (XLA's elementwise pass, or the kernel's second pass). Reports us per chunk and the
logits' bytes (once) per second; --sweep times every combination of the kernel's settings and
prints the fastest five. Off GPU the kernel runs interpreted (a smoke run). Prints only.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from t6_jax import cli  # noqa: E402

cli.quiet_startup()  # no libtpu start-up (or its profiler plugin) on a host without a TPU

from decode_kernel import _settings  # noqa: E402  (bench/decode_kernel.py: KEY=V1,V2 parsing)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tokens", type=int, default=4096, help="rows of the chunk")
  p.add_argument("--vocab", type=int, default=50304)
  p.add_argument("--calls", type=int, default=20, help="chunks per timed loop")
  p.add_argument("--grad", action="store_true",
                 help="also the logits' gradient (softmax - onehot), as a train step needs it")
  p.add_argument("--sweep", nargs="*", default=None, metavar="KEY=V1,V2",
                 help="time every combination of these kernel settings (cross_entropy_gpu.TUNING)")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  import jax
  import jax.numpy as jnp
  import numpy as np

  from t6_jax import kernels
  from t6_jax.kernels import cross_entropy_gpu

  on_gpu = jax.default_backend() == "gpu"
  n, v = args.tokens, args.vocab
  x = (3 * jax.random.normal(jax.random.key(0), (n, v), jnp.float32)).astype(jnp.bfloat16)
  t = jax.random.randint(jax.random.key(1), (n,), 0, v)
  x64 = np.asarray(x.astype(jnp.float32), np.float64)
  want = x64.max(-1) + np.log(np.exp(x64 - x64.max(-1, keepdims=True)).sum(-1))

  grad = args.grad

  def xla(x, t):  # the train step's own XLA form, on one chunk of one row
    return tuple(o[0] for o in kernels.lse_and_target(x[None], t[None], impl="xla", grad=grad))

  def gradient(x, t, lse):  # XLA's gradient pass alone, as the XLA form runs it
    onehot = jax.nn.one_hot(t, v, dtype=jnp.float32)
    return (jnp.exp(x.astype(jnp.float32) - lse[:, None]) - onehot).astype(x.dtype)

  def kernel(**tune):
    return lambda x, t: cross_entropy_gpu.lse_and_target(x, t, grad=grad,
                                                         interpret=not on_gpu, **tune)

  def kernel_then_xla(x, t):  # the statistics from the kernel, the gradient from XLA
    lse, target = cross_entropy_gpu.lse_and_target(x, t, interpret=not on_gpu)
    return lse, target, gradient(x, t, lse)

  def timed(f) -> tuple[float, float]:
    """(us per chunk, max |lse - float64|)."""
    def loop(x, t):  # each call's ids depend on the last call's result: none is hoisted
      def body(_, acc):
        out = f(x, t + (acc[0] > 3e38).astype(t.dtype))
        acc = acc + out[0] + out[1]
        if grad:  # the whole gradient written (the barrier), one column of it read
          acc = acc + jax.lax.optimization_barrier(out[2])[:, 0].astype(jnp.float32)
        return acc
      return jax.lax.fori_loop(0, args.calls, body, jnp.zeros((n,), jnp.float32))
    run = jax.jit(loop)
    jax.block_until_ready(run(x, t))
    best = float("inf")
    for _ in range(3):
      start = time.perf_counter()
      jax.block_until_ready(run(x, t))
      best = min(best, (time.perf_counter() - start) / args.calls)
    err = float(np.abs(np.asarray(jax.jit(f)(x, t)[0]) - want).max())
    return best * 1e6, err

  print(f"chunk {n} x {v} bf16 logits ({n * v * 2 / 2**20:.0f} MiB), {jax.devices()[0].device_kind}")
  if args.sweep is not None:
    grid = _settings(args.sweep)
    rows = []
    for values in itertools.product(*grid.values()):
      tune = dict(zip(grid, values))
      try:
        us, err = timed(kernel(**tune))
      except Exception as e:  # a setting Triton cannot compile: report it and go on
        print(f"  {tune}: failed to compile ({type(e).__name__})")
        continue
      rows.append((us, err, tune))
    for us, err, tune in sorted(rows, key=lambda r: r[0])[:5]:
      print(f"  {tune}: {us:8.1f} us  {n * v * 2 / us / 1e6:6.2f} TB/s  max error {err:.1e}")
    return 0
  forms = [("XLA (two reductions and a gather" + (", the gradient's pass)" if grad else ")"),
            xla), (f"Pallas kernel {cross_entropy_gpu.TUNING}", kernel())]
  if grad:
    forms.insert(1, ("the kernel's statistics, XLA's gradient pass", kernel_then_xla))
  for name, f in forms:
    us, err = timed(f)
    print(f"  {name}: {us:8.1f} us  {n * v * 2 / us / 1e6:6.2f} TB/s  max error {err:.1e}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

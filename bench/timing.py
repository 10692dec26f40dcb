"""The timing loop the kernel benchmarks share."""

from __future__ import annotations

import time


def median_seconds(fn, args, *, reps: int, calls: int, warm: int = 2) -> float:
  """Seconds per call of fn(*args): the median over `reps` loops of `calls` calls each, after
  `warm` untimed calls (tracing, compiling, first run). Asynchronous dispatch is waited for
  once per loop, so back-to-back calls overlap their launch overhead as in a real step."""
  import jax
  import numpy as np

  for _ in range(warm):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / calls)
  return float(np.median(times))

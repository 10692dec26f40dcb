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


def best_seconds(fn, args, *, tries: int = 5):
  """(fastest of `tries` timed calls of fn(*args) in seconds, its output), after one untimed
  call (tracing, compiling, first run); each call waited for on its own."""
  import jax

  jax.block_until_ready(fn(*args))
  best, out = float("inf"), None
  for _ in range(tries):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best, out


def lowered_for_cuda(fn, *specs) -> str:
  """The text of jitted fn lowered for CUDA at the given argument shapes, on any host: the
  Triton lowering of jax >= 0.11 asks the local GPU for its compute capability, so it is
  answered as an H200 would (jax 0.10 assumes 9.0 by itself)."""
  try:
    from jax._src.pallas.triton import gpu_info, pallas_call_registration
  except ImportError:
    pass
  else:
    h200 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H200)
    pallas_call_registration.gpu_info_lib.get_gpu_info = lambda: h200
  return fn.trace(*specs).lower(lowering_platforms=("cuda",)).as_text()

"""Where a decode step's time goes: a jax.profiler trace of a few steps of the real token loop.

  python bench/decode_profile.py                                   # t6-small, t6-xl, B=1, 2k
  python bench/decode_profile.py --models gqa-small,mla-small --batch 64 --context 32768
  python bench/decode_profile.py --tiny                            # CPU smoke test

Builds the jitted decode loop exactly as bench/decode.py does (random bf16 weights, a bf16
cache of the full context, `--steps` greedy steps per call), times it without the profiler
(best of `--repeats` calls), then traces one call and reports per decode step: kernels
launched, device-busy time (the union of the kernels' intervals on the device streams) against
the traced wall time from the first kernel to the last, the gap between them (launch overhead:
the device idles while the host issues the next kernels), time per op category and the kernels
that take the most time. `--trace_dir` keeps the trace for Perfetto / TensorBoard.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from t6_jax import cli  # noqa: E402

cli.quiet_startup()  # no libtpu start-up (or its profiler plugin) on a host without a TPU

from decode import _args, lower_one, model_config  # noqa: E402  (bench/decode.py)
from train_profile import (category, device_events, perfetto_file,  # noqa: E402
                           tally)  # (bench/train_profile.py)


def busy_time(spans: list[dict]) -> float:
  """Microseconds during which at least one kernel runs (overlapping kernels counted once)."""
  total, end = 0.0, -float("inf")
  for start, stop in sorted((e["ts"], e["ts"] + e["dur"]) for e in spans):
    if stop <= end:
      continue
    total += stop - max(start, end)
    end = stop
  return total


def summarise(spans: list[dict], steps: int, top: int) -> str:
  if not spans:
    return "no device events in the trace"
  first = min(e["ts"] for e in spans)
  last = max(e["ts"] + e["dur"] for e in spans)
  busy, span = busy_time(spans), last - first
  by_cat, by_name, counts = tally(spans)
  total = sum(by_cat.values())
  lines = [f"per step: {len(spans) / steps:.0f} kernels, device busy {busy / steps / 1e3:.3f} ms "
           f"of {span / steps / 1e3:.3f} ms traced ({100 * busy / span:.0f}% busy; gaps "
           f"{(span - busy) / steps / 1e3:.3f} ms, {(span - busy) / max(len(spans), 1):.1f} us "
           f"per kernel)", "", "| category | ms/step | share |", "|---|---|---|"]
  lines += [f"| {c} | {t / steps / 1e3:.3f} | {100 * t / total:.1f}% |"
            for c, t in by_cat.most_common()]
  lines += ["", f"top {top} kernels:", "| kernel | category | calls/step | us/call | ms/step "
            "| share |", "|---|---|---|---|---|---|"]
  lines += [f"| {n[:80]} | {category(n)} | {counts[n] / steps:g} | {t / counts[n]:.1f} | "
            f"{t / steps / 1e3:.3f} | {100 * t / total:.1f}% |"
            for n, t in by_name.most_common(top)]
  return "\n".join(lines)


def profile_one(name: str, args) -> str:
  import jax
  from t6_jax.model import init_params

  cfg = model_config(name, args.tiny)
  params = jax.jit(lambda: init_params(cfg.model, 0))()
  weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  t0 = time.perf_counter()
  compiled = lower_one(cfg, params, args.batch, args.context, args.steps, args.repeats,
                       args.cache_dtype).compile()
  compile_s = time.perf_counter() - t0
  # Room in the cache for the warm-up, the timed calls and the traced one (repeats + 1 in
  # `_args`'s count): no step writes past the cache's end.
  params_, cache, *rest = _args(cfg, params, args.batch, args.context, args.steps,
                                args.repeats + 1, args.cache_dtype, abstract=False)
  tokens, cache = compiled(params_, cache, *rest)
  tokens.block_until_ready()  # warm-up
  best = float("inf")
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    tokens, cache = compiled(params_, cache, *rest)
    tokens.block_until_ready()
    best = min(best, (time.perf_counter() - t0) / args.steps)
  print(f"# {name}: compiled in {compile_s:.1f} s, {best * 1e3:.3f} ms/step untraced; tracing",
        flush=True)
  trace_dir = (os.path.join(args.trace_dir, name.replace(":", "_")) if args.trace_dir
               else tempfile.mkdtemp(prefix="t6_decode_trace_"))
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    tokens, cache = compiled(params_, cache, *rest)
    tokens.block_until_ready()
  del cache
  trace_file = perfetto_file(trace_dir)
  head = (f"### {name}, batch {args.batch}, context {args.context}: {best * 1e3:.3f} ms/step "
          f"untraced (best of {args.repeats} calls of {args.steps} steps; weights "
          f"{weight_bytes / 1e9:.2f} GB = {weight_bytes / (args.hbm_tbps * 1e9):.3f} ms at "
          f"{args.hbm_tbps} TB/s; compile {compile_s:.1f} s)")
  if trace_file is None:
    return f"{head}\n\nno perfetto_trace.json under {trace_dir}"
  # One traced call runs `steps` + 1 tokens: the first is sampled from the given logits, so
  # `steps` model steps (and the call's small prologue) are in the trace.
  return f"{head}\n\n{summarise(device_events(trace_file)[0], args.steps, args.top)}"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default="t6-small,t6-xl",
                 help="presets, as bench/decode.py takes them (NAME:xla, NAME:materialised)")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--context", type=int, default=2048)
  p.add_argument("--steps", type=int, default=8, help="decode steps per (traced) call")
  p.add_argument("--repeats", type=int, default=3, help="untimed-trace calls, best kept")
  p.add_argument("--top", type=int, default=15)
  p.add_argument("--hbm_tbps", type=float, default=4.0)
  p.add_argument("--cache_dtype", default="bfloat16")
  p.add_argument("--trace_dir", default="", help="keep the traces here ('': temp dirs)")
  p.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke test)")
  args = p.parse_args(argv)
  if args.tiny:
    args.context = min(args.context, 128)
  import jax
  print(f"{jax.devices()[0].device_kind} ({jax.default_backend()}, jax {jax.__version__})",
        flush=True)
  for name in args.models.split(","):
    print(profile_one(name, args), flush=True)
    print(flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Where one training step's device time goes: a jax.profiler trace, summarised by op category.

  python bench/train_profile.py --config t6-small --batch 64            # H200: ~1 min
  python bench/train_profile.py --config tiny --batch 8 --seq_len 32 --dtype float32
  python bench/train_profile.py --trace runs/t6-small/tb --steps 3   # a run's train.profile_steps

Compiles and warms up the real train step (as bench/train_throughput.py), traces `--steps`
steps with a Perfetto trace, then sums the device (GPU stream) events: total time per category
(matmul, attention kernel, reductions, elementwise fusions, copies, collectives, other) and the
kernels that take the most time. `--trace_dir` keeps the trace for Perfetto / TensorBoard.
`--trace` summarises a trace already taken instead, such as the one a training run writes
with train.profile_steps (`--steps` then says how many steps it holds).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from t6_jax import cli  # noqa: E402

cli.quiet_startup()  # no libtpu start-up (or its profiler plugin) on a host without a TPU

CATEGORIES = (  # first match wins; names are GPU kernel or XLA op names
    ("attention kernel", r"flash|fmha|sdpa|cudnn|attention"),
    ("matmul", r"gemm|gemv|xmma|nvjet|cutlass|cublas|wgmma|dot|matmul|triton_gemm"),
    ("collective", r"nccl|all-reduce|all-gather|reduce-scatter|all_reduce|all_gather"),
    ("copy / transpose", r"memcpy|memset|copy|transpose"),
    ("reduction fusion", r"reduce|reduction"),
    ("elementwise fusion", r"fusion|loop|convert|multiply|add|select"),
)


def category(name: str) -> str:
  low = name.lower()
  for cat, pattern in CATEGORIES:
    if re.search(pattern, low):
      return cat
  return "other"


def device_events(trace_file: str):
  """(kernel spans, device time per trace line, process names) of a Perfetto JSON trace.

  The spans are the complete events of the device processes (GPU/TPU). Device processes carry
  one line per stream plus summary lines (XLA Ops, Modules) that repeat the same time, so the
  spans are those of the stream lines where there are any; the per-line times cover all."""
  opener = gzip.open if trace_file.endswith(".gz") else open
  with opener(trace_file, "rt") as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  procs, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      procs[e["pid"]] = e["args"]["name"]
    if e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e["tid"])] = e["args"]["name"]
  device = {p for p, n in procs.items() if re.search(r"/device:(GPU|TPU)", n)}
  spans = [e for e in events if e.get("ph") == "X" and e.get("pid") in device]
  per_line = collections.Counter()
  for e in spans:
    per_line[threads.get((e["pid"], e["tid"]), str(e["tid"]))] += e["dur"]
  streams = {k for k, n in threads.items() if k[0] in device and n.lower().startswith("stream")}
  if streams:
    spans = [e for e in spans if (e["pid"], e["tid"]) in streams]
  return spans, per_line, procs


def perfetto_file(trace_dir: str) -> str | None:
  """The Perfetto JSON trace that jax.profiler.trace(trace_dir, create_perfetto_trace=True)
  wrote (the newest), or None."""
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json*"),
                           recursive=True))
  return files[-1] if files else None


def tally(spans: list[dict]):
  """(device time per category, device time per kernel, calls per kernel) of the spans."""
  by_cat, by_name, counts = collections.Counter(), collections.Counter(), collections.Counter()
  for e in spans:
    by_cat[category(e["name"])] += e["dur"]
    by_name[e["name"]] += e["dur"]
    counts[e["name"]] += 1
  return by_cat, by_name, counts


def summarise(trace_file: str, steps: int, top: int = 25) -> str:
  """Device time per category and the top kernels of a Perfetto JSON trace (per step)."""
  spans, per_line, procs = device_events(trace_file)
  if not spans:
    return f"no device events in {trace_file} (processes: {sorted(procs.values())})"
  by_cat, by_name, counts = tally(spans)
  total = sum(by_cat.values())
  lines = [f"device time per step: {total / steps / 1e3:.1f} ms summed over "
           f"{len({(e['pid'], e['tid']) for e in spans})} stream(s), {len(spans) // steps} "
           f"kernels per step; device lines (ms/step): " +
           ", ".join(f"{n} {t / steps / 1e3:.1f}" for n, t in per_line.most_common(8)),
           "", "| category | ms/step | share |", "|---|---|---|"]
  lines += [f"| {c} | {t / steps / 1e3:.2f} | {100 * t / total:.1f}% |"
            for c, t in by_cat.most_common()]
  lines += ["", f"top {top} kernels:", "| kernel | category | calls/step | ms/step | share |",
            "|---|---|---|---|---|"]
  lines += [f"| {n[:90]} | {category(n)} | {counts[n] / steps:g} | {t / steps / 1e3:.2f} | "
            f"{100 * t / total:.1f}% |" for n, t in by_name.most_common(top)]
  return "\n".join(lines + [""] + idle_lines(spans, steps))


def idle_lines(spans: list[dict], steps: int, top: int = 10) -> list[str]:
  """Where a stream waits: per stream, the traced span (first kernel's start to last kernel's
  end), the time no kernel ran, and the kernel pairs with the most waiting between them. Waits
  are what a step loses to launches and host work beyond the device time above."""
  lines = []
  by_line = collections.defaultdict(list)
  for e in spans:
    by_line[(e["pid"], e["tid"])].append(e)
  for events in by_line.values():
    events.sort(key=lambda e: e["ts"])
    span = events[-1]["ts"] + events[-1]["dur"] - events[0]["ts"]
    gaps, end = [], events[0]["ts"]
    for before, after in zip(events, events[1:]):
      end = max(end, before["ts"] + before["dur"])
      if after["ts"] > end:
        gaps.append((after["ts"] - end, before["name"], after["name"]))
    idle = sum(g for g, _, _ in gaps)
    small = sum(g for g, _, _ in gaps if g < 10)
    lines += [f"stream span per step {span / steps / 1e3:.1f} ms, idle {idle / steps / 1e3:.2f} "
              f"ms ({100 * idle / span:.1f}%): {len(gaps) // steps} waits per step, "
              f"{small / steps / 1e3:.2f} ms of them under 10 us each",
              "", f"the {top} kernel pairs with most waiting between them (per step):",
              "| waits | us | longest us | after | before |", "|---|---|---|---|---|"]
    pairs = collections.defaultdict(list)
    for g, a, b in gaps:
      pairs[(a, b)].append(g)
    for (a, b), gs in sorted(pairs.items(), key=lambda kv: -sum(kv[1]))[:top]:
      lines.append(f"| {len(gs) / steps:g} | {sum(gs) / steps:.0f} | {max(gs):.0f} | {a[:55]} "
                   f"| {b[:55]} |")
  return lines


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="t6-small")
  p.add_argument("--batch", type=int, help="global batch (required unless --trace)")
  p.add_argument("--seq_len", type=int, default=1024)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--steps", type=int, default=3, help="traced steps")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--top", type=int, default=25)
  p.add_argument("--trace_dir", default="", help="keep the trace here ('' : a temp dir)")
  p.add_argument("--trace", default="", help="summarise the newest Perfetto trace under this "
                                             "folder (or this file) instead of running steps")
  p.add_argument("overrides", nargs="*", metavar="section.key=value")
  args = p.parse_args(argv)
  if args.trace:
    trace_file = args.trace if os.path.isfile(args.trace) else perfetto_file(args.trace)
    if trace_file is None:
      print(f"no perfetto_trace.json under {args.trace}")
      return 1
    print(f"{trace_file}: {args.steps} step(s)")
    print(summarise(trace_file, args.steps, args.top))
    return 0
  if args.batch is None:
    p.error("--batch is required (unless --trace)")
  import jax
  import numpy as np

  from t6_jax import config as config_lib
  from t6_jax import sharding as sharding_lib
  from t6_jax.train import step as step_lib

  cfg = config_lib.load(args.config, [f"train.batch_size={args.batch}",
                                      f"train.seq_len={args.seq_len}",
                                      f"model.dtype={args.dtype}"] + list(args.overrides))
  if cfg.model.max_seq_len < args.seq_len:
    cfg = config_lib.apply_overrides(cfg, [f"model.max_seq_len={args.seq_len}"])
  mesh = sharding_lib.mesh_from_config(cfg.mesh)
  _, state, shardings = step_lib.init_state(cfg, mesh)
  step = step_lib.TrainStep(cfg, mesh, shardings)
  tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size,
                                             (args.batch, args.seq_len + 1), dtype=np.int32)
  batch = sharding_lib.put_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, mesh,
                                 cfg.mesh.rules)
  for _ in range(1 + args.warmup):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="t6_trace_")
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(args.steps):
      state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
  trace_file = perfetto_file(trace_dir)
  if trace_file is None:
    print(f"no perfetto_trace.json under {trace_dir}")
    return 1
  print(f"{args.config}, batch {args.batch} x {args.seq_len}, {args.dtype}, "
        f"{jax.devices()[0].device_kind}; {args.steps} traced steps ({trace_file})")
  print(summarise(trace_file, args.steps, args.top))
  return 0


if __name__ == "__main__":
  sys.exit(main())

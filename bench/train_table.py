"""Training throughput of several presets under several settings, side by side in one run.

  python bench/train_table.py --presets t6-small:64,mha-medium:32 \\
      --variants "default=;triton=train.gpu_gemm=triton" --out docs/train_table.md

Each (preset, variant) runs `bench/train_throughput.py` in its own process (so every peak
memory figure is that run's own), and the results become one markdown table: tokens/s, MFU by
the reference formula 6N + 12·L·h·d_h·T and peak memory per variant, the first variant's
tokens/s as the base of the ratios, and the PyTorch reference's measurement where there is one.
`--rounds N` runs each preset's variants N times in turn (A B A B ...), so a drift of the
machine during the run falls on every variant alike; a cell then lists every run's tokens/s
and the ratio compares medians. A setting `env:NAME=VALUE` sets an environment variable for
that variant's process instead of a config key, so process-wide switches such as XLA's flags
alternate too:

  python bench/train_table.py --presets t6-small:64 --rounds 2 \\
      --variants "default=;lhs=env:XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true"
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from train_throughput import REFERENCE_H200  # noqa: E402

FIELDS = {"tokens/s": r"tokens/s\s+([\d,]+)",
          "mfu": r"MFU \(reference formula 6N\+12LhdT\)\s+([\d.]+%)",
          "peak": r"peak memory \([^)]*\)\s+([\d.]+ GiB)",
          "compile": r"compile \+ first step\s+(\d+ s)"}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--presets", required=True, help="comma-separated PRESET:BATCH pairs")
  p.add_argument("--variants", default="default=",
                 help="semicolon-separated NAME=SETTINGS, SETTINGS space-separated key=value")
  p.add_argument("--seq_len", type=int, default=1024)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--timeout_s", type=float, default=150.0, help="per run")
  p.add_argument("--rounds", type=int, default=1,
                 help="runs of each variant, alternated with the other variants")
  p.add_argument("--out", default="", help="markdown file to append the table to")
  return p.parse_args(argv)


def split_settings(settings: list[str]) -> tuple[list[str], dict[str, str]]:
  """A variant's settings -> (config overrides, environment variables from `env:NAME=VALUE`)."""
  overrides, env = [], {}
  for item in settings:
    if item.startswith("env:"):
      name, eq, value = item[4:].partition("=")
      if not name or not eq:
        raise SystemExit(f"variant setting {item!r}: write env:NAME=VALUE")
      env[name] = value
    else:
      overrides.append(item)
  return overrides, env


def run_one(preset: str, batch: int, overrides: list[str], env: dict[str, str],
            args) -> dict[str, str]:
  cmd = [sys.executable, os.path.join(HERE, "train_throughput.py"), "--config", preset,
         "--batch", str(batch), "--seq_len", str(args.seq_len), "--steps", str(args.steps),
         "--warmup", str(args.warmup), "--out", "", *overrides]
  try:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s,
                          env={**os.environ, **env})
    text = done.stdout + done.stderr
  except subprocess.TimeoutExpired:
    return {"error": f"over {args.timeout_s:.0f} s"}
  found = {k: m.group(1) for k, pat in FIELDS.items() if (m := re.search(pat, text))}
  if "tokens/s" not in found:
    found["error"] = _error_line(text)
  return found


def _error_line(text: str) -> str:
  """The exception line of a failed run's output (jax prints a note after it), else the last."""
  lines = text.strip().splitlines() or ["no output"]
  raised = [l for l in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b:?", l)]
  return (raised or lines)[-1][:160]


def main(argv=None) -> int:
  args = parse_args(argv)
  presets = [(p.split(":")[0], int(p.split(":")[1])) for p in args.presets.split(",")]
  variants = []
  for item in args.variants.split(";"):
    name, _, settings = item.partition("=")
    # (a malformed env: setting fails here, before any run)
    variants.append((name.strip(), split_settings(settings.split())))
  header = ["preset", "batch"] + [name for name, _ in variants] + ["reference"]
  rows = []
  for preset, batch in presets:
    runs = {name: [] for name, _ in variants}
    for _ in range(max(1, args.rounds)):
      for name, (overrides, env) in variants:
        r = run_one(preset, batch, overrides, env, args)
        runs[name].append(r)
        print(f"{preset} B={batch} {name}: {r}", flush=True)
    cells, base = [preset, str(batch)], None
    for name, _ in variants:
      good = [r for r in runs[name] if "error" not in r]
      if not good:
        cells.append(f"failed: {runs[name][0]['error']}")
        continue
      tps = [float(r["tokens/s"].replace(",", "")) for r in good]
      median = statistics.median(tps)
      ratio = "" if base is None else f" ({median / base:.3f}x)"
      base = median if base is None else base
      last = good[-1]
      cells.append(f"{' / '.join(r['tokens/s'] for r in good)}{ratio}, {last.get('mfu', '?')}, "
                   f"{last.get('peak', '?')}")
    # (the reference was measured at T = 1024 only)
    reference = REFERENCE_H200.get(preset, "") if args.seq_len == 1024 else ""
    cells.append(reference.replace(f"batch {batch}: ", ""))
    rows.append(cells)
  sys.path.insert(0, os.path.dirname(HERE))
  from t6_jax import cli
  cli.quiet_startup()  # no libtpu start-up noise on a host without a TPU
  import jax
  date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  lines = ["", f"`python bench/train_table.py --presets {args.presets} --seq_len {args.seq_len} "
           f"--variants \"{args.variants}\" --rounds {args.rounds}` on "
           f"{jax.devices()[0].device_kind} "
           f"(jax {jax.__version__}, {date}); each cell: tokens/s of each run (ratio of "
           f"medians to the first variant), MFU by 6N+12LhdT and peak memory of the last run.",
           "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(c) + " |" for c in rows]
  print("\n".join(lines))
  if args.out:
    with open(args.out, "a") as f:
      f.write("\n".join(lines) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())

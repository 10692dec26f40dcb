"""Training throughput of a preset on the devices present: tokens/s, TFLOP/s, MFU, peak memory.

  python bench/train_throughput.py --batch 64                     # T6-small, T=1024, bf16
  python bench/train_throughput.py --config mha-small --batch 64 --steps 300
  python bench/train_throughput.py --config tiny --batch 8 --seq_len 32 --dtype float32 \\
      --steps 20 --out ''                                          # a CPU smoke run

Runs the real jitted train step (AdamW, donated state, the mesh over every local device) on a
fixed random batch, so the input pipeline is not measured. After compiling and `--warmup`
steps, `--steps` steps are dispatched back to back and timed to the last one's completion.
MFU is reported twice: with the FLOPs counted for the attention type (t6_jax/train/flops.py)
and with the reference's 6N + 12*L*h*d_h*T, which the reference's published figures use.
Results are printed and appended to `--out` (docs/benchmarks.md) under their own heading.
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from t6_jax import cli  # noqa: E402

cli.quiet_startup()  # no libtpu start-up (or its profiler plugin) on a host without a TPU

REFERENCE_H200 = {  # the reference measured on one H200, torch.compile, bf16 autocast, T = 1024
    "t6-small": "batch 64: 322k tokens/s, 34.7% MFU (6N+12LhdT vs 989 TFLOP/s), 62.7 GiB",
    "mha-small": "batch 64: 520k tokens/s, 44.9% MFU (6N+12LhdT vs 989 TFLOP/s), 53.4 GiB",
    "t6-medium": "batch 32: 115k tokens/s, 35.0% MFU (6N+12LhdT vs 989 TFLOP/s), 60.8 GiB",
    "mha-medium": "batch 32: 182k tokens/s, 44.6% MFU (6N+12LhdT vs 989 TFLOP/s), 48.7 GiB",
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="t6-small", help="preset or YAML file")
  p.add_argument("--batch", type=int, required=True, help="global batch (sequences per step)")
  p.add_argument("--seq_len", type=int, default=1024)
  p.add_argument("--dtype", default="bfloat16", help="compute dtype (params stay fp32)")
  p.add_argument("--remat", default="none", help="none | full | save_dots")
  p.add_argument("--grad_accum", type=int, default=1)
  p.add_argument("--steps", type=int, default=100, help="timed steps")
  p.add_argument("--warmup", type=int, default=5, help="untimed steps after compiling")
  p.add_argument("--out", default=os.path.join("docs", "benchmarks.md"),
                 help="markdown file to append the result to ('' : print only)")
  p.add_argument("overrides", nargs="*", metavar="section.key=value")
  return p.parse_args(argv)


def peak_memory_bytes(devices) -> tuple[float | None, str]:
  """Peak device memory (largest over devices) where the backend reports it, else the
  process's peak resident memory (CPU)."""
  from t6_jax.metrics import device_peak_bytes
  peak = device_peak_bytes(devices)
  if peak is not None:
    return peak, "device peak"
  return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "host RSS peak"


def main(argv=None) -> int:
  args = parse_args(argv)
  import jax
  import numpy as np

  from t6_jax import config as config_lib
  from t6_jax import sharding as sharding_lib
  from t6_jax.train import flops as flops_lib
  from t6_jax.train import step as step_lib

  overrides = [f"train.batch_size={args.batch}", f"train.seq_len={args.seq_len}",
               f"train.grad_accum={args.grad_accum}", f"model.dtype={args.dtype}",
               f"model.remat={args.remat}"] + list(args.overrides)
  cfg = config_lib.load(args.config, overrides)
  if cfg.model.max_seq_len < args.seq_len:
    cfg = config_lib.apply_overrides(cfg, [f"model.max_seq_len={args.seq_len}"])
  step_lib.validate(cfg)
  mesh = sharding_lib.mesh_from_config(cfg.mesh)
  devices = jax.devices()
  kind = devices[0].device_kind
  print(f"{args.config}: {cfg.model.attention}, batch {args.batch} x {args.seq_len}, "
        f"{args.dtype}, remat {args.remat}; {len(devices)} x {kind}, mesh {dict(mesh.shape)}")

  _, state, shardings = step_lib.init_state(cfg, mesh)
  step = step_lib.TrainStep(cfg, mesh, shardings)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.model.vocab_size, (args.batch, args.seq_len + 1), dtype=np.int32)
  batch = sharding_lib.put_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, mesh,
                                 cfg.mesh.rules)

  t0 = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  for _ in range(args.warmup):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = step(state, batch)
  loss = float(jax.device_get(metrics["loss"]))  # waits for the last step
  elapsed = time.perf_counter() - t0

  n_params = step_lib.num_params(state["params"])
  tokens_per_s = args.steps * args.batch * args.seq_len / elapsed
  ours = flops_lib.train_flops_per_token(cfg.model, args.seq_len)
  ref = flops_lib.reference_flops_per_token(cfg.model, args.seq_len)
  tflops = ours * tokens_per_s / len(devices) / 1e12
  mfu = flops_lib.mfu(ours, tokens_per_s, len(devices), kind)
  mfu_ref = flops_lib.mfu(ref, tokens_per_s, len(devices), kind)
  peak, peak_what = peak_memory_bytes(devices)
  pct = lambda x: "n/a (no peak for this device)" if x is None else f"{100 * x:.1f}%"  # noqa

  rows = [
      ("tokens/s", f"{tokens_per_s:,.0f}"),
      ("step time", f"{1e3 * elapsed / args.steps:.1f} ms"),
      ("TFLOP/s per device (attention-type count)", f"{tflops:.3g}"),
      ("MFU (attention-type count)", pct(mfu)),
      ("MFU (reference formula 6N+12LhdT)", pct(mfu_ref)),
      (f"peak memory ({peak_what})", f"{peak / 2**30:.1f} GiB"),
      ("compile + first step", f"{compile_s:.0f} s"),
      ("parameters", f"{n_params:,}"),
      ("GFLOP per token (ours / 6N+12LhdT)", f"{ours / 1e9:.3f} / {ref / 1e9:.3f}"),
      ("final loss (random tokens)", f"{loss:.3f}"),
  ]
  for name, value in rows:
    print(f"  {name:45s} {value}")
  preset = os.path.basename(args.config).removesuffix(".yaml")
  if preset in REFERENCE_H200:
    print(f"  reference (measured, same setup): {REFERENCE_H200[preset]}")

  if args.out:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "",
        f"### Training throughput: {preset}, batch {args.batch} x {args.seq_len}, "
        f"{args.dtype}, remat {args.remat} on {len(devices)} x {kind} ({date})",
        "",
        f"`python bench/train_throughput.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
        f" ({args.steps} timed steps after {args.warmup} warm-up steps; jax {jax.__version__})",
        "",
        "| measure | value |",
        "|---|---|",
    ] + [f"| {name} | {value} |" for name, value in rows]
    if preset in REFERENCE_H200:
      lines.append(f"| reference (measured, same setup) | {REFERENCE_H200[preset]} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    new_file = not os.path.exists(args.out)
    with open(args.out, "a") as f:
      if new_file:
        f.write("# Benchmarks\n")
      f.write("\n".join(lines) + "\n")
    print(f"appended to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Train T6 (or a baseline) on one CPU, one or several GPUs, or a TPU pod slice.

  python train.py                                   # the demo: configs/demo.yaml -> runs/demo
  python train.py --config t6-small --workdir runs/t6-small data.path=DIR/fineweb_*.bin
  python train.py --config t6-xl --aot_topology v5p:8x8x8 train.batch_size=512 \\
      mesh.data=8 mesh.fsdp=64     # compile for a 512-chip v5p slice, print memory
  python train.py --config t6-xl --aot_topology v5p:8x8x8 --aot_slices 2 \\
      train.batch_size=1024 mesh.data=16 mesh.fsdp=64   # two slices over DCN (Multislice)

A rerun with the same --workdir (train.workdir) resumes from its newest good checkpoint;
--restart starts over. Settings are section.key=value, anywhere among the flags; every setting
and its default is listed below. A failure ends in one line (--debug shows the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys

from t6_jax import cli

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo.yaml")


def parse_args(argv=None):
  from t6_jax import config as config_lib
  parser = argparse.ArgumentParser(
      prog="train.py", description=__doc__,
      epilog="settings (section.key = default):\n" + config_lib.help_text(),
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default=DEFAULT_CONFIG,
                      help="YAML file or preset name in configs/ (default: configs/demo.yaml)")
  parser.add_argument("--workdir", default="",
                      help="run directory: checkpoints, metrics, config.yaml (train.workdir)")
  parser.add_argument("--restart", action="store_true",
                      help="delete train.workdir first and train from scratch")
  parser.add_argument("--distributed", action="store_true",
                      help="call jax.distributed.initialize() with auto-detection (multi-host "
                           "runs are detected on TPU pods, SLURM and Open MPI anyway)")
  parser.add_argument("--aot_topology", default="",
                      help="compile the sharded train step for this TPU topology (v5p:8x8x8, "
                           "v5e:16x16, ...) and print memory and FLOPs instead of training")
  parser.add_argument("--aot_slices", type=int, default=1,
                      help="with --aot_topology: compile for this many such slices joined over "
                           "the data-center network (TPU Multislice; mesh.data must be a "
                           "multiple of it) and report what crosses between them")
  cli.add_common(parser)
  args = cli.parse(parser, argv)
  if args.aot_slices != 1 and not args.aot_topology:
    parser.error("--aot_slices describes the slices of an --aot_topology compile; add "
                 "--aot_topology (on real Multislice TPUs the slices are found on their own)")
  if args.workdir:
    args.overrides.append(f"train.workdir={args.workdir}")
  if args.aot_topology:
    # Compile-only TPU devices come from libtpu's topology description; no backend needed.
    cli.quiet_aot_startup()
  return args


def run(args) -> int:
  from t6_jax import config as config_lib
  cfg = config_lib.load(args.config, args.overrides)

  if args.aot_topology:
    from t6_jax.train import aot
    try:
      report = aot.compile_train_step(cfg, args.aot_topology, slices=args.aot_slices)
    except aot.DoesNotFit as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
    print(report.text())
    return 0

  from t6_jax.train import loop
  try:
    summary = loop.train(cfg, restart=args.restart, distributed=args.distributed)
  except loop.NonFiniteLoss as e:
    print(f"error: {e}", file=sys.stderr)
    return 1

  import jax
  if jax.process_index() != 0:
    return 0
  first, last = summary["first_val_loss"], summary["last_val_loss"]
  print(f"done: step {summary['final_step']} in {summary['wall_s']:.0f} s "
        f"(data {summary['data_s']:.0f} s, compile {summary['compile_s'] or 0:.0f} s)"
        + (f", {summary['tokens_per_s']:,.0f} tokens/s" if summary["tokens_per_s"] else "")
        + (f", peak memory {summary['peak_memory_gib']:.1f} GiB per device"
           if summary["peak_memory_gib"] else ""))
  if first is not None and last is not None:
    print(f"validation loss: first {first:.4f} -> last {last:.4f}")
  elif last is not None:
    print(f"validation loss: {last:.4f}")
  if cfg.train.sample_tokens > 0:
    from t6_jax.decode import sample_text
    d = cfg.decode
    text = sample_text(cfg, summary["state"]["params"], summary["tokenizer"],
                       [cfg.train.sample_prompt], cfg.train.sample_tokens,
                       temperature=d.temperature, top_k=d.top_k, top_p=d.top_p, seed=d.seed)[0]
    print(f"sample:\n{cfg.train.sample_prompt}{text}")
  return 0


def main(argv=None) -> int:
  return cli.run(run, parse_args, argv)


if __name__ == "__main__":
  sys.exit(main())

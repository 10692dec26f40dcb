"""Checkpoint save / restore times for a real train state, and what an async save costs a step.

  python bench/checkpoint_io.py                          # T6-small (params + AdamW, ~1.5 GB)
  python bench/checkpoint_io.py --config t6-medium --dir /fast/disk/bench
  python bench/checkpoint_io.py --config tiny --steps 5  # a quick smoke run

Measures, on whatever devices JAX sees (all of them, FSDP mesh):
  sync save      Checkpointer with checkpoint.async_save=false: save + commit
  async save     blocking part of save() (device -> host copy, directory set-up) and the time
                 until the background write has committed
  restore        full train state into its sharded abstract target (Checkpointer.restore)
  load_params    params only, out of the train checkpoint (Orbax partial restore)
  export         export_params, and load_params of the export
  step cost      train-step time (small batch, --batch x --seq) without a save, and of the
                 steps that run while an async save is being written
Writes a JSON summary with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def directory_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, f))
             for root, _, files in os.walk(path) for f in files)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="t6-small")
  parser.add_argument("--dir", default="", help="where to write (default: a temporary dir)")
  parser.add_argument("--batch", type=int, default=1, help="rows per step for the step cost")
  parser.add_argument("--seq", type=int, default=64, help="tokens per row for the step cost")
  parser.add_argument("--steps", type=int, default=8, help="timed steps without a save")
  parser.add_argument("--repeats", type=int, default=2, help="repeats of each save/restore")
  parser.add_argument("--json", default="", help="also write the numbers to this file")
  parser.add_argument("overrides", nargs="*", metavar="section.key=value")
  args = parser.parse_args(argv)

  import jax
  import numpy as np

  from t6_jax import config as config_lib
  from t6_jax import sharding as sharding_lib
  from t6_jax.checkpoint import Checkpointer, export_params, load_params
  from t6_jax.train import step as step_lib

  cfg = config_lib.load(args.config, [f"train.batch_size={args.batch}",
                                      f"train.seq_len={args.seq}", "train.grad_accum=1",
                                      *args.overrides])
  root = args.dir or tempfile.mkdtemp(prefix="ckpt_bench_")
  os.makedirs(root, exist_ok=True)
  mesh = sharding_lib.mesh_from_config(cfg.mesh)
  print(f"{args.config}: {jax.device_count()} x {jax.devices()[0].device_kind}, "
        f"mesh {dict(mesh.shape)}, writing under {root}", flush=True)

  t = time.perf_counter()
  _, state, shardings = step_lib.init_state(cfg, mesh)

  # Adam's moments start at zero, which compresses to nothing; a trained state's do not.
  noise = np.random.default_rng(1)
  state["opt_state"] = jax.tree.map(
      lambda x, s: jax.device_put(
          noise.standard_normal(x.shape, np.float32).astype(x.dtype) * 1e-3, s)
      if np.issubdtype(x.dtype, np.floating) and x.ndim else x,
      state["opt_state"], shardings["opt_state"])
  jax.block_until_ready(state)
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(state["params"]))
  print(f"state: {state_bytes / 1e9:.3f} GB ({param_bytes / 1e9:.3f} GB params), "
        f"initialised in {time.perf_counter() - t:.1f} s", flush=True)
  results: dict = {"config": args.config, "devices": jax.device_count(),
                   "device_kind": jax.devices()[0].device_kind,
                   "state_gb": state_bytes / 1e9, "params_gb": param_bytes / 1e9}

  def best(times):
    return min(times)

  # ---- synchronous save
  sync_times = []
  for r in range(args.repeats):
    workdir = os.path.join(root, f"sync{r}")
    ck = Checkpointer(workdir, config_lib.CheckpointConfig(every=1, keep=1, async_save=False))
    t = time.perf_counter()
    ck.save(1, state, None, config=cfg, tokenizer_spec=None, force=True)
    ck.wait()
    sync_times.append(time.perf_counter() - t)
    ck.close()
  ckpt_bytes = directory_bytes(os.path.join(root, "sync0", "checkpoints", "1"))
  results.update(sync_save_s=best(sync_times), checkpoint_gb=ckpt_bytes / 1e9)
  print(f"sync save: {best(sync_times):.2f} s ({ckpt_bytes / 1e9:.3f} GB on disk, "
        f"{ckpt_bytes / 1e9 / best(sync_times):.2f} GB/s)", flush=True)

  # ---- async save: blocking part and time to commit
  blocking, committed = [], []
  for r in range(args.repeats):
    workdir = os.path.join(root, f"async{r}")
    ck = Checkpointer(workdir, config_lib.CheckpointConfig(every=1, keep=1, async_save=True))
    t = time.perf_counter()
    ck.save(1, state, None, config=cfg, tokenizer_spec=None, force=True)
    blocking.append(time.perf_counter() - t)
    ck.wait()
    committed.append(time.perf_counter() - t)
    ck.close()
  results.update(async_blocking_s=best(blocking), async_commit_s=best(committed))
  print(f"async save: save() blocks {best(blocking):.2f} s, committed after "
        f"{best(committed):.2f} s", flush=True)

  # ---- restore
  target = step_lib.abstract_state(cfg, mesh)
  restore_times = []
  for _ in range(args.repeats):
    ck = Checkpointer(os.path.join(root, "sync0"), cfg.checkpoint, read_only=True)
    t = time.perf_counter()
    _, restored = ck.restore(target, None)
    jax.block_until_ready(restored)
    restore_times.append(time.perf_counter() - t)
    ck.close()
    del restored
  results["restore_s"] = best(restore_times)
  print(f"restore (full state): {best(restore_times):.2f} s", flush=True)

  params_times = []
  for _ in range(args.repeats):
    t = time.perf_counter()
    _, params, _ = load_params(os.path.join(root, "sync0"), mesh=mesh, rules=cfg.mesh.rules)
    jax.block_until_ready(params)
    params_times.append(time.perf_counter() - t)
  results["load_params_s"] = best(params_times)
  print(f"load_params (params of the train checkpoint): {best(params_times):.2f} s", flush=True)

  export_dir = os.path.join(root, "export")
  t = time.perf_counter()
  export_params(export_dir, state["params"], cfg, None, overwrite=True)
  results["export_s"] = time.perf_counter() - t
  results["export_gb"] = directory_bytes(export_dir) / 1e9
  t = time.perf_counter()
  _, params, _ = load_params(export_dir, mesh=mesh, rules=cfg.mesh.rules)
  jax.block_until_ready(params)
  results["export_load_s"] = time.perf_counter() - t
  del params
  print(f"export_params: {results['export_s']:.2f} s ({results['export_gb']:.3f} GB), "
        f"load_params of it: {results['export_load_s']:.2f} s", flush=True)

  # ---- the cost of an async save to the training step
  step_fn = step_lib.TrainStep(cfg, mesh, shardings)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.model.vocab_size, (args.batch, args.seq + 1), dtype=np.int32)
  batch = jax.device_put(
      {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]},
      step_lib.batch_shardings(cfg, mesh))
  for _ in range(2):  # compile and warm up
    state, m = step_fn(state, batch)
  jax.block_until_ready(m)

  def timed_step():
    nonlocal state
    t0 = time.perf_counter()
    state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    return time.perf_counter() - t0

  plain = [timed_step() for _ in range(args.steps)]
  ck = Checkpointer(os.path.join(root, "during"), config_lib.CheckpointConfig(every=1, keep=1))
  t0 = time.perf_counter()
  ck.save(1, state, None, config=cfg, tokenizer_spec=None, force=True)
  save_block = time.perf_counter() - t0
  during = []
  while ck.saving() and len(during) < 200:
    during.append(timed_step())
  t1 = time.perf_counter()
  ck.wait()
  tail = time.perf_counter() - t1
  ck.close()
  step_s = float(np.median(plain))
  during_s = float(np.mean(during)) if during else None
  results.update(step_s=step_s, save_blocking_in_loop_s=save_block,
                 steps_during_save=len(during), step_during_save_s=during_s,
                 wait_after_steps_s=tail)
  print(f"train step ({args.batch} x {args.seq} tokens): {step_s:.3f} s median without a save",
        flush=True)
  if during:
    extra = sum(during) - len(during) * step_s + save_block
    results["async_save_cost_s"] = extra
    print(f"async save in the loop: save() blocked {save_block:.2f} s, then {len(during)} "
          f"step(s) ran while it was written at {during_s:.3f} s each "
          f"({100 * (during_s / step_s - 1):+.0f}%); total cost to training ~{extra:.2f} s, "
          f"vs {results['sync_save_s']:.2f} s for a synchronous save", flush=True)
  else:
    print(f"async save in the loop: save() blocked {save_block:.2f} s; the write finished "
          f"before the next step", flush=True)

  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)
  if not args.dir:
    shutil.rmtree(root, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

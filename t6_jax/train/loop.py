"""The training loop: data, resume-or-init, the jitted step, metrics, validation, checkpoints,
preemption and the non-finite-loss guard. `train(cfg)` is everything train.py does.

The host never waits for the device between steps: step n+1 is dispatched before step n's
metrics are read. It waits only where it must anyway: validation, checkpoint saves (the
metrics of the step being saved are checked first, so a saved step is never a diverged one)
and the end of the run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time

import jax
import numpy as np
import yaml

from t6_jax import distributed as distributed_lib
from t6_jax import sharding as sharding_lib
from t6_jax import storage
from t6_jax.config import Config
from t6_jax.distributed import initialize as init_distributed  # noqa: F401 (train.py, tests)
from t6_jax.metrics import Metrics
from t6_jax.train import flops as flops_lib
from t6_jax.train import step as step_lib

RUN_FILES = ("config.yaml", "metrics.jsonl", "tb", "checkpoints")


class NonFiniteLoss(RuntimeError):
  """Training produced a NaN/Inf loss or gradient; the message names the step."""


def clear_run_dir(workdir: str) -> None:
  """Removes a previous run (for --restart); refuses folders that are not run directories."""
  if not os.path.isdir(workdir):
    return
  entries = set(os.listdir(workdir))
  if entries and not entries & set(RUN_FILES):
    raise ValueError(f"--restart would delete {workdir!r}, which does not look like a run "
                     f"directory (no {', '.join(RUN_FILES)}); remove it yourself or choose "
                     f"another train.workdir")
  shutil.rmtree(workdir)


def _batch_keys(cfg: Config) -> tuple[str, ...]:
  if cfg.data.packing == "segments":
    return ("inputs", "targets", "positions", "segment_ids")
  return ("inputs", "targets")


def _per_process(global_rows: int, what: str) -> int:
  count = jax.process_count()
  if global_rows % count:
    raise ValueError(f"{what}={global_rows} must be a multiple of the {count} processes")
  return global_rows // count


def validation_batches(cfg: Config, mesh) -> list[dict]:
  """The same `train.eval_batches` validation batches every time (no shuffling), on device."""
  from t6_jax import data as data_lib
  rows = cfg.train.batch_size // cfg.train.grad_accum
  ds = data_lib.make_dataset(cfg, "validation", batch_size=_per_process(rows, "eval rows"),
                             seq_len=cfg.train.seq_len, shuffle=False, num_epochs=1,
                             process_index=jax.process_index(),
                             process_count=jax.process_count())
  keys = _batch_keys(cfg)
  batches = []
  for batch in ds:
    batches.append(data_lib.global_batch({k: batch[k] for k in keys}, mesh))
    if len(batches) == cfg.train.eval_batches:
      break
  if not batches:
    raise ValueError(f"the validation split ({cfg.data.eval_split!r}) gave no batch of "
                     f"{rows} x {cfg.train.seq_len} tokens; lower train.batch_size or "
                     f"train.seq_len, or give the data source a validation split")
  return batches


def logged(workdir: str, key: str) -> list[float]:
  """Every value of `key` in the run's metrics.jsonl, in order (e.g. the validation losses of
  the runs before a resume)."""
  path = storage.join(workdir, "metrics.jsonl")
  values = []
  if storage.exists(path):
    with storage.open(path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue
        if isinstance(record.get(key), (int, float)):
          values.append(float(record[key]))
  return values


def evaluate(step_fn: step_lib.TrainStep, params, batches) -> float:
  sums = [step_fn.eval(params, b) for b in batches]  # all dispatched before any read
  loss_sum, count = np.sum(np.asarray(jax.device_get(sums), np.float64), axis=0)
  return float(loss_sum / max(count, 1.0))


def train(cfg: Config, *, restart: bool = False, distributed: bool = False) -> dict:
  """Trains as the config says; returns a summary (steps, first/last validation loss, speed).

  Resumes from the newest good checkpoint in train.workdir unless `restart`. Raises
  NonFiniteLoss (naming the step) when the loss or gradient stops being finite.
  """
  t_start = time.time()
  storage.check(cfg.train.workdir, "train.workdir")  # a bucket offline: one line, in seconds
  init_distributed(distributed)
  step_lib.validate(cfg)
  from t6_jax import data as data_lib
  from t6_jax.checkpoint import Checkpointer

  primary = jax.process_index() == 0
  workdir = cfg.train.workdir
  if restart and primary:
    clear_run_dir(workdir)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("run directory ready")
  if primary:
    storage.makedirs(workdir)
    storage.write_text(storage.join(workdir, "config.yaml"),
                       yaml.safe_dump(cfg.to_dict(), sort_keys=False))
  log = print if primary else (lambda *a, **k: None)

  mesh = sharding_lib.mesh_from_config(cfg.mesh)
  device_kind = jax.devices()[0].device_kind
  log(f"devices: {jax.device_count()} x {device_kind} in {jax.process_count()} process(es); "
      f"mesh {dict(mesh.shape)}, rules {cfg.mesh.rules!r}")

  t0 = time.time()
  tokenizer = data_lib.load_tokenizer(cfg)
  if tokenizer.vocab_size > cfg.model.vocab_size:
    raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size="
                     f"{cfg.model.vocab_size}; raise model.vocab_size")
  t = cfg.train
  train_ds = data_lib.make_dataset(
      cfg, "train", batch_size=_per_process(t.batch_size, "train.batch_size"),
      seq_len=t.seq_len, seed=cfg.data.seed, shuffle=True, num_epochs=None,
      process_index=jax.process_index(), process_count=jax.process_count())
  train_iter = iter(train_ds)
  val_batches = validation_batches(cfg, mesh)
  data_s = time.time() - t0

  ckpt = Checkpointer(workdir, cfg.checkpoint, primary=primary)
  resumed = ckpt.latest_step() is not None
  if resumed:
    start, state = ckpt.restore(step_lib.abstract_state(cfg, mesh), train_iter)
    shardings = step_lib.state_shardings(cfg, mesh)
    log(f"resuming from the checkpoint of step {start} in {workdir}")
  else:
    _, state, shardings = step_lib.init_state(cfg, mesh)
    start = 0
    log(f"no checkpoint in {workdir}: starting from scratch")
  start = int(start)
  n_params = step_lib.num_params(state["params"])
  sharding_lib.check_replicated(state["params"], shardings["params"],
                                fail=cfg.mesh.fail_on_replicated, log=log)

  keys = _batch_keys(cfg)
  step_fn = step_lib.TrainStep(cfg, mesh, batch_keys=keys)
  tokens_per_step = step_lib.tokens_per_step(cfg)
  flops_per_token = flops_lib.train_flops_per_token(cfg.model, t.seq_len)
  log(f"model: {cfg.model.attention}, {n_params:,} parameters; "
      f"{flops_per_token / 1e9:.3f} GFLOP per training token "
      f"(reference formula 6N+12LhdT: "
      f"{flops_lib.reference_flops_per_token(cfg.model, t.seq_len) / 1e9:.3f})")

  metrics = Metrics(workdir, total_steps=t.steps, start_step=start, primary=primary)
  say = metrics.print
  tokenizer_spec = tokenizer.spec()
  summary = {"start_step": start, "resumed": resumed, "params": n_params,
             "first_val_loss": None, "last_val_loss": None, "data_s": round(data_s, 1)}

  def validate_now(n):
    loss = evaluate(step_fn, state["params"], val_batches)
    metrics.write(n, {"val_loss": loss})
    say(f"step {n}: validation loss {loss:.4f}")
    if summary["first_val_loss"] is None:
      summary["first_val_loss"] = loss
    summary["last_val_loss"] = loss
    return loss

  clock = {"t": None, "step": start, "tokens_per_s": None}
  compile_s = None

  def read(n, m):
    """Step n's metrics (blocks until step n is done); stops the run on a non-finite loss."""
    m = jax.device_get(m)
    loss = float(m["loss"])
    if not (math.isfinite(loss) and math.isfinite(float(m["grad_norm"]))):
      ckpt.wait()
      last = ckpt.latest_step()
      raise NonFiniteLoss(
          f"step {n}: loss {loss}, grad norm {float(m['grad_norm'])} is not finite; stopped "
          f"(the state was left unchanged by that step). Last good checkpoint: "
          f"{'none' if last is None else f'step {last}'} in {workdir}; lower train.lr or "
          f"raise train.warmup_steps and resume")
    summary["train_loss"] = loss
    now = time.time()
    if clock["t"] is None:  # the first step includes compilation: time from its end
      clock["t"], clock["step"] = now, n
    elif n % t.log_every == 0 or n == t.steps:
      dt, steps_done = now - clock["t"], n - clock["step"]
      tps = steps_done * tokens_per_step / dt
      clock.update(t=now, step=n, tokens_per_s=tps)
      tflops = flops_per_token * tps / jax.device_count() / 1e12
      metrics.write(n, {"loss": loss, "grad_norm": float(m["grad_norm"]), "lr": float(m["lr"]),
                        "tokens_per_s": tps, "tflops_per_device": tflops,
                        "mfu": flops_lib.mfu(flops_per_token, tps, jax.device_count(),
                                             device_kind),
                        "step_s": dt / steps_done})
      if metrics.bar is None or metrics.bar.disable:
        say(f"step {n}/{t.steps}: loss {loss:.4f}  lr {float(m['lr']):.3g}  "
            f"{tps:,.0f} tokens/s  {tflops:.3g} TFLOP/s/device")
    metrics.progress(n, loss=loss, **({"tok/s": f"{clock['tokens_per_s']:,.0f}"}
                                      if clock["tokens_per_s"] else {}))

  try:
    if start == 0:
      validate_now(0)
    else:
      before = logged(workdir, "val_loss")
      summary["first_val_loss"] = before[0] if before else None
      summary["last_val_loss"] = before[-1] if before else None
      if start >= t.steps:
        say(f"the run in {workdir} is complete at step {start} (train.steps={t.steps}); "
            f"raise train.steps to continue or pass --restart to start over")
    pending = None
    t_train = time.time()
    for n in range(start + 1, t.steps + 1):
      batch = data_lib.global_batch({k: v for k, v in next(train_iter).items() if k in keys},
                                    mesh)
      state, step_metrics = step_fn(state, batch)
      if compile_s is None:
        compile_s = time.time() - t_train
      if pending is not None:
        read(*pending)  # step n-1, while step n runs
      pending = (n, step_metrics)
      # Every step on every process: jax.distributed's preemption sync point is one agreed
      # step that a host only sees if it asks at that step (the check costs no collective).
      preempted = ckpt.reached_preemption(n)
      last = n == t.steps
      evaluate_now = n % t.eval_every == 0 or last
      if preempted or last or evaluate_now or n % cfg.checkpoint.every == 0:
        read(*pending)  # never save or report a step whose loss was not finite
        pending = None
      if evaluate_now:
        validate_now(n)
      ckpt.save(n, state, train_iter, config=cfg, tokenizer_spec=tokenizer_spec,
                force=preempted or last)
      if preempted:
        ckpt.wait()
        say(f"preemption signal at step {n}: checkpoint saved, exiting cleanly")
        summary["preempted"] = True
        break
    if pending is not None:
      read(*pending)
    ckpt.wait()
  except Exception as e:
    distributed_lib.exit_if_peer_lost(e, workdir)  # another process died: a clear line, exit 1
    raise
  finally:
    metrics.close()
    ckpt.close()

  summary.update(final_step=int(jax.device_get(state["step"])),
                 tokens_per_s=clock["tokens_per_s"],
                 compile_s=None if compile_s is None else round(compile_s, 1),
                 wall_s=round(time.time() - t_start, 1))
  summary["state"] = state
  summary["tokenizer"] = tokenizer
  return summary

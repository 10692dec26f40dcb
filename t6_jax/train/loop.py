"""The training loop: data, resume-or-init, the jitted step, metrics, validation, checkpoints,
preemption and the non-finite-loss guard. `train(cfg)` is everything train.py does.

The host never waits for the device between steps: step n+1 is dispatched before step n's
metrics are read. It waits only where it must anyway: validation, checkpoint saves (the
metrics of the step being saved are checked first, so a saved step is never a diverged one)
and the end of the run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid

import jax
import numpy as np

from t6_jax import distributed as distributed_lib
from t6_jax import storage
from t6_jax.distributed import initialize as init_distributed  # noqa: F401 (train.py, tests)
from t6_jax import sharding as sharding_lib
from t6_jax import config as config_lib
from t6_jax.config import Config
from t6_jax.metrics import Metrics, device_peak_bytes, import_wandb
from t6_jax.model import placement
from t6_jax.train import flops as flops_lib
from t6_jax.train import init_from as init_from_lib
from t6_jax.train.profile import StepProfiler
from t6_jax.train import step as step_lib

RUN_FILES = ("config.yaml", "metrics.jsonl", "tb", "checkpoints")


class NonFiniteLoss(RuntimeError):
  """Training produced a NaN/Inf loss or gradient; the message names the step."""


def clear_run_dir(workdir: str) -> None:
  """Removes a previous run (for --restart); refuses folders that are not run directories."""
  storage.check(workdir, "train.workdir")
  if not storage.isdir(workdir):
    return
  entries = set(storage.listdir(workdir))
  if entries and not entries & set(RUN_FILES):
    raise ValueError(f"--restart would delete {workdir!r}, which does not look like a run "
                     f"directory (no {', '.join(RUN_FILES)}); remove it yourself or choose "
                     f"another train.workdir")
  storage.rmtree(workdir)


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
  batches = _read_validation(cfg, mesh)
  if not batches:
    raise ValueError(f"the validation split ({cfg.data.eval_split!r}) gave no batch of "
                     f"{cfg.train.batch_size // cfg.train.grad_accum} x {cfg.train.seq_len} "
                     f"tokens; lower train.batch_size or train.seq_len, or give the data "
                     f"source a validation split")
  return batches


def _read_validation(cfg: Config, mesh) -> list[dict]:
  """Up to `train.eval_batches` validation batches, on device (none if the split is short)."""
  from t6_jax import data as data_lib
  rows = cfg.train.batch_size // cfg.train.grad_accum
  ds = data_lib.make_dataset(cfg, "validation", batch_size=_per_process(rows, "eval rows"),
                             seq_len=cfg.train.seq_len, shuffle=False, num_epochs=1,
                             process_index=jax.process_index(),
                             process_count=jax.process_count())
  keys = _batch_keys(cfg)
  batches = []
  for batch in ds:
    batches.append(sharding_lib.put_batch({k: batch[k] for k in keys}, mesh, cfg.mesh.rules))
    if len(batches) == cfg.train.eval_batches:
      break
  return batches


def source_validation_batches(cfg: Config, mesh, say=print) -> dict[str, list[dict]]:
  """data.mixture: each source's own validation batches ({"SOURCE:PATH": batches}, logged as
  val_loss/SOURCE:PATH beside the mixture's val_loss); {} for one source. A source whose split
  alone fills no batch is left out with a notice (the mixture's val_loss still counts it)."""
  if not cfg.data.mixture:
    return {}
  from t6_jax.data import mixture
  out = {name: _read_validation(part, mesh) for name, part in mixture.source_configs(cfg)}
  counts = np.array([len(b) for b in out.values()], np.int64)
  if jax.process_count() > 1:  # every process evaluates the same number of batches
    from jax.experimental import multihost_utils
    counts = np.min(multihost_utils.process_allgather(counts), axis=0)
  for (name, batches), count in zip(list(out.items()), counts):
    if count == 0:
      del out[name]
      say(f"[data] data.mixture source {name}: its validation split alone fills no batch "
          f"of {cfg.train.batch_size // cfg.train.grad_accum} x {cfg.train.seq_len} tokens; "
          f"its own val_loss is not logged")
    else:
      out[name] = batches[:count]
  return out


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


def load_tasks(cfg: Config) -> list:
  """The documents of train.eval_tasks (read with the eval.* settings); [] when none."""
  if not cfg.train.eval_tasks:
    return []
  from t6_jax.eval import tasks
  return tasks.load_tasks(cfg.train.eval_tasks, cfg.eval)


def score_tasks(cfg: Config, params, mesh, tokenizer, task_data: list) -> dict[str, float]:
  """{TASK/acc, TASK/acc_norm (where the task has it): accuracy in [0, 1]} of the params, as
  eval.py scores them."""
  from t6_jax.eval import scoring
  results = scoring.evaluate_tasks(cfg, params, tokenizer, task_data, mesh=mesh)
  return {f"{r['task']}/{metric}": float(r[metric])
          for r in results for metric in ("acc", "acc_norm") if metric in r}


def evaluate(step_fn: step_lib.TrainStep, params, batches) -> float:
  sums = [step_fn.eval(params, b) for b in batches]  # all dispatched before any read
  loss_sum, count = np.sum(np.asarray(jax.device_get(sums), np.float64), axis=0)
  return float(loss_sum / max(count, 1.0))


class Run:
  """One training run as named steps; `train` below is the loop over them.

  Building a Run prepares everything a step needs (run directory, mesh, data, the restored or
  fresh state, the compiled step, metrics) and writes RUN/config.yaml only then, so a run
  that fails before it starts leaves the previous config.yaml in place. The host never waits
  for the device between steps: `step(n)` dispatches step n and then reads step n-1's metrics.
  """

  def __init__(self, cfg: Config, *, restart: bool = False, distributed: bool = False):
    self.t_start = time.time()
    storage.check(cfg.train.workdir, "train.workdir")  # a bucket offline: one line, in seconds
    init_distributed(distributed)
    step_lib.validate(cfg)
    if cfg.train.wandb_project and jax.process_index() == 0:
      import_wandb()  # missing: one line now, not after the data and the state are ready
    self.tasks = load_tasks(cfg)  # a missing task file fails here, in seconds
    self.cfg, t = cfg, cfg.train
    self.primary = jax.process_index() == 0
    self.workdir = cfg.train.workdir
    self.log = print if self.primary else (lambda *a, **k: None)
    self._prepare_run_dir(restart)
    self.mesh = sharding_lib.mesh_from_config(cfg.mesh)
    self.device_kind = jax.devices()[0].device_kind
    self.log(f"devices: {jax.device_count()} x {self.device_kind} in {jax.process_count()} "
             f"process(es); mesh {dict(self.mesh.shape)}, rules {cfg.mesh.rules!r}")
    self._load_data()
    self._restore_or_init()
    if self.primary:  # the run has started: record what it is
      config_lib.dump(cfg, storage.join(self.workdir, "config.yaml"))
    self.keys = _batch_keys(cfg)
    self.step_fn = step_lib.TrainStep(cfg, self.mesh, batch_keys=self.keys)
    self.tokens_per_step = step_lib.tokens_per_step(cfg)
    self.flops_per_token = flops_lib.train_flops_per_token(cfg.model, t.seq_len)
    self.log(f"model: {cfg.model.attention}, {self.n_params:,} parameters; "
             f"{self.flops_per_token / 1e9:.3f} GFLOP per training token (reference formula "
             f"6N+12LhdT: {flops_lib.reference_flops_per_token(cfg.model, t.seq_len) / 1e9:.3f})")
    self.metrics = Metrics(self.workdir, total_steps=t.steps, start_step=self.start,
                           primary=self.primary, wandb=self._wandb_settings())
    self.say = self.metrics.print
    # The first step compiles: the trace starts profile_skip steps after it.
    self.profiler = StepProfiler(self.metrics.local_dir("tb"), self.start + 2 + t.profile_skip,
                                 t.profile_steps, log=self.say)
    self.first_val_loss = self.last_val_loss = self.train_loss = None
    self.pending = None  # (step, device metrics) dispatched but not read yet
    self.clock_t, self.clock_step, self.tokens_per_s = None, self.start, None
    self.compile_s = None
    self.preempted = False

  # ------------------------------------------------------------------------------------------
  # Setting up

  def _wandb_settings(self) -> dict | None:
    """Metrics' W&B run: named after the run directory, with an id kept in RUN/wandb_id so
    that a resumed run logs to the same W&B run."""
    t = self.cfg.train
    if not (t.wandb_project and self.primary):
      return None
    path = storage.join(self.workdir, "wandb_id")
    if storage.exists(path):
      run_id = storage.read_text(path).strip()
    else:
      run_id = uuid.uuid4().hex[:12]
      storage.write_text(path, run_id + "\n")
    name = self.workdir.rstrip("/").rsplit("/", 1)[-1]
    return dict(project=t.wandb_project, entity=t.wandb_entity, name=name, run_id=run_id,
                config=dataclasses.asdict(self.cfg))

  def _prepare_run_dir(self, restart: bool) -> None:
    if restart and self.primary:
      clear_run_dir(self.workdir)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("run directory ready")
    if self.primary:
      storage.makedirs(self.workdir)

  def _load_data(self) -> None:
    from t6_jax import data as data_lib
    cfg, t = self.cfg, self.cfg.train
    t0 = time.time()
    self.tokenizer = data_lib.load_tokenizer(cfg)
    if self.tokenizer.vocab_size > cfg.model.vocab_size:
      raise ValueError(f"the tokenizer has {self.tokenizer.vocab_size} tokens but "
                       f"model.vocab_size={cfg.model.vocab_size}; raise model.vocab_size")
    train_ds = data_lib.make_dataset(
        cfg, "train", batch_size=_per_process(t.batch_size, "train.batch_size"),
        seq_len=t.seq_len, seed=cfg.data.seed, shuffle=True, num_epochs=None,
        process_index=jax.process_index(), process_count=jax.process_count())
    self.train_iter = iter(train_ds)
    self.val_batches = validation_batches(cfg, self.mesh)
    self.source_val_batches = source_validation_batches(cfg, self.mesh, self.log)
    self.data_s = time.time() - t0

  def _restore_or_init(self) -> None:
    from t6_jax.checkpoint import Checkpointer
    cfg = self.cfg
    self.ckpt = Checkpointer(self.workdir, cfg.checkpoint, primary=self.primary)
    try:
      self.resumed = self.ckpt.latest_step() is not None
      if self.resumed:
        start, self.state = self.ckpt.restore(step_lib.abstract_state(cfg, self.mesh),
                                              self.train_iter)
        shardings = step_lib.state_shardings(cfg, self.mesh)
        self.log(f"resuming from the checkpoint of step {start} in {self.workdir}")
        self._log_changed_settings()
        if cfg.checkpoint.init_from:
          self.log("(checkpoint.init_from is not read: the run resumes its own checkpoints)")
      elif cfg.checkpoint.init_from:
        self.state, shardings = init_from_lib.initial_state(cfg, self.mesh, self.tokenizer,
                                                            log=self.log)
        start = 0
      else:
        _, self.state, shardings = step_lib.init_state(cfg, self.mesh)
        start = 0
        self.log(f"no checkpoint in {self.workdir}: starting from scratch")
      self.start = int(start)
      self.n_params = step_lib.num_params(self.state["params"])
      sharding_lib.check_replicated(self.state["params"], shardings["params"],
                                    fail=cfg.mesh.fail_on_replicated, log=self.log)
      padded = placement.config_for_mesh(cfg.model, self.mesh, cfg.mesh.rules)
      if padded != cfg.model:
        self.log(f"{placement.padding_changes(cfg.model, padded)} inside each step (zeros, "
                 f"to split over the mesh's tensor axis; the same loss and updates)")
    except BaseException:
      self.ckpt.close()
      raise

  def _log_changed_settings(self) -> None:
    """A resumed run says which settings differ from its last start (RUN/config.yaml, not yet
    rewritten), so that a changed batch size or learning rate is a choice, not a surprise."""
    path = storage.join(self.workdir, "config.yaml")
    if not (self.primary and storage.exists(path)):
      return
    try:
      before = config_lib.load_file(path)
    except ValueError as e:  # written by another version, or edited by hand
      self.log(f"(the settings of the run's last start are unreadable, not compared: {e})")
      return
    changed = config_lib.differences(before, self.cfg, ignore=("train.workdir",))  # moved
    if changed:
      self.log("settings changed since the run last started: " + "; ".join(changed))

  # ------------------------------------------------------------------------------------------
  # The steps of the loop

  def begin(self) -> None:
    """Validation before the first step of a new run; a resumed run reports its history."""
    if self.start == 0:
      self.validate(0)
      return
    before = logged(self.workdir, "val_loss")
    self.first_val_loss = before[0] if before else None
    self.last_val_loss = before[-1] if before else None
    if self.start >= self.cfg.train.steps:
      self.say(f"the run in {self.workdir} is complete at step {self.start} (train.steps="
               f"{self.cfg.train.steps}); raise train.steps to continue or pass --restart to "
               f"start over")

  def step(self, n: int) -> None:
    """Dispatches step n, then reads step n-1's metrics while step n runs."""
    batch = sharding_lib.put_batch(
        {k: v for k, v in next(self.train_iter).items() if k in self.keys}, self.mesh,
        self.cfg.mesh.rules)
    t0 = time.time()
    with self.profiler.step(n):
      self.state, step_metrics = self.step_fn(self.state, batch)
    if self.compile_s is None:
      self.compile_s = time.time() - t0
    self.profiler.dispatched(n, step_metrics)
    self.read_pending()
    self.pending = (n, step_metrics)

  def read_pending(self) -> None:
    """Reads the metrics of the step dispatched last (blocks until it is done); stops the run
    on a non-finite loss."""
    if self.pending is None:
      return
    (n, m), self.pending = self.pending, None
    m = jax.device_get(m)
    loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
      self.ckpt.wait()
      last = self.ckpt.latest_step()
      raise NonFiniteLoss(
          f"step {n}: loss {loss}, grad norm {grad_norm} is not finite; stopped (the state was "
          f"left unchanged by that step). Last good checkpoint: "
          f"{'none' if last is None else f'step {last}'} in {self.workdir}; lower train.lr or "
          f"raise train.warmup_steps and resume")
    self.train_loss = loss
    extra = {"z_loss": float(m["z_loss"])} if "z_loss" in m else {}
    self._log_speed(n, loss, grad_norm, float(m["lr"]), extra)

  def _log_speed(self, n: int, loss: float, grad_norm: float, lr: float,
                 extra: dict[str, float]) -> None:
    t, now = self.cfg.train, time.time()
    if self.clock_t is None:  # the first step includes compilation: time from its end
      self.clock_t, self.clock_step = now, n
    elif n % t.log_every == 0 or n == t.steps:
      dt, steps_done = now - self.clock_t, n - self.clock_step
      tps = steps_done * self.tokens_per_step / dt
      self.clock_t, self.clock_step, self.tokens_per_s = now, n, tps
      tflops = self.flops_per_token * tps / jax.device_count() / 1e12
      self.metrics.write(n, {
          "loss": loss, **extra, "grad_norm": grad_norm, "lr": lr, "tokens_per_s": tps,
          "tflops_per_device": tflops,
          "mfu": flops_lib.mfu(self.flops_per_token, tps, jax.device_count(), self.device_kind),
          "step_s": dt / steps_done, "peak_memory_gib": self._peak_gib()})
      if self.metrics.bar is None or self.metrics.bar.disable:
        self.say(f"step {n}/{t.steps}: loss {loss:.4f}  lr {lr:.3g}  {tps:,.0f} tokens/s  "
                 f"{tflops:.3g} TFLOP/s/device")
    self.metrics.progress(n, loss=loss, **({"tok/s": f"{self.tokens_per_s:,.0f}"}
                                           if self.tokens_per_s else {}))

  def _peak_gib(self) -> float | None:
    """This process's devices' peak memory in use so far, GiB (None where not reported)."""
    peak = device_peak_bytes(jax.local_devices())
    return None if peak is None else round(peak / 2**30, 2)

  def validate(self, n: int) -> None:
    loss = evaluate(self.step_fn, self.state["params"], self.val_batches)
    per_source = {f"val_loss/{name}": evaluate(self.step_fn, self.state["params"], batches)
                  for name, batches in self.source_val_batches.items()}
    self.metrics.write(n, {"val_loss": loss, **per_source})
    self.say(f"step {n}: validation loss {loss:.4f}" + "".join(
        f", {name.split('/', 1)[1]} {value:.4f}" for name, value in per_source.items()))
    if self.tasks:
      scores = score_tasks(self.cfg, self.state["params"], self.mesh, self.tokenizer, self.tasks)
      self.metrics.write(n, scores)
      self.say(f"step {n}: " + ", ".join(f"{k} {100 * v:.2f}" for k, v in scores.items()))
    if self.first_val_loss is None:
      self.first_val_loss = loss
    self.last_val_loss = loss

  def save(self, n: int, *, force: bool) -> None:
    self.ckpt.save(n, self.state, self.train_iter, config=self.cfg,
                   tokenizer_spec=self.tokenizer.spec(), force=force)

  def stop_for_preemption(self, n: int) -> None:
    self.ckpt.wait()
    self.say(f"preemption signal at step {n}: checkpoint saved, exiting cleanly")
    self.preempted = True

  def finish(self) -> None:
    self.read_pending()
    self.ckpt.wait()

  def close(self) -> None:
    try:
      self.profiler.stop()  # a run that ended inside the traced steps
      self.metrics.close()
    finally:
      self.ckpt.close()

  def summary(self) -> dict:
    out = {"start_step": self.start, "resumed": self.resumed, "params": self.n_params,
           "first_val_loss": self.first_val_loss, "last_val_loss": self.last_val_loss,
           "data_s": round(self.data_s, 1),
           "final_step": int(jax.device_get(self.state["step"])),
           "tokens_per_s": self.tokens_per_s,
           "compile_s": None if self.compile_s is None else round(self.compile_s, 1),
           "peak_memory_gib": self._peak_gib(),
           "wall_s": round(time.time() - self.t_start, 1),
           "state": self.state, "tokenizer": self.tokenizer}
    if self.train_loss is not None:
      out["train_loss"] = self.train_loss
    if self.preempted:
      out["preempted"] = True
    return out


def train(cfg: Config, *, restart: bool = False, distributed: bool = False) -> dict:
  """Trains as the config says; returns a summary (steps, first/last validation loss, speed,
  the final state and the tokenizer).

  Resumes from the newest good checkpoint in train.workdir unless `restart`. Raises
  NonFiniteLoss (naming the step) when the loss or gradient stops being finite.
  """
  run = Run(cfg, restart=restart, distributed=distributed)
  t, every = cfg.train, cfg.checkpoint.every
  try:
    run.begin()
    for n in range(run.start + 1, t.steps + 1):
      run.step(n)
      # Every step on every process: jax.distributed's preemption sync point is one agreed
      # step that a host only sees if it asks at that step (the check costs no collective).
      preempted = run.ckpt.reached_preemption(n)
      last = n == t.steps
      evaluate_now = n % t.eval_every == 0 or last
      if preempted or last or evaluate_now or n % every == 0:
        run.read_pending()  # never save or report a step whose loss was not finite
      if evaluate_now:
        run.validate(n)
      run.save(n, force=preempted or last)
      if preempted:
        run.stop_for_preemption(n)
        break
    run.finish()
  except Exception as e:
    distributed_lib.exit_if_peer_lost(e, run.workdir)  # another process died: a clear line, exit 1
    raise
  finally:
    run.close()
  return run.summary()

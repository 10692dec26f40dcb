"""The training Checkpointer: Orbax CheckpointManager with async saves, retention policies,
exact resume (train state + Grain iterator state), fallback past damaged steps, preemption.

One step is three Orbax items saved together (ocp.args.Composite):
  state  StandardSave of {"step", "params", "opt_state"}   (each process its shards)
  data   Grain's CheckpointSave of the DatasetIterator              (per-process JSON state)
  meta   JsonSave of the resolved config and tokenizer spec        (what load_params reads)
Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it to `<step>` only when
every item of every process is written, so a step killed half-way is never listed.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from t6_jax import storage
from t6_jax.checkpoint.params import _absolute  # pylint: disable=protected-access
from t6_jax.checkpoint.params import (CHECKPOINT_DIR, DATA, META, STATE, committed_steps,
                                      meta_record, newest_good, read_meta, saved_state_tree, say)
from t6_jax.checkpoint.trees import CheckpointError, CheckpointMismatchError, check_same_shapes
from t6_jax.config import CheckpointConfig, Config

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _reached_sync_point(count: int) -> bool:
  """jax.distributed's agreed preemption point, reached at query `count` (False without the
  preemption service, i.e. a single process without jax.distributed)."""
  from jax.experimental import multihost_utils
  try:
    return bool(multihost_utils.reached_preemption_sync_point(count))
  except RuntimeError:
    return False


class _Manager(ocp.CheckpointManager):
  """Orbax's manager, whose own preemption check (made inside save) answers with the step the
  Checkpointer agreed on, so the two never query jax's sync point with different counts."""

  preempted_step: int | None = None

  def reached_preemption(self, step: int) -> bool:
    return self.preempted_step is not None and int(step) == self.preempted_step


def _same_folder(a: str, b: str) -> bool:
  """Whether two folders are one (symbolic links resolved locally; bucket URIs compared)."""
  if storage.is_remote(a) or storage.is_remote(b):
    return a.rstrip("/") == b.rstrip("/")
  return os.path.realpath(a) == os.path.realpath(b)


class Checkpointer:
  """Checkpoints of one run directory (`workdir/checkpoints/<step>`).

  Every process of a job creates one and calls save / restore / reached_preemption together
  (each writes its own shards; Orbax's primary host writes the shared files). `primary` is
  whether this process reports (fallbacks, signals) on the console; pass
  `jax.process_index() == 0`. SIGTERM / SIGINT are caught so that `reached_preemption` turns
  True at the next step boundary. read_only=True gives a view for evaluators watching a run
  (restore, latest_step); it never writes, deletes or takes signals.
  """

  def __init__(self, workdir: str, cfg: CheckpointConfig, *, primary: bool = True,
               read_only: bool = False):
    cfg.validate()  # ConfigError for a bad checkpoint.every / keep / keep_every
    self.cfg = cfg
    self.primary = primary
    self._say = say if primary else (lambda message: None)
    self.read_only = read_only
    self.directory = storage.join(_absolute(workdir), CHECKPOINT_DIR)  # gs:// kept as is
    keep = [policies.LatestN(n=cfg.keep)]
    if cfg.keep_every:
      keep.append(policies.EveryNSteps(interval_steps=cfg.keep_every))
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.FixedIntervalPolicy(cfg.every),
        preservation_policy=policies.AnyPreservationPolicy(keep),
        enable_async_checkpointing=cfg.async_save,
        cleanup_tmp_directories=not read_only,  # leftovers of a killed save
        read_only=read_only,
        create=not read_only,
    )
    self._manager = _Manager(self.directory, options=options)
    self._sync_calls = 0  # preemption sync-point queries made by this process
    self.problems: list[str] = []  # messages about damaged steps skipped by the last restore
    self._signal: int | None = None
    self._previous_handlers: dict[int, object] = {}
    if not read_only:
      self._install_signal_handlers()

  # ------------------------------------------------------------------------------------------
  # Steps

  def all_steps(self) -> list[int]:
    """Committed steps, ascending (a save in flight appears once it has committed)."""
    if self.read_only:
      self._manager.reload()
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest committed step of this run; if it has none yet, the step a resume would
    take from checkpoint.resume_from (checkpoint.resume_step, or that run's newest)."""
    steps = self.all_steps()
    if steps:
      return steps[-1]
    source = self._resume_source()
    if source is None:
      return None
    directory, step = source
    if step is None:
      found = committed_steps(directory)
      step = found[-1] if found else None
    return step

  def _resume_source(self) -> tuple[str, int | None] | None:
    """(checkpoints directory, step or None) of checkpoint.resume_from, or None if unset."""
    if not self.cfg.resume_from:
      return None
    storage.check(self.cfg.resume_from, "checkpoint.resume_from")
    path = _absolute(self.cfg.resume_from).rstrip("/")  # gs:// kept as is
    step = self.cfg.resume_step if self.cfg.resume_step >= 0 else None
    parent, _, name = path.rpartition("/")
    if storage.isdir(storage.join(path, CHECKPOINT_DIR)):
      directory = storage.join(path, CHECKPOINT_DIR)
    elif name.isdigit() and storage.isdir(storage.join(path, STATE)):
      directory, step = parent, int(name)  # a step directory
    elif committed_steps(path):
      directory = path
    else:
      raise CheckpointError(
          f"checkpoint.resume_from={self.cfg.resume_from!r} holds no checkpoint; give a run "
          f"directory (with {CHECKPOINT_DIR}/<step>/), its {CHECKPOINT_DIR}/ folder or one "
          f"step's directory")
    if _same_folder(directory, self.directory):
      return None  # our own directory: nothing to start from yet
    return directory, step

  # ------------------------------------------------------------------------------------------
  # Saving

  def save(self, step: int, state: dict, data_iter, *, config: Config,
           tokenizer_spec: dict | None, force: bool = False) -> bool:
    """Starts saving `state` (and `data_iter`'s position) as step `step` when `step` is a
    multiple of checkpoint.every, or when `force` (end of training, preemption).

    Returns True if a save started. With async_save the arrays are copied off the devices
    before this returns (so the caller may donate `state` to the next step) and written in
    the background; the iterator's state is captured now too. A step already on disk is left
    alone (False).
    """
    if self.read_only:
      raise CheckpointError("this Checkpointer is read-only (read_only=True); it cannot save")
    step = int(step)
    if not force and step % self.cfg.every:
      return False
    if step in self._manager.all_steps():
      return False
    items = {
        STATE: ocp.args.StandardSave(state),
        META: ocp.args.JsonSave(meta_record(step, config, tokenizer_spec,
                                            has_data=data_iter is not None)),
    }
    if data_iter is not None:
      # grain only with a data iterator: eval and generate load checkpoints without it
      import grain.checkpoint as grain_checkpoint
      items[DATA] = grain_checkpoint.CheckpointSave(data_iter)
    return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=True))

  def saving(self) -> bool:
    """Whether an async save is still being written."""
    return bool(self._manager.is_saving_in_progress())

  def wait(self) -> None:
    """Blocks until the save in flight (if any) is committed; raises if it failed."""
    self._manager.wait_until_finished()

  # ------------------------------------------------------------------------------------------
  # Restoring

  def _restore_step(self, manager, step: int, abstract_state: dict, data_iter):
    step_dir = os.path.join(str(manager.directory), str(step))
    meta = read_meta(step_dir)
    check_same_shapes(abstract_state, saved_state_tree(step_dir),
                      where=f"checkpoint step {step} ({step_dir})",
                      fix="train with the model and optimizer settings of that run, or start "
                          "a new run directory")
    items = {STATE: ocp.args.StandardRestore(abstract_state), META: ocp.args.JsonRestore()}
    portable = None
    if data_iter is not None:
      if not meta.get("has_data", True):
        self._say(f"checkpoint step {step} holds no data-iterator state; the data order "
                  f"restarts from the beginning of the pipeline")
      else:
        portable = _check_data_files(step_dir, step)
        if portable is None:
          import grain.checkpoint as grain_checkpoint
          items[DATA] = grain_checkpoint.CheckpointRestore(data_iter)
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    if portable is not None:
      data_iter.set_state(portable)
    return restored[STATE]

  def restore(self, abstract_state: dict, data_iter, step: int | None = None) -> tuple[int, dict]:
    """(step, state) of the newest complete, readable step (or of `step`).

    `abstract_state` holds jax.ShapeDtypeStructs with the shardings wanted now (any mesh: the
    arrays are resharded while reading). `data_iter`, if given, is set to the saved position.
    A damaged step is reported (naming the step and the problem) and skipped for the next
    older one; a checkpoint of a different model raises CheckpointMismatchError.
    While this run has no checkpoint, checkpoint.resume_from (and resume_step) say where to
    start from instead.
    """
    self.wait()
    if self.read_only:
      self._manager.reload()
    manager = self._manager
    source = None if committed_steps(self.directory) else self._resume_source()
    if source is not None:
      directory, resume_step = source
      step = resume_step if step is None else step
      manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
          read_only=True, create=False))
      self._say(f"starting from {directory} "
                f"({'newest good step' if step is None else f'step {step}'}; "
                f"checkpoint.resume_from)")
    try:
      found, state, self.problems = newest_good(
          str(manager.directory),
          lambda s: self._restore_step(manager, s, abstract_state, data_iter), step,
          report=self.primary)
    finally:
      if manager is not self._manager:
        manager.close()
    if manager is self._manager and not self.read_only:
      self._move_aside([s for s in committed_steps(self.directory) if s > found])
    return found, state

  def _move_aside(self, damaged: list[int]) -> None:
    """Renames damaged steps newer than the restored one to `<step>.damaged-<time>`: the run
    saves those steps again when it reaches them (Orbax skips a step whose folder exists), and
    whatever the damaged folders still hold stays on disk for the user to inspect."""
    if not damaged:
      return
    if self.primary:
      stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
      for step in damaged:
        source = os.path.join(self.directory, str(step))
        target = f"{source}.damaged-{stamp}"
        os.rename(source, target)
        self._say(f"moved the damaged step {step} aside to {target}; it is saved again when "
                  f"training reaches step {step}")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("damaged checkpoints moved aside")
    self._manager.reload()

  # ------------------------------------------------------------------------------------------
  # Preemption

  def _install_signal_handlers(self) -> None:
    if threading.current_thread() is not threading.main_thread():
      return  # signal handlers can only be set from the main thread
    if jax.process_count() > 1:
      # jax.distributed's preemption service owns SIGTERM and makes every host stop at the
      # same step (reached_preemption_sync_point); a flag of our own could stop hosts at
      # different steps and hang the save's collectives.
      return
    for sig in _SIGNALS:
      self._previous_handlers[sig] = signal.signal(sig, self._on_signal)

  def _on_signal(self, signum, frame) -> None:
    name = signal.Signals(signum).name
    if self._signal is not None:  # a second signal: stop now, without a checkpoint
      self._say(f"{name} again: exiting without waiting for the checkpoint")
      previous = self._previous_handlers.get(signum)
      if callable(previous):
        previous(signum, frame)
      raise KeyboardInterrupt(name)
    self._signal = signum
    self._say(f"{name} received: saving a checkpoint at the next step boundary, then exiting "
              f"(send it again to exit at once)")

  def reached_preemption(self, step: int) -> bool:
    """True once SIGTERM / SIGINT was received (one process), or when the multi-host
    preemption sync point of jax.distributed is reached at `step` (Orbax's check: a SIGTERM
    or TPU maintenance notice on any host, agreed by all). Call it at every step boundary on
    every process; on True, save with force=True and stop."""
    if self._signal is not None or self._manager.preempted_step == int(step):
      return True
    # jax's sync point is a count of queries, starting when the process starts: a notice that
    # arrives before the first query agrees on count 1. Passing the step number instead (as
    # Orbax does) would never match it in a resumed run, whose first step is past 1.
    self._sync_calls += 1
    if _reached_sync_point(self._sync_calls):
      self._manager.preempted_step = int(step)
      return True
    return False

  @property
  def signal_received(self) -> str | None:
    return signal.Signals(self._signal).name if self._signal is not None else None

  # ------------------------------------------------------------------------------------------

  def close(self) -> None:
    """Waits for the save in flight, then releases Orbax's threads and the signal handlers."""
    try:
      self._manager.wait_until_finished()
      self._manager.close()
    finally:
      for sig, previous in self._previous_handlers.items():
        try:
          signal.signal(sig, previous)
        except (ValueError, TypeError):
          pass
      self._previous_handlers = {}

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _check_data_files(step_dir: str, step: int) -> dict | None:
  """Grain stores one JSON per process (`process_I-of-N.json`). Saved by another number of
  processes, the state carries over only when it is a batch count that every process shares
  (`{"next_index": n}`: random-access sources without worker processes, whose global batch n
  holds the same rows whatever the process count); that state is returned. Any other state
  cannot continue that data order, which is a setup error rather than damage."""
  data_dir = storage.join(step_dir, DATA)
  if not storage.isdir(data_dir):
    raise CheckpointError(f"{data_dir} is missing")
  index, count = jax.process_index(), jax.process_count()
  want = f"process_{index}-of-{count}.json"
  files = [f for f in storage.listdir(data_dir) if f.startswith("process_")]
  if want in files:
    return
  others = sorted({f.split("-of-")[-1].removesuffix(".json") for f in files})
  if others and str(count) not in others:
    states = [json.loads(storage.read_text(storage.join(data_dir, f))) for f in files]
    if all(s == states[0] for s in states) and set(states[0]) == {"next_index"}:
      return states[0]
    raise CheckpointMismatchError(
        f"checkpoint step {step} holds the data-iterator state of {', '.join(others)} "
        f"process(es) but this job has {count}, and that state (a streamed source or Grain "
        f"worker processes) is per process; resume with the same number of processes, or "
        f"restore with data_iter=None to restart the data order")
  raise CheckpointError(f"{data_dir}/{want} is missing")

"""End-to-end resume through the real training loop (t6_jax.train.loop.train / train.py).

One uninterrupted 20-step run is the reference. Against it: a run stopped at step 10 by a real
SIGTERM and resumed; training subprocesses killed with SIGKILL (during an async save, and at a
step without one) and resumed; a restore onto a 4-device FSDP+TP mesh; a damaged newest step;
a different model. Losses are recorded at every step through Metrics.progress; on CPU the
resumed losses and final params must equal the reference bit for bit.
"""

import dataclasses
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from t6_jax import config as config_lib
from t6_jax import metrics as metrics_lib
from t6_jax.checkpoint import Checkpointer, CheckpointMismatchError, load_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 20, 5
OVERRIDES = [f"train.steps={STEPS}", f"checkpoint.every={EVERY}", "checkpoint.keep=4",
             "train.log_every=1", "train.eval_every=1000", "train.eval_batches=1"]


def make_cfg(workdir, extra=()):
  return config_lib.load("tiny", [f"train.workdir={workdir}", *OVERRIDES, *extra])


def host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def run_train(cfg, monkeypatch, stop_after=None):
  """loop.train(cfg) recording {step: loss}; with stop_after=n a real SIGTERM arrives while
  step n + 1 runs, so the loop must save step n + 1 and exit at that step boundary."""
  from t6_jax.train import loop
  losses = {}
  original = metrics_lib.Metrics.progress

  def progress(self, step, **values):
    losses[step] = values["loss"]
    if step == stop_after:
      os.kill(os.getpid(), signal.SIGTERM)
    return original(self, step, **values)

  with monkeypatch.context() as m:
    m.setattr(metrics_lib.Metrics, "progress", progress)
    summary = loop.train(cfg)
  return summary, losses


def _same_run(cfg):
  return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, workdir=""))


@pytest.fixture(scope="module")
def compile_once():
  """The loop.train calls of this module share one compiled train step and one fresh state
  (copied, since the step donates it): the configs differ only in train.workdir, so the
  computation is the same, and compiling it once keeps the tests fast."""
  from t6_jax.train import step as step_lib
  steps, states = {}, {}
  original_step, original_init = step_lib.TrainStep, step_lib.init_state

  def train_step(cfg, mesh, shardings=None, batch_keys=("inputs", "targets")):
    key = (_same_run(cfg), mesh, shardings is None, tuple(batch_keys))
    if key not in steps:
      steps[key] = original_step(cfg, mesh, shardings, batch_keys=batch_keys)
    return steps[key]

  def init_state(cfg, mesh):
    key = (_same_run(cfg), mesh)
    if key not in states:
      states[key] = original_init(cfg, mesh)
    graphdef, state, shardings = states[key]
    return graphdef, jax.tree.map(lambda x: x.copy(), state), shardings

  with pytest.MonkeyPatch.context() as m:
    m.setattr(step_lib, "TrainStep", train_step)
    m.setattr(step_lib, "init_state", init_state)
    yield


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  """A persistent compilation cache for this module: the training subprocesses load the
  executables this process compiled instead of compiling them again."""
  from jax.experimental.compilation_cache import compilation_cache as cc
  path = str(tmp_path_factory.mktemp("jax_cache"))
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  saved = {name: getattr(jax.config, name) for name in names}
  for name, value in zip(names, (path, 0.0, -1)):
    jax.config.update(name, value)
  cc.reset_cache()
  yield path
  for name, value in saved.items():
    jax.config.update(name, value)
  cc.reset_cache()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, compile_once, compile_cache):
  workdir = str(tmp_path_factory.mktemp("reference"))
  with pytest.MonkeyPatch.context() as monkeypatch:
    summary, losses = run_train(make_cfg(workdir), monkeypatch)
  assert sorted(losses) == list(range(1, STEPS + 1))
  return workdir, losses, host(summary["state"])


def stop_at_10_then_resume(reference, tmp_path, monkeypatch, capsys):
  _, ref_losses, ref_state = reference
  cfg = make_cfg(str(tmp_path))
  first, losses = run_train(cfg, monkeypatch, stop_after=9)
  assert first.get("preempted") and first["final_step"] == 10
  assert "SIGTERM received" in capsys.readouterr().err
  assert Checkpointer(str(tmp_path), cfg.checkpoint, read_only=True).latest_step() == 10
  second, resumed = run_train(cfg, monkeypatch)
  assert second["resumed"] and second["start_step"] == 10 and second["final_step"] == STEPS
  losses.update(resumed)
  assert losses == ref_losses  # exact floats, data order included
  assert_equal(host(second["state"]), ref_state)


def _wait_for(predicate, proc, what, timeout=300.0):
  deadline = time.time() + timeout
  while time.time() < deadline:
    found = predicate()
    if found:
      return found
    if proc.poll() is not None:
      raise AssertionError(f"training exited (rc {proc.returncode}) before {what}")
    time.sleep(0.002)
  raise AssertionError(f"timed out waiting for {what}")




def kill_9_then_resume(reference, compile_cache, tmp_path, monkeypatch, capsys, moment):
  _, ref_losses, ref_state = reference
  workdir = str(tmp_path / "run")
  rng = random.Random(f"kill step {moment}")  # seeded: a failure reruns the same kill step
  if moment == "during_async_save":
    kill_step = rng.choice(range(2 * EVERY, STEPS, EVERY))  # a checkpoint exists before it
  else:
    kill_step = rng.choice([s for s in range(2 * EVERY + 1, STEPS - 2) if s % EVERY])
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=compile_cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  log = open(tmp_path / "train.log", "w")
  proc = subprocess.Popen(
      [sys.executable, os.path.join(REPO, "train.py"), "--config", "tiny",
       f"train.workdir={workdir}", *OVERRIDES], cwd=REPO, env=env, stdout=log,
      stderr=subprocess.STDOUT)
  checkpoints = os.path.join(workdir, "checkpoints")
  try:
    if moment == "during_async_save":
      # The save of kill_step is written under a temporary name until it commits.
      _wait_for(lambda: glob.glob(f"{checkpoints}/{kill_step}.orbax-checkpoint-tmp*"), proc,
                f"the save of step {kill_step}")
    else:
      def reached():
        path = os.path.join(workdir, "metrics.jsonl")
        if not os.path.exists(path):
          return False
        with open(path) as f:
          return any(json.loads(line).get("step", -1) >= kill_step
                     for line in f if line.endswith("\n") and '"loss"' in line)
      _wait_for(reached, proc, f"step {kill_step}")
    os.kill(proc.pid, signal.SIGSTOP)  # freeze it where it is, look, then kill -9
    in_flight = not os.path.isdir(os.path.join(checkpoints, str(kill_step)))
    committed = [int(n) for n in os.listdir(checkpoints) if n.isdigit()]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
  finally:
    if proc.poll() is None:
      proc.kill()
    log.close()
  if moment == "during_async_save":
    assert in_flight, f"the save of step {kill_step} committed before the kill"
  cfg = make_cfg(workdir)
  latest = Checkpointer(workdir, cfg.checkpoint, read_only=True).latest_step()
  # Resumes from the newest save that had committed; lost: the steps since the last save
  # started, plus that save if it was still being written (at most one interval more).
  assert latest == max(committed), (kill_step, committed, latest)
  assert latest >= (kill_step // EVERY - 1) * EVERY, (kill_step, latest)
  summary, losses = run_train(cfg, monkeypatch)
  assert summary["resumed"] and summary["start_step"] == latest
  assert "resuming from the checkpoint of step" in capsys.readouterr().out
  assert losses == {s: ref_losses[s] for s in range(latest + 1, STEPS + 1)}, kill_step
  assert_equal(host(summary["state"]), ref_state)


def restore_onto_fsdp_tp_mesh_of_4_devices(reference):
  from t6_jax import data as data_lib
  from t6_jax import sharding as sharding_lib
  from t6_jax.train import step as step_lib
  workdir, ref_losses, _ = reference
  cfg = make_cfg(workdir, ["mesh.fsdp=2", "mesh.tensor=2", "mesh.rules=fsdp_tp"])
  mesh = sharding_lib.mesh_from_config(cfg.mesh, devices=jax.devices()[:4])
  target = step_lib.abstract_state(cfg, mesh)
  train_iter = iter(data_lib.make_dataset(cfg, "train", batch_size=cfg.train.batch_size,
                                          seq_len=cfg.train.seq_len, seed=cfg.data.seed))
  ck = Checkpointer(workdir, cfg.checkpoint, read_only=True)
  step, state = ck.restore(target, train_iter, step=10)
  ck.close()
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(target)):
    assert got.sharding == want.sharding
  c_fc1 = state["params"]["blocks"]["mlp"]["c_fc1"]
  assert c_fc1.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert len(c_fc1.sharding.device_set) == 4
  _, params_10, _ = load_params(workdir, step=10)  # one device, as saved
  assert_equal(host(state["params"]), host(params_10))
  # Step 11's loss (the train step reports the loss before its update) on the new mesh.
  step_fn = step_lib.TrainStep(cfg, mesh, step_lib.state_shardings(cfg, mesh))
  batch = sharding_lib.put_batch(next(train_iter), mesh, cfg.mesh.rules)
  loss_sum, count = jax.device_get(step_fn.eval(state["params"], batch))
  # Another mesh sums in another order: equal to float32 rounding, not bitwise.
  np.testing.assert_allclose(loss_sum / count, ref_losses[11], rtol=2e-6)


def damaged_newest_step_and_other_model(reference, tmp_path, capsys):
  from t6_jax import sharding as sharding_lib
  from t6_jax.train import step as step_lib
  workdir, _, ref_state = reference
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  for path in glob.glob(f"{copy}/checkpoints/{STEPS}/state/**/d/*", recursive=True):
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 3)
  cfg = make_cfg(copy)
  mesh = sharding_lib.mesh_from_config(cfg.mesh)
  ck = Checkpointer(copy, cfg.checkpoint, read_only=True)
  step, state = ck.restore(step_lib.abstract_state(cfg, mesh), None)
  assert step == STEPS - EVERY
  assert f"checkpoint step {STEPS}" in capsys.readouterr().err
  _, params, _ = load_params(workdir)
  assert_equal(host(params), ref_state["params"])

  wide = make_cfg(copy, ["model.d_model=96"])
  with pytest.raises(CheckpointMismatchError, match=r"W_A_k has shape \(2, 64, 4, 2\) in "
                     r"checkpoint step 15 .* expects \(2, 96, 4, 2\)"):
    ck.restore(step_lib.abstract_state(wide, mesh), None)
  ck.close()


# One test, so that pytest-xdist cannot split these stages (and the reference run and its
# compile) over two workers.
# Orbax abandons TensorStore reads of a damaged file when it gives up on the step; their late
# callbacks hit a closed event loop ("Event loop is closed"), which pytest would report.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_resume_end_to_end(reference, compile_cache, tmp_path, monkeypatch, capsys):
  stages = ["stop", "during_async_save", "between_saves", "damaged"]
  for name in stages:
    (tmp_path / name).mkdir()
  stop_at_10_then_resume(reference, tmp_path / "stop", monkeypatch, capsys)
  for moment in ("during_async_save", "between_saves"):
    kill_9_then_resume(reference, compile_cache, tmp_path / moment, monkeypatch, capsys, moment)
  restore_onto_fsdp_tp_mesh_of_4_devices(reference)
  damaged_newest_step_and_other_model(reference, tmp_path / "damaged", capsys)

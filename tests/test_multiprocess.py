"""A pod's life in 2 processes of 2 forced CPU devices, against the same work in 1 process of 4.

The processes join through JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, as on
a GPU cluster (tests/multiproc.py starts them). One uninterrupted training run of each kind is
made once per test session (by whichever pytest-xdist worker needs it first; a worker that
needs it meanwhile waits) and shared by the tests; against them: SIGTERM to both processes
(preemption), kill -9 of one process, and the resumes after each; restores across process
counts and meshes; the per-process data slices, eval.py and generate.py; who writes what.
Same process count and mesh: bit-identical losses and params; another process count or mesh
sums in another order: equal to float32 rounding.

Every started process costs seconds of CPU (imports, joining, tracing), so the jobs are few:
the runs above, each stage a single job, and the single-process eval and generate in the
test's own process.
"""

import fcntl
import glob
import importlib.util
import json
import os
import shutil
import signal
import time

import jax
import numpy as np
import pytest

import multiproc

STEPS, EVERY = 10, 2
MIDDLE = 2 * EVERY  # the step the restores across process counts start from
MICRO = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.head_dim=8",
         "model.max_seq_len=16", "train.seq_len=16", "train.batch_size=8",
         f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=1000",
         "train.eval_batches=1", f"checkpoint.every={EVERY}", "checkpoint.keep=10"]
RTOL = 2e-5  # another process count or mesh: float32 sums in another order
# Devices in all: each is a rank of the CPU collectives, and on a 2-core machine 4 ranks step
# about 2x faster than 8 while still sharding every array across both processes.
DEVICES = 4
# A dead process is detected within this heartbeat timeout (tests/multiproc.py passes it on).
HEARTBEAT_S = 10
TIMEOUTS = {"T6_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_S), "T6_SHUTDOWN_TIMEOUT_S": "30",
            "T6_INIT_TIMEOUT_S": "120"}
ROOT = multiproc.REPO


@pytest.fixture(scope="session")
def shared(tmp_path_factory):
  """This test session's folder for every pytest-xdist worker (their own temporary folders sit
  side by side in the session's): the reference runs, the data cache, compiled programs."""
  base = tmp_path_factory.getbasetemp()
  path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "multiprocess"
  path.mkdir(exist_ok=True)
  return path


def train_args(shared, workdir, extra=()):
  return ["train.py", "--config", "tiny", f"train.workdir={workdir}",
          f"data.cache_dir={shared / 'data_cache'}", *MICRO, *extra]


def start(shared, logdir, args, processes, name):
  return multiproc.Job(args, processes=processes, devices=DEVICES // processes, logdir=str(logdir),
                       name=name, shared=str(shared), env=TIMEOUTS)


def run(shared, logdir, args, processes, name, timeout=300):
  job = start(shared, logdir, args, processes, name)
  return job.check(job.wait(timeout))


def once(shared, name, make):
  """`make(workdir)`, done once per test session; the run directory it made."""
  workdir, done = shared / name, shared / f"{name}.done"
  with open(shared / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      shutil.rmtree(workdir, ignore_errors=True)  # what a failed attempt left
      make(workdir)
      done.touch()
  return workdir


def losses(workdir, after: int = 0) -> dict[int, float]:
  """{step: loss} from metrics.jsonl, from its line `after` on (the first step of each run is
  not logged: it starts the throughput clock)."""
  out = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      for line in f.readlines()[after:]:
        if line.endswith("\n") and '"loss"' in line:
          record = json.loads(line)
          out[record["step"]] = record["loss"]
  return out


def metric_lines(workdir) -> int:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return len(f.readlines())


def params_of(workdir, step=None):
  from t6_jax.checkpoint import load_params
  _, params, _ = load_params(str(workdir), step=step)
  return jax.tree.map(np.asarray, jax.device_get(params))


def assert_same_params(workdir, reference, exact):
  for a, b in zip(jax.tree.leaves(params_of(workdir)), jax.tree.leaves(params_of(reference))):
    if exact:
      np.testing.assert_array_equal(a, b)
    else:
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def committed(workdir) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def in_flight(workdir) -> list[int]:
  """Steps whose save is still under Orbax's temporary name (not renamed to <step> yet)."""
  return [int(os.path.basename(p).split(".")[0])
          for p in glob.glob(f"{workdir}/checkpoints/*.orbax-checkpoint-tmp*")]


def wait_for(predicate, job, what, timeout=240.0):
  deadline = time.time() + timeout
  while time.time() < deadline:
    found = predicate()
    if found:
      return found
    if any(p.poll() is not None for p in job.procs):
      job.kill()
      raise AssertionError(f"a process exited before {what}:\n" + job.output(0)[-3000:])
    time.sleep(0.005)
  job.kill()
  raise AssertionError(f"timed out waiting for {what}")


def log(shared, name, i=0) -> str:
  with open(shared / "logs" / f"{name}.{i}.log", errors="replace") as f:
    return f.read()


@pytest.fixture(scope="module")
def one(shared):
  """The reference: 1 process of 4 devices, uninterrupted."""
  workdir = once(shared, "one", lambda w: run(shared, shared / "logs",
                                               train_args(shared, w), 1, "one"))
  assert sorted(losses(workdir)) == list(range(2, STEPS + 1))
  return workdir, losses(workdir), log(shared, "one")


@pytest.fixture(scope="module")
def two(shared):
  """2 processes of 2 devices, uninterrupted."""
  workdir = once(shared, "two", lambda w: run(shared, shared / "logs",
                                               train_args(shared, w), 2, "two"))
  return workdir, losses(workdir), [log(shared, "two", i) for i in range(2)]


def test_two_processes_train_like_one(one, two):
  (one_dir, one_losses, one_out), (two_dir, two_losses, two_out) = one, two
  assert sorted(two_losses) == sorted(one_losses)
  np.testing.assert_allclose([two_losses[s] for s in sorted(two_losses)],
                             [one_losses[s] for s in sorted(one_losses)], rtol=RTOL)
  assert_same_params(two_dir, one_dir, exact=False)
  assert "in 2 process(es)" in two_out[0] and "in 1 process(es)" in one_out
  # Only process 0 reports: progress, the summary, metrics.jsonl (one record per step).
  assert f"step {STEPS}/{STEPS}" in two_out[0] and "done: step" in two_out[0]
  for text in ("step 2/", "validation loss", "done:", "devices:"):
    assert text not in two_out[1], text
  records = [json.loads(line) for line in open(two_dir / "metrics.jsonl")]
  for key in ("loss", "val_loss"):
    steps = [r["step"] for r in records if key in r]
    assert len(steps) == len(set(steps)), key
  assert os.listdir(two_dir / "tb")
  # Every process writes its part of each checkpoint: its OCDBT shard files, its data state.
  for step in committed(two_dir):
    step_dir = two_dir / "checkpoints" / str(step)
    for i in range(2):
      assert os.listdir(step_dir / "state" / f"ocdbt.process_{i}"), (step, i)
      assert os.path.isfile(step_dir / "data" / f"process_{i}-of-2.json"), (step, i)
  assert committed(two_dir) == list(range(EVERY, STEPS + 1, EVERY))
  assert not glob.glob(str(one_dir / "checkpoints/*/state/ocdbt.process_1"))


def val_losses(workdir) -> dict[int, float]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    records = [json.loads(line) for line in f if line.endswith("\n")]
  return {r["step"]: r["val_loss"] for r in records if "val_loss" in r}


def test_preemption_then_kill_9_then_each_resume_continues_exactly(shared, tmp_path, two):
  """One run, stopped twice: SIGTERM to both processes (checkpoint at the agreed step, exit
  0), a rerun that resumes there and loses process 1 to kill -9 while a checkpoint is being
  written, and a rerun that resumes from the newest complete checkpoint. Every step after
  each resume is the uninterrupted run's, bit for bit."""
  two_dir, two_losses, _ = two
  workdir, logs = tmp_path / "run", tmp_path / "logs"

  # SIGTERM to both as soon as training starts (after the validation of step 0): within about
  # a second jax.distributed agrees on a step; both save it and exit 0. (A fresh run: its step
  # numbers are the preemption service's call counts from 1, so an early notice is not lost.)
  job = start(shared, logs, train_args(shared, workdir), 2, "preempted")
  wait_for(lambda: 0 in val_losses(workdir), job, "the validation of step 0")
  job.signal(signal.SIGTERM)
  results = job.wait(timeout=120)
  assert [r.rc for r in results] == [0, 0], results[0].output[-3000:]
  said = [line for line in results[0].output.splitlines() if "preemption signal at step" in line]
  assert said, results[0].output[-3000:]
  stop = int(said[0].split("preemption signal at step ")[1].split(":")[0])
  # (A later stop would leave no checkpoint save before the last step for the kill below.)
  assert 1 <= stop <= STEPS - 2 * EVERY and committed(workdir)[-1] == stop, stop
  for i in range(2):  # both processes wrote their part of that step
    assert os.listdir(workdir / "checkpoints" / str(stop) / "state" / f"ocdbt.process_{i}")

  # The rerun resumes at `stop`; kill -9 of process 1 while a later save is being written.
  before = metric_lines(workdir)
  job = start(shared, logs, train_args(shared, workdir), 2, "killed")
  wait_for(lambda: [s for s in in_flight(workdir) if stop + 2 <= s < STEPS], job,
           "a checkpoint save in flight")
  job.signal(signal.SIGKILL, [1])
  killed_at = time.time()
  results = job.wait(timeout=HEARTBEAT_S + 60)
  waited = time.time() - killed_at
  assert results[1].rc == -signal.SIGKILL
  out = results[0].output
  assert f"resuming from the checkpoint of step {stop}" in out, out[-3000:]
  # Same processes, same mesh: the steps after the preemption are the uninterrupted run's.
  resumed = losses(workdir, after=before)
  assert resumed and min(resumed) == stop + 2, sorted(resumed)
  for s in resumed:
    assert resumed[s] == two_losses[s], s
  # The survivor stops on its own, soon, and names the process that is gone: our line once the
  # coordinator has declared it dead, or (if jax.distributed's own abort on that same event
  # comes first) jax's line listing the unhealthy task.
  assert waited < HEARTBEAT_S + 30, waited
  assert "error: process 0 of 2: a step across processes failed" in out, out[-3000:]
  if results[0].rc == 1:
    assert "error: the job lost a process: process 1 of 2 stopped" in out, out[-3000:]
  else:
    assert results[0].rc == -signal.SIGABRT, out[-3000:]
    assert "stopped sending heartbeats):\n1\n" in out, out[-3000:]
  # A half-written save (still under its temporary name) never counts as a checkpoint.
  complete = committed(workdir)
  assert complete[-1] >= stop and not set(in_flight(workdir)) & set(complete), complete
  for step in complete:
    assert os.path.isfile(workdir / "checkpoints" / str(step) / "commit_success.txt")

  # The next rerun resumes from the newest complete checkpoint and ends where the
  # uninterrupted run ended, bit for bit.
  newest = complete[-1]
  before = metric_lines(workdir)
  results = run(shared, logs, train_args(shared, workdir), 2, "resumed")
  assert f"resuming from the checkpoint of step {newest}" in results[0].output
  resumed = losses(workdir, after=before)
  assert sorted(resumed) == list(range(newest + 2, STEPS + 1)), sorted(resumed)
  for s in resumed:
    assert resumed[s] == two_losses[s], s
  assert_same_params(workdir, two_dir, exact=True)


def test_restore_across_process_counts_and_meshes(shared, tmp_path, one, two):
  (one_dir, one_losses, _), (two_dir, _, _) = one, two
  # 2 processes x 2 devices -> 1 process x 4 devices on a data=2 x fsdp=2 mesh.
  to_one = tmp_path / "two_to_one"
  args = train_args(shared, to_one, [f"checkpoint.resume_from={two_dir}",
                                     f"checkpoint.resume_step={MIDDLE}", "mesh.data=2",
                                     "mesh.fsdp=2"])
  run(shared, tmp_path, args, 1, "two_to_one")
  # 1 process x 4 devices -> 2 processes x 2 devices.
  to_two = tmp_path / "one_to_two"
  args = train_args(shared, to_two, [f"checkpoint.resume_from={one_dir}",
                                     f"checkpoint.resume_step={MIDDLE}"])
  results = run(shared, tmp_path, args, 2, "one_to_two")
  assert f"resuming from the checkpoint of step {MIDDLE}" in results[0].output
  for workdir in (to_one, to_two):
    got = losses(workdir)
    assert sorted(got) == list(range(MIDDLE + 2, STEPS + 1)), workdir
    np.testing.assert_allclose([got[s] for s in sorted(got)],
                               [one_losses[s] for s in sorted(got)], rtol=RTOL)
    assert_same_params(workdir, one_dir, exact=False)


# In each process of a 2-process job: its slice of the first 3 global batches of each split,
# then eval.py and generate.py (their main(), as `python eval.py ...` runs it) on the run (and
# generate.py again on a tensor-parallel mesh over both processes),
# then a new run's state taken from it by checkpoint.init_from (each leaf's sum of squares).
SLICES_EVAL_GENERATE = """
import importlib.util, json, sys
from t6_jax import config, distributed
distributed.initialize()
import jax, jax.numpy as jnp, numpy as np
from t6_jax import data, sharding
from t6_jax.train import init_from
out, overrides, eval_args, generate_args, init_args = sys.argv[1], *map(json.loads, sys.argv[2:])
me = jax.process_index()
cfg = config.load("tiny", overrides)
for split in ("train", "validation"):
  it = iter(data.make_dataset(cfg, split, batch_size=8 // jax.process_count(), seq_len=16,
                              shuffle=split == "train", num_epochs=None if split == "train"
                              else 1))
  np.save(f"{out}/{split}.{me}.npy", np.stack([next(it)["inputs"] for _ in range(3)]))
tensor = ["mesh.rules=fsdp_tp", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=-1"]
for name, args in (("eval", eval_args + ["--output", f"{out}/eval.json"]),
                   ("generate", generate_args + ["--out", f"{out}/generate.{me}.jsonl"]),
                   ("generate", generate_args + tensor + ["--out", f"{out}/tensor.{me}.jsonl"])):
  spec = importlib.util.spec_from_file_location(name + "_cli", name + ".py")
  cli = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cli)
  assert cli.main(args) == 0, name
cfg = config.load("tiny", init_args)
state, _ = init_from.initial_state(cfg, sharding.mesh_from_config(cfg.mesh),
                                   data.load_tokenizer(cfg), log=lambda *a: None)
sums = jax.jit(lambda t: jax.tree.map(lambda x: jnp.sum(jnp.square(x.astype(jnp.float32))), t))(
    state)
with open(f"{out}/init_from.{me}.json", "w") as f:
  json.dump({jax.tree_util.keystr(k): float(v)
             for k, v in jax.tree_util.tree_leaves_with_path(jax.device_get(sums))}, f)
"""


def load_cli(name):
  spec = importlib.util.spec_from_file_location(f"{name}_cli", os.path.join(ROOT, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def completions(path) -> list[str]:
  with open(path) as f:
    return [json.loads(line)["completion"] for line in f]


def test_data_slices_eval_and_generate_in_two_processes_as_in_one(shared, tmp_path, one):
  one_dir = one[0]
  overrides = [f"data.cache_dir={shared / 'data_cache'}", "train.seq_len=16"]
  eval_args = ["--workdir", str(one_dir), "--no_tasks", "--no_progress", "eval.batch_size=8",
               "eval.max_batches=2"]
  generate_args = ["--workdir", str(one_dir), "--ids", "--prompt", "10 20 30", "--prompt",
                   "40 50", "--max_new_tokens", "6", "--temperature", "0", "--no_stop"]
  out = tmp_path / "two"
  out.mkdir()
  init_args = overrides + MICRO + [f"checkpoint.init_from={one_dir}"]
  script = ["-c", SLICES_EVAL_GENERATE, str(out), json.dumps(overrides), json.dumps(eval_args),
            json.dumps(generate_args), json.dumps(init_args)]
  run(shared, tmp_path, script, 2, "slices_eval_generate")

  # Each process reads a disjoint slice of every global batch, and the slices cover it.
  from t6_jax import config, data
  cfg = config.load("tiny", overrides)
  for split in ("train", "validation"):
    it = iter(data.make_dataset(cfg, split, batch_size=8, seq_len=16,
                                shuffle=split == "train", process_index=0, process_count=1,
                                num_epochs=None if split == "train" else 1))
    whole = [next(it)["inputs"] for _ in range(3)]
    parts = [np.load(out / f"{split}.{i}.npy") for i in range(2)]
    for b in range(3):
      mine = [{r.tobytes() for r in p[b]} for p in parts]
      assert all(len(m) == 4 for m in mine)
      assert not mine[0] & mine[1], (split, b)
      assert mine[0] | mine[1] == {r.tobytes() for r in whole[b]}, (split, b)

  # The same loss and the same tokens as eval.py and generate.py in this process (8 CPU
  # devices from tests/conftest.py, the same XLA flags).
  assert load_cli("eval").main(eval_args + ["--output", str(tmp_path / "eval.json")]) == 0
  assert load_cli("generate").main(generate_args + ["--out", str(tmp_path / "gen.jsonl")]) == 0
  report_one = json.loads((tmp_path / "eval.json").read_text())
  report_two = json.loads((out / "eval.json").read_text())
  assert report_one["step"] == report_two["step"] == STEPS
  np.testing.assert_allclose(report_two["validation"]["loss"], report_one["validation"]["loss"],
                             rtol=RTOL)
  assert report_two["validation"]["tokens"] == report_one["validation"]["tokens"]
  reference = completions(tmp_path / "gen.jsonl")
  assert len(reference) == 2
  for i in range(2):
    assert completions(out / f"generate.{i}.jsonl") == reference, i
    # and with the weights split over 8 tensor shards of both processes (tiny's 4 heads and
    # 170 MLP units padded to 8 and 176 on the way)
    assert completions(out / f"tensor.{i}.jsonl") == reference, i

  # checkpoint.init_from over 2 processes: the run's params, sharded over both, a fresh AdamW
  # state and step 0 (sums of squares against float64 NumPy on the saved params).
  want = {f"['params']{jax.tree_util.keystr(k)}": float(np.sum(np.square(v, dtype=np.float64)))
          for k, v in jax.tree_util.tree_leaves_with_path(params_of(one_dir))}
  for i in range(2):
    got = json.loads((out / f"init_from.{i}.json").read_text())
    assert set(want) <= set(got), sorted(set(want) - set(got))
    for key, value in got.items():
      if key in want:
        np.testing.assert_allclose(value, want[key], rtol=1e-5, err_msg=key)
      else:  # the step and every optimizer leaf
        assert value == 0.0, key

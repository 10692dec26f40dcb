"""A pod's life in 2 processes of 4 forced CPU devices, against the same work in 1 process of 8.

The processes join through JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, as on
a GPU cluster (tests/multiproc.py starts them). One uninterrupted run of each kind is shared by
the tests; against them: the per-process data slices, kill -9 of one process and a resume,
SIGTERM to both (preemption) and a resume, restores across process counts and meshes, eval.py
and generate.py, and who writes what. Same process count and mesh: bit-identical losses and
params; another process count or mesh sums in another order: equal to float32 rounding.
"""

import glob
import json
import os
import signal
import time

import jax
import numpy as np
import pytest

import multiproc

STEPS, EVERY = 12, 3
MICRO = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.head_dim=8",
         "model.max_seq_len=16", "train.seq_len=16", "train.batch_size=8",
         f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=1000",
         "train.eval_batches=1", f"checkpoint.every={EVERY}", "checkpoint.keep=10"]
RTOL = 2e-5  # another process count or mesh: float32 sums in another order
# A dead process is detected within this heartbeat timeout (tests/multiproc.py passes it on).
HEARTBEAT_S = 10
TIMEOUTS = {"T6_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_S), "T6_SHUTDOWN_TIMEOUT_S": "30",
            "T6_INIT_TIMEOUT_S": "120"}


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
  return tmp_path_factory.mktemp("multiprocess")


@pytest.fixture(scope="module")
def cache(tmp):
  return str(tmp / "jax_cache")  # later jobs load what the first ones compiled


def train_args(tmp, workdir, extra=()):
  return ["train.py", "--config", "tiny", f"train.workdir={workdir}",
          f"data.cache_dir={tmp / 'data_cache'}", *MICRO, *extra]


def run(tmp, cache, args, processes, name, **kw):
  return multiproc.run(args, processes=processes, devices=8 // processes,
                       logdir=str(tmp / "logs"), name=name, cache_dir=cache,
                       env=TIMEOUTS, **kw)


def start(tmp, cache, args, processes, name):
  return multiproc.Job(args, processes=processes, devices=8 // processes,
                       logdir=str(tmp / "logs"), name=name, cache_dir=cache, env=TIMEOUTS)


def losses(workdir) -> dict[int, float]:
  """{step: loss} from metrics.jsonl (the first step of each run is not logged: it starts the
  throughput clock)."""
  out = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        if line.endswith("\n") and '"loss"' in line:
          record = json.loads(line)
          out[record["step"]] = record["loss"]
  return out


def params_of(workdir, step=None):
  from t6_jax.checkpoint import load_params
  _, params, _ = load_params(str(workdir), step=step)
  return jax.tree.map(np.asarray, jax.device_get(params))


def committed(workdir) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


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


@pytest.fixture(scope="module")
def one(tmp, cache):
  """The reference: 1 process of 8 devices, uninterrupted."""
  workdir = tmp / "one"
  (result,) = run(tmp, cache, train_args(tmp, workdir), 1, "one")
  assert sorted(losses(workdir)) == list(range(2, STEPS + 1))
  return workdir, losses(workdir), result.output


@pytest.fixture(scope="module")
def two(tmp, cache):
  """2 processes of 4 devices, uninterrupted."""
  workdir = tmp / "two"
  results = run(tmp, cache, train_args(tmp, workdir), 2, "two")
  return workdir, losses(workdir), [r.output for r in results]


def two_processes_train_like_one(one, two):
  (one_dir, one_losses, one_out), (two_dir, two_losses, two_out) = one, two
  assert sorted(two_losses) == sorted(one_losses)
  np.testing.assert_allclose([two_losses[s] for s in sorted(two_losses)],
                             [one_losses[s] for s in sorted(one_losses)], rtol=RTOL)
  for a, b in zip(jax.tree.leaves(params_of(two_dir)), jax.tree.leaves(params_of(one_dir))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
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


SLICES = """
import sys, numpy as np
from t6_jax import config, distributed
distributed.initialize()
import jax
from t6_jax import data
cfg = config.load("tiny", sys.argv[2:])
for split in ("train", "validation"):
  it = iter(data.make_dataset(cfg, split, batch_size=8 // jax.process_count(), seq_len=16,
                              shuffle=split == "train", num_epochs=None if split == "train"
                              else 1))
  rows = np.stack([next(it)["inputs"] for _ in range(3)])
  np.save(f"{sys.argv[1]}/{split}.{jax.process_index()}.npy", rows)
"""


def test_each_process_reads_a_disjoint_slice_of_every_batch(tmp, cache):
  out = tmp / "slices"
  out.mkdir()
  overrides = [f"data.cache_dir={tmp / 'data_cache'}", "train.seq_len=16"]
  run(tmp, cache, ["-c", SLICES, str(out), *overrides], 2, "slices")
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


def kill_9_one_process_then_resume(tmp, cache, two):
  two_dir, two_losses, _ = two
  workdir = tmp / "killed"
  job = start(tmp, cache, train_args(tmp, workdir), 2, "killed")
  checkpoints = workdir / "checkpoints"

  def save_in_flight():  # a save after the first committed one, not yet renamed to <step>
    return [p for p in glob.glob(f"{checkpoints}/*.orbax-checkpoint-tmp*")
            if int(os.path.basename(p).split(".")[0]) >= 2 * EVERY]
  wait_for(save_in_flight, job, "a checkpoint save in flight")
  job.signal(signal.SIGKILL, [1])
  killed_at = time.time()
  results = job.wait(timeout=HEARTBEAT_S + 60)
  waited = time.time() - killed_at
  assert results[1].rc == -signal.SIGKILL
  # The survivor stops on its own, soon, and names the process that is gone: our line once the
  # coordinator has declared it dead, or (if jax.distributed's own abort on that same event
  # comes first) jax's line listing the unhealthy task.
  out = results[0].output
  assert waited < HEARTBEAT_S + 30, waited
  assert "error: process 0 of 2: a step across processes failed" in out, out[-3000:]
  if results[0].rc == 1:
    assert "error: the job lost a process: process 1 of 2 stopped" in out, out[-3000:]
  else:
    assert results[0].rc == -signal.SIGABRT, out[-3000:]
    assert "stopped sending heartbeats):\n1\n" in out, out[-3000:]
  # A half-written save (still under its temporary name) never counts as a checkpoint.
  complete = committed(workdir)
  leftovers = [int(os.path.basename(p).split(".")[0])
               for p in glob.glob(f"{checkpoints}/*.orbax-checkpoint-tmp*")]
  assert complete and not set(leftovers) & set(complete)
  for step in complete:
    assert os.path.isfile(checkpoints / str(step) / "commit_success.txt")

  results = run(tmp, cache, train_args(tmp, workdir), 2, "killed_resume")
  newest = complete[-1]
  assert f"resuming from the checkpoint of step {newest}" in results[0].output
  resumed = losses(workdir)
  # Same processes, same mesh: the steps after the resume are the uninterrupted run's, bitwise.
  for s in range(newest + 2, STEPS + 1):
    assert resumed[s] == two_losses[s], s
  for a, b in zip(jax.tree.leaves(params_of(workdir)), jax.tree.leaves(params_of(two_dir))):
    np.testing.assert_array_equal(a, b)


def sigterm_to_both_saves_at_the_agreed_step_then_resumes_exactly(tmp, cache, two):
  two_dir, two_losses, _ = two
  workdir = tmp / "preempted"
  job = start(tmp, cache, train_args(tmp, workdir), 2, "preempted")
  wait_for(lambda: max(losses(workdir), default=0) >= 3, job, "step 3")
  job.signal(signal.SIGTERM)
  results = job.wait(timeout=120)
  assert [r.rc for r in results] == [0, 0], results[0].output[-3000:]
  said = [line for line in results[0].output.splitlines() if "preemption signal at step" in line]
  assert said, results[0].output[-3000:]
  stop = int(said[0].split("preemption signal at step ")[1].split(":")[0])
  assert 3 <= stop < STEPS and committed(workdir)[-1] == stop
  for i in range(2):  # both processes wrote their part of that step
    assert os.listdir(workdir / "checkpoints" / str(stop) / "state" / f"ocdbt.process_{i}")

  results = run(tmp, cache, train_args(tmp, workdir), 2, "preempted_resume")
  assert f"resuming from the checkpoint of step {stop}" in results[0].output
  resumed = losses(workdir)
  for s in range(stop + 2, STEPS + 1):
    assert resumed[s] == two_losses[s], s
  for a, b in zip(jax.tree.leaves(params_of(workdir)), jax.tree.leaves(params_of(two_dir))):
    np.testing.assert_array_equal(a, b)


def restore_across_process_counts_and_meshes(tmp, cache, one, two):
  (one_dir, one_losses, _), (two_dir, _, _) = one, two
  middle = 2 * EVERY
  # 2 processes x 4 devices -> 1 process x 8 devices on a data=2 x fsdp=4 mesh.
  to_one = tmp / "two_to_one"
  run(tmp, cache, train_args(tmp, to_one, [f"checkpoint.resume_from={two_dir}",
                                          f"checkpoint.resume_step={middle}", "mesh.data=2",
                                          "mesh.fsdp=4"]), 1, "two_to_one")
  # 1 process x 8 devices -> 2 processes x 4 devices.
  to_two = tmp / "one_to_two"
  results = run(tmp, cache, train_args(tmp, to_two, [f"checkpoint.resume_from={one_dir}",
                                                    f"checkpoint.resume_step={middle}"]),
                2, "one_to_two")
  assert f"resuming from the checkpoint of step {middle}" in results[0].output
  reference = params_of(one_dir)
  for workdir in (to_one, to_two):
    got = losses(workdir)
    assert sorted(got) == list(range(middle + 2, STEPS + 1)), workdir
    np.testing.assert_allclose([got[s] for s in sorted(got)],
                               [one_losses[s] for s in sorted(got)], rtol=RTOL)
    for a, b in zip(jax.tree.leaves(params_of(workdir)), jax.tree.leaves(reference)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def eval_and_generate_agree_in_two_processes(tmp, cache, one):
  one_dir = one[0]
  reports = []
  for processes in (1, 2):
    out = tmp / f"eval{processes}.json"
    run(tmp, cache, ["eval.py", "--workdir", str(one_dir), "--no_tasks", "--no_progress",
                     "--output", str(out), "eval.batch_size=8", "eval.max_batches=2"],
        processes, f"eval{processes}")
    reports.append(json.loads(out.read_text()))
  assert reports[0]["step"] == reports[1]["step"] == STEPS
  np.testing.assert_allclose(reports[1]["validation"]["loss"], reports[0]["validation"]["loss"],
                             rtol=RTOL)
  assert reports[1]["validation"]["tokens"] == reports[0]["validation"]["tokens"]

  completions = []
  for processes in (1, 2):
    results = run(tmp, cache, ["generate.py", str(one_dir), "--ids", "--prompt", "10 20 30",
                               "--prompt", "40 50", "--max_new_tokens", "6", "--temperature",
                               "0", "--no_stop"], processes, f"generate{processes}")
    completions.append([line for line in results[0].output.splitlines() if " | " in line])
  assert len(completions[0]) == 2 and completions[1] == completions[0], completions


# One test, so that pytest-xdist cannot split the stages (and the two reference runs they
# share) over two workers.
def test_a_pod_life_in_two_processes(tmp, cache, one, two):
  two_processes_train_like_one(one, two)
  kill_9_one_process_then_resume(tmp, cache, two)
  sigterm_to_both_saves_at_the_agreed_step_then_resumes_exactly(tmp, cache, two)
  restore_across_process_counts_and_meshes(tmp, cache, one, two)
  eval_and_generate_agree_in_two_processes(tmp, cache, one)

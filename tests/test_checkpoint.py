"""Checkpointer and params export: unit tests on synthetic sharded train states.

The states are the tiny model's params plus an Adam state, sharded over the 8 forced CPU
devices; expected values are host copies taken before saving, so every comparison is bitwise.
"""

import glob
import logging
import os
import shutil
import signal

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from t6_jax import config as config_lib
from t6_jax.checkpoint import (Checkpointer, CheckpointError, CheckpointMismatchError,
                               export_params, load_params, read_config)
from t6_jax.checkpoint import quiet
from t6_jax.checkpoint.trees import abstract_params, param_shardings
from t6_jax.sharding import make_mesh

CFG = config_lib.load("tiny")
TX = optax.chain(optax.scale_by_adam(), optax.scale_by_schedule(lambda count: -1e-2))
TOKENIZER = {"kind": "bytes", "vocab_size": 256}


def shardings(cfg, mesh, rules):
  params = param_shardings(cfg.model, mesh, rules)
  rep = NamedSharding(mesh, P())
  opt = (optax.ScaleByAdamState(count=rep, mu=params, nu=params),
         optax.ScaleByScheduleState(count=rep))
  return {"step": rep, "params": params, "opt_state": opt, "rng": rep}


def build(params):
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": TX.init(params),
          "rng": jax.random.key_data(jax.random.key(0))}


def fresh(cfg, mesh, rules, seed=0):
  """A train state of random params (cheaper than the model's initialiser) and Adam state."""
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype),
                        abstract_params(cfg.model))
  return jax.jit(build, out_shardings=shardings(cfg, mesh, rules))(params)


def abstract(cfg, mesh, rules):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      jax.eval_shape(build, abstract_params(cfg.model)),
                      shardings(cfg, mesh, rules))


def _update(state):
  grads = jax.tree.map(lambda p: jnp.cos(p * (state["step"] + 1)), state["params"])
  updates, opt_state = TX.update(grads, state["opt_state"], state["params"])
  return {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
          "opt_state": opt_state, "rng": state["rng"]}


update = jax.jit(_update, donate_argnums=0)  # donated, like the real train step


def host(tree):
  return jax.tree.map(np.array, tree)


def assert_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def dataset():
  return grain.MapDataset.range(10_000).shuffle(seed=7).batch(4).to_iter_dataset()


def elements(n):
  """The first n batches of `dataset()`, read by a fresh iterator (the reference order)."""
  it = iter(dataset())
  return [next(it) for _ in range(n)]


def quiet_signals():
  return {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A run of 12 updates saved every 3 steps (keep 2, keep every 6th), async, with the data
  iterator; records host copies of the state and the next batch at every saved step."""
  workdir = str(tmp_path_factory.mktemp("run"))
  mesh = make_mesh(fsdp=8)
  state = fresh(CFG, mesh, "fsdp")
  it = iter(dataset())
  saved = {}
  cfg = config_lib.CheckpointConfig(every=3, keep=2, keep_every=6, async_save=True)
  ck = Checkpointer(workdir, cfg)
  for step in range(1, 13):
    next(it)
    state = update(state)
    expected = host(state)
    if ck.save(step, state, it, config=CFG, tokenizer_spec=TOKENIZER):
      # The save copied the arrays and the iterator position; both move on right away.
      scratch = update(state)  # overwrites the donated buffers while the save is in flight
      saved[step] = expected
      state = jax.device_put(expected, shardings(CFG, mesh, "fsdp"))
      del scratch
  ck.save(12, state, it, config=CFG, tokenizer_spec=TOKENIZER, force=True)  # already saved
  ck.close()
  return workdir, saved


def copy_run(workdir, tmp_path):
  target = str(tmp_path / "copy")
  shutil.copytree(workdir, target)
  return target


def test_retention_keeps_latest_and_every_mth(run):
  workdir, saved = run
  assert sorted(saved) == [3, 6, 9, 12]
  ck = Checkpointer(workdir, config_lib.CheckpointConfig(every=3, keep=2, keep_every=6),
                    read_only=True)
  assert ck.all_steps() == [6, 9, 12]  # latest 2 (9, 12) plus every 6th (6, 12)
  assert ck.latest_step() == 12
  assert sorted(os.listdir(ck.directory)) == ["12", "6", "9"]
  ck.close()


def test_restore_is_exact_and_resumes_data_order(run):
  workdir, saved = run
  ck = Checkpointer(workdir, config_lib.CheckpointConfig(every=3), read_only=True)
  mesh = make_mesh(fsdp=8)
  reference = elements(14)
  for step in (12, 6):
    it = iter(dataset())
    found, state = ck.restore(abstract(CFG, mesh, "fsdp"), it, step=step if step != 12 else None)
    assert found == step
    # Saved while the next update ran on donated buffers: still the values at save time.
    assert_equal(state, saved[step])
    np.testing.assert_array_equal(next(it), reference[step])
    np.testing.assert_array_equal(next(it), reference[step + 1])
  ck.close()


def test_restore_onto_smaller_mesh_with_tensor_parallelism(run):
  workdir, saved = run
  mesh = make_mesh(fsdp=2, tensor=2, devices=jax.devices()[:4])
  target = abstract(CFG, mesh, "fsdp_tp")
  ck = Checkpointer(workdir, config_lib.CheckpointConfig(every=3), read_only=True)
  step, state = ck.restore(target, None)
  ck.close()
  assert step == 12
  assert_equal(state, saved[12])
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(target)):
    assert got.sharding == want.sharding
  wte = state["params"]["embed"]["wte"]
  assert wte.sharding.spec == P("tensor", "fsdp") and len(wte.sharding.device_set) == 4


def test_load_params_from_run_step_and_export(run, tmp_path):
  workdir, saved = run
  cfg, params, spec = load_params(workdir)
  assert cfg == CFG and spec == TOKENIZER
  assert_equal(params, saved[12]["params"])
  cfg, params, _ = load_params(workdir, step=9)
  assert_equal(params, saved[9]["params"])
  cfg, params, _ = load_params(os.path.join(workdir, "checkpoints", "6"))
  assert_equal(params, saved[6]["params"])
  assert read_config(workdir) == (CFG, TOKENIZER)

  export = export_params(str(tmp_path / "export"), params, CFG, TOKENIZER)
  assert sorted(os.listdir(export)) == ["config.yaml", "params", "tokenizer.json"]
  mesh = make_mesh(fsdp=4, tensor=2)
  cfg, loaded, spec = load_params(export, mesh=mesh, rules="fsdp_tp")
  assert cfg == CFG and spec == TOKENIZER
  assert_equal(loaded, saved[6]["params"])
  assert loaded["embed"]["wte"].sharding.spec == P("tensor", "fsdp")

  def size(path):
    return sum(os.path.getsize(f) for f in glob.glob(f"{path}/**", recursive=True)
               if os.path.isfile(f))
  assert size(export) < 0.5 * size(os.path.join(workdir, "checkpoints", "6"))

  with pytest.raises(CheckpointError, match="already exists"):
    export_params(export, params, CFG, None)
  numpy_params = host(params)  # a converter's host arrays export too
  export_params(export, numpy_params, CFG, None, overwrite=True)
  cfg, loaded, spec = load_params(export)
  assert spec is None
  assert_equal(loaded, saved[6]["params"])


def test_mismatched_model_names_parameter_and_shapes(run, tmp_path):
  workdir, _ = run
  wide = config_lib.apply_overrides(CFG, ["model.d_model=96"]).validate()
  mesh = make_mesh(fsdp=8)
  ck = Checkpointer(workdir, config_lib.CheckpointConfig(every=3), read_only=True)
  with pytest.raises(CheckpointMismatchError) as e:
    ck.restore(abstract(wide, mesh, "fsdp"), None)
  ck.close()
  message = str(e.value)
  assert "opt_state.0.mu.blocks.attn.W_A_k" in message  # first leaf in sorted order
  assert "(2, 64, 4, 2)" in message and "(2, 96, 4, 2)" in message and "step 12" in message

  with pytest.raises(CheckpointMismatchError, match=r"params\.blocks\.attn\.W_A_k has shape "
                     r"\(2, 64, 4, 2\) in checkpoint .* expects \(2, 96, 4, 2\)"):
    load_params(workdir, model=wide.model)
  mla = config_lib.apply_overrides(CFG, ["model.attention=mla"]).validate()
  with pytest.raises(CheckpointMismatchError,
                     match=r"params\.blocks\.attn\.\w+ (is missing|has shape)"):
    load_params(workdir, model=mla.model)
  with pytest.raises(CheckpointMismatchError, match="do not fit config.model"):
    export_params(str(tmp_path / "bad"), host(fresh(CFG, mesh, "fsdp")["params"]), wide, None)


# Orbax abandons TensorStore reads of the damaged file when it gives up on the step; their
# late callbacks hit a closed event loop ("Event loop is closed"), which pytest reports.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate_arrays", "delete_state", "truncate_data_state",
                                    "delete_meta"])
def test_damaged_newest_step_falls_back(run, tmp_path, damage, capsys):
  workdir, saved = run
  workdir = copy_run(workdir, tmp_path)
  step_dir = os.path.join(workdir, "checkpoints", "12")
  if damage == "truncate_arrays":
    for path in glob.glob(f"{step_dir}/state/**/d/*", recursive=True):
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
  elif damage == "delete_state":
    shutil.rmtree(f"{step_dir}/state")
  elif damage == "truncate_data_state":
    with open(f"{step_dir}/data/process_0-of-1.json", "r+b") as f:
      f.truncate(5)
  else:
    os.remove(f"{step_dir}/meta/metadata")
  mesh = make_mesh(fsdp=8)
  ck = Checkpointer(workdir, config_lib.CheckpointConfig(every=3))
  it = iter(dataset())
  step, state = ck.restore(abstract(CFG, mesh, "fsdp"), it)
  assert step == 9
  assert_equal(state, saved[9])
  np.testing.assert_array_equal(next(it), elements(10)[9])
  assert len(ck.problems) == 1 and "step 12" in ck.problems[0]
  err = capsys.readouterr().err
  assert "checkpoint step 12" in err and "damaged or incomplete" in err
  assert "falling back to step 9" in err
  # The damaged step is moved aside (kept for the user), so that training saves step 12 anew.
  assert "moved the damaged step 12 aside" in err
  (moved,) = glob.glob(f"{step_dir}.damaged-*")
  assert ck.all_steps() == [6, 9] and os.path.isdir(moved)
  with pytest.raises(CheckpointError, match="step 12 is not in .* complete steps are 6, 9"):
    ck.restore(abstract(CFG, mesh, "fsdp"), iter(dataset()), step=12)
  ck.close()
  # A reader (read-only) that meets a damaged step leaves it where it is.
  os.rename(moved, step_dir)
  ck = Checkpointer(workdir, config_lib.CheckpointConfig(every=3), read_only=True)
  assert ck.restore(abstract(CFG, mesh, "fsdp"), iter(dataset()))[0] == 9
  with pytest.raises(CheckpointError, match="step 12 .* damaged or incomplete"):
    ck.restore(abstract(CFG, mesh, "fsdp"), iter(dataset()), step=12)
  ck.close()
  assert os.path.isdir(step_dir)
  if damage == "delete_state":  # load_params falls back the same way
    _, params, _ = load_params(workdir)
    assert_equal(params, saved[9]["params"])


def test_half_written_step_is_ignored_and_all_damaged_is_an_error(run, tmp_path):
  workdir, _ = run
  workdir = copy_run(workdir, tmp_path)
  checkpoints = os.path.join(workdir, "checkpoints")
  # What a process killed during an async save leaves behind: a temporary directory.
  partial = os.path.join(checkpoints, "15.orbax-checkpoint-tmp-1234")
  shutil.copytree(os.path.join(checkpoints, "12"), partial)
  shutil.rmtree(os.path.join(partial, "meta"))
  ck = Checkpointer(workdir, config_lib.CheckpointConfig(every=3), read_only=True)
  assert ck.latest_step() == 12
  ck.close()
  # The resumed trainer reaches step 15 again: its save replaces the leftover.
  ck = Checkpointer(workdir, config_lib.CheckpointConfig(every=3))
  assert ck.save(15, {"w": jnp.ones(3)}, None, config=CFG, tokenizer_spec=None)
  ck.wait()
  assert not os.path.exists(partial) and ck.latest_step() == 15
  for step in ck.all_steps():
    shutil.rmtree(os.path.join(checkpoints, str(step), "state"))
  with pytest.raises(CheckpointError, match="every checkpoint .* is damaged"):
    ck.restore(abstract(CFG, make_mesh(fsdp=8), "fsdp"), None)
  ck.close()


def test_preemption_signal_and_forced_save(tmp_path):
  before = quiet_signals()
  ck = Checkpointer(str(tmp_path), config_lib.CheckpointConfig(every=100))
  assert not ck.reached_preemption(1)
  os.kill(os.getpid(), signal.SIGTERM)
  assert ck.reached_preemption(2) and ck.signal_received == "SIGTERM"
  state = {"step": jnp.int32(5), "w": jnp.arange(8.0)}
  assert not ck.save(5, state, None, config=CFG, tokenizer_spec=None)  # not a multiple
  assert ck.save(5, state, None, config=CFG, tokenizer_spec=None, force=True)
  ck.close()
  assert quiet_signals() == before  # handlers handed back
  ck = Checkpointer(str(tmp_path), config_lib.CheckpointConfig(every=100))
  step, restored = ck.restore(jax.eval_shape(lambda: state), iter(dataset()))
  ck.close()
  assert step == 5
  assert_equal(restored, state)


def test_read_only_view_cannot_save(tmp_path):
  ck = Checkpointer(str(tmp_path), config_lib.CheckpointConfig(), read_only=True)
  assert ck.latest_step() is None
  with pytest.raises(CheckpointError, match="read-only"):
    ck.save(1000, {"w": jnp.zeros(2)}, None, config=CFG, tokenizer_spec=None)
  with pytest.raises(CheckpointError, match="no complete checkpoint"):
    ck.restore({"w": jax.ShapeDtypeStruct((2,), jnp.float32)}, None)
  ck.close()
  with pytest.raises(CheckpointError, match="not a checkpoint"):
    load_params(str(tmp_path))


def test_resume_from_another_run(run, tmp_path):
  workdir, saved = run
  mesh = make_mesh(fsdp=8)
  cfg = config_lib.CheckpointConfig(every=3, resume_from=workdir, resume_step=9)
  ck = Checkpointer(str(tmp_path / "fork"), cfg)
  assert ck.latest_step() == 9
  it = iter(dataset())
  step, state = ck.restore(abstract(CFG, mesh, "fsdp"), it)
  assert step == 9
  assert_equal(state, saved[9])
  np.testing.assert_array_equal(next(it), elements(10)[9])
  assert ck.save(12, state, it, config=CFG, tokenizer_spec=None)
  ck.wait()
  assert ck.latest_step() == 12  # its own checkpoints come first from now on
  step, _ = ck.restore(abstract(CFG, mesh, "fsdp"), None)
  assert step == 12
  ck.close()
  step_dir = os.path.join(workdir, "checkpoints", "6")
  ck = Checkpointer(str(tmp_path / "fork2"),
                    config_lib.CheckpointConfig(resume_from=step_dir), read_only=True)
  assert ck.latest_step() == 6
  step, state = ck.restore(abstract(CFG, mesh, "fsdp"), None)
  assert step == 6
  assert_equal(state, saved[6])
  ck.close()
  with pytest.raises(CheckpointError, match="holds no checkpoint"):
    Checkpointer(str(tmp_path / "fork3"), config_lib.CheckpointConfig(
        resume_from=str(tmp_path)), read_only=True).latest_step()


def test_preemption_sync_point_counts_queries_not_steps(tmp_path, monkeypatch):
  """jax.distributed's preemption point is a count of queries from process start: a notice
  that arrives before a resumed run's first step agrees on query 1, so that run must stop at
  its first step (asking with the step number, past 1 after a resume, never matched). Orbax's
  own check inside save then agrees on the same step."""
  from jax.experimental import multihost_utils
  asked = []
  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point",
                      lambda n: asked.append(n) or n == 1)
  ck = Checkpointer(str(tmp_path / "run"), config_lib.CheckpointConfig(every=100))
  try:
    assert ck.reached_preemption(7)  # the first step after resuming from step 6
    assert ck.reached_preemption(7) and asked == [1]  # the same step again: no new query
    assert ck._manager.reached_preemption(7) and not ck._manager.reached_preemption(8)
  finally:
    ck.close()
  asked.clear()
  ck = Checkpointer(str(tmp_path / "run2"), config_lib.CheckpointConfig(every=100))
  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point",
                      lambda n: asked.append(n) or n == 3)
  try:
    assert [ck.reached_preemption(s) for s in (11, 12, 13)] == [False, False, True]
    assert asked == [1, 2, 3] and ck.reached_preemption(13) and asked == [1, 2, 3]
  finally:
    ck.close()


def test_abandoned_damaged_reads_are_dropped_before_the_step_is_given_up(monkeypatch):
  """asyncio's record of a TensorStore read of a damaged array that nobody awaited is noise
  even when the garbage collector logs it before the step is reported damaged; any other
  abandoned-task record still reaches the user until then."""
  monkeypatch.setattr(quiet, "_damage_seen", False)
  record = lambda msg: logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None, None)
  damaged = ("Task exception was never retrieved\nfuture: <Task finished exception=ValueError("
             "'OUT_OF_RANGE: Error opening \"zarr\" driver: Error reading \"step/.zarray\"')>")
  other = "Task exception was never retrieved\nfuture: <Task finished exception=KeyError('x')>"
  assert not quiet._Filter().filter(record(damaged))
  assert quiet._Filter().filter(record(other))
  monkeypatch.setattr(quiet, "_damage_seen", True)
  assert not quiet._Filter().filter(record(other))

"""checkpoint.init_from: a new run takes only the parameters of a params export, a run or one
of its steps (AdamW's fresh state, step 0), restored straight into its own mesh; a rerun
resumes the new run's own checkpoints; another tokenizer, other shapes, or init_from together
with resume_from are one-line errors."""

import jax
import numpy as np
import pytest

from t6_jax import config as config_lib
from t6_jax import sharding as sharding_lib
from t6_jax.checkpoint import CheckpointMismatchError, export_params, load_params
from t6_jax.data.tokenizers import ByteTokenizer
from t6_jax.model import init_params
from t6_jax.train import init_from as init_from_lib
from t6_jax.train import loop
from t6_jax.train import step as step_lib

MICRO = ["model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.head_dim=8",
         "model.max_seq_len=16", "train.seq_len=16", "train.batch_size=8", "train.steps=2",
         "train.warmup_steps=1", "train.log_every=1", "train.eval_every=1000",
         "train.eval_batches=1", "checkpoint.every=2", "checkpoint.async_save=false"]


def host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """An export of parameters no initialisation would give (N(0, 0.05) everywhere), with the
  byte tokenizer of configs/tiny.yaml, as (path, config, host params)."""
  path = tmp_path_factory.mktemp("export")
  cfg = config_lib.load("tiny", MICRO)
  rng = np.random.default_rng(5)
  params = jax.tree.map(lambda x: (0.05 * rng.standard_normal(x.shape)).astype(np.float32),
                        host(init_params(cfg.model, 0)))
  export_params(str(path), params, cfg, ByteTokenizer().spec(), overwrite=True)
  return str(path), cfg, params


def test_a_new_run_starts_from_the_export_then_resumes_its_own_checkpoints(source, tmp_path,
                                                                           capsys):
  path, _, params = source
  # Another mesh than the export's single device, and a longer context (reported, allowed).
  cfg = config_lib.load("tiny", MICRO + [
      f"train.workdir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}",
      f"checkpoint.init_from={path}", "model.max_seq_len=32", "mesh.data=2", "mesh.fsdp=2",
      "mesh.tensor=2", "mesh.rules=fsdp_tp"])
  mesh = sharding_lib.mesh_from_config(cfg.mesh)
  state, shardings = init_from_lib.initial_state(cfg, mesh, ByteTokenizer())
  out = capsys.readouterr().out
  assert f"starting from the parameters of {path} (an export" in out
  assert "note: this run changes the checkpoint's model.max_seq_len 16 -> 32\n" in out
  for got, want in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(got), want)
  assert jax.tree.map(lambda x: x.sharding, state) == shardings
  assert shardings == step_lib.state_shardings(cfg, mesh)
  assert int(state["step"]) == 0
  # AdamW's fresh state: zero moments, zero counts.
  for leaf in jax.tree.leaves(state["opt_state"]):
    assert not np.asarray(leaf).any()

  # Through the loop: the run trains from those params, and a rerun resumes its own step.
  first = loop.train(cfg)
  assert not first["resumed"] and first["start_step"] == 0 and first["final_step"] == 2
  assert "checkpoint.init_from" in capsys.readouterr().out
  again = loop.train(cfg)
  assert again["resumed"] and again["start_step"] == 2
  assert "checkpoint.init_from is not read" in capsys.readouterr().out

  # A run directory is a source too (its newest good step), here onto the default mesh.
  other = config_lib.load("tiny", MICRO + [f"checkpoint.init_from={tmp_path / 'run'}",
                                           "model.max_seq_len=32"])
  state, _ = init_from_lib.initial_state(other, sharding_lib.mesh_from_config(other.mesh),
                                         ByteTokenizer(), log=lambda *_: None)
  _, trained, _ = load_params(str(tmp_path / "run"))
  for got, want in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(host(trained))):
    np.testing.assert_array_equal(np.asarray(got), want)


def test_other_shapes_are_named(source):
  path, _, _ = source
  cfg = config_lib.load("tiny", MICRO + [f"checkpoint.init_from={path}", "model.d_model=48"])
  with pytest.raises(CheckpointMismatchError, match=r"^checkpoint.init_from: parameter "
                     r"params\.\S+ has shape .* in checkpoint .* but the model expects"):
    init_from_lib.initial_state(cfg, sharding_lib.mesh_from_config(cfg.mesh), ByteTokenizer())


class Spec:
  def __init__(self, spec):
    self._spec = spec

  def spec(self):
    return self._spec


def test_another_tokenizer_is_refused_with_the_setting_to_use():
  saved = config_lib.load("tiny", ["data.tokenizer=gpt2"])
  run = config_lib.load("tiny")
  gpt2 = {"kind": "tiktoken", "name": "gpt2", "path": "/data/gpt2.tiktoken"}
  # The same ranks read from another place are the same tokenizer.
  assert init_from_lib.tokenizer_problem(
      saved, gpt2, Spec(dict(gpt2, path="/elsewhere/gpt2.tiktoken")), run, "X") is None
  problem = init_from_lib.tokenizer_problem(saved, gpt2, ByteTokenizer(), run, "exports/x")
  assert problem == ("checkpoint.init_from=exports/x was trained with tokenizer 'gpt2' "
                     "(tiktoken) but this run's data give 'bytes' (bytes), so its token ids "
                     "would mean other tokens; set data.tokenizer=gpt2")
  # A converted reference checkpoint has no tokenizer.json: its config names the tokenizer.
  problem = init_from_lib.tokenizer_problem(saved, None, ByteTokenizer(), run, "exports/x")
  assert problem.endswith("this run's data give 'bytes', so its token ids would mean other "
                          "tokens; set data.tokenizer=gpt2")
  assert init_from_lib.tokenizer_problem(saved, None, Spec({}), saved, "X") is None
  # Trained BPEs of the same name differ by their merges.
  bpe = config_lib.load("tiny", ["data.tokenizer=bpe"])
  problem = init_from_lib.tokenizer_problem(
      bpe, {"kind": "tiktoken", "name": "bpe", "ranks": "a 0"},
      Spec({"kind": "tiktoken", "name": "bpe", "ranks": "b 0"}), bpe, "runs/a")
  assert "trained on other text or with other settings" in problem
  assert "with the checkpoint's data.* settings" in problem


def test_changed_settings_leave_out_how_the_model_runs():
  saved = config_lib.load("tiny")
  run = config_lib.load("tiny", ["model.rope_base=500000", "model.dtype=bfloat16",
                                 "model.remat=full", "model.attention_impl=xla"])
  assert init_from_lib.changed_settings(saved, run) == ["model.rope_base 10000.0 -> 500000.0"]


def test_init_from_and_resume_from_together_are_refused():
  with pytest.raises(config_lib.ConfigError, match="init_from and checkpoint.resume_from are "
                     "both set"):
    config_lib.load("tiny", ["checkpoint.init_from=a", "checkpoint.resume_from=b"])

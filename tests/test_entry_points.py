"""train.py, eval.py and generate.py as a user meets them: one command-line convention, every
failure one line on stderr and a non-zero exit (no traceback), fallbacks past damaged
checkpoints that replace the damaged step, and nothing of the user's lost or overwritten."""

import fcntl
import glob
import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from t6_jax import config as config_lib
from t6_jax.checkpoint import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOISE = ("Traceback", "Future exception", "Event loop is closed", "OUT_OF_RANGE",
         "Metadata file does not exist", "host bounds", "TPU_WORKER_HOSTNAMES")


def load_cli(name):
  spec = importlib.util.spec_from_file_location(f"{name}_cli", os.path.join(ROOT, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


COMPILE_CACHE = {}  # the processes of this module share compiled programs


def shared_dir(tmp_path_factory):
  """A folder of this test session that every pytest-xdist worker sees (the workers' own
  temporary folders sit side by side in the session's)."""
  base = tmp_path_factory.getbasetemp()
  path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "entry_points"
  path.mkdir(exist_ok=True)
  return path


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
  COMPILE_CACHE.update(JAX_COMPILATION_CACHE_DIR=str(shared_dir(tmp_path_factory) / "jax_cache"),
                       JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                       JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  yield
  COMPILE_CACHE.clear()


def run(script, *args, platforms="cpu"):
  """A real process with one CPU device; JAX_PLATFORMS unset when platforms is None (what a
  user without a TPU has: libtpu, if installed, must stay quiet)."""
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  env.update(PYTHONPATH=ROOT, XLA_FLAGS="--xla_backend_optimization_level=0", **COMPILE_CACHE)
  if platforms:
    env["JAX_PLATFORMS"] = platforms
  proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  return proc.returncode, proc.stdout, proc.stderr


def assert_clean(stderr):
  for noise in NOISE:
    assert noise not in stderr, stderr


def assert_one_line_error(rc, stderr, *words):
  assert rc != 0
  lines = [line for line in stderr.splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith("error: ")]
  assert len(errors) == 1, stderr
  assert_clean(stderr)
  for word in words:
    assert word in errors[0], errors[0]


def damage(step_dir):
  for path in glob.glob(f"{step_dir}/state/**/d/*", recursive=True):
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 4-step tiny run with checkpoints at steps 2 and 4, trained by train.py itself with
  settings before and after the flags."""
  base = shared_dir(tmp_path_factory)  # trained once, whichever worker comes first
  workdir = str(base / "run")
  settings = ["train.steps=4", "checkpoint.every=2", "train.eval_every=1000",
              "train.eval_batches=1", f"data.cache_dir={base / 'cache'}"]
  with open(base / "lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (base / "trained").exists():
      rc, out, err = run("train.py", "train.steps=4", "--config", "tiny", "--workdir", workdir,
                         *settings[1:])
      assert rc == 0, err
      (base / "trained").write_text("")
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  return workdir, settings


def copy_run(workdir, tmp_path):
  import shutil
  target = str(tmp_path / "run")
  shutil.copytree(workdir, target)
  return target


def test_eval_and_generate_fall_back_past_a_damaged_step(trained, tmp_path):
  workdir = copy_run(trained[0], tmp_path)
  damage(os.path.join(workdir, "checkpoints", "4"))
  rc, out, err = run("eval.py", "--workdir", workdir, "--no_tasks", "--no_progress",
                     "eval.max_batches=1")
  assert rc == 0, err
  assert "checkpoint step 4" in err and "falling back to step 2" in err
  assert "(step 2)" in out
  assert_clean(err)
  rc, out, err = run("generate.py", "--workdir", workdir, "--prompt", "ROMEO:",
                     "--max_new_tokens", "2", "decode.cache_dtype=float32", "--seed", "1")
  assert rc == 0, err
  assert "falling back to step 2" in err and "ROMEO:" in out
  assert_clean(err)
  # Readers never move anything: the damaged step is still where it was.
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "4"))


def test_eval_of_every_step_skips_a_damaged_one(trained, tmp_path, capsys):
  """eval.py --step all: each complete step in turn, each into its own eval_step<N>.json, a
  damaged step skipped with a notice, a table of the steps, --output a list of the reports."""
  workdir = copy_run(trained[0], tmp_path)
  os.makedirs(os.path.join(workdir, "checkpoints", "3"))  # an empty step is no step
  eval_cli = load_cli("eval")
  common = ["--workdir", workdir, "--step", "all", "--no_progress", "eval.max_batches=1",
            "eval.limit=4", trained[1][-1]]  # the run's data cache
  assert eval_cli.main(common + ["--output", str(tmp_path / "all.json")]) == 0
  out = capsys.readouterr().out
  reports = json.loads((tmp_path / "all.json").read_text())
  assert [r["step"] for r in reports] == [2, 4]
  assert reports[0]["validation"]["loss"] != reports[1]["validation"]["loss"]
  for r in reports:
    saved = json.loads(open(os.path.join(workdir, f"eval_step{r['step']}.json")).read())
    assert saved["validation"] == r["validation"] and saved["tasks"] == r["tasks"]
  table = out[out.index("    step     loss"):].splitlines()
  assert table[0].split() == ["step", "loss", "perplexity", "bits/byte", "fixture"]
  assert [row.split()[0] for row in table[1:3]] == ["2", "4"]
  assert f"{reports[1]['validation']['loss']:.4f}" in table[2]

  damage(os.path.join(workdir, "checkpoints", "2"))
  os.remove(os.path.join(workdir, "eval_step2.json"))
  assert eval_cli.main(common + ["--no_tasks"]) == 0
  captured = capsys.readouterr()
  assert "skipping step 2: checkpoint step 2" in captured.err
  assert "(step 4)" in captured.out and not os.path.exists(os.path.join(workdir,
                                                                         "eval_step2.json"))


def test_eval_step_all_needs_a_run(trained, capsys):
  eval_cli = load_cli("eval")
  step_dir = os.path.join(trained[0], "checkpoints", "2")
  assert eval_cli.main(["--checkpoint", step_dir, "--step", "all", "--no_tasks"]) != 0
  assert "error: --step all evaluates the steps of a run" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    eval_cli.main(["--workdir", trained[0], "--step", "newest"])
  assert "'newest' is not a step; give a number, or all" in capsys.readouterr().err


def test_train_replaces_a_damaged_step_and_keeps_the_user_s_files(trained, tmp_path):
  workdir, settings = trained
  workdir = copy_run(workdir, tmp_path)
  checkpoints = os.path.join(workdir, "checkpoints")
  damage(os.path.join(checkpoints, "4"))
  with open(os.path.join(workdir, "config.yaml")) as f:
    config_before = f.read()

  # A refused model change: one line, and config.yaml still describes the checkpoints.
  rc, _, err = run("train.py", "--config", "tiny", "--workdir", workdir, *settings,
                   "model.num_layers=3")
  assert_one_line_error(rc, err, "checkpoint")
  with open(os.path.join(workdir, "config.yaml")) as f:
    assert f.read() == config_before
  assert sorted(os.listdir(checkpoints)) == ["2", "4"]

  rc, out, err = run("train.py", "--config", "tiny", "--workdir", workdir, *settings,
                     "checkpoint.keep=7")
  assert rc == 0, err
  assert "falling back to step 2" in err and "moved the damaged step 4 aside" in err
  # the resumed run names the one setting that differs from its last start
  assert "settings changed since the run last started: checkpoint.keep: " in out, out
  assert "-> 7\n" in out and "model.num_layers" not in out
  assert_clean(err)
  names = sorted(os.listdir(checkpoints))
  assert names[:2] == ["2", "4"] and names[2].startswith("4.damaged-"), names
  loaded = load_checkpoint(workdir)  # the new step 4 restores cleanly
  assert loaded.step == 4
  # ... and holds the same params as the undamaged original (same data order and steps).
  original = load_checkpoint(trained[0], step=4)
  for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(original.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  for step in ("2", "4"):
    damage(os.path.join(checkpoints, step))
  rc, _, err = run("train.py", "--config", "tiny", "--workdir", workdir, *settings)
  assert_one_line_error(rc, err, "every checkpoint", "damaged")
  assert os.path.isdir(os.path.join(checkpoints, "4"))


def test_generate_errors_are_one_line(trained, tmp_path, capsys):
  generate = load_cli("generate").main
  workdir = trained[0]
  cases = [
      (["--workdir", str(tmp_path / "missing"), "--prompt", "x"], "does not exist"),
      (["--workdir", str(tmp_path), "--prompt", "x"], "is not a checkpoint"),
      (["--workdir", workdir, "--step", "7", "--prompt", "x"], "complete steps are 2, 4"),
      (["--workdir", workdir, "--prompt", "x", "mesh.tensor=3"], "set mesh.*"),
      (["--workdir", workdir, "--prompt", "x", "decode.cache_dtype=flaot32"],
       "did you mean float32"),
      (["--prompt", "x"], "give --workdir RUN"),
      (["--workdir", workdir, "--prompt", "x", "--batch_size", "-1"], "--batch_size -1"),
      (["--workdir", workdir, "--ids", "--prompt", "1", "--max_new_tokens", "0"],
       "of at least 1"),
      (["--workdir", workdir, "--prompts_file", str(tmp_path / "no.txt")], "does not exist"),
  ]
  (tmp_path / "keys.jsonl").write_text('{"prompt": "a"}\n\n{"text": "b"}\n')
  (tmp_path / "text.jsonl").write_text("a prompt\n")
  cases += [(["--workdir", workdir, "--prompts_file", str(tmp_path / "keys.jsonl")],
             'keys.jsonl:3 has no "prompt"'),
            (["--workdir", workdir, "--prompts_file", str(tmp_path / "text.jsonl")],
             "text.jsonl:1 is not JSON")]
  for argv, words in cases:
    rc = generate(argv)
    err = capsys.readouterr().err
    assert_one_line_error(rc, err, words)


def test_eval_errors_are_one_line(trained, tmp_path, capsys):
  evaluate = load_cli("eval").main
  for argv, words in [
      (["--workdir", str(tmp_path / "missing")], "does not exist"),
      (["--workdir", trained[0], "--step", "3"], "complete steps are 2, 4"),
      (["--workdir", trained[0], "--no_tasks", "mesh.tensor=3", "checkpoint.keep=1",
        "train.seq_len=8"], "set mesh"),
  ]:
    rc = evaluate(argv)
    err = capsys.readouterr().err
    assert_one_line_error(rc, err, words)
  # a setting eval.py does not read gets a note; train.seq_len (its default window) none
  assert "note: checkpoint.keep=1 has no effect on eval.py" in err
  assert "train.seq_len=8 has" not in err


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
  generate = load_cli("generate").main
  from t6_jax.checkpoint import CheckpointError
  with pytest.raises(CheckpointError, match="does not exist"):
    generate(["--workdir", str(tmp_path / "missing"), "--prompt", "x", "--debug"])
  monkeypatch.setenv("T6_DEBUG", "1")
  with pytest.raises(CheckpointError):
    generate(["--workdir", str(tmp_path / "missing"), "--prompt", "x"])


def test_settings_anywhere_and_the_old_positional_checkpoint(trained, capsys):
  generate = load_cli("generate").main
  argv = ["--prompt", "1 2 3", "--ids", "--max_new_tokens", "3", "decode.cache_dtype=float32",
          "--seed", "0"]
  assert generate(["--workdir", trained[0], *argv]) == 0
  new = capsys.readouterr().out
  assert generate([trained[0], *argv]) == 0  # deprecated form, same result
  assert capsys.readouterr().out == new
  with pytest.raises(SystemExit):
    generate(["--workdir", trained[0], *argv, "--no_such_flag"])


def test_each_batch_samples_with_its_own_key(capsys):
  generate = load_cli("generate").main
  argv = ["--config", "tiny", "--random_init", "--ids", "--prompt", "5 6 7", "--prompt",
          "5 6 7", "--batch_size", "1", "--max_new_tokens", "12", "--temperature", "1",
          "--seed", "3"]
  assert generate(argv) == 0
  out, err = capsys.readouterr()
  first = out.splitlines()
  assert len(first) == 2 and first[0] != first[1]  # same prompt, two batches, other noise
  assert "note: the longest prompt" not in err  # 3 + 12 positions, within tiny's 64
  # and reproducible; a setting generate.py does not read gets a note, train.seed (read with
  # --random_init, here its default) none; positions past model.max_seq_len get a note (RoPE
  # reads no table, so the tokens stay the same)
  assert generate([*argv, "train.lr=3", "train.seed=0", "model.max_seq_len=8"]) == 0
  out, err = capsys.readouterr()
  assert out.splitlines() == first
  assert "note: train.lr=3 has no effect on generate.py" in err and "train.seed=0 has" not in err
  assert "reach position 15, past the 8 positions the model trains on" in err, err


def test_generate_notes_its_mesh_and_pads_for_the_tensor_axis(capsys):
  """On 8 devices generate.py says when its mesh gathers the weights in every step (FSDP), and
  on 8 tensor shards pads tiny's 4 heads and 170 MLP units to 8 and 176, with the tokens of
  the weights held whole (dp)."""
  generate = load_cli("generate").main
  argv = ["--config", "tiny", "--random_init", "--ids", "--prompt", "5 6 7", "--max_new_tokens",
          "6"]
  assert generate([*argv, "mesh.rules=dp", "mesh.data=-1", "mesh.fsdp=1"]) == 0
  one, err = capsys.readouterr()
  assert "note:" not in err
  assert generate([*argv, "mesh.fsdp=-1"]) == 0
  out, err = capsys.readouterr()
  assert out == one and "split over fsdp, which also splits the batch: every decode step " \
      "gathers" in err and "mesh.rules=dp mesh.data=-1 mesh.fsdp=1" in err
  assert generate([*argv, "mesh.rules=fsdp_tp", "mesh.fsdp=1", "mesh.tensor=8"]) == 0
  out, err = capsys.readouterr()
  assert out == one and "gathers" not in err
  assert "note: model.num_heads 4 -> 8 and model.mlp_hidden 170 -> 176, padded" in err


def test_lm_eval_adapter_samples_each_batch_with_its_own_key():
  from t6_jax.eval.harness import T6Adapter
  from t6_jax.model import init_params

  class Bytes:
    eot_id, vocab_size = 0, 256

    def encode(self, text):
      return list(text.encode())

    def decode(self, ids):
      return bytes(i for i in ids if i).decode("utf-8", "replace")

  cfg = config_lib.load("tiny")
  params = init_params(cfg.model, 0)  # near-uniform next-token distributions
  request = ("Once", {"until": [], "max_gen_toks": 12, "do_sample": True, "temperature": 1.0,
                      "seed": 5})

  def outputs():
    adapter = T6Adapter(cfg, params, Bytes(), batch_size=4, max_gen_toks=12)
    return [adapter.generate_until([request])[0] for _ in range(2)]

  first = outputs()
  assert first[0] != first[1]
  assert outputs() == first


def test_no_libtpu_noise_without_a_tpu():
  if importlib.util.find_spec("libtpu") is None and not os.environ.get("CI"):
    pytest.skip("libtpu not installed (the tpu extra): nothing to keep quiet")
  rc, _, err = run("generate.py", "--config", "tiny", "--random_init", "--ids", "--prompt",
                   "1 2", "--max_new_tokens", "1", platforms=None)
  assert rc == 0, err
  assert_clean(err)


def test_aot_slices_without_a_topology_is_refused(capsys):
  with pytest.raises(SystemExit):
    load_cli("train").main(["--aot_slices", "2"])
  assert "--aot_slices describes the slices of an --aot_topology compile" in \
      capsys.readouterr().err

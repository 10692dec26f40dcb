"""A few-step run of the training loop on the bundled corpus: validation, metrics files,
a preemption that saves and exits cleanly, and a rerun that resumes from that checkpoint."""

import json
import os
import sys

import jax
import pytest

from t6_jax import config as config_lib
from t6_jax.checkpoint import Checkpointer
from t6_jax.train import loop

MICRO = ["model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.head_dim=8",
         "model.max_seq_len=16", "train.seq_len=16", "train.batch_size=8", "train.steps=6",
         "train.warmup_steps=1", "train.lr=1e-2", "train.min_lr=1e-2",
         "train.schedule=constant", "train.log_every=2", "train.eval_every=2",
         "train.eval_batches=1", "checkpoint.every=2", "checkpoint.async_save=false"]


def test_preempt_then_resume(tmp_path, monkeypatch):
  cfg = config_lib.load("tiny", MICRO + [f"train.workdir={tmp_path / 'run'}",
                                         f"data.cache_dir={tmp_path / 'cache'}"])
  real = Checkpointer.reached_preemption
  monkeypatch.setattr(Checkpointer, "reached_preemption",
                      lambda self, step: step == 3 or real(self, step))
  first = loop.train(cfg)
  assert first.get("preempted") and first["final_step"] == 3 and not first["resumed"]
  # Created sharded: fsdp=-1 spans the 8 forced host devices, d_model 32 splits 8 ways.
  wte = first["state"]["params"]["embed"]["wte"]
  assert len(wte.sharding.device_set) == jax.device_count()
  assert wte.addressable_shards[0].data.shape == (256, 32 // jax.device_count())
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2", "3"]

  monkeypatch.setattr(Checkpointer, "reached_preemption", real)
  second = loop.train(cfg)
  assert second["resumed"] and second["start_step"] == 3 and second["final_step"] == 6
  assert second["first_val_loss"] == first["first_val_loss"]  # read back from metrics.jsonl
  assert second["last_val_loss"] < first["first_val_loss"]

  records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert [r["step"] for r in records if "val_loss" in r] == [0, 2, 4, 6]
  train_records = [r for r in records if "loss" in r]
  # Each run's first step (compilation, or the first after a resume) starts the clock.
  assert [r["step"] for r in train_records] == [2, 6]
  assert all(r["tokens_per_s"] > 0 and r["lr"] == pytest.approx(1e-2) for r in train_records)
  assert os.path.exists(tmp_path / "run" / "config.yaml")
  assert os.listdir(tmp_path / "run" / "tb")


def test_restart_refuses_a_folder_that_is_not_a_run(tmp_path):
  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(ValueError, match="does not look like a run directory"):
    loop.clear_run_dir(str(tmp_path))


def test_profile_steps_write_a_trace(tmp_path):
  """train.profile_steps: a trace of whole steps after the compiling one, in the run's tb/
  folder as TensorBoard's profile plugin reads it, with a Perfetto file beside it."""
  cfg = config_lib.load("tiny", MICRO + [f"train.workdir={tmp_path / 'run'}",
                                         f"data.cache_dir={tmp_path / 'cache'}",
                                         "train.steps=3", "train.profile_steps=1",
                                         "train.profile_skip=0"])
  loop.train(cfg)
  runs = os.listdir(tmp_path / "run" / "tb" / "plugins" / "profile")
  assert len(runs) == 1
  files = os.listdir(tmp_path / "run" / "tb" / "plugins" / "profile" / runs[0])
  assert any(f.endswith(".xplane.pb") for f in files), files
  assert "perfetto_trace.json.gz" in files, files


def test_device_peak_bytes():
  """The largest reported peak over the devices; None where no device reports one (CPU)."""
  from t6_jax.metrics import device_peak_bytes

  class Device:
    def __init__(self, stats):
      self.stats = stats

    def memory_stats(self):
      if isinstance(self.stats, Exception):
        raise self.stats
      return self.stats

  assert device_peak_bytes([Device({"peak_bytes_in_use": 5}), Device({"peak_bytes_in_use": 9}),
                            Device(None), Device(NotImplementedError())]) == 9.0
  assert device_peak_bytes([Device(None), Device({"bytes_in_use": 3})]) is None
  assert device_peak_bytes(jax.devices()[:1]) is None  # host CPUs report none


class FakeWandb:
  """What the loop asks of the wandb module: init (returning a run), log and finish."""

  def __init__(self):
    self.inits, self.logs, self.finished = [], [], 0

  def init(self, **kwargs):
    self.inits.append(kwargs)
    return self

  def log(self, values, step):
    self.logs.append((step, dict(values)))

  def finish(self):
    self.finished += 1


def test_wandb_gets_the_scalars_and_a_resume_keeps_its_run(tmp_path, monkeypatch):
  fake = FakeWandb()
  monkeypatch.setitem(sys.modules, "wandb", fake)
  cfg = config_lib.load("tiny", MICRO + [f"train.workdir={tmp_path / 'run'}",
                                         f"data.cache_dir={tmp_path / 'cache'}",
                                         "train.steps=3", "train.wandb_project=t6",
                                         "train.wandb_entity=lab"])
  real = Checkpointer.reached_preemption
  monkeypatch.setattr(Checkpointer, "reached_preemption",
                      lambda self, step: step == 2 or real(self, step))
  assert loop.train(cfg)["preempted"]
  (init,) = fake.inits
  run_id = (tmp_path / "run" / "wandb_id").read_text().strip()
  assert init["project"] == "t6" and init["entity"] == "lab" and init["name"] == "run"
  assert init["id"] == run_id and init["resume"] == "allow"
  assert init["config"]["train"]["wandb_project"] == "t6" and fake.finished == 1
  # The same scalars as metrics.jsonl, at the same steps.
  records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert [(s, v) for s, v in fake.logs] == [
      (r["step"], {k: v for k, v in r.items() if k not in ("step", "time")}) for r in records]
  assert any("loss" in v for _, v in fake.logs) and any("val_loss" in v for _, v in fake.logs)

  monkeypatch.setattr(Checkpointer, "reached_preemption", real)
  assert loop.train(cfg)["resumed"]
  assert [i["id"] for i in fake.inits] == [run_id, run_id] and fake.finished == 2
  assert fake.logs[-1][0] == 3


def test_wandb_missing_is_one_clear_error(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
  cfg = config_lib.load("tiny", MICRO + [f"train.workdir={tmp_path / 'run'}",
                                         "train.wandb_project=t6"])
  with pytest.raises(ValueError, match="train.wandb_project is set but wandb is not installed; "
                     "pip install wandb"):
    loop.train(cfg)
  assert not os.path.exists(tmp_path / "run" / "config.yaml")


def test_eval_tasks_are_scored_at_every_validation(tmp_path, capsys):
  cfg = config_lib.load("tiny", MICRO + [f"train.workdir={tmp_path / 'run'}",
                                         f"data.cache_dir={tmp_path / 'cache'}",
                                         "train.steps=2", "train.eval_tasks=fixture",
                                         "eval.limit=6"])
  loop.train(cfg)
  records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  scored = [r for r in records if "fixture/acc" in r]
  assert [r["step"] for r in scored] == [0, 2]
  assert "step 2: fixture/acc " in capsys.readouterr().out
  # What eval.py's scoring gives for the saved step-2 params, on one device.
  from t6_jax.checkpoint import load_params
  from t6_jax.data import load_tokenizer
  _, params, _ = load_params(str(tmp_path / "run"))
  want = loop.score_tasks(cfg, params, None, load_tokenizer(cfg), loop.load_tasks(cfg))
  assert want == {k: scored[-1][k] for k in want} and set(want) == {"fixture/acc",
                                                                     "fixture/acc_norm"}
  assert all(v in {i / 6 for i in range(7)} for v in want.values())


def test_a_missing_task_file_stops_the_run_before_it_starts(tmp_path):
  cfg = config_lib.load("tiny", MICRO + [f"train.workdir={tmp_path / 'run'}",
                                         f"train.eval_tasks=mc={tmp_path / 'none.jsonl'}"])
  with pytest.raises(Exception, match="task file '.*none.jsonl' for mc does not exist"):
    loop.train(cfg)
  assert not os.path.exists(tmp_path / "run" / "config.yaml")


def test_a_run_on_a_tensor_axis_says_what_it_pads(tmp_path, capsys):
  """8 tensor shards for 4 heads and 85 MLP units: the run says it pads them inside each step
  to 8 and 88, trains, and saves the model's own sizes."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 (forced host) devices")
  cfg = config_lib.load("tiny", MICRO + [f"train.workdir={tmp_path / 'run'}",
                                         f"data.cache_dir={tmp_path / 'cache'}",
                                         "train.steps=2", "model.mlp_hidden=85",
                                         "mesh.rules=fsdp_tp", "mesh.fsdp=1", "mesh.tensor=8"])
  result = loop.train(cfg)
  assert ("model.num_heads 4 -> 8 and model.mlp_hidden 85 -> 88 inside each step"
          in capsys.readouterr().out)
  assert result["final_step"] == 2 and result["last_val_loss"] < 10
  assert result["state"]["params"]["blocks"]["mlp"]["c_proj"].shape == (2, 85, 32)

"""Every user-given path accepts gs://: config files, data, prepare/eval/generate outputs, task
files, resume_from, --restart and the converter, through the in-memory gs:// file system of
test_storage (it proves that our code keeps bucket URIs and reads and writes through
t6_jax.storage; it cannot prove GCS itself)."""

import json
import os
import time
import types

import numpy as np
import pytest
from test_storage import fake_gcs  # noqa: F401 - the fixture

from t6_jax import config as config_lib
from t6_jax import storage
from t6_jax.data import sources as src

CORPUS = [f"Document {i}: to be or not to be, that is question {i * 7}. " * (3 + i % 5)
          for i in range(12)]


def _shard_bytes(tokens, count=None):
  """The reference's shard format, written independently of the code under test."""
  header = np.zeros(256, dtype=np.int32)
  header[0], header[1], header[2] = 20240520, 1, len(tokens) if count is None else count
  return header.tobytes() + np.asarray(tokens, dtype=np.uint16).tobytes()


def test_config_file_on_a_bucket(fake_gcs, tmp_path):  # noqa: F811
  cfg = config_lib.load("tiny", ["train.steps=7"])
  config_lib.dump(cfg, "gs://bucket/cfg/run.yaml")
  again = config_lib.load("gs://bucket/cfg/run.yaml")
  assert again == cfg
  config_lib.dump(cfg, str(tmp_path / "local.yaml"))  # local: as before
  assert config_lib.load(str(tmp_path / "local.yaml")) == cfg
  with pytest.raises(config_lib.ConfigError, match="not found"):
    config_lib.load("gs://bucket/cfg/missing.yaml")
  storage.write_text("gs://bucket/cfg/bad.yaml", "- a list\n")
  with pytest.raises(config_lib.ConfigError, match="mapping"):
    config_lib.load("gs://bucket/cfg/bad.yaml")


def test_reference_shards_on_a_bucket_are_cached_locally(fake_gcs, tmp_path):  # noqa: F811
  rng = np.random.default_rng(0)
  shards = [rng.integers(0, 50257, size=n) for n in (300, 517, 260)]
  for i, s in enumerate(shards):
    name = f"fineweb_{'val' if i == 0 else 'train'}_{i:06d}.bin"
    storage.write_bytes(f"gs://bucket/fw/{name}", _shard_bytes(s))
  storage.write_text("gs://bucket/fw/README.txt", "not a shard")
  cache = str(tmp_path / "cache")
  for pattern in ("gs://bucket/fw", "gs://bucket/fw/*.bin", "gs://bucket/fw/fineweb_t*.bin,"
                  "gs://bucket/fw/fineweb_val_000000.bin"):
    files = src.expand_paths(pattern, (".bin",), "shards")
    assert [f.rsplit("/", 1)[1] for f in files] == [
        "fineweb_train_000001.bin", "fineweb_train_000002.bin", "fineweb_val_000000.bin"]
    assert all(f.startswith("gs://bucket/fw/") for f in files)
  train = src.reference_tokens("gs://bucket/fw/*.bin", "train", cache)
  val = src.reference_tokens("gs://bucket/fw/*.bin", "validation", cache)
  assert all(e[1].startswith(os.path.join(cache, "remote")) for e in train.entries + val.entries)
  for got, want in zip(val.arrays + train.arrays, shards):
    np.testing.assert_array_equal(got, want)
  assert train.lengths() == [517, 260]
  storage.write_bytes("gs://bucket/bad/a.bin", _shard_bytes(shards[0], count=301))
  with pytest.raises(src.DataError, match=r"gs://bucket/bad/a\.bin.*truncated"):
    src.read_reference_header("gs://bucket/bad/a.bin")
  with pytest.raises(src.DataError, match="matches no"):
    src.expand_paths("gs://bucket/nothing/*.bin", (".bin",), "shards")
  with pytest.raises(storage.StorageError, match="must be a local folder"):
    storage.local_copy("gs://bucket/fw/README.txt", "gs://bucket/cache")


def test_text_corpus_and_prepare_on_a_bucket(fake_gcs, tmp_path, capsys):  # noqa: F811
  from t6_jax.data import load_tokenizer
  from t6_jax.data import prepare as prepare_lib
  for i in range(4):
    storage.write_text(f"gs://bucket/corpus/play{i}.txt", CORPUS[i])
  storage.write_text("gs://bucket/corpus/sub/more.jsonl", "".join(
      json.dumps({"text": CORPUS[i]}) + "\n" for i in range(4, 12)))
  model = {"vocab_size": 512, "num_layers": 1, "d_model": 32, "num_heads": 2, "head_dim": 16}
  cfg = config_lib.from_dict({"model": model, "data": {
      "cache_dir": str(tmp_path / "cache"), "source": "text", "path": "gs://bucket/corpus",
      "val_fraction": 0.25}})
  train = src.local_text_documents(cfg.data, "train")
  val = src.local_text_documents(cfg.data, "validation")
  assert sorted([train[i] for i in range(len(train))] + [val[i] for i in range(len(val))]) == \
      sorted(CORPUS)
  meta = prepare_lib.prepare(cfg, "gs://bucket/prepared", progress=False)
  assert "gs://bucket/prepared/train.array_record" in capsys.readouterr().out
  assert sorted(storage.listdir("gs://bucket/prepared")) == [
      "meta.json", "train.array_record", "validation.array_record"]
  assert src.read_prepared_meta("gs://bucket/prepared") == meta
  docs = src.prepared_documents("gs://bucket/prepared", "validation", str(tmp_path / "cache"))
  tok = load_tokenizer(cfg)
  assert [docs[i].tolist() for i in range(len(docs))] == [
      tok.encode(val[i]) for i in range(len(val))]
  with pytest.raises(src.DataError, match="not a prepared dataset"):
    src.read_prepared_meta("gs://bucket/corpus")


def test_eval_outputs_and_task_files_on_a_bucket(fake_gcs):  # noqa: F811
  import eval as eval_cli
  from t6_jax.eval.tasks import documents
  from t6_jax.eval.tasks.formats import TASKS
  assert eval_cli.default_output("gs://bucket/runs/a/", None) == "gs://bucket/runs/a/eval.json"
  assert eval_cli.default_output("gs://bucket/runs/a/checkpoints/100", 100) == \
      "gs://bucket/runs/a/eval_step100.json"
  assert eval_cli.default_output("/x/runs/a/checkpoints/100/", 100) == "/x/runs/a/eval_step100.json"
  storage.write_text("gs://bucket/tasks/piqa/validation.jsonl",
                     json.dumps({"goal": "g", "sol1": "a", "sol2": "b", "label": 1}) + "\n")
  found = documents.task_file("gs://bucket/tasks", "piqa", "validation")
  assert found == "gs://bucket/tasks/piqa/validation.jsonl"
  assert documents.read_jsonl(found, TASKS["piqa"])[0]["label"] == 1
  with pytest.raises(documents.TaskError, match="no validation file"):
    documents.task_file("gs://bucket/tasks", "boolq", "validation")


def test_generate_prompts_file_on_a_bucket(fake_gcs):  # noqa: F811
  import generate
  storage.write_text("gs://bucket/p.txt", "first\n\nsecond\n")
  args = types.SimpleNamespace(prompt=["given"], prompts_file="gs://bucket/p.txt")
  assert generate.read_prompts(args) == ["given", "first", "second"]


def test_resume_from_and_restart_on_a_bucket(fake_gcs):  # noqa: F811
  from t6_jax.checkpoint.manager import Checkpointer
  from t6_jax.checkpoint.trees import CheckpointError
  from t6_jax.train import loop
  storage.write_text("gs://bucket/old/checkpoints/20/state/x", "x")
  storage.write_text("gs://bucket/old/config.yaml", "{}")

  def source(resume_from, own="gs://bucket/new/checkpoints"):
    cfg = types.SimpleNamespace(resume_from=resume_from, resume_step=-1)
    return Checkpointer._resume_source(types.SimpleNamespace(cfg=cfg, directory=own))
  assert source("gs://bucket/old")[0] == "gs://bucket/old/checkpoints"
  assert source("gs://bucket/old/checkpoints/20/") == ("gs://bucket/old/checkpoints", 20)
  assert source("gs://bucket/old", own="gs://bucket/old/checkpoints/") is None
  with pytest.raises(CheckpointError, match="holds no checkpoint"):
    source("gs://bucket/nothing")

  storage.write_text("gs://bucket/data/keep.txt", "mine")
  with pytest.raises(ValueError, match="does not look like a run directory"):
    loop.clear_run_dir("gs://bucket/data")
  loop.clear_run_dir("gs://bucket/old")
  assert not storage.exists("gs://bucket/old/config.yaml")
  assert storage.exists("gs://bucket/data/keep.txt")
  loop.clear_run_dir("gs://bucket/never")  # nothing there: nothing to do


def test_converter_inputs_and_outputs_on_a_bucket(fake_gcs, tmp_path):  # noqa: F811
  from t6_jax.convert import torch_io
  from t6_jax.convert.verify import load_array
  rng = np.random.default_rng(1)
  sd = {"transformer.wte.weight": rng.standard_normal((8, 4)).astype(np.float32),
        "transformer.h.0.mlp.c_fc.weight": rng.standard_normal((16, 4)).astype(np.float32)}
  hf = {"model_type": "gpt2", "n_head": 2}
  written = torch_io.write_checkpoint("gs://bucket/ref", sd, hf, "safetensors")
  assert written == "gs://bucket/ref/model.safetensors"
  assert sorted(storage.listdir("gs://bucket/ref")) == ["config.json", "model.safetensors"]
  for where in ("gs://bucket/ref", "gs://bucket/ref/model.safetensors"):
    got, got_hf, weights = torch_io.read_checkpoint(
        where, None if where.endswith("ref") else "gs://bucket/ref/config.json")
    assert weights == "gs://bucket/ref/model.safetensors" and got_hf == hf
    for key in sd:
      np.testing.assert_array_equal(got[key], sd[key])
  with pytest.raises(Exception, match="does not exist"):
    torch_io.read_checkpoint("gs://bucket/missing")
  import io
  buffer = io.BytesIO()
  np.save(buffer, np.arange(6).reshape(2, 3))
  storage.write_bytes("gs://bucket/tokens.npy", buffer.getvalue())
  np.testing.assert_array_equal(load_array("gs://bucket/tokens.npy", "tokens"),
                                np.arange(6).reshape(2, 3))


def test_offline_bucket_config_fails_fast_with_one_line():
  start = time.time()
  with pytest.raises(storage.StorageError) as info:
    config_lib.load("gs://t6-jax-offline-test/x.yaml")
  assert time.time() - start < 40
  message = str(info.value)
  assert message.startswith("--config=gs://t6-jax-offline-test/x.yaml: ") and "\n" not in message


def test_offline_bucket_in_prepare_and_convert_is_one_line(tmp_path, capsys):
  from t6_jax.convert.main import main as convert_main
  from t6_jax.data.prepare import main as prepare_main
  start = time.time()
  assert prepare_main(["--out", "gs://t6-jax-offline-test/prepared", "--no-progress"]) == 1
  assert convert_main(["from-torch", "gs://t6-jax-offline-test/ref", str(tmp_path / "x")]) == 2
  assert time.time() - start < 60
  errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert len(errors) == 2 and errors[0].startswith("error: --out=gs://t6-jax-offline-test/")
  assert errors[1].startswith("error: checkpoint=gs://t6-jax-offline-test/ref: ")
  assert not os.path.exists(tmp_path / "x")

"""data.mixture: several sources read as one stream at their weights, checkpointable, sliced
per process, finite for validation; a bad mixture is one ConfigError naming the item."""

import numpy as np
import pytest

from t6_jax import config as config_lib
from t6_jax.config import ConfigError
from t6_jax.data import DataError, make_dataset, mixture
from t6_jax.data import prepare as prepare_lib

A, B = ord("a"), ord("B")  # each corpus is one letter's words: a row says where it came from


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
  base = tmp_path_factory.mktemp("mixture")
  for name, letter in (("a", "a"), ("b", "B")):
    (base / name).mkdir()
    for i in range(24):  # documents differ (their number), so do their rows
      (base / name / f"doc{i}.txt").write_text(" ".join([f"{letter}{i:02d}"] * (30 + i)))
  return base


def cfg_of(corpora, spec="0.75:text:{a};0.25:text:{b}", *extra):
  spec = spec.format(a=corpora / "a", b=corpora / "b")
  return config_lib.load("tiny", [f"data.mixture={spec}", f"data.cache_dir={corpora / 'cache'}",
                                  "data.tokenizer=bytes", "data.shuffle_buffer=4", *extra])


def origin(row) -> str:
  has_a, has_b = A in row, B in row
  assert has_a != has_b, row  # a row never mixes sources
  return "a" if has_a else "b"


def batches(cfg, n, split="train", **kw):
  it = iter(make_dataset(cfg, split, batch_size=8, seq_len=16, process_index=0,
                         process_count=1, **kw))
  return it, [next(it) for _ in range(n)]


@pytest.mark.parametrize("packing", ["concat", "segments"])
def test_rows_come_at_the_weights_and_resume_exactly(corpora, packing):
  cfg = cfg_of(corpora, "0.75:text:{a};0.25:text:{b}", f"data.packing={packing}")
  it, first = batches(cfg, 10)
  if packing == "concat":
    origins = [origin(r) for b in first for r in b["inputs"]]
    assert origins.count("a") == 60 and origins.count("b") == 20  # 3:1 of 80 rows
  else:
    assert {"segment_ids", "positions"} <= set(first[0])
  state = it.get_state()
  want = [next(it) for _ in range(3)]
  again, _ = batches(cfg, 0)
  again.set_state(state)
  for w in want:
    got = next(again)
    for key in w:
      np.testing.assert_array_equal(got[key], w[key])


def test_processes_read_disjoint_rows_and_validation_ends(corpora):
  cfg = cfg_of(corpora)
  rows = []
  for i in range(2):
    it = iter(make_dataset(cfg, "train", batch_size=4, seq_len=16, process_index=i,
                           process_count=2, shuffle=False, num_epochs=1))
    rows.append({next(it)["inputs"].tobytes() for _ in range(4)})
  assert not rows[0] & rows[1]
  val = list(make_dataset(cfg, "validation", batch_size=2, seq_len=16, shuffle=False,
                          num_epochs=1, process_index=0, process_count=1))
  assert val and {origin(r) for b in val for r in b["inputs"]} == {"a", "b"}


@pytest.mark.parametrize("spec, message", [
    ("0.5:text:x", "names 1 source"),
    ("0.5:text:x;abc", "is not WEIGHT:SOURCE:PATH"),
    ("half:text:x;1:text:y", "weight 'half' is not a number"),
    ("0:text:x;1:text:y", "the weight must be positive"),
    ("1:txt:x;1:text:y", "source 'txt' is not one of"),
    ("1:text:;1:text:y", "text needs a path"),
    ("1:tfds:;1:text:y", "tfds needs a dataset name"),
    ("1:text:x;2:text:x", "names a source twice"),
])
def test_bad_mixtures_are_named(spec, message):
  with pytest.raises(ConfigError, match=message):
    config_lib.load("tiny", [f"data.mixture={spec}", "data.tokenizer=bytes"])


def test_a_trained_bpe_is_refused_and_paths_keep_their_colons():
  with pytest.raises(ConfigError, match="data.mixture needs a tokenizer that is not trained"):
    config_lib.load("tiny", ["data.mixture=1:text:x;1:text:y", "data.tokenizer=bpe"])
  assert mixture.parse("1:arrayrecord:gs://b/web;2:tfds:fineweb_edu;1:shakespeare:") == [
      (1.0, "arrayrecord", "gs://b/web"), (2.0, "tfds", "fineweb_edu"),
      (1.0, "shakespeare", "")]
  parts = mixture.components(config_lib.load(
      "tiny", ["data.mixture=1:text:a,b;3:tfds:fw", "data.tokenizer=bytes"]).data)
  assert [(k, w, c.source, c.path, c.tfds_name, c.mixture) for k, w, c in parts] == [
      ("text:a,b", 1.0, "text", "a,b", "", ""), ("tfds:fw", 3.0, "tfds", "", "fw", "")]


def write_shard(path, tokens):
  """The reference's shard format (256 int32 header: magic, version, count; uint16 tokens)."""
  header = np.zeros(256, dtype=np.int32)
  header[:3] = 20240520, 1, len(tokens)
  with open(path, "wb") as f:
    f.write(header.tobytes() + np.asarray(tokens, dtype=np.uint16).tobytes())


def test_token_shards_and_prepared_corpora_mix_too(corpora, tmp_path):
  """Flat token sources (windows read at random) and prepared ArrayRecord documents."""
  rng = np.random.default_rng(0)
  for name, low in (("x", 0), ("y", 100)):  # ids 0-99 and 100-199 tell the sources apart
    (tmp_path / name).mkdir()
    for i, split in enumerate(("val", "train")):
      write_shard(tmp_path / name / f"fw_{split}_{i:06d}.bin", rng.integers(low, low + 100, 900))
  cfg = cfg_of(tmp_path, f"2:reference_bin:{tmp_path / 'x'};1:reference_bin:{tmp_path / 'y'}")
  _, got = batches(cfg, 6)
  rows = np.concatenate([b["inputs"] for b in got])
  assert len(rows) == 48 and all((r < 100).all() or (r >= 100).all() for r in rows)
  assert int(sum((r < 100).all() for r in rows)) == 32  # 2:1 of 48 rows

  text = cfg_of(corpora)
  prepared = [str(tmp_path / f"prep_{n}") for n in "ab"]
  for out, folder in zip(prepared, ("a", "b")):
    one = config_lib.load("tiny", ["data.source=text", f"data.path={corpora / folder}",
                                   f"data.cache_dir={corpora / 'cache'}", "data.tokenizer=bytes"])
    prepare_lib.prepare(one, out, progress=False)
  cfg = cfg_of(corpora, f"1:arrayrecord:{prepared[0]};1:arrayrecord:{prepared[1]}")
  _, got = batches(cfg, 4)
  origins = [origin(r) for b in got for r in b["inputs"]]
  assert origins.count("a") == origins.count("b") == 16
  with pytest.raises(DataError, match="prepare each text source on its own"):
    prepare_lib.prepare(text, str(tmp_path / "mixed"), progress=False)


def test_training_logs_each_sources_validation_loss(corpora, tmp_path):
  """A mixture run logs val_loss/SOURCE:PATH for each source beside the mixture's val_loss;
  each is the loss on that source's own validation batches (as a run on it alone reads them)."""
  import json

  from t6_jax import sharding as sharding_lib
  from t6_jax.train import loop
  from t6_jax.train import step as step_lib
  micro = ["model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.head_dim=8",
           "model.max_seq_len=16", "train.seq_len=16", "train.batch_size=8", "train.steps=2",
           "train.warmup_steps=1", "train.eval_every=2", "train.eval_batches=2",
           "checkpoint.async_save=false", f"train.workdir={tmp_path / 'run'}",
           "data.val_fraction=0.25"]  # 6 documents of each source held out: 2+ batches each
  cfg = cfg_of(corpora, "0.75:text:{a};0.25:text:{b}", *micro)
  out = loop.train(cfg)
  names = [f"val_loss/text:{corpora / 'a'}", f"val_loss/text:{corpora / 'b'}"]
  records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  validations = [r for r in records if "val_loss" in r]
  assert [r["step"] for r in validations] == [0, 2]
  assert all(set(names) <= set(r) for r in validations)
  last = validations[-1]
  assert last[names[0]] != last[names[1]]
  # Source a alone, its validation batches evaluated with the final params.
  alone = config_lib.apply_overrides(cfg, ["data.mixture=", "data.source=text",
                                          f"data.path={corpora / 'a'}"])
  mesh = sharding_lib.mesh_from_config(alone.mesh)
  step = step_lib.TrainStep(alone, mesh)
  batches = loop.validation_batches(alone, mesh)
  np.testing.assert_allclose(loop.evaluate(step, out["state"]["params"], batches), last[names[0]],
                             rtol=1e-6)

  # eval.py on the run: the mixture's split and each source's alone, in the report.
  import importlib.util
  import os
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("eval_cli", os.path.join(root, "eval.py"))
  eval_cli = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(eval_cli)
  assert eval_cli.main(["--workdir", str(tmp_path / "run"), "--no_tasks", "--no_progress",
                        "--output", str(tmp_path / "eval.json"), "eval.batch_size=8"]) == 0
  report = json.loads((tmp_path / "eval.json").read_text())
  sources = report["validation_sources"]
  assert sorted(sources) == sorted(name.split("/", 1)[1] for name in names)
  assert all(np.isfinite(r["loss"]) and r["tokens"] > 0 for r in sources.values())
  assert sources[names[0].split("/", 1)[1]]["loss"] != sources[names[1].split("/", 1)[1]]["loss"]


def test_a_source_too_small_for_its_own_validation_is_left_out(corpora, tmp_path):
  """A source whose validation split alone fills no batch gets a notice, not an error: the
  others' per-source batches are still built (the mixture's val_loss counts every source)."""
  from t6_jax import sharding as sharding_lib
  from t6_jax.train import loop
  small = tmp_path / "small"
  small.mkdir()
  for i in range(3):
    (small / f"doc{i}.txt").write_text("c" * 20)
  spec = "1:text:{a};1:text:" + str(small)
  cfg = cfg_of(corpora, spec, "data.val_fraction=0.25", "train.batch_size=8", "train.seq_len=16",
               "model.max_seq_len=16")
  notices = []
  got = loop.source_validation_batches(cfg, sharding_lib.mesh_from_config(cfg.mesh), notices.append)
  assert list(got) == [f"text:{corpora / 'a'}"] and got[f"text:{corpora / 'a'}"]
  assert len(notices) == 1 and f"text:{small}" in notices[0] and "fills no batch" in notices[0]

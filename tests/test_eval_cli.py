"""eval.py end to end on an exported tiny model: loss / perplexity / bits per byte on the
bundled corpus's validation split and the bundled multiple-choice fixture, table and JSON."""

import importlib.util
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from t6_jax import config as config_lib
from t6_jax.checkpoint import export_params
from t6_jax.data import load_tokenizer
from t6_jax.model import init_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_eval_cli():
  spec = importlib.util.spec_from_file_location("eval_cli", os.path.join(ROOT, "eval.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_eval_cli_on_an_export(tmp_path, capsys):
  cfg = config_lib.load("tiny", ["model.max_seq_len=32", "train.seq_len=32",
                                 f"data.cache_dir={tmp_path / 'cache'}"])
  shapes = jax.eval_shape(lambda: init_params(cfg.model, seed=0))
  rng = np.random.default_rng(4)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.1, s.shape), s.dtype), shapes)
  export = export_params(str(tmp_path / "export"), params, cfg, load_tokenizer(cfg).spec())
  out = tmp_path / "results.json"
  rc = load_eval_cli().main(["--checkpoint", export, "--no_progress", "--output", str(out),
                             "eval.max_batches=2", "eval.batch_size=8", "eval.limit=6"])
  printed = capsys.readouterr().out
  assert rc == 0
  assert "perplexity" in printed and "bits/byte" in printed and "fixture" in printed
  report = json.loads(out.read_text())
  loss = report["validation"]
  assert loss["tokens"] == 2 * 8 * 32 and loss["batches"] == 2
  assert loss["perplexity"] == np.float64(math.exp(loss["loss"]))
  # Bytes tokenizer: one byte per token except end-of-text, which decodes to nothing.
  assert 0.9 < loss["bytes_per_token"] <= 1.0
  assert math.isclose(loss["bits_per_byte"],
                      loss["loss"] / math.log(2) / loss["bytes_per_token"], rel_tol=1e-9)
  (fixture,) = report["tasks"]
  assert fixture["task"] == "fixture" and fixture["n"] == 6
  assert 0.0 <= fixture["acc"] <= 1.0 and 0.0 <= fixture["acc_norm"] <= 1.0
  # On 8 tensor shards the 4 heads and 170 MLP units are padded to 8 and 176 (zeros): the
  # same scores; the report keeps the checkpoint's sizes.
  out_tp = tmp_path / "results_tp.json"
  assert load_eval_cli().main(["--checkpoint", export, "--no_progress", "--output",
                               str(out_tp), "eval.max_batches=2", "eval.batch_size=8",
                               "eval.limit=6", "mesh.rules=fsdp_tp", "mesh.fsdp=1",
                               "mesh.tensor=8"]) == 0
  report_tp = json.loads(out_tp.read_text())
  assert report_tp["model"]["num_heads"] == 4
  np.testing.assert_allclose(report_tp["validation"]["loss"], loss["loss"], rtol=1e-6)
  assert [(t["acc"], t["acc_norm"]) for t in report_tp["tasks"]] == [
      (fixture["acc"], fixture["acc_norm"])]

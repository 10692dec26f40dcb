"""The lm-eval adapter inside the real harness (skipped where lm_eval is not installed, except
in CI, which installs it).

A tiny model is exported as a checkpoint; lm_eval's own `simple_evaluate` runs a local
multiple-choice task (a JSON file, no network) through `--model t6_jax` and must report the
same acc / acc_norm as our task code on the same documents.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

if os.environ.get("CI"):
  import lm_eval  # noqa: F401  CI installs the eval extra: missing there is a failure, not a skip
else:
  lm_eval = pytest.importorskip("lm_eval")

from t6_jax import config as config_lib  # noqa: E402
from t6_jax.checkpoint import export_params  # noqa: E402
from t6_jax.data.tokenizers import TiktokenTokenizer  # noqa: E402
from t6_jax.eval import harness, tasks  # noqa: E402
from t6_jax.model import init_params  # noqa: E402

TASK_YAML = """task: t6_fixture
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_target: gold
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  cfg = config_lib.load("tiny", ["model.max_seq_len=64", "eval.mc_batch_size=16"])
  shapes = jax.eval_shape(lambda: init_params(cfg.model, seed=0))
  rng = np.random.default_rng(2)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.1, s.shape), s.dtype), shapes)
  # Bytes as tokens (0xFF never occurs in UTF-8, so 255 is end-of-text): vocab 256.
  tok = TiktokenTokenizer({bytes([i]): i for i in range(255)}, name="bytes", embed=True)
  path = str(tmp_path_factory.mktemp("export") / "tiny")
  export_params(path, params, cfg, tok.spec())
  return path


def test_model_is_registered():
  from lm_eval.api.registry import get_model
  assert get_model("t6_jax") is harness.T6JaxLM


def test_harness_run_matches_our_tasks(exported, tmp_path, monkeypatch):
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  from lm_eval.tasks import TaskManager
  data_file = os.path.join(tasks.DATA_DIR, "fixture.jsonl")
  (tmp_path / "t6_fixture.yaml").write_text(TASK_YAML.format(data=data_file))
  out = lm_eval.simple_evaluate(
      model="t6_jax", model_args=f"workdir={exported},mesh=false,batch_size=16",
      tasks=["t6_fixture"], num_fewshot=0, log_samples=True,
      task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
  theirs = out["results"]["t6_fixture"]
  adapter = harness.T6Adapter.from_checkpoint(exported, batch_size=16)
  data = tasks.load_task("fixture", data_file)
  ours = tasks.evaluate_task(data, adapter.loglikelihood)
  assert theirs["acc,none"] == pytest.approx(ours["acc"])
  assert theirs["acc_norm,none"] == pytest.approx(ours["acc_norm"])
  # Per document: the harness's requests and log-likelihoods are the ones our prompts give.
  samples = sorted(out["samples"]["t6_fixture"], key=lambda s: s["doc_id"])
  assert len(samples) == len(data.docs)
  for sample, doc in zip(samples, data.docs):
    prompt = tasks.build_prompt(data.task, doc)
    assert [tuple(a) for a in sample["arguments"]] == list(prompt.requests)
    lls = [lp for lp, _ in adapter.loglikelihood(prompt.requests)]
    np.testing.assert_allclose([float(r[0]) for r in sample["filtered_resps"]], lls,
                               rtol=1e-6)

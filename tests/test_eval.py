"""Evaluation: continuation log-likelihoods against float64 NumPy, task prompts, k-shot,
acc / acc_norm, task-file errors, loss / bits-per-byte sums, the adapter's request handling."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t6_jax import config as config_lib
from t6_jax.eval import scoring, tasks
from t6_jax.eval.harness import T6Adapter, cut_at_stop
from t6_jax.eval.perplexity import count_bytes, make_loss_fn
from t6_jax.model import inference_params, init_params, model_from_params
from t6_jax.sharding import make_mesh


class ByteTokenizer:
  """UTF-8 bytes as ids; id 0 (NUL, absent from text) is end-of-text."""

  vocab_size = 256
  eot_id = 0

  def encode(self, text):
    return list(text.encode("utf-8"))

  def decode(self, ids):
    return bytes(i for i in ids if i).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def tiny():
  cfg = config_lib.load("tiny", ["model.max_seq_len=32", "eval.mc_batch_size=8"])

  # Fresh params zero the output projections, which would make every position blind to its
  # context; random weights everywhere (drawn on the host: no init compile) show attention.
  shapes = jax.eval_shape(lambda: init_params(cfg.model, seed=0))
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.1, s.shape), s.dtype), shapes)
  return cfg, params


@pytest.fixture(scope="module")
def scorer(tiny):
  cfg, params = tiny
  return scoring.Scorer(cfg, params, rows=8)


_FORWARD = {}


def forward_logits(cfg, params, tokens):
  """float64 copy of the fp32 logits of one sequence (jitted; one compile per length)."""
  fn = _FORWARD.setdefault(cfg, jax.jit(lambda p, t: model_from_params(cfg.model, p)(t)))
  return np.asarray(fn(params, jnp.asarray([tokens], jnp.int32))[0], np.float64)


def log_softmax64(logits):
  logits = logits - logits.max(-1, keepdims=True)
  return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def reference_logp(cfg, params, full):
  """log p(full[t+1] | full[:t+1]) from one unpadded forward, and the argmax per position."""
  logits = forward_logits(cfg, params, full[:-1])
  return log_softmax64(logits)[np.arange(len(full) - 1), full[1:]], logits.argmax(-1)


def reference_ll(cfg, params, context, continuation, max_len):
  full = (list(context) + list(continuation))[-(max_len + 1):]
  lp, argmax = reference_logp(cfg, params, full)
  n = min(len(continuation), len(full) - 1)
  greedy = bool(np.all(argmax[len(full) - 1 - n:] == np.asarray(full[len(full) - n:])))
  return float(lp[len(lp) - n:].sum()), greedy


def test_continuation_loglikelihood_matches_numpy(tiny):
  cfg, params = tiny
  rng = np.random.default_rng(0)
  # Few distinct total lengths (7, 20, 33: one reference compile each) but many context /
  # continuation splits; longer requests are left-truncated to the 33 tokens that fit.
  pairs = [(rng.integers(1, 256, n_ctx).tolist(), rng.integers(1, 256, n_cont).tolist())
           for n_ctx, n_cont in [(1, 6), (3, 4), (6, 1), (12, 8), (19, 1), (2, 18), (30, 3),
                                 (45, 4), (5, 40), (1, 32)]]
  # A continuation that is the greedy decode of its context must come back as greedy.
  context = pairs[3][0] + pairs[3][1][:-1]
  _, argmax = reference_logp(cfg, params, context + [1])
  pairs.append((context, [int(argmax[-1])]))
  mesh = make_mesh(data=2, fsdp=4, tensor=1)
  scorer = scoring.Scorer(cfg, params, mesh=mesh, rows=8)
  got = scorer.loglikelihood(pairs)
  for (context, continuation), (lp, greedy) in zip(pairs, got):
    want_lp, want_greedy = reference_ll(cfg, params, context, continuation, 32)
    assert lp == pytest.approx(want_lp, rel=1e-5, abs=1e-4)
    assert greedy == want_greedy
  assert got[-1][1] is True
  # Lengths 7..33 tokens map onto the 16 and 32 buckets: at most two compiled programs.
  assert scorer.buckets == [16, 32]
  assert scorer.compiled_shapes() <= 2


def test_inference_params_score_as_the_fp32_parameters():
  """Evaluation holding the block matrices in the bf16 compute dtype (`inference_params`,
  as eval.py does) scores exactly as the fp32 parameters it came from."""
  cfg = config_lib.load("tiny", ["model.max_seq_len=32", "model.dtype=bfloat16"])
  params = init_params(cfg.model, 0)
  held = inference_params(cfg.model, params)
  tokens = jnp.asarray(np.random.default_rng(1).integers(1, 256, (2, 17)), jnp.int32)
  score = jax.jit(lambda p: scoring.token_logprobs(cfg, p, tokens[:, :-1], tokens[:, 1:]))
  for got, want in zip(score(held), score(params)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_rolling_windows_score_each_token_once():
  tokens = list(range(1, 24))
  pairs = scoring.rolling_windows(tokens, prefix_token=0, max_len=8)
  assert [t for _, cont in pairs for t in cont] == tokens
  assert pairs[0][0] == [0]
  for context, continuation in pairs:
    assert len(context) + len(continuation) <= 9  # at most max_len inputs
  # Later windows condition on as much text as fits.
  assert len(pairs[-1][0]) + len(pairs[-1][1]) == 9


def test_text_scorer_splits_like_the_harness(tiny, scorer):
  cfg, params = tiny
  tok = ByteTokenizer()
  assert scoring.encode_pair(tok, "Answer: ", "yes") == (tok.encode("Answer:"),
                                                          tok.encode(" yes"))
  assert scoring.encode_pair(tok, "", "hi") == ([0], tok.encode("hi"))
  text = scoring.TextScorer(scorer, tok)
  long_text = "All the world's a stage, and all the men and women merely players."
  assert len(tok.encode(long_text)) == 66  # three windows of 33 tokens: 32 + 32 + 2 scored
  (rolled,) = text.loglikelihood_rolling([long_text])
  # Independent: every window of at most 32 inputs scored by one unpadded forward.
  ids = tok.encode(long_text)
  want = sum(reference_ll(cfg, params, c, x, 32)[0]
             for c, x in scoring.rolling_windows(ids, 0, 32))
  assert rolled == pytest.approx(want, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Task formats: the harness's prompts, written out by hand

PROMPT_CASES = {
    "arc_easy": ({"id": "x", "question": "Which is a gas?",
                  "choices": {"text": ["iron", "oxygen"], "label": ["A", "B"]},
                  "answerKey": "B"},
                 [("Question: Which is a gas?\nAnswer:", " iron"),
                  ("Question: Which is a gas?\nAnswer:", " oxygen")], 1),
    "boolq": ({"passage": "Cats purr.", "question": "do cats purr", "label": 1},
              [("Cats purr.\nQuestion: do cats purr?\nAnswer:", " no"),
               ("Cats purr.\nQuestion: do cats purr?\nAnswer:", " yes")], 1),
    "hellaswag": ({"activity_label": "Cooking", "ctx_a": "A man cracks eggs.", "ctx_b": "he",
                   "endings": ["whisks them [title] well.", "sleeps."], "label": "0"},
                  [("Cooking: A man cracks eggs. He", " whisks them. well."),
                   ("Cooking: A man cracks eggs. He", " sleeps.")], 0),
    "openbookqa": ({"id": "1", "question_stem": "The sun is a",
                    "choices": {"text": ["star", "planet"], "label": ["A", "B"]},
                    "answerKey": "A"},
                   [("The sun is a", " star"), ("The sun is a", " planet")], 0),
    "piqa": ({"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid",
              "label": 0},
             [("Question: Open a jar\nAnswer:", " twist the lid"),
              ("Question: Open a jar\nAnswer:", " eat the lid")], 0),
    "winogrande": ({"sentence": "The cup fell off the table because _ was unsteady.",
                    "option1": "the cup", "option2": "the table", "answer": "2"},
                   [("The cup fell off the table because the cup", " was unsteady."),
                    ("The cup fell off the table because the table", " was unsteady.")], 1),
    "mmlu": ({"question": " What is 2+2? ", "subject": "elementary_mathematics",
              "choices": ["3", "4", "5", "6"], "answer": 1},
             [("The following are multiple choice questions (with answers) about elementary "
               "mathematics.\n\nWhat is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:", f" {c}")
              for c in "ABCD"], 1),
    "sciq": ({"support": "  Water boils at 100 C.", "question": "When does water boil?",
              "distractor1": "0 C", "distractor2": "50 C", "distractor3": "10 C",
              "correct_answer": "100 C"},
             [("Water boils at 100 C.\nQuestion: When does water boil?\nAnswer:", f" {c}")
              for c in ["0 C", "50 C", "10 C", "100 C"]], 3),
}


@pytest.mark.parametrize("name", sorted(PROMPT_CASES))
def test_prompt_formats(name):
  doc, requests, gold = PROMPT_CASES[name]
  prompt = tasks.build_prompt(tasks.TASKS[name], doc)
  assert list(prompt.requests) == requests
  assert prompt.gold == gold


def test_paper_tasks_metrics_follow_reference():
  assert set(tasks.PAPER_TASKS) == set(tasks.TASKS) - {"mc"}
  acc_only = {"boolq", "winogrande", "mmlu"}
  for name in tasks.PAPER_TASKS:
    assert tasks.TASKS[name].paper_metric == ("acc" if name in acc_only else "acc_norm")


def test_acc_and_acc_norm_on_known_answers():
  docs = [{"context": "q1", "choices": ["a", "bbbb"], "gold": 1},
          {"context": "q2", "choices": ["yes", "no"], "gold": 0},
          {"context": "q3", "choices": ["xx", "y"], "gold": 1}]
  lls = {("q1", " a"): -2.0, ("q1", " bbbb"): -3.0,   # acc wrong; per char -2 < -0.75: right
         ("q2", " yes"): -1.0, ("q2", " no"): -5.0,   # both right
         ("q3", " xx"): -4.0, ("q3", " y"): -3.0}     # acc right; per char -2 > -3: wrong
  data = tasks.TaskData(tasks.TASKS["mc"], docs, docs, "inline", pool_is_eval=True)
  result = tasks.evaluate_task(data, lambda reqs: [(lls[r], False) for r in reqs])
  assert result["acc"] == pytest.approx(2 / 3)
  assert result["acc_norm"] == pytest.approx(2 / 3)
  assert result["n"] == 3
  assert result["acc_stderr"] == pytest.approx(np.std([0, 1, 1], ddof=1) / math.sqrt(3))
  assert tasks.choice_metrics([-2.0, -3.0], ["a", "bbbb"], 1) == {"acc": 0.0, "acc_norm": 1.0}


def test_kshot_assembly_is_deterministic():
  pool = [{"context": f"c{i}", "choices": ["x", "y"], "gold": i % 2} for i in range(12)]
  data = tasks.TaskData(tasks.TASKS["mc"], pool, pool, "inline", pool_is_eval=True)
  a = tasks.fewshot_examples(data, 2, seed=1234)
  b = tasks.fewshot_examples(data, 2, seed=1234)
  c = tasks.fewshot_examples(data, 2, seed=7)
  assert a == b and a != c
  for doc, examples in zip(pool, a):
    assert len(examples) == 2 and doc not in examples
  prompt = tasks.build_prompt(data.task, pool[0], a[0])
  e0, e1 = a[0]
  want = (f"{e0['context']} {e0['choices'][e0['gold']]}\n\n"
          f"{e1['context']} {e1['choices'][e1['gold']]}\n\nc0")
  assert prompt.requests[0] == (want, " x")
  # MMLU takes the first k dev questions of the same subject, in order.
  dev = [{"question": f"q{i}", "subject": s, "choices": ["1", "2", "3", "4"], "answer": i % 4}
         for i, s in enumerate(["law", "art", "law", "law"])]
  test = [{"question": "t", "subject": "law", "choices": ["1", "2", "3", "4"], "answer": 0}]
  mmlu = tasks.TaskData(tasks.TASKS["mmlu"], test, dev, "inline", pool_is_eval=False)
  assert tasks.fewshot_examples(mmlu, 2, seed=0) == [[dev[0], dev[2]]]
  # WinoGrande's solved example is the right option's context, then the shared ending.
  wino = PROMPT_CASES["winogrande"][0]
  assert tasks.solved_example(tasks.TASKS["winogrande"], wino) == (
      "The cup fell off the table because the table was unsteady.")


def test_bad_task_files_give_clear_errors(tmp_path):
  mc = tasks.TASKS["mc"]
  bad_json = tmp_path / "bad.jsonl"
  bad_json.write_text('{"context": "a", "choices": ["x"], "gold": 0}\n{"context": \n')
  with pytest.raises(tasks.TaskError, match=r"bad.jsonl:2: not valid JSON"):
    tasks.read_jsonl(str(bad_json), mc)
  missing = tmp_path / "missing.jsonl"
  missing.write_text(json.dumps({"context": "a", "gold": 0}) + "\n")
  with pytest.raises(tasks.TaskError, match=r"missing.jsonl:1: mc document lacks field\(s\) "
                                            r"choices"):
    tasks.read_jsonl(str(missing), mc)
  arc = tmp_path / "arc.jsonl"
  arc.write_text(json.dumps({"question": "q", "choices": {"text": ["a"], "label": ["A"]},
                             "answerKey": "C"}) + "\n")
  with pytest.raises(tasks.TaskError, match=r"answer key 'C' is not one of"):
    tasks.read_jsonl(str(arc), tasks.TASKS["arc_easy"])
  out_of_range = tmp_path / "range.jsonl"
  out_of_range.write_text(json.dumps({"context": "a", "choices": ["x", "y"], "gold": 5}) + "\n")
  with pytest.raises(tasks.TaskError, match=r"answer index 5 is outside the 2 choices"):
    tasks.read_jsonl(str(out_of_range), mc)
  with pytest.raises(tasks.TaskError, match=r"did you mean hellaswag"):
    tasks.parse_task_list("helaswag")
  with pytest.raises(tasks.TaskError, match=r"no test file for task arc_easy"):
    tasks.load_task("arc_easy", task_dir=str(tmp_path))
  with pytest.raises(tasks.TaskError, match=r"no dataset in the TFDS catalog"):
    tasks.load_tfds(tasks.TASKS["sciq"], "test")
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(tasks.TaskError, match=r"ai2_arc/ARC-Easy split test is not prepared under "
                     r"\S+; prepare it once"):  # no files: no tfds internals in the message
    tasks.load_tfds(tasks.TASKS["arc_easy"], "test", data_dir=str(tmp_path / "tfds"))


def test_task_list_and_local_layout(tmp_path):
  assert [n for n, _ in tasks.parse_task_list("paper")] == list(tasks.PAPER_TASKS)
  (tmp_path / "piqa").mkdir()
  doc = PROMPT_CASES["piqa"][0]
  (tmp_path / "piqa" / "validation.jsonl").write_text(json.dumps(doc) + "\n")
  (tmp_path / "piqa.train.jsonl").write_text(json.dumps(dict(doc, goal="g")) + "\n")
  data = tasks.load_task("piqa", task_dir=str(tmp_path), num_fewshot=1)
  assert data.docs == [doc] and data.fewshot_pool[0]["goal"] == "g"
  assert not data.pool_is_eval
  fixture = tasks.load_task(*tasks.parse_task_list("fixture")[0])
  assert len(fixture.docs) >= 10


def test_fixture_scores_with_the_model(tiny, scorer):
  cfg, _ = tiny
  text = scoring.TextScorer(scorer, ByteTokenizer())
  data = tasks.load_task(*tasks.parse_task_list("fixture")[0])
  result = tasks.evaluate_task(data, text.loglikelihood, num_fewshot=1, limit=5)
  # The same prompts scored one document at a time give the same per-document answers.
  examples = tasks.fewshot_examples(data, 1, 1234, data.docs[:5])
  hits = []
  for doc, ex in zip(data.docs[:5], examples):
    prompt = tasks.build_prompt(data.task, doc, ex)
    lls = [lp for lp, _ in text.loglikelihood(prompt.requests)]
    hits.append(tasks.choice_metrics(lls, prompt.choices, prompt.gold)["acc"])
  assert result["acc"] == pytest.approx(np.mean(hits))
  assert result["n"] == 5 and result["num_fewshot"] == 1
  assert result["task"] == "fixture"
  table = tasks.format_table([result], cfg.model)
  assert "fixture" in table and "average" not in table


# ---------------------------------------------------------------------------------------------
# Loss and bits per byte


def test_loss_sums_and_bytes(tiny):
  cfg, params = tiny
  rng = np.random.default_rng(3)
  inputs = rng.integers(1, 256, (4, 19)).astype(np.int32)
  targets = rng.integers(1, 256, (4, 19)).astype(np.int32)
  targets[1, :5] = -1
  targets[3] = -1
  nll, count = make_loss_fn(cfg, None)(params, {"inputs": jnp.asarray(inputs),
                                                "targets": jnp.asarray(targets)})
  want = 0.0
  for row in range(4):
    logp = log_softmax64(forward_logits(cfg, params, inputs[row].tolist()))
    keep = targets[row] >= 0
    want -= logp[np.arange(19)[keep], targets[row][keep]].sum()
  assert float(nll) == pytest.approx(want, rel=1e-5)
  assert int(count) == 4 * 19 - 5 - 19
  tok = ByteTokenizer()
  rows = np.full((2, 7), -1, np.int32)
  rows[0, :6] = tok.encode("héllo")
  assert count_bytes(rows, tok) == len("héllo".encode("utf-8"))


# ---------------------------------------------------------------------------------------------
# The lm-eval adapter's logic on request objects (no lm_eval needed)


@dataclasses.dataclass
class FakeRequest:
  args: tuple


def test_adapter_answers_request_objects(tiny):
  cfg, params = tiny
  tok = ByteTokenizer()
  adapter = T6Adapter(cfg, params, tok, batch_size=8, max_gen_toks=4)
  # Total lengths 7, 7 and 33 (truncated) share the reference forwards compiled above.
  reqs = [FakeRequest(("Question: Is the sky blue?\nAnswer:", " yes")),
          FakeRequest(("", "To be,")), FakeRequest(("abc ", "def"))]
  got = adapter.loglikelihood(reqs)
  for r, (lp, greedy) in zip(reqs, got):
    want, want_greedy = reference_ll(cfg, params, *scoring.encode_pair(tok, *r.args), 32)
    assert lp == pytest.approx(want, rel=1e-5, abs=1e-4) and greedy == want_greedy
  (rolled,) = adapter.loglikelihood_rolling([FakeRequest(("nineteen characters",))])
  want = reference_ll(cfg, params, [0], tok.encode("nineteen characters"), 32)[0]
  assert rolled == pytest.approx(want, rel=1e-5)
  assert adapter.loglikelihood([FakeRequest(("abc", ""))]) == [(0.0, True)]
  assert cut_at_stop("abc\n\ndef", ["\n\n", "x"]) == "abc"
  assert cut_at_stop("abc", []) == "abc"


def test_adapter_generate_until(tiny):
  cfg, params = tiny
  tok = ByteTokenizer()
  adapter = T6Adapter(cfg, params, tok, batch_size=8, max_gen_toks=6)
  prompt = "Once upon"
  (text,) = adapter.generate_until([FakeRequest((prompt, {"until": [], "max_gen_toks": 6}))])
  # Greedy decoding by hand: six argmax steps of the full forward (right-padded to 32, which
  # causal attention keeps out of the positions read).
  ids = tok.encode(prompt)
  for _ in range(6):
    logits = forward_logits(cfg, params, ids + [0] * (32 - len(ids)))
    ids.append(int(logits[len(ids) - 1].argmax()))
  new = ids[len(tok.encode(prompt)):]
  if 0 in new:
    new = new[:new.index(0)]
  assert text == tok.decode(new)
  assert len(text) >= 3, text  # the stop string below must come from inside the text
  stop = text[2]
  (cut,) = adapter.generate_until([FakeRequest((prompt, {"until": [stop], "max_gen_toks": 6}))])
  assert cut == cut_at_stop(text, [stop]) and len(cut) <= 2


def test_tfds_documents_without_download():
  tfds = pytest.importorskip("tensorflow_datasets")
  # tfds's mock data: random examples with the builders' real feature layouts, no files.
  with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
    piqa = tasks.load_tfds(tasks.TASKS["piqa"], "validation")
    obqa = tasks.load_tfds(tasks.TASKS["openbookqa"], "test")
  assert len(piqa) == 3 and all(d["label"] in (0, 1) for d in piqa)
  assert all(isinstance(d["goal"], str) for d in piqa)
  prompt = tasks.build_prompt(tasks.TASKS["openbookqa"], obqa[0])
  assert len(prompt.requests) == 4 and prompt.requests[0][0] == obqa[0]["question_stem"]


def test_report_sets_paper_average_beside_ours():
  small = config_lib.load("t6-small").model
  results = [{"task": name, "n": 10, "num_fewshot": 0, "paper_metric": t.paper_metric,
              "acc": 0.5, "acc_norm": 0.6} for name, t in
             ((n, tasks.TASKS[n]) for n in tasks.PAPER_TASKS)]
  table = tasks.format_table(results, small)
  # acc for boolq, winogrande, mmlu; acc_norm for the other six: (3 * 50 + 6 * 60) / 9.
  assert f"{(3 * 50 + 6 * 60) / 9:.2f}" in table
  assert "paper, small, 0-shot (lm-eval 0.4.5): MHA 46.19, T6 46.21; ours (tpa)" in table
  two_shot = tasks.format_table([dict(r, num_fewshot=2) for r in results], small)
  assert "paper, small" not in two_shot

"""Multiple-choice tasks in lm-evaluation-harness 0.4 style: prompts, k-shot, acc and acc_norm.

Each task turns a document (the field layout of the Hugging Face dataset the harness reads,
e.g. ARC's {question, choices: {text, label}, answerKey}) into one (context, continuation)
request per choice with the harness's prompt: `Question: ...\\nAnswer:` plus " " + choice.
The prediction is the choice with the highest summed log-likelihood (`acc`) or the highest
log-likelihood per character of the choice (`acc_norm`). WinoGrande is the harness's
"partial" format: the choices differ in the context and share one continuation.

k-shot prompts put k solved examples before the question, separated by blank lines; they are
drawn with one `random.Random(seed)` per task in document order (MMLU takes the first k of its
subject's dev split), so the same seed gives the same prompts.

Documents come from JSONL files (one document per line, in the Hugging Face layout) or from
prepared tfds datasets; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
from typing import Any, Callable, Sequence

import numpy as np

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
PAPER_TASKS = ("arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa", "piqa",
               "winogrande", "mmlu", "sciq")


class TaskError(ValueError):
  """A task name, task file or document is unusable; the message says how to fix it."""


# --------------------------------------------------------------------------------------------
# Task formats


def _hellaswag_clean(text: str) -> str:
  # WikiHow items carry bracketed markup ("[title]", "[step]") that the harness strips.
  text = text.strip().replace(" [title]", ". ")
  text = re.sub(r"\[.*?\]", "", text)
  return text.replace("  ", " ")


def _hellaswag_query(doc: dict) -> str:
  if "ctx_a" in doc:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
  else:  # tfds keeps only the joined context (ctx_a + " " + ctx_b, ctx_b not capitalised)
    ctx = doc["ctx"]
  return _hellaswag_clean(doc["activity_label"] + ": " + ctx)


def _label_index(doc: dict, key: str) -> int:
  labels = list(doc["choices"]["label"])
  answer = doc[key].strip() if isinstance(doc[key], str) else doc[key]
  if answer not in labels:
    raise TaskError(f"answer key {answer!r} is not one of the choice labels {labels}")
  return labels.index(answer)


def _mmlu_description(doc: dict) -> str:
  subject = doc["subject"].replace("_", " ")
  return f"The following are multiple choice questions (with answers) about {subject}.\n\n"


@dataclasses.dataclass(frozen=True)
class Task:
  """One multiple-choice task format.

  text(doc): the question part of the prompt (for `partial` tasks the shared continuation).
  choices(doc): the answer strings (for `partial` tasks the alternative contexts).
  gold(doc): index of the right choice. fields: what every document must have.
  """

  name: str
  fields: tuple[str, ...]
  text: Callable[[dict], str]
  choices: Callable[[dict], list[str]]
  gold: Callable[[dict], int]
  eval_split: str
  fewshot_split: str
  metrics: tuple[str, ...] = ("acc", "acc_norm")
  paper_metric: str = "acc_norm"
  partial: bool = False
  description: Callable[[dict], str] | None = None
  fewshot: str = "random"  # random | first_n (the first k of the same group, as MMLU)
  group: Callable[[dict], str] | None = None
  tfds_name: str = ""
  tfds_splits: tuple[tuple[str, str], ...] = ()  # (our split, tfds split) where they differ
  from_tfds: Callable[[dict], dict] | None = None
  layout: str = ""  # an example document, for error messages


def _arc(name: str, tfds_config: str) -> Task:
  return Task(
      name=name, fields=("question", "choices", "answerKey"),
      text=lambda d: f"Question: {d['question']}\nAnswer:",
      choices=lambda d: list(d["choices"]["text"]),
      gold=lambda d: _label_index(d, "answerKey"),
      eval_split="test", fewshot_split="train",
      tfds_name=f"ai2_arc/{tfds_config}", from_tfds=lambda d: d,
      layout='{"question": "...", "choices": {"text": ["...", "..."], "label": ["A", "B"]}, '
             '"answerKey": "A"}')


TASKS: dict[str, Task] = {t.name: t for t in [
    _arc("arc_easy", "ARC-Easy"),
    _arc("arc_challenge", "ARC-Challenge"),
    Task(name="boolq", fields=("passage", "question", "label"),
         text=lambda d: f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:",
         choices=lambda d: ["no", "yes"], gold=lambda d: int(d["label"]),
         eval_split="validation", fewshot_split="train", metrics=("acc",), paper_metric="acc",
         tfds_name="super_glue/boolq", from_tfds=lambda d: d,
         layout='{"passage": "...", "question": "...", "label": 1}'),
    Task(name="hellaswag", fields=("activity_label", "endings", "label"),
         text=_hellaswag_query,
         choices=lambda d: [_hellaswag_clean(e) for e in d["endings"]],
         gold=lambda d: int(d["label"]),
         eval_split="validation", fewshot_split="train",
         tfds_name="hellaswag",
         from_tfds=lambda d: {"ctx": d["context"], "activity_label": d["activity_label"],
                              "endings": d["endings"], "label": d["label"]},
         layout='{"activity_label": "...", "ctx_a": "...", "ctx_b": "...", '
                '"endings": ["...", "...", "...", "..."], "label": "0"}'),
    Task(name="openbookqa", fields=("question_stem", "choices", "answerKey"),
         text=lambda d: d["question_stem"],
         choices=lambda d: list(d["choices"]["text"]),
         gold=lambda d: _label_index(d, "answerKey"),
         eval_split="test", fewshot_split="train", tfds_name="openbookqa",
         from_tfds=lambda d: {
             "question_stem": d["question"]["stem"],
             "choices": {"text": [d["question"][f"choice_{k}"] for k in "ABCD"],
                         "label": list("ABCD")},
             "answerKey": "ABCD"[d["answerKey"]]},
         layout='{"question_stem": "...", "choices": {"text": [...], "label": ["A", ...]}, '
                '"answerKey": "A"}'),
    Task(name="piqa", fields=("goal", "sol1", "sol2", "label"),
         text=lambda d: f"Question: {d['goal']}\nAnswer:",
         choices=lambda d: [d["sol1"], d["sol2"]], gold=lambda d: int(d["label"]),
         eval_split="validation", fewshot_split="train", tfds_name="piqa",
         from_tfds=lambda d: d,
         layout='{"goal": "...", "sol1": "...", "sol2": "...", "label": 0}'),
    Task(name="winogrande", fields=("sentence", "option1", "option2", "answer"),
         text=lambda d: d["sentence"][d["sentence"].index("_") + 1:].strip(),
         choices=lambda d: [d["sentence"][:d["sentence"].index("_")] + d[k]
                            for k in ("option1", "option2")],
         gold=lambda d: int(d["answer"]) - 1,
         eval_split="validation", fewshot_split="train", metrics=("acc",),
         paper_metric="acc", partial=True, tfds_name="winogrande",
         tfds_splits=(("train", "train_xl"),),
         from_tfds=lambda d: {"sentence": d["sentence"], "option1": d["option1"],
                              "option2": d["option2"], "answer": str(int(d["label"]) + 1)},
         layout='{"sentence": "... _ ...", "option1": "...", "option2": "...", '
                '"answer": "1"}'),
    Task(name="mmlu", fields=("question", "subject", "choices", "answer"),
         text=lambda d: (f"{d['question'].strip()}\nA. {d['choices'][0]}\n"
                         f"B. {d['choices'][1]}\nC. {d['choices'][2]}\n"
                         f"D. {d['choices'][3]}\nAnswer:"),
         choices=lambda d: ["A", "B", "C", "D"], gold=lambda d: int(d["answer"]),
         eval_split="test", fewshot_split="dev", metrics=("acc",), paper_metric="acc",
         description=_mmlu_description, fewshot="first_n", group=lambda d: d["subject"],
         layout='{"question": "...", "subject": "anatomy", "choices": ["...", "...", "...", '
                '"..."], "answer": 0}  (cais/mmlu, config "all")'),
    Task(name="sciq",
         fields=("support", "question", "distractor1", "distractor2", "distractor3",
                 "correct_answer"),
         text=lambda d: f"{d['support'].lstrip()}\nQuestion: {d['question']}\nAnswer:",
         choices=lambda d: [d["distractor1"], d["distractor2"], d["distractor3"],
                            d["correct_answer"]],
         gold=lambda d: 3, eval_split="test", fewshot_split="train",
         layout='{"support": "...", "question": "...", "distractor1": "...", '
                '"distractor2": "...", "distractor3": "...", "correct_answer": "..."}'),
    # Any file of {"context", "choices", "gold"}; the bundled fixture uses it.
    Task(name="mc", fields=("context", "choices", "gold"),
         text=lambda d: d["context"], choices=lambda d: list(d["choices"]),
         gold=lambda d: int(d["gold"]), eval_split="test", fewshot_split="test",
         layout='{"context": "...", "choices": ["...", "..."], "gold": 0}'),
]}


# --------------------------------------------------------------------------------------------
# Documents


def read_jsonl(path: str, task: Task) -> list[dict]:
  """Documents of `task` from a JSONL file, each checked for the task's fields."""
  if not os.path.isfile(path):
    raise TaskError(f"task file {path!r} for {task.name} does not exist")
  docs = []
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        doc = json.loads(line)
      except json.JSONDecodeError as e:
        raise TaskError(f"{path}:{line_no}: not valid JSON ({e.msg}); a task file holds one "
                        f"JSON object per line") from e
      check_doc(task, doc, f"{path}:{line_no}")
      docs.append(doc)
  if not docs:
    raise TaskError(f"task file {path!r} holds no documents")
  return docs


def check_doc(task: Task, doc: Any, where: str) -> None:
  """Raises TaskError naming the missing field, or a broken answer, of one document."""
  if not isinstance(doc, dict):
    raise TaskError(f"{where}: a {task.name} document must be a JSON object, got "
                    f"{type(doc).__name__}; expected {task.layout}")
  missing = [k for k in task.fields if k not in doc]
  if missing:
    raise TaskError(f"{where}: {task.name} document lacks field(s) {', '.join(missing)}; "
                    f"expected {task.layout}")
  try:
    choices = task.choices(doc)
    gold = task.gold(doc)
    task.text(doc)
  except TaskError as e:
    raise TaskError(f"{where}: {e}") from None
  except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
    raise TaskError(f"{where}: malformed {task.name} document ({type(e).__name__}: {e}); "
                    f"expected {task.layout}") from None
  if not 0 <= gold < len(choices):
    raise TaskError(f"{where}: answer index {gold} is outside the {len(choices)} choices")


def task_file(task_dir: str, name: str, split: str) -> str:
  candidates = [os.path.join(task_dir, name, f"{split}.jsonl"),
                os.path.join(task_dir, f"{name}.{split}.jsonl"),
                os.path.join(task_dir, f"{name}_{split}.jsonl")]
  for path in candidates:
    if os.path.isfile(path):
      return path
  raise TaskError(f"no {split} file for task {name} under {task_dir!r}; looked for "
                  f"{', '.join(candidates)}. Export the dataset the harness uses to JSONL "
                  f"(docs/eval.md) or set eval.task_source=tfds")


def _to_python(x):
  if isinstance(x, bytes):
    return x.decode("utf-8")
  if isinstance(x, dict):
    return {k: _to_python(v) for k, v in x.items()}
  if isinstance(x, np.ndarray):
    return [_to_python(v) for v in x.tolist()] if x.ndim else _to_python(x.item())
  if isinstance(x, (list, tuple)):
    return [_to_python(v) for v in x]
  if isinstance(x, np.generic):
    return x.item()
  return x


def load_tfds(task: Task, split: str, data_dir: str = "") -> list[dict]:
  """Documents from a prepared tfds dataset (ArrayRecord; read without TensorFlow, never
  downloaded), in the task's layout."""
  if not task.tfds_name:
    raise TaskError(f"task {task.name} has no dataset in the TFDS catalog; use "
                    f"eval.task_source=local with JSONL files of the Hugging Face dataset "
                    f"(docs/eval.md)")
  import tensorflow_datasets as tfds
  tfds_split = dict(task.tfds_splits).get(split, split)
  try:
    source = tfds.data_source(task.tfds_name, split=tfds_split, data_dir=data_dir or None,
                              download=False)
    examples = [source[i] for i in range(len(source))]
  except Exception as e:  # tfds raises assorted types for a dataset that is not prepared
    raise TaskError(f"tfds dataset {task.tfds_name} split {tfds_split} is not prepared"
                    f"{' under ' + data_dir if data_dir else ''} ({type(e).__name__}: "
                    f"{str(e)[:300]}); prepare it once where it can be downloaded: `tfds build "
                    f"{task.tfds_name} --file_format array_record` (then set "
                    f"eval.tfds_data_dir), or use local JSONL files") from e
  docs = [task.from_tfds(_to_python(ex)) for ex in examples]
  for i, doc in enumerate(docs):
    check_doc(task, doc, f"tfds {task.tfds_name}[{tfds_split}][{i}]")
  return docs


@dataclasses.dataclass
class TaskData:
  task: Task
  docs: list[dict]
  fewshot_pool: list[dict]
  source: str
  pool_is_eval: bool  # k-shot examples come from the evaluated documents themselves
  name: str = ""  # the name results are reported under (default: the task's)


def parse_task_list(spec: str) -> list[tuple[str, str]]:
  """'paper,mc=my.jsonl' -> [(name, file or "")]; `paper` expands to the paper's nine."""
  out = []
  for item in (s.strip() for s in spec.split(",")):
    if not item:
      continue
    name, _, path = item.partition("=")
    name = name.strip()
    if name == "paper":
      out += [(t, "") for t in PAPER_TASKS]
    elif name == "fixture":
      out.append(("fixture", path or os.path.join(DATA_DIR, "fixture.jsonl")))
    elif name in TASKS:
      out.append((name, path.strip()))
    else:
      import difflib
      near = difflib.get_close_matches(name, list(TASKS) + ["fixture", "paper"], n=3)
      hint = f"; did you mean {' or '.join(near)}?" if near else ""
      raise TaskError(f"unknown task {name!r}{hint} Known tasks: fixture, paper, "
                      f"{', '.join(TASKS)}; NAME=FILE.jsonl reads a task from one file")
  if not out:
    raise TaskError(f"eval.tasks={spec!r} names no task")
  return out


def load_task(name: str, path: str = "", *, source: str = "local", task_dir: str = "",
              tfds_data_dir: str = "", num_fewshot: int = 0) -> TaskData:
  """A task's evaluation documents and its pool of k-shot examples."""
  task = TASKS["mc"] if name == "fixture" else TASKS[name]
  if path:  # one file: it is both the evaluated split and the k-shot pool
    docs = read_jsonl(path, task)
    return TaskData(task, docs, docs, path, pool_is_eval=True, name=name)
  if source == "tfds":
    docs = load_tfds(task, task.eval_split, tfds_data_dir)
    pool = (load_tfds(task, task.fewshot_split, tfds_data_dir) if num_fewshot else [])
    return TaskData(task, docs, pool, f"tfds:{task.tfds_name}",
                    pool_is_eval=task.fewshot_split == task.eval_split)
  if not task_dir:
    raise TaskError(f"task {name} needs data: set eval.task_dir to a folder of JSONL files, "
                    f"give {name}=FILE.jsonl, or set eval.task_source=tfds")
  eval_path = task_file(task_dir, name, task.eval_split)
  docs = read_jsonl(eval_path, task)
  pool = []
  if num_fewshot:
    pool = read_jsonl(task_file(task_dir, name, task.fewshot_split), task)
  return TaskData(task, docs, pool, eval_path,
                  pool_is_eval=task.fewshot_split == task.eval_split)


# --------------------------------------------------------------------------------------------
# Prompts


def solved_example(task: Task, doc: dict) -> str:
  """A k-shot example: question, target delimiter, right answer."""
  gold = task.gold(doc)
  if task.partial:
    return task.choices(doc)[gold] + " " + task.text(doc)
  return task.text(doc) + " " + task.choices(doc)[gold]


def fewshot_examples(data: TaskData, num_fewshot: int, seed: int,
                     docs: Sequence[dict] | None = None) -> list[list[dict]]:
  """The k-shot examples of each evaluated document, deterministic in `seed`.

  One `random.Random(seed)` serves the whole task in document order; when the pool is the
  evaluated split, k + 1 are drawn and the document itself is dropped (as the harness does).
  """
  docs = data.docs if docs is None else docs
  if num_fewshot == 0:
    return [[] for _ in docs]
  task, pool = data.task, data.fewshot_pool
  if task.fewshot == "first_n":
    out = []
    for doc in docs:
      same = [ex for ex in pool if task.group(ex) == task.group(doc) and ex != doc]
      if len(same) < num_fewshot:
        raise TaskError(f"{task.name}: {num_fewshot}-shot needs {num_fewshot} examples of "
                        f"group {task.group(doc)!r} in the {task.fewshot_split} split, found "
                        f"{len(same)}")
      out.append(same[:num_fewshot])
    return out
  need = num_fewshot + (1 if data.pool_is_eval else 0)
  if len(pool) < need:
    raise TaskError(f"{task.name}: {num_fewshot}-shot needs {need} documents in the k-shot "
                    f"pool ({task.fewshot_split} split), found {len(pool)}")
  rng = random.Random(seed)
  out = []
  for doc in docs:
    drawn = rng.sample(pool, need)
    out.append([ex for ex in drawn if ex != doc][:num_fewshot])
  return out


@dataclasses.dataclass(frozen=True)
class Prompt:
  requests: tuple[tuple[str, str], ...]  # (context, continuation), one per choice
  choices: tuple[str, ...]  # acc_norm divides by these strings' character lengths
  gold: int


def build_prompt(task: Task, doc: dict, examples: Sequence[dict] = ()) -> Prompt:
  prefix = task.description(doc) if task.description else ""
  prefix += "".join(solved_example(task, ex) + "\n\n" for ex in examples)
  choices = task.choices(doc)
  if task.partial:
    requests = tuple((prefix + c, " " + task.text(doc)) for c in choices)
  else:
    requests = tuple((prefix + task.text(doc), " " + c) for c in choices)
  return Prompt(requests, tuple(choices), task.gold(doc))


# --------------------------------------------------------------------------------------------
# Scoring and metrics

LogLikelihood = Callable[[Sequence[tuple[str, str]]], Sequence[tuple[float, bool]]]


def choice_metrics(lls: Sequence[float], choices: Sequence[str], gold: int) -> dict:
  """acc: the most likely choice is right; acc_norm: the same per character of the choice."""
  lls = np.asarray(lls, np.float64)
  lengths = np.asarray([float(len(c)) for c in choices])
  return {"acc": float(np.argmax(lls) == gold),
          "acc_norm": float(np.argmax(lls / lengths) == gold)}


def _stderr(values: Sequence[float]) -> float:
  n = len(values)
  return float(np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")


def evaluate_task(data: TaskData, loglikelihood: LogLikelihood, *, num_fewshot: int = 0,
                  seed: int = 1234, limit: int = 0) -> dict:
  """Scores every document of a task; returns metrics, their standard errors and counts."""
  task = data.task
  docs = data.docs[:limit] if limit else data.docs
  prompts = [build_prompt(task, doc, examples)
             for doc, examples in zip(docs, fewshot_examples(data, num_fewshot, seed, docs))]
  flat = [r for p in prompts for r in p.requests]
  results = list(loglikelihood(flat))
  if len(results) != len(flat):
    raise RuntimeError(f"{task.name}: {len(flat)} requests gave {len(results)} answers")
  per_doc = {m: [] for m in task.metrics}
  start = 0
  for p in prompts:
    lls = [lp for lp, _ in results[start:start + len(p.requests)]]
    start += len(p.requests)
    scores = choice_metrics(lls, p.choices, p.gold)
    for m in task.metrics:
      per_doc[m].append(scores[m])
  out = {"task": data.name or task.name, "n": len(docs), "num_fewshot": num_fewshot,
         "source": data.source, "paper_metric": task.paper_metric}
  for m in task.metrics:
    out[m] = float(np.mean(per_doc[m]))
    out[f"{m}_stderr"] = _stderr(per_doc[m])
  return out


# --------------------------------------------------------------------------------------------
# Reporting beside the paper (REFERENCE.md section 6: 0-shot averages of the nine tasks)

PAPER_SIZES = {(12, 768): "small", (24, 1024): "medium", (36, 1280): "large", (48, 1600): "xl"}
PAPER_AVERAGE_0SHOT = {"small": {"mha": 46.19, "tpa": 46.21},
                       "medium": {"mha": 50.11, "tpa": 51.41},
                       "large": {"mha": 52.52, "tpa": 53.10},
                       "xl": {"mha": 54.49, "tpa": 55.01}}


def paper_size(model_cfg) -> str | None:
  return PAPER_SIZES.get((model_cfg.num_layers, model_cfg.d_model))


def format_table(results: Sequence[dict], model_cfg=None) -> str:
  """A text table of task results; the paper's 0-shot average beside ours when comparable."""
  lines = [f"{'task':<16}{'n':>7}{'shots':>6}{'acc':>9}{'acc_norm':>10}{'paper metric':>15}",
           "-" * 63]
  for r in results:
    norm = f"{100 * r['acc_norm']:.2f}" if "acc_norm" in r else "-"
    lines.append(f"{r['task']:<16}{r['n']:>7}{r['num_fewshot']:>6}{100 * r['acc']:>9.2f}"
                 f"{norm:>10}{r['paper_metric']:>10} {100 * r[r['paper_metric']]:.2f}")
  names = {r["task"] for r in results}
  if names >= set(PAPER_TASKS):
    paper = [r for r in results if r["task"] in PAPER_TASKS]
    avg = float(np.mean([100 * r[r["paper_metric"]] for r in paper]))
    shots = {r["num_fewshot"] for r in paper}
    lines.append("-" * 63)
    lines.append(f"average of the paper's nine tasks (its metric each): {avg:.2f}")
    size = paper_size(model_cfg) if model_cfg is not None else None
    if size and shots == {0}:
      ref = PAPER_AVERAGE_0SHOT[size]
      lines.append(f"paper, {size}, 0-shot (lm-eval 0.4.5): MHA {ref['mha']:.2f}, "
                   f"T6 {ref['tpa']:.2f}; ours ({model_cfg.attention}) {avg:.2f}")
  return "\n".join(lines)

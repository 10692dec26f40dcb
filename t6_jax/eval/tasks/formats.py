"""The task formats: how each task's documents (the field layout of the Hugging Face dataset
lm-evaluation-harness reads, e.g. ARC's {question, choices: {text, label}, answerKey}) become a
question, its choices and the right answer, and where each task lives in the TFDS catalog."""

from __future__ import annotations

import dataclasses
import re
from typing import Callable


class TaskError(ValueError):
  """A task name, task file or document is unusable; the message says how to fix it."""


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

"""Scoring a task: acc (the choice with the highest summed log-likelihood is right) and acc_norm
(the same per character of the choice), with their standard errors over documents."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from t6_jax.eval.tasks.documents import TaskData
from t6_jax.eval.tasks.prompts import build_prompt, fewshot_examples

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

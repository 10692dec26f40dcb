"""Prompts in lm-evaluation-harness 0.4 style: one (context, continuation) request per choice,
after k solved examples separated by blank lines.

The k-shot examples are drawn with one `random.Random(seed)` per task in document order (MMLU
takes the first k of its subject's dev split), so the same seed gives the same prompts.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Sequence

from t6_jax.eval.tasks.documents import TaskData
from t6_jax.eval.tasks.formats import Task, TaskError


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

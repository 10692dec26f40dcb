"""Reading a task's documents: JSONL files (one document per line, in the Hugging Face layout)
or prepared tfds datasets, each document checked against its task's format; nothing is
downloaded. Also the task list of `eval.tasks`."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from t6_jax import storage
from t6_jax.eval.tasks.formats import TASKS, Task, TaskError
from t6_jax.eval.tasks.paper import PAPER_TASKS

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")


def _isfile(path: str) -> bool:
  if storage.is_remote(path):
    return storage.exists(path) and not storage.isdir(path)
  return os.path.isfile(path)


def _join(folder: str, *parts: str) -> str:
  return storage.join(folder, *parts) if storage.is_remote(folder) else os.path.join(folder, *parts)


def read_jsonl(path: str, task: Task) -> list[dict]:
  """Documents of `task` from a JSONL file, each checked for the task's fields."""
  storage.check(path, "task file")
  if not _isfile(path):
    raise TaskError(f"task file {path!r} for {task.name} does not exist")
  docs = []
  if storage.is_remote(path):
    lines = storage.read_text(path).splitlines(keepends=True)
  else:
    with open(path, encoding="utf-8") as f:
      lines = f.readlines()
  for line_no, line in enumerate(lines, 1):
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
  storage.check(task_dir, "eval.task_dir")
  candidates = [_join(task_dir, name, f"{split}.jsonl"),
                _join(task_dir, f"{name}.{split}.jsonl"),
                _join(task_dir, f"{name}_{split}.jsonl")]
  for path in candidates:
    if _isfile(path):
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
  from t6_jax.data.sources import tfds_data_dir, tfds_prepared_dir
  tfds_split = dict(task.tfds_splits).get(split, split)
  try:
    source = tfds.data_source(task.tfds_name, split=tfds_split, data_dir=data_dir or None,
                              download=False)
    examples = [source[i] for i in range(len(source))]
  except Exception as e:  # tfds raises assorted types for a dataset that is not prepared
    where = tfds_data_dir(data_dir)
    # Not there at all: say so plainly; else (another file format, a damaged copy) show why.
    why = ("" if tfds_prepared_dir(task.tfds_name, where) is None
           else f" ({type(e).__name__}: {str(e)[:300]})")
    raise TaskError(f"tfds dataset {task.tfds_name} split {tfds_split} is not prepared under "
                    f"{where}{why}; prepare it once where it can be downloaded: `tfds build "
                    f"{task.tfds_name} --data_dir DIR --file_format array_record` (then set "
                    f"eval.tfds_data_dir=DIR), or use local JSONL files "
                    f"(eval.task_source=local)") from e
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
      hint = f" (did you mean {' or '.join(near)}?)" if near else ""
      raise TaskError(f"unknown task {name!r}{hint}; known tasks: fixture, paper, "
                      f"{', '.join(TASKS)}; TASK=FILE.jsonl reads one of them from a file "
                      f"(mc=FILE.jsonl: any multiple-choice file in the generic format)")
  if not out:
    raise TaskError(f"eval.tasks={spec!r} names no task")
  return out


def load_tasks(spec: str, eval_cfg) -> list[TaskData]:
  """The documents of every task a list in eval.tasks syntax names, read with the eval.*
  settings `eval_cfg` (source, task_dir, tfds_data_dir, num_fewshot)."""
  return [load_task(name, path, source=eval_cfg.task_source,
                    task_dir=os.path.expanduser(eval_cfg.task_dir),
                    tfds_data_dir=eval_cfg.tfds_data_dir, num_fewshot=eval_cfg.num_fewshot)
          for name, path in parse_task_list(spec)]


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

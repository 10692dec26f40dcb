"""Writes the paper's nine tasks as local JSONL files, once, on a machine with internet access.

  python -m t6_jax.eval.download --out ~/mc_tasks [--tasks arc_easy,mmlu]

Reads the Hugging Face datasets lm-evaluation-harness reads (needs the `datasets` package, which
lm-eval installs) and writes OUT/NAME/SPLIT.jsonl for the evaluated split and the k-shot split,
the layout `eval.task_dir` expects. Nothing else in t6_jax downloads task data.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from t6_jax import storage
from t6_jax.eval.tasks import PAPER_TASKS, TASKS

# (Hugging Face dataset, config) per task, as in lm-evaluation-harness's task YAMLs.
HF_DATASETS = {
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge"),
    "boolq": ("aps/super_glue", "boolq"),
    "hellaswag": ("Rowan/hellaswag", None),
    "openbookqa": ("allenai/openbookqa", "main"),
    "piqa": ("baber/piqa", None),
    "winogrande": ("allenai/winogrande", "winogrande_xl"),
    "mmlu": ("cais/mmlu", "all"),
    "sciq": ("allenai/sciq", None),
}


def download(out: str, names=PAPER_TASKS) -> list[str]:
  from datasets import load_dataset
  written = []
  for name in names:
    path, config = HF_DATASETS[name]
    task = TASKS[name]
    for split in dict.fromkeys((task.eval_split, task.fewshot_split)):
      target = storage.join(out, name, f"{split}.jsonl")
      ds = load_dataset(path, config, split=split)
      with tempfile.TemporaryDirectory() as tmp:  # written locally, then copied (gs:// too)
        local = os.path.join(tmp, f"{split}.jsonl")
        ds.to_json(local, lines=True, force_ascii=False)
        storage.copy(local, target)
      print(f"{name}: {len(ds)} documents -> {target}")
      written.append(target)
  return written


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m t6_jax.eval.download", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="folder for NAME/SPLIT.jsonl files")
  parser.add_argument("--tasks", default=",".join(PAPER_TASKS), help="comma list of tasks")
  args = parser.parse_args(argv)
  names = [n.strip() for n in args.tasks.split(",") if n.strip()]
  unknown = [n for n in names if n not in HF_DATASETS]
  if unknown:
    print(f"error: unknown task(s) {', '.join(unknown)}; choose from {', '.join(HF_DATASETS)}",
          file=sys.stderr)
    return 2
  try:
    import datasets  # noqa: F401
  except ImportError:
    print("error: needs the `datasets` package: pip install 't6-jax[eval]'", file=sys.stderr)
    return 2
  try:
    storage.check(args.out, "--out")
  except storage.StorageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  download(args.out, names)
  return 0


if __name__ == "__main__":
  sys.exit(main())

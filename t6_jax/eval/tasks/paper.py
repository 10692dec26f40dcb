"""The paper's nine tasks and its reported 0-shot averages, and the results table that puts ours
beside them (docs/model.md, "Evaluation in the paper")."""

from __future__ import annotations

from typing import Sequence

import numpy as np

PAPER_TASKS = ("arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa", "piqa",
               "winogrande", "mmlu", "sciq")
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

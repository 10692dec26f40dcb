"""Evaluation: validation loss / perplexity / bits per byte, multiple-choice tasks in
lm-evaluation-harness style, and an lm-eval adapter (`t6_jax.eval.harness`)."""

from t6_jax.eval.scoring import Scorer, TextScorer, encode_pair, rolling_windows  # noqa: F401
from t6_jax.eval.tasks import (PAPER_TASKS, TASKS, TaskError, build_prompt,  # noqa: F401
                               evaluate_task, fewshot_examples, format_table, load_task,
                               parse_task_list)

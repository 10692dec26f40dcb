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

Modules: `formats` (the tasks), `documents` (reading them; the `eval.tasks` list), `prompts`,
`metrics` (scoring a task) and `paper` (the paper's tasks, numbers and the results table).
"""

from t6_jax.eval.tasks.documents import (DATA_DIR, TaskData, check_doc,  # noqa: F401
                                         load_task, load_tasks, load_tfds, parse_task_list,
                                         read_jsonl,
                                         task_file)
from t6_jax.eval.tasks.formats import TASKS, Task, TaskError  # noqa: F401
from t6_jax.eval.tasks.metrics import LogLikelihood, choice_metrics, evaluate_task  # noqa: F401
from t6_jax.eval.tasks.paper import (PAPER_AVERAGE_0SHOT, PAPER_SIZES,  # noqa: F401
                                     PAPER_TASKS, format_table, paper_size)
from t6_jax.eval.tasks.prompts import (Prompt, build_prompt, fewshot_examples,  # noqa: F401
                                       solved_example)

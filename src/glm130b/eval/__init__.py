"""Zero-shot evaluation: GLM-130B's task types (mul, gen, lm) plus the harness-style ll.

    from glm130b.eval import evaluate
    results = evaluate(model, tokenizer, ["lambada_openai", "mmlu"], limit=100)

See docs/eval.md for the task list, the scoring rules and the decisions behind them.
"""

from glm130b.eval.formats import BLANK, READERS, DataError, Item, read_items
from glm130b.eval.runner import evaluate, results_table, run_command
from glm130b.eval.scoring import Row, choice_row, score_rows, single_token_row
from glm130b.eval.tasks import (
    TaskConfig,
    TaskError,
    TaskResult,
    available_tasks,
    load_items,
    load_task,
    run_task,
)

__all__ = [
    "BLANK", "READERS", "DataError", "Item", "read_items",
    "evaluate", "results_table", "run_command",
    "Row", "choice_row", "score_rows", "single_token_row",
    "TaskConfig", "TaskError", "TaskResult", "available_tasks", "load_items", "load_task", "run_task",
]

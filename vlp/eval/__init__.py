"""Evaluation suites: see vlp/eval/tasks.py for the evaluator interface and the task registry."""

from .tasks import (
    DatasetSpec,
    EvalContext,
    EvalOptionError,
    Figure,
    TaskResult,
    check_options,
    get_task,
    parse_options,
    register_task,
    run_task,
    task_names,
)
from .zeroshot import build_classifier, classification_metrics, evaluate_zeroshot, run_zeroshot

__all__ = [
    "DatasetSpec", "EvalContext", "EvalOptionError", "Figure", "TaskResult", "build_classifier", "check_options",
    "classification_metrics", "evaluate_zeroshot", "get_task", "parse_options", "register_task", "run_task",
    "run_zeroshot", "task_names",
]

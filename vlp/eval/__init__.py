"""Evaluation suites: see vlp/eval/tasks.py for the evaluator interface and the task registry."""

from .tasks import DatasetSpec, EvalContext, Figure, TaskResult, get_task, register_task, run_task, task_names
from .zeroshot import build_classifier, classification_metrics, evaluate_zeroshot, run_zeroshot

__all__ = [
    "DatasetSpec", "EvalContext", "Figure", "TaskResult", "build_classifier", "classification_metrics",
    "evaluate_zeroshot", "get_task", "register_task", "run_task", "run_zeroshot", "task_names",
]

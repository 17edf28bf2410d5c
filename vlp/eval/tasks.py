"""The evaluator interface and the task registry behind `python -m vlp.eval` and `evals:`.

An evaluator is a plain function

    evaluate(model, tokenizer, preprocess, spec: DatasetSpec, ctx: EvalContext) -> TaskResult

* `model` is a vlp CLIP (or anything with `encode_image` / `encode_text`), already on
  `ctx.device` and in eval mode; `tokenizer` maps a list of strings to token ids;
  `preprocess` is the checkpoint's PreprocessConfig (image size, mean, std, interpolation).
* `spec` names the dataset and its knobs (split, max_samples, batch_size, options).
* `ctx` says where it runs: device, rank and world size (every rank calls the evaluator; split
  the data with `vlp.eval.common.shard` and gather with `gather_rows` so each sample is scored
  exactly once), loader workers, an optional cache directory and checkpoint fingerprint, and
  whether figures are wanted (False inside training).
* It returns `TaskResult(metrics, figures, details)`: metrics are flat `{name: float | int}`
  (the same on every rank; shown in tables and logged in training); details are any JSON-able
  extras (per-class scores) written to results.json only; figures are `Figure(title, draw, caption)` whose `draw()` returns a
  matplotlib Figure. Drawing is deferred, so figures cost nothing unless a report is written.

Registering a task is one line in `_BUILTIN` (module:function, imported on first use), or
`register_task("name", fn)` at run time.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class DatasetSpec:
    """Which data an evaluator reads: a built-in name or a local path, plus per-run knobs."""

    name: str
    split: str = "test"
    max_samples: int = 0  # 0: the whole split
    batch_size: int = 256
    options: dict[str, Any] = field(default_factory=dict)  # task-specific (e.g. linear_probe k_shot)


@dataclass
class EvalContext:
    """Where and how an evaluator runs (same object on every rank apart from `rank`)."""

    device: torch.device | str = "cpu"
    rank: int = 0
    world_size: int = 1
    workers: int = 0
    cache_dir: Path | None = None  # where reusable artefacts (zero-shot classifiers) may be stored
    checkpoint_id: str | None = None  # fingerprint of the weights; None disables caching
    figures: bool = True
    seed: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class Figure:
    """A picture for the report; `draw()` builds and returns a matplotlib Figure on demand."""

    title: str
    draw: Callable[[], Any]
    caption: str = ""


@dataclass
class TaskResult:
    """Scalar `metrics` (tables, training logs), `figures` (the report) and JSON-able `details`
    (per-class numbers, confusion matrices: written to results.json only)."""

    metrics: dict[str, float | int]
    figures: list[Figure] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


Evaluator = Callable[[Any, Any, Any, DatasetSpec, EvalContext], TaskResult]

# task name -> "module:function"; one line per task
_BUILTIN: dict[str, str] = {
    "zeroshot": "vlp.eval.zeroshot:evaluate",
    "retrieval": "vlp.eval.retrieval:evaluate",
    "linear_probe": "vlp.eval.linear_probe:evaluate",
    "segmentation": "vlp.eval.segmentation_task:evaluate",  # adapter over vlp/eval/segmentation.py
}
_REGISTERED: dict[str, Evaluator] = {}


class UnknownTaskError(ValueError):
    pass


def register_task(name: str, fn: Evaluator) -> None:
    _REGISTERED[name] = fn


def task_names() -> list[str]:
    return sorted(set(_BUILTIN) | set(_REGISTERED))


def get_task(name: str) -> Evaluator:
    """The evaluator for a task name; an unknown or unavailable task raises, naming it."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in _BUILTIN:
        raise UnknownTaskError(f"unknown eval task '{name}' (known: {', '.join(task_names())})")
    module, fn = _BUILTIN[name].split(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("vlp."):
            raise
        raise UnknownTaskError(f"eval task '{name}' is not available in this install ({e.name} is missing)") from None
    return getattr(mod, fn)


def run_task(name: str, model: Any, tokenizer: Any, preprocess: Any, spec: DatasetSpec,
             ctx: EvalContext) -> TaskResult:
    """Run one task on one dataset with the model in eval mode (restored afterwards).

    Gradients are not switched off here: an evaluator that fits a head (linear probe,
    segmentation probe) needs them; forward passes of the model use `torch.inference_mode`.
    """
    fn = get_task(name)
    was_training = model.training
    model.eval()
    try:
        return fn(model, tokenizer, preprocess, spec, ctx)
    finally:
        model.train(was_training)

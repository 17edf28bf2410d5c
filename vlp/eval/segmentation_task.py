"""The dense evaluator of `vlp/eval/segmentation.py` as the `segmentation` task (see vlp.eval.tasks).

Options: `SegmentationOptions` below (`DatasetSpec.options`, `evals.NAME.options`,
`--option segmentation.KEY=VALUE`; `python -m vlp.eval` fills `train_split` / `train_samples` from
--train-split / --train-samples). Every keyword of `evaluate_segmentation` is an option:
`modes` (a list or comma string of zeroshot, linear_probe, denseclip), `train_split`, `train_samples`,
`background` and `bg_threshold`, `dense` (zero-shot patch embeddings: maskclip or tokens), the
probe's `probe_epochs`, `probe_lr`, `probe_weight_decay`, `probe_balance`, `finetune_steps`,
`denseclip` (a mapping of further `finetune_denseclip` keywords, e.g. `{lr: 1e-3, batch_size: 32}`,
keys and value types checked against its signature), `num_examples`, and `examples` (a PNG path:
rank 0 writes image | ground truth | each mode's prediction per row, the picture of docs/dense.md).
Metrics are prefixed by mode: `zeroshot/miou`, `zeroshot/miou_fg`, `zeroshot/pixel_accuracy`; the
per-class IoU and confusion matrix of each mode go to `details` (results.json). Under torchrun the
test set (and the probe's train set) is split across ranks and the confusion matrices summed, so each
image counts once and the metrics are the same on every rank.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from vlp.data.segmentation import SegmentationDataset, load_segmentation_dataset
from vlp.eval.common import load_once
from vlp.eval.segmentation import (
    BACKGROUNDS,
    DENSE_READOUTS,
    MODES,
    evaluate_segmentation,
    examples_image,
    finetune_denseclip,
)
from vlp.eval.tasks import (
    DatasetSpec,
    EvalContext,
    EvalOptionError,
    Figure,
    TaskResult,
    check_keys,
    coerce_option,
    typed_options,
)

# finetune_denseclip keywords the task sets itself
_DENSECLIP_FIXED = {"model", "tokenizer", "train", "steps", "device"}


def denseclip_keys() -> dict[str, Any]:
    """The `denseclip` option's keys and their types: finetune_denseclip's other keywords."""
    hints = typing.get_type_hints(finetune_denseclip)
    return {k: hints.get(k, Any) for k in inspect.signature(finetune_denseclip).parameters
            if k not in _DENSECLIP_FIXED}


@dataclass(frozen=True)
class SegmentationOptions:
    """Options of the `segmentation` task; each but the first four is the `evaluate_segmentation`
    keyword of the same name (`denseclip` is its `denseclip_options`), with its default."""

    modes: tuple[str, ...] = ("zeroshot", "linear_probe")
    train_split: str = "train"  # the probe's / DenseCLIP's train split
    train_samples: int = 0  # train scenes; 0: the loader's default
    examples: str | None = None  # a PNG path for the examples grid (rank 0)
    background: str = "prompt"  # zero-shot: prompt | threshold | none
    bg_threshold: float = 0.5  # zero-shot with background=threshold
    dense: str = "maskclip"  # zero-shot patch embeddings: maskclip | tokens
    probe_epochs: int = 30
    probe_lr: float = 1e-2
    probe_weight_decay: float = 1e-4
    probe_balance: float = 0.5
    finetune_steps: int = 1000  # denseclip
    denseclip: dict[str, Any] = field(default_factory=dict)  # further finetune_denseclip keywords
    num_examples: int = 4

    def __post_init__(self) -> None:
        def refuse(key: str, value: Any, known: tuple[str, ...]) -> None:
            raise EvalOptionError(f"eval task 'segmentation': option '{key}' must be one of {', '.join(known)}, "
                                  f"got {value!r}")

        for m in self.modes:
            if m not in MODES:
                refuse("modes", m, MODES)
        if self.background not in BACKGROUNDS:
            refuse("background", self.background, BACKGROUNDS)
        if self.dense not in DENSE_READOUTS:
            refuse("dense", self.dense, tuple(DENSE_READOUTS))
        known = denseclip_keys()
        check_keys("segmentation", self.denseclip, known, what="'denseclip' key")
        typed = {k: coerce_option("segmentation", f"denseclip.{k}", v, known[k]) for k, v in self.denseclip.items()}
        object.__setattr__(self, "denseclip", typed)


def _dataset(name: str, split: str, max_samples: int) -> SegmentationDataset:
    return load_once(load_segmentation_dataset, name, split, max_samples)


def _examples_figure(title: str, full: dict[str, dict[str, Any]], num_classes: int) -> Figure:
    def draw():
        import matplotlib.pyplot as plt

        grid = examples_image(full, num_classes)
        fig, ax = plt.subplots(figsize=(min(12.0, 1.6 * (2 + len(full))), min(12.0, 1.6 * len(full[next(iter(full))]["examples"]))))
        ax.imshow(grid)
        ax.set_axis_off()
        fig.tight_layout()
        return fig

    return Figure(title, draw, "per row: image | ground truth | " + " | ".join(full) + " (colours: classes, black: background)")


def _iou_bars(title: str, full: dict[str, dict[str, Any]]) -> Figure:
    def draw():
        import matplotlib.pyplot as plt

        names = list(next(iter(full.values()))["per_class_iou"])
        fig, ax = plt.subplots(figsize=(min(14.0, 2 + 0.45 * len(names) * len(full)), 3.5))
        width = 0.8 / len(full)
        for j, (mode, res) in enumerate(full.items()):
            vals = [100 * np.nan_to_num(res["per_class_iou"][n]) for n in names]
            ax.bar(np.arange(len(names)) + j * width, vals, width, label=f"{mode} (mIoU {100 * res['miou']:.1f})")
        ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("IoU (%)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        return fig

    return Figure(title, draw, "per-class IoU for each mode")


def evaluate(model: nn.Module, tokenizer, pre, spec: DatasetSpec, ctx: EvalContext) -> TaskResult:
    opts = typed_options("segmentation", SegmentationOptions, spec.options)
    modes = list(opts.modes)
    test = _dataset(spec.name, spec.split, spec.max_samples)
    needs_train = {"linear_probe", "denseclip"} & set(modes)
    train = _dataset(spec.name, opts.train_split, opts.train_samples) if needs_train else None
    extra = {k: getattr(opts, k) for k in ("background", "bg_threshold", "dense", "probe_epochs", "probe_lr",
                                           "probe_weight_decay", "probe_balance", "finetune_steps", "num_examples")}
    extra["denseclip_options"] = dict(opts.denseclip)
    metrics: dict[str, float | int] = {}
    full: dict[str, dict[str, Any]] = {}
    details: dict[str, Any] = {}
    for mode in modes:
        # seeded probe / fine-tune init, without disturbing the caller's (training's) RNG stream
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)
            res = full[mode] = evaluate_segmentation(model, tokenizer, test, mode, spec.batch_size, ctx.device,
                                                     train_dataset=train, ctx=ctx, **extra)
        metrics.update({f"{mode}/miou": res["miou"], f"{mode}/miou_fg": res["miou_fg"],
                        f"{mode}/pixel_accuracy": res["pixel_accuracy"]})
        details[mode] = {"per_class_iou": res["per_class_iou"], "confusion_matrix": res["confusion_matrix"]}
    metrics["num_samples"] = len(test)
    if opts.examples and ctx.is_main and full:
        from PIL import Image

        Image.fromarray(examples_image(full, test.num_classes)).save(opts.examples)
    figures = []
    if ctx.figures and full:
        figures.append(_examples_figure(f"segmentation maps: {spec.name} ({spec.split})", full, test.num_classes))
        figures.append(_iou_bars(f"per-class IoU: {spec.name} ({spec.split})", full))
    return TaskResult(metrics, figures, details)

"""The dense evaluator of `vlp/eval/segmentation.py` as the `segmentation` task (see vlp.eval.tasks).

Options (`DatasetSpec.options`, `evals.NAME.options`, or the CLI's defaults):
`modes` (list or comma string of zeroshot, linear_probe, denseclip; default zeroshot,linear_probe),
`train_split` (default train), `train_samples` (0: the loader's default), `background`, `dense` (zero-shot
patch embeddings: maskclip, the default, or tokens), `finetune_steps`,
`denseclip` (a mapping of further `finetune_denseclip` keywords, e.g. `{lr: 1e-3, batch_size: 32}`),
`num_examples` (default 4) and `examples` (a PNG path: rank 0 writes image | ground truth | each mode's
prediction per row, the picture of docs/dense.md).
Metrics are prefixed by mode: `zeroshot/miou`, `zeroshot/miou_fg`, `zeroshot/pixel_accuracy`; the per-class IoU and confusion matrix of each mode go to `details` (results.json). Under torchrun the test
set (and the probe's train set) is split across ranks and the confusion matrices summed, so each image
counts once and the metrics are the same on every rank.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
from torch import nn

from vlp.data.segmentation import SegmentationDataset, load_segmentation_dataset
from vlp.eval.common import load_once
from vlp.eval.segmentation import evaluate_segmentation, examples_image, finetune_denseclip
from vlp.eval.tasks import DatasetSpec, EvalContext, Figure, TaskResult


def _dataset(name: str, split: str, max_samples: int) -> SegmentationDataset:
    return load_once(load_segmentation_dataset, name, split, max_samples)


def _modes(value: Any) -> list[str]:
    items = value.split(",") if isinstance(value, str) else list(value)
    return [m.strip() for m in items if m.strip()]


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
    opts = dict(spec.options)
    modes = _modes(opts.get("modes", "zeroshot,linear_probe"))
    test = _dataset(spec.name, spec.split, spec.max_samples)
    needs_train = {"linear_probe", "denseclip"} & set(modes)
    train = _dataset(spec.name, opts.get("train_split", "train"), int(opts.get("train_samples", 0))) if needs_train else None
    extra = {k: opts[k] for k in ("background", "finetune_steps", "num_examples", "dense") if k in opts}
    if "denseclip" in opts:
        if not isinstance(opts["denseclip"], dict):
            raise ValueError(f"segmentation option 'denseclip' must be a mapping, got {opts['denseclip']!r}")
        known = set(inspect.signature(finetune_denseclip).parameters) - {"model", "tokenizer", "train", "steps", "device"}
        unknown = sorted(set(opts["denseclip"]) - known)
        if unknown:
            raise ValueError(f"unknown segmentation.denseclip key(s) {unknown} (known: {', '.join(sorted(known))})")
        extra["denseclip_options"] = dict(opts["denseclip"])
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
    if opts.get("examples") and ctx.is_main and full:
        from PIL import Image

        Image.fromarray(examples_image(full, test.num_classes)).save(str(opts["examples"]))
    figures = []
    if ctx.figures and full:
        figures.append(_examples_figure(f"segmentation maps: {spec.name} ({spec.split})", full, test.num_classes))
        figures.append(_iou_bars(f"per-class IoU: {spec.name} ({spec.split})", full))
    return TaskResult(metrics, figures, details)

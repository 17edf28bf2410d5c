"""Zero-shot classification: class names x templates -> text classifier -> top-1 / top-5 / mean recall.

Metrics follow CLIP_benchmark's definitions: top-k accuracy over samples, and mean per-class
recall (balanced accuracy). Under a process group the images are split across ranks and the
features gathered, so each sample is scored exactly once. The text classifier (a prompt
ensemble: the mean of each class's normalized prompt embeddings) is cached on disk per
checkpoint fingerprint, class names and templates when the context has a cache directory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlp.data.datasets import EvalDataset, load_eval_dataset
from vlp.eval.common import (
    cached,
    cached_image_features,
    dataset_key,
    encode_images,
    encode_text_kind,
    load_once,
    make_context,
    text_prefix,
)
from vlp.eval.tasks import DatasetSpec, EvalContext, Figure, TaskResult, typed_options
from vlp.models.config import PreprocessConfig


@dataclass(frozen=True)
class ZeroShotOptions:
    """Options of the `zeroshot` task."""

    # the prompts' prefix kind on a prefix-conditioned model (None or "": caption); refused on
    # a model without prefixes
    prefix: str | None = None


def fill_template(template: str, classname: str) -> str:
    return template.replace("{c}", classname) if "{c}" in template else template.format(classname)


def build_classifier(model: nn.Module, tokenizer, classnames: list[str], templates: list[str],
                     device: torch.device | str = "cpu", batch_size: int = 512,
                     kind: str | None = None) -> torch.Tensor:
    """[num_classes, embed_dim] unit-norm weights: the mean of each class's normalized prompt embeddings.

    All class x template prompts are encoded in large batches rather than one class at a time.
    `kind`: the prompts' prefix on a prefix-conditioned model (None: the model's default).
    """
    prompts = [fill_template(t, name) for name in classnames for t in templates]
    feats = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            tokens = tokenizer(prompts[start:start + batch_size]).to(device)
            feats.append(F.normalize(encode_text_kind(model, tokens, kind).float(), dim=-1))
    emb = torch.cat(feats).view(len(classnames), len(templates), -1).mean(1)
    return F.normalize(emb, dim=-1).clone()


def cached_classifier(model: nn.Module, tokenizer, classnames: list[str], templates: list[str],
                      ctx: EvalContext, kind: str | None = None) -> torch.Tensor:
    """build_classifier, cached under ctx.cache_dir per checkpoint fingerprint, class names, templates
    (and prefix kind)."""
    key = [classnames, templates] if kind is None else [classnames, templates, kind]
    clf = cached(ctx, "zeroshot_classifier", key,
                 lambda: build_classifier(model, tokenizer, classnames, templates, ctx.device, kind=kind))
    return clf.to(ctx.device)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """top-1, top-5 (top-k capped at the number of classes) and mean per-class recall."""
    k = min(5, num_classes)
    topk = logits.topk(k, dim=-1).indices
    correct = topk == labels[:, None]
    pred = topk[:, 0]
    recalls = []
    for c in range(num_classes):
        mask = labels == c
        if mask.any():
            recalls.append((pred[mask] == c).float().mean().item())
    return {
        "top1": correct[:, 0].float().mean().item(),
        "top5": correct.any(dim=-1).float().mean().item(),
        "mean_per_class_recall": sum(recalls) / max(1, len(recalls)),
        "num_samples": int(labels.numel()),
    }


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """[true, predicted] counts."""
    flat = labels.long() * num_classes + pred.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes).numpy()


def confusion_figure(title: str, cm: np.ndarray, classnames: list[str]) -> Figure:
    def draw():
        import matplotlib.pyplot as plt

        n = len(classnames)
        size = min(11.0, 2.0 + 0.35 * n)
        fig, ax = plt.subplots(figsize=(size, size))
        rows = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(n), classnames, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(n), classnames, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if n <= 20:
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rows[i, j] > 0.5 else "black")
        fig.tight_layout()
        return fig

    return Figure(title, draw, "rows: true class (colour = fraction of the row), columns: predicted class")


def zeroshot_predictions(model: nn.Module, tokenizer, data: EvalDataset, pre: PreprocessConfig,
                         batch_size: int = 256, device: torch.device | str = "cpu",
                         ctx: EvalContext | None = None, cache_key: str | None = None,
                         kind: str | None = None) -> torch.Tensor:
    """[N, num_classes] cosine logits for every image of `data`, in order, on every rank.

    With `cache_key` (see common.dataset_key) and a caching context, image features are reused.
    `kind`: the prompts' prefix on a prefix-conditioned model.
    """
    ctx = ctx or make_context(device)
    was_training = model.training
    model.eval()
    classifier = cached_classifier(model, tokenizer, data.classnames, data.templates, ctx, kind)
    if cache_key is None:
        feats = encode_images(model, data, pre, batch_size, ctx)
    else:
        feats = cached_image_features(model, data, pre, batch_size, ctx, cache_key)
    model.train(was_training)
    return feats @ classifier.cpu().t()


def evaluate_zeroshot(model: nn.Module, tokenizer, data: EvalDataset, pre: PreprocessConfig,
                      batch_size: int = 256, device: torch.device | str = "cpu",
                      ctx: EvalContext | None = None) -> dict[str, float]:
    logits = zeroshot_predictions(model, tokenizer, data, pre, batch_size, device, ctx)
    labels = torch.as_tensor(data.labels, dtype=torch.long)
    return classification_metrics(logits, labels, len(data.classnames))


def cached_dataset(name: str, split: str, max_samples: int) -> EvalDataset:
    """load_eval_dataset, memoized per process."""
    return load_once(load_eval_dataset, name, split, max_samples)


def run_zeroshot(model: nn.Module, tokenizer, dataset: str, split: str = "test", batch_size: int = 256,
                 max_samples: int = 0, device: torch.device | str = "cpu",
                 preprocess: PreprocessConfig | None = None) -> dict[str, float]:
    """Zero-shot eval on a named dataset; the dataset is loaded once per process and cached."""
    pre = preprocess or model.preprocess
    return evaluate_zeroshot(model, tokenizer, cached_dataset(dataset, split, max_samples), pre, batch_size, device)


def evaluate(model: nn.Module, tokenizer, pre: PreprocessConfig, spec: DatasetSpec, ctx: EvalContext) -> TaskResult:
    """Task entry point (see vlp.eval.tasks). Options: ZeroShotOptions; the prefix kind used is
    recorded in the details."""
    opts = typed_options("zeroshot", ZeroShotOptions, spec.options)
    kind = text_prefix(model, opts.prefix)
    data = cached_dataset(spec.name, spec.split, spec.max_samples)
    logits = zeroshot_predictions(model, tokenizer, data, pre, spec.batch_size, ctx.device, ctx,
                                  dataset_key(spec.name, spec.split, spec.max_samples), kind)
    labels = torch.as_tensor(data.labels, dtype=torch.long)
    metrics = classification_metrics(logits, labels, len(data.classnames))
    figures = []
    if ctx.figures:
        cm = confusion_matrix(logits.argmax(-1), labels, len(data.classnames))
        figures.append(confusion_figure(f"zero-shot confusion matrix: {spec.name} ({spec.split})", cm,
                                        data.classnames))
    return TaskResult(metrics, figures, {"text_prefix": kind} if kind is not None else {})

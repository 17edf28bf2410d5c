"""Linear probe: logistic regression on frozen, unit-norm image features.

The inverse regularization strength C is chosen on a validation split carved (stratified,
seeded) from the train split, then the probe is refit with that C on train + validation and
scored on the test split. Few-shot (`k_shot > 0`): k images per class are drawn (seeded) for
training and another disjoint k per class for choosing C; the refit uses the k-shot set only,
so the probe never sees more than k labelled images per class. Features are gathered from all
ranks exactly once; rank 0 fits (scikit-learn, L-BFGS) and broadcasts the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from vlp.eval.common import cached_image_features, dataset_key
from vlp.eval.tasks import DatasetSpec, EvalContext, TaskResult, typed_options
from vlp.eval.zeroshot import cached_dataset, classification_metrics, confusion_figure, confusion_matrix
from vlp.models.config import PreprocessConfig

DEFAULT_CS = (0.01, 0.1, 1.0, 10.0, 100.0)


@dataclass(frozen=True)
class LinearProbeOptions:
    """Options of the `linear_probe` task (`python -m vlp.eval` fills the first three from
    --k-shot, --train-split and --train-samples, `seed` from --seed)."""

    k_shot: int = 0  # k labelled train images per class; 0: the whole train split
    train_split: str = "train"
    train_samples: int = 0  # cap on the train split; 0: all
    val_fraction: float = 0.2  # share of train held out to choose C (k_shot 0)
    cs: tuple[float, ...] = DEFAULT_CS  # the inverse regularization strengths tried
    seed: int | None = None  # None: the context's seed


def _per_class_split(labels: np.ndarray, rng: np.random.Generator, take: int | float) -> tuple[np.ndarray, np.ndarray]:
    """(picked, rest) indices: per class, `take` items (int) or that fraction (float, at least 1)."""
    picked, rest = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n = take if isinstance(take, int) else max(1, int(round(take * len(idx))))
        n = min(n, len(idx) - 1) if len(idx) > 1 else 0
        picked.append(idx[:n])
        rest.append(idx[n:])
    return np.sort(np.concatenate(picked)), np.sort(np.concatenate(rest))


def fit_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, num_classes: int, k_shot: int = 0,
              val_fraction: float = 0.2, cs: tuple[float, ...] = DEFAULT_CS, seed: int = 0,
              max_iter: int = 1000) -> dict[str, Any]:
    """Choose C on a validation split of the train set, refit, and score the test set: returns
    {"C", "val_top1", "num_train", "scores": [num_test, num_classes] log-probabilities}."""
    from sklearn.linear_model import LogisticRegression

    if len(np.unique(y_train)) < 2:
        raise ValueError("linear probe needs at least two classes in the train split")
    rng = np.random.default_rng(seed)
    if k_shot > 0:
        fit_idx, rest = _per_class_split(y_train, rng, k_shot)
        val_pick, _ = _per_class_split(y_train[rest], rng, k_shot)
        val_idx, final_idx = rest[val_pick], fit_idx
    else:
        val_idx, fit_idx = _per_class_split(y_train, rng, val_fraction)
        final_idx = np.sort(np.concatenate([fit_idx, val_idx]))

    def fit(idx: np.ndarray, c: float) -> Any:
        return LogisticRegression(C=c, max_iter=max_iter).fit(x_train[idx], y_train[idx])

    val_acc = {c: float((fit(fit_idx, c).predict(x_train[val_idx]) == y_train[val_idx]).mean()) for c in cs}
    best = max(cs, key=lambda c: (val_acc[c], -c))  # ties: the stronger regularization
    clf = fit(final_idx, best)
    scores = np.full((len(x_test), num_classes), -np.inf, dtype=np.float64)
    scores[:, clf.classes_] = clf.predict_log_proba(x_test)  # classes absent from train never win
    return {"C": best, "val_top1": val_acc[best], "num_train": int(len(final_idx)), "scores": scores}


def evaluate(model: nn.Module, tokenizer, pre: PreprocessConfig, spec: DatasetSpec, ctx: EvalContext) -> TaskResult:
    """Task entry point (see vlp.eval.tasks). Options: LinearProbeOptions."""
    opts = typed_options("linear_probe", LinearProbeOptions, spec.options)
    train_split, train_samples = opts.train_split, opts.train_samples
    train = cached_dataset(spec.name, train_split, train_samples)
    test = cached_dataset(spec.name, spec.split, spec.max_samples)
    x_train = cached_image_features(model, train, pre, spec.batch_size, ctx,
                                    dataset_key(spec.name, train_split, train_samples)).numpy()
    x_test = cached_image_features(model, test, pre, spec.batch_size, ctx,
                                   dataset_key(spec.name, spec.split, spec.max_samples)).numpy()
    result: list[Any] = [None]
    if ctx.is_main:
        result[0] = fit_probe(x_train, np.asarray(train.labels), x_test, len(test.classnames), k_shot=opts.k_shot,
                              val_fraction=opts.val_fraction, cs=tuple(opts.cs),
                              seed=ctx.seed if opts.seed is None else opts.seed)
    if ctx.world_size > 1:
        dist.broadcast_object_list(result, src=0)
    fit = result[0]
    labels = torch.as_tensor(test.labels, dtype=torch.long)
    scores = torch.from_numpy(fit["scores"])
    num_classes = len(test.classnames)
    m = classification_metrics(scores, labels, num_classes)
    metrics = {"top1": m["top1"], "mean_per_class_recall": m["mean_per_class_recall"], "C": fit["C"],
               "val_top1": fit["val_top1"], "num_train": fit["num_train"], "num_samples": m["num_samples"]}
    figures = []
    if ctx.figures:
        cm = confusion_matrix(scores.argmax(-1), labels, num_classes)
        k = opts.k_shot
        figures.append(confusion_figure(f"linear probe{f' ({k}-shot)' if k else ''} confusion matrix: "
                                        f"{spec.name} ({spec.split})", cm, test.classnames))
    return TaskResult(metrics, figures)

"""Image<->text retrieval: recall@1/5/10 in both directions with several captions per image.

Definitions are CLIP_benchmark's (and the CLIP papers'): `image_retrieval_recall@k` is the
fraction of texts whose top-k images contain a correct image (text -> image);
`text_retrieval_recall@k` is the fraction of images whose top-k texts contain a correct
caption (image -> text). Which pairs are correct comes from the dataset's groups (an image's
own captions, or every image of a caption's class for the built-in class-level sets).
Images and texts are both split across ranks and their features gathered exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vlp.data.datasets import RetrievalDataset, load_retrieval_dataset
from vlp.eval.common import (
    cached_image_features,
    dataset_key,
    encode_images,
    encode_texts,
    load_once,
    text_prefix,
)
from vlp.eval.tasks import DatasetSpec, EvalContext, Figure, TaskResult, typed_options
from vlp.models.config import PreprocessConfig

RECALL_KS = (1, 5, 10)


@dataclass(frozen=True)
class RetrievalOptions:
    """Options of the `retrieval` task."""

    # the texts' prefix kind on a prefix-conditioned model (None or "": caption)
    prefix: str | None = None
    # the member holding the captions in a webdataset directory ("": txt; clipart also has syn.txt)
    text_key: str = "txt"


def _hits_at_k(scores: torch.Tensor, query_groups: torch.Tensor, item_groups: torch.Tensor, k: int,
               chunk: int = 4096) -> torch.Tensor:
    """[Q] bool: does each query's top-k (by score, rows = queries) contain an item of its group?"""
    k = min(k, scores.shape[1])
    out = []
    for start in range(0, scores.shape[0], chunk):
        top = scores[start:start + chunk].topk(k, dim=1).indices
        out.append((item_groups[top] == query_groups[start:start + chunk, None]).any(dim=1))
    return torch.cat(out)


def retrieval_metrics(image_feats: torch.Tensor, text_feats: torch.Tensor, image_groups: np.ndarray | torch.Tensor,
                      text_groups: np.ndarray | torch.Tensor, ks: tuple[int, ...] = RECALL_KS) -> dict[str, float]:
    """Recall@k both ways from unit-norm features and the pairs' groups."""
    ig, tg = torch.as_tensor(image_groups), torch.as_tensor(text_groups)
    scores = text_feats @ image_feats.t()  # [T, I]
    metrics: dict[str, float] = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = _hits_at_k(scores, tg, ig, k).float().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = _hits_at_k(scores.t(), ig, tg, k).float().mean().item()
    metrics["num_images"] = int(len(ig))
    metrics["num_texts"] = int(len(tg))
    return metrics


def retrieval_features(model: nn.Module, tokenizer, data: RetrievalDataset, pre: PreprocessConfig,
                       batch_size: int, ctx: EvalContext) -> tuple[torch.Tensor, torch.Tensor]:
    """(image features [I, D], text features [T, D]), unit norm, on every rank."""
    return (encode_images(model, data, pre, batch_size, ctx),
            encode_texts(model, tokenizer, data.texts, batch_size, ctx))


def top_images_figure(title: str, data: RetrievalDataset, scores: torch.Tensor, queries: list[int],
                      top: int = 5) -> Figure:
    """For each query text, its `top` best images (green frame: a correct match, red: not)."""
    top = min(top, scores.shape[1])
    picks = scores[queries].topk(top, dim=1).indices.tolist()

    def draw():
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(len(queries), top, figsize=(1.6 * top + 0.5, 1.9 * len(queries)), squeeze=False)
        for row, (q, items) in enumerate(zip(queries, picks)):
            for col, i in enumerate(items):
                ax = axes[row][col]
                ax.imshow(data.image(i))
                ok = data.image_groups[i] == data.text_groups[q]
                for side in ax.spines.values():
                    side.set_edgecolor("green" if ok else "red")
                    side.set_linewidth(3)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_xlabel(f"#{col + 1}  {float(scores[q, i]):.2f}", fontsize=7)
            axes[row][0].set_title(f'"{data.texts[q][:60]}"', loc="left", fontsize=8)
        fig.tight_layout()
        return fig

    return Figure(title, draw, "top images per text query; green frame: a correct match, red: not")


def evaluate(model: nn.Module, tokenizer, pre: PreprocessConfig, spec: DatasetSpec, ctx: EvalContext) -> TaskResult:
    """Task entry point (see vlp.eval.tasks). Options: RetrievalOptions; the prefix kind used is
    recorded in the details."""
    opts = typed_options("retrieval", RetrievalOptions, spec.options)
    kind = text_prefix(model, opts.prefix)
    text_key = opts.text_key or "txt"
    extra = () if text_key == "txt" else (text_key,)
    data = load_once(load_retrieval_dataset, spec.name, spec.split, spec.max_samples, *extra)
    # built-in sets share their image features with zero-shot and the linear probe
    img = cached_image_features(model, data, pre, spec.batch_size, ctx,
                                dataset_key(spec.name, spec.split, spec.max_samples,
                                            reader="captioned" + "".join(f":{k}" for k in extra)))
    txt = encode_texts(model, tokenizer, data.texts, spec.batch_size, ctx, kind)
    metrics = retrieval_metrics(img, txt, data.image_groups, data.text_groups)
    figures = []
    if ctx.figures and len(data.texts):
        # four queries from groups spread over the dataset: the first text of each
        groups = np.unique(data.text_groups)
        picked = groups[np.linspace(0, len(groups) - 1, min(4, len(groups))).round().astype(int)]
        queries = [int(np.flatnonzero(data.text_groups == g)[0]) for g in picked]
        figures.append(top_images_figure(f"text -> image retrieval: {spec.name} ({spec.split})", data,
                                         txt @ img.t(), queries))
    return TaskResult(metrics, figures, {"text_prefix": kind} if kind is not None else {})

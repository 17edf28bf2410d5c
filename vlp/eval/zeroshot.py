"""Zero-shot classification: class names x templates -> text classifier -> top-1 / top-5 / mean recall.

Metrics follow CLIP_benchmark's definitions: top-k accuracy over samples, and mean per-class
recall (balanced accuracy). Under a process group the images are split across ranks and the
logits gathered, so each sample is scored exactly once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vlp.data.sources import EvalDataset, load_eval_dataset
from vlp.data.transforms import eval_transform
from vlp.models.config import PreprocessConfig


def fill_template(template: str, classname: str) -> str:
    return template.replace("{c}", classname) if "{c}" in template else template.format(classname)


@torch.no_grad()
def build_classifier(model: nn.Module, tokenizer, classnames: list[str], templates: list[str],
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """[num_classes, embed_dim] unit-norm weights: the mean of each class's normalized prompt embeddings."""
    weights = []
    for name in classnames:
        tokens = tokenizer([fill_template(t, name) for t in templates]).to(device)
        emb = F.normalize(model.encode_text(tokens).float(), dim=-1).mean(0)
        weights.append(F.normalize(emb, dim=-1))
    return torch.stack(weights)


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


@torch.no_grad()
def zeroshot_logits(model: nn.Module, classifier: torch.Tensor, data: EvalDataset, pre: PreprocessConfig,
                    indices: list[int], batch_size: int, device: torch.device | str) -> torch.Tensor:
    transform = eval_transform(pre)
    dtype = next(model.parameters()).dtype  # bf16/fp16 models under mixed precision
    out = []
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        images = torch.stack([transform(data.image(i)) for i in chunk]).to(device, dtype)
        feats = F.normalize(model.encode_image(images).float(), dim=-1)
        out.append(feats @ classifier.t())
    return torch.cat(out) if out else torch.zeros(0, classifier.shape[0], device=device)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def zeroshot_predictions(model: nn.Module, tokenizer, data: EvalDataset, pre: PreprocessConfig,
                         batch_size: int = 256, device: torch.device | str = "cpu") -> torch.Tensor:
    """[N, num_classes] cosine logits for every image of `data`, in order, on every rank."""
    rank, world = _world()
    was_training = model.training
    model.eval()
    classifier = build_classifier(model, tokenizer, data.classnames, data.templates, device)
    n = len(data)
    # contiguous slices per rank; every rank runs the same number of forward passes because
    # ZeRO-3 gathers weights collectively
    per_rank = -(-n // world)
    mine = list(range(rank * per_rank, min(n, (rank + 1) * per_rank)))
    logits = zeroshot_logits(model, classifier, data, pre, mine, batch_size, device)
    for _ in range(-(-per_rank // batch_size) - -(-len(mine) // batch_size)):
        zeroshot_logits(model, classifier, data, pre, [0], 1, device)
    if world > 1:
        parts: list = [None] * world
        dist.all_gather_object(parts, logits.cpu())
        logits = torch.cat(parts)
    model.train(was_training)
    return logits.cpu()


def evaluate_zeroshot(model: nn.Module, tokenizer, data: EvalDataset, pre: PreprocessConfig,
                      batch_size: int = 256, device: torch.device | str = "cpu") -> dict[str, float]:
    logits = zeroshot_predictions(model, tokenizer, data, pre, batch_size, device)
    labels = torch.as_tensor(data.labels, dtype=torch.long)
    return classification_metrics(logits, labels, len(data.classnames))


_DATASETS: dict[tuple[str, str, int], EvalDataset] = {}


def run_zeroshot(model: nn.Module, tokenizer, dataset: str, split: str = "test", batch_size: int = 256,
                 max_samples: int = 0, device: torch.device | str = "cpu",
                 preprocess: PreprocessConfig | None = None) -> dict[str, float]:
    """Zero-shot eval on a named dataset; the dataset is loaded once per process and cached."""
    key = (dataset, split, max_samples)
    if key not in _DATASETS:
        _DATASETS[key] = load_eval_dataset(dataset, split=split, max_samples=max_samples)
    pre = preprocess or model.preprocess
    return evaluate_zeroshot(model, tokenizer, _DATASETS[key], pre, batch_size, device)

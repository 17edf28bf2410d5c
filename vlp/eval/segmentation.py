"""Dense evaluation: zero-shot semantic segmentation (MaskCLIP) and linear-probe segmentation, mIoU.

    res = evaluate_segmentation(model, tokenizer, dataset, mode="zeroshot")          # or "linear_probe"
    res["miou"], res["per_class_iou"], res["examples"]                               # examples: (image, pred, gt)

Zero-shot (MaskCLIP, Zhou et al. 2022): the last transformer block of the image tower is run with its
query-key attention replaced by the identity (every token attends only to itself), so each patch
keeps its own value embedding, `proj(v)`, plus the block's residual and MLP; the tokens then take the
pooled path's final norm(s) and `image_proj` into the text space, and each patch is scored against the
class text embeddings (cosine). Background: the dataset's `background_names` are prompted with the
same templates and a patch's background score is the best of them (MaskCLIP's extra background
classes); `background="threshold"` instead labels a patch background when its best class softmax
probability (at the model's logit scale) is below `bg_threshold`. Patch scores are upsampled
bilinearly to the mask size before the argmax.

Linear probe: frozen patch tokens of the last block (after the final norm), standardized with train
statistics, one linear layer trained with soft per-patch targets (the class fractions of the pixels
each patch covers) on the train split, each class's term weighted by 1/sqrt(its pixel frequency) so
that a background covering most pixels does not drown the object classes (`probe_balance`); its patch
logits are upsampled bilinearly and scored on the test split.

Metrics: a confusion matrix over background + classes (pixels equal to `ignore_index` skipped);
IoU = TP / (TP + FP + FN) per class, NaN for a class absent from both prediction and ground truth,
mIoU = mean over the non-NaN classes (as mmsegmentation). `miou_fg` leaves background out.

Under torchrun (`ctx` with world_size > 1) each rank predicts a contiguous slice of the test set and
the confusion matrices are summed, so every image is counted once; the linear probe's train features
are extracted the same way and gathered in order, its head is fitted on rank 0 and broadcast.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlp.data.segmentation import SegmentationDataset
from vlp.eval.common import gather_rows, shard
from vlp.eval.tasks import EvalContext
from vlp.eval.zeroshot import build_classifier
from vlp.models.config import PreprocessConfig
from vlp.models.vision import final_patch_tokens, require_vit, vit_tokens

# ---- metrics --------------------------------------------------------------------------------------


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """[num_classes, num_classes] int64 counts, rows = ground truth, columns = prediction."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    if target.numel() and (int(target.max()) >= num_classes or int(target.min()) < 0):
        raise ValueError(f"target values must be in [0, {num_classes}) or {ignore_index}")
    if pred.numel() and (int(pred.max()) >= num_classes or int(pred.min()) < 0):
        raise ValueError(f"prediction values must be in [0, {num_classes})")
    return torch.bincount(target * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_from_confusion(cm: torch.Tensor) -> dict[str, Any]:
    """Per-class IoU (NaN where a class is in neither prediction nor ground truth), mIoU, pixel accuracy."""
    cm = cm.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    valid = ~torch.isnan(iou)
    total = cm.sum()
    return {
        "iou": iou.tolist(),
        "miou": float(iou[valid].mean()) if valid.any() else float("nan"),
        "pixel_accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
    }


# ---- image tower pieces ---------------------------------------------------------------------------


def _vision_parts(model: nn.Module) -> tuple[nn.Module, nn.Module, PreprocessConfig]:
    """(timm trunk, image projection, preprocess) of a vlp CLIP model or a `vlp.load_backbone` Backbone."""
    trunk = getattr(getattr(model, "visual", None), "trunk", None)
    if trunk is None:
        trunk = getattr(model, "trunk", None)
    proj = getattr(model, "image_proj", None)
    pre = getattr(model, "preprocess", None)
    if trunk is None or proj is None or pre is None:
        raise TypeError(f"{type(model).__name__} is not a vlp CLIP model or Backbone "
                        "(needs .visual.trunk or .trunk, .image_proj and .preprocess)")
    return trunk, proj, pre


def _check_vit(trunk: nn.Module) -> None:
    require_vit(trunk, "dense evaluation")


def grid_size(model: nn.Module) -> tuple[int, int]:
    trunk, _, _ = _vision_parts(model)
    _check_vit(trunk)
    return tuple(trunk.patch_embed.grid_size)  # type: ignore[return-value]


def _tokens_before_last_block(trunk: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return vit_tokens(trunk, images, blocks=slice(None, -1))


def maskclip_embeddings(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """MaskCLIP patch embeddings in the text space, `[B, gh, gw, embed_dim]` (not normalized).

    The last block runs with a diagonal attention mask, so softmax attention is the identity and each
    token's attention output is `proj(v_token)`; residual and MLP stay as in MaskCLIP's ViT code.
    """
    trunk, proj, _ = _vision_parts(model)
    _check_vit(trunk)
    x = _tokens_before_last_block(trunk, images)
    n = x.shape[1]
    diag = torch.full((n, n), float("-inf"), device=x.device, dtype=x.dtype)
    diag.fill_diagonal_(0.0)
    x = trunk.blocks[-1](x, attn_mask=diag)
    out = proj(final_patch_tokens(trunk, x))
    gh, gw = trunk.patch_embed.grid_size
    return out.reshape(out.shape[0], gh, gw, -1)


def patch_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Frozen patch tokens of the last block after the final norm(s), `[B, gh, gw, num_features]`."""
    trunk, _, _ = _vision_parts(model)
    _check_vit(trunk)
    x = final_patch_tokens(trunk, trunk.blocks[-1](_tokens_before_last_block(trunk, images)))
    gh, gw = trunk.patch_embed.grid_size
    return x.reshape(x.shape[0], gh, gw, -1)


def token_embeddings(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Plain patch tokens of the last block (final norms) through `image_proj`, `[B, gh, gw, embed_dim]`."""
    _, proj, _ = _vision_parts(model)
    return proj(patch_features(model, images))


DENSE_READOUTS = {"maskclip": maskclip_embeddings, "tokens": token_embeddings}
BACKGROUNDS = ("prompt", "threshold", "none")  # how zero-shot decides background
MODES = ("zeroshot", "linear_probe", "denseclip")


def preprocess_images(images: np.ndarray, pre: PreprocessConfig, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> normalized [B, 3, S, S] at the model's size (images are resized whole)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-2:] != (pre.image_size, pre.image_size):
        mode = "bicubic" if pre.interpolation == "bicubic" else "bilinear"
        x = F.interpolate(x, size=(pre.image_size, pre.image_size), mode=mode, antialias=True,
                          align_corners=False).clamp_(0, 1)
    mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1)
    return ((x - mean) / std).to(dtype)


# ---- zero-shot ------------------------------------------------------------------------------------


def zeroshot_logits(dense: torch.Tensor, class_emb: torch.Tensor, bg_emb: torch.Tensor | None = None,
                    logit_scale: float = 100.0, bg_threshold: float | None = None) -> torch.Tensor:
    """[B, 1 + K, gh, gw] scores from dense embeddings `[B, gh, gw, D]` and unit class embeddings `[K, D]`.

    Channel 0 is background: the best cosine over `bg_emb` rows, or with `bg_threshold` a constant
    probability so a patch whose best class probability (softmax at `logit_scale`) is below it
    becomes background. Without either the background channel is -inf (never predicted).
    """
    d = F.normalize(dense.float(), dim=-1)
    cls = torch.einsum("bhwd,kd->bkhw", d, class_emb.float())
    if bg_threshold is not None:
        probs = (cls * logit_scale).softmax(dim=1)
        bg = torch.full_like(probs[:, :1], float(bg_threshold))
        return torch.cat([bg, probs], dim=1)
    if bg_emb is not None and len(bg_emb):
        bg = torch.einsum("bhwd,kd->bkhw", d, bg_emb.float()).amax(dim=1, keepdim=True)
    else:
        bg = torch.full_like(cls[:, :1], float("-inf"))
    return torch.cat([bg, cls], dim=1)


def _upsample_argmax(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    logits = logits.nan_to_num(neginf=-1e4)
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False).argmax(dim=1)


def _batches(n: int, batch_size: int, ctx: EvalContext | None) -> tuple[range, list[tuple[int, int] | None]]:
    """This rank's contiguous slice of range(n) and its batches; `None` entries are padding batches so
    that every rank runs as many forward passes (ZeRO-3 gathers weights collectively in each forward)."""
    rank, size = (0, 1) if ctx is None else (ctx.rank, ctx.world_size)
    mine, per_rank = shard(n, rank, size)
    batches: list[tuple[int, int] | None] = [(s, min(s + batch_size, mine.stop))
                                             for s in range(mine.start, mine.stop, batch_size)]
    return mine, batches + [None] * (-(-per_rank // batch_size) - len(batches))


@torch.no_grad()
def zeroshot_predict(model: nn.Module, tokenizer, data: SegmentationDataset, batch_size: int = 64,
                     device: torch.device | str = "cpu", background: str = "prompt",
                     bg_threshold: float = 0.5, ctx: EvalContext | None = None,
                     dense: str = "maskclip") -> torch.Tensor:
    """uint8 predictions [n, H, W] (0 background, i = classnames[i - 1]) for this rank's slice of `data`
    (all of it without a distributed `ctx`).

    `dense` "maskclip": MaskCLIP's patch embeddings (last block without query-key attention);
    "tokens": the plain patch tokens of the last block through `image_proj` (models whose image
    embedding is a weighted mean of these, such as TIPS's attention pooling, are read out directly).
    """
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background mode '{background}' (known: {', '.join(BACKGROUNDS)})")
    if dense not in DENSE_READOUTS:
        raise ValueError(f"unknown dense readout '{dense}' (known: {', '.join(DENSE_READOUTS)})")
    _, _, pre = _vision_parts(model)
    cls_emb = build_classifier(model, tokenizer, data.classnames, data.templates, device)
    bg_emb = None
    if background == "prompt":
        bg_emb = build_classifier(model, tokenizer, data.background_names, data.templates, device)
    scale = float(model.clamped_logit_scale())
    dtype = next(model.parameters()).dtype
    preds = [torch.zeros(0, *data.masks.shape[1:], dtype=torch.uint8)]
    for b in _batches(len(data), batch_size, ctx)[1]:
        x = preprocess_images(data.images[b[0]:b[1]] if b else data.images[:1], pre, device, dtype)
        logits = zeroshot_logits(DENSE_READOUTS[dense](model, x), cls_emb, bg_emb, scale,
                                 bg_threshold if background == "threshold" else None)
        if b is not None:
            preds.append(_upsample_argmax(logits, data.masks.shape[1:]).to(torch.uint8).cpu())
    return torch.cat(preds)


# ---- linear probe ---------------------------------------------------------------------------------


@torch.no_grad()
def extract_patch_features(model: nn.Module, data: SegmentationDataset, batch_size: int = 64,
                           device: torch.device | str = "cpu", ctx: EvalContext | None = None) -> torch.Tensor:
    """fp32 CPU patch features [n, gh, gw, C] of this rank's slice of `data` (all of it without `ctx`)."""
    _, _, pre = _vision_parts(model)
    dtype = next(model.parameters()).dtype
    out = []
    for b in _batches(len(data), batch_size, ctx)[1]:
        f = patch_features(model, preprocess_images(data.images[b[0]:b[1]] if b else data.images[:1], pre, device, dtype))
        if b is not None:
            out.append(f.float().cpu())
    return torch.cat(out) if out else torch.zeros(0, *grid_size(model), _vision_parts(model)[0].num_features)


def soft_patch_targets(masks: np.ndarray | torch.Tensor, num_classes: int, grid: tuple[int, int],
                       ignore_index: int = 255) -> torch.Tensor:
    """[N, gh, gw, num_classes]: the fraction of each patch's labelled pixels in each class."""
    m = torch.as_tensor(np.asarray(masks)).long()
    valid = m != ignore_index
    onehot = F.one_hot(m.clamp(max=num_classes - 1) * valid, num_classes).float() * valid[..., None]
    pooled = F.adaptive_avg_pool2d(onehot.permute(0, 3, 1, 2), grid)
    return (pooled / pooled.sum(1, keepdim=True).clamp(min=1e-8)).permute(0, 2, 3, 1)


def balance_weights(freq: torch.Tensor, balance: float) -> torch.Tensor:
    """Class weights (1 / freq_k) ** balance, normalized to mean 1 over the classes present (freq > 0);
    all ones for balance 0."""
    if balance <= 0:
        return torch.ones_like(freq, dtype=torch.float32)
    weight = freq.float().clamp(min=1e-6).pow(-balance)
    present = freq > 0
    return weight / (weight[present].mean() if present.any() else weight.mean())


def train_linear_head(feats: torch.Tensor, targets: torch.Tensor, epochs: int = 30, lr: float = 1e-2,
                      weight_decay: float = 1e-4, batch_size: int = 1024, seed: int = 0,
                      balance: float = 0.0) -> nn.Module:
    """A standardizing linear layer on `[N, gh, gw, C]` features fitted to soft targets `[N, gh, gw, K]`.

    `balance` > 0 weights class k's term by (1 / frequency_k) ** balance (normalized to mean 1), so
    small object classes are not drowned by a background that covers most pixels.
    """
    x = feats.reshape(-1, feats.shape[-1]).float()
    y = targets.reshape(-1, targets.shape[-1]).float()
    keep = y.sum(-1) > 0
    x, y = x[keep], y[keep]
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    weight = balance_weights(y.mean(0), balance)
    head = nn.Sequential(_Standardize(mean, std), nn.Linear(x.shape[1], y.shape[1]))
    opt = torch.optim.AdamW(head[1].parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            loss = torch.sum(-weight * y[idx] * F.log_softmax(head(x[idx]), dim=-1), dim=-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return head.eval()


class _Standardize(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


@torch.no_grad()
def linear_head_predict(head: nn.Module, feats: torch.Tensor, size: tuple[int, int],
                        batch_size: int = 256) -> torch.Tensor:
    preds = []
    for s in range(0, len(feats), batch_size):
        logits = head(feats[s:s + batch_size].float()).permute(0, 3, 1, 2)
        preds.append(_upsample_argmax(logits, size).to(torch.uint8))
    return torch.cat(preds)


# ---- DenseCLIP fine-tuning ------------------------------------------------------------------------


def finetune_denseclip(model: nn.Module, tokenizer, train: SegmentationDataset, steps: int = 1000,
                       batch_size: int = 32, lr: float = 1e-3, backbone_lr_mult: float = 0.3,
                       aux_weight: float = 0.4, n_ctx: int = 4, balance: float = 0.5, flip: bool = True,
                       weight_decay: float = 1e-4, device: torch.device | str = "cpu", seed: int = 0) -> nn.Module:
    """Fine-tune a copy of `model` with a DenseCLIP head on `train` (classes: background + classnames).

    AdamW with cosine decay; the image tower learns at `backbone_lr_mult` x `lr`, the text tower stays
    frozen (only the prompt context learns). Both cross-entropies (decoder logits and the auxiliary score
    map) weight class k's pixels by (1 / its pixel frequency in `train`) ** `balance`, normalized to mean
    1 (the linear probe's weighting): with plain cross-entropy a background covering ~84% of the clipart
    pixels drowns the object classes. `flip`: random horizontal flips of image and mask together.
    Returns the DenseCLIPSegmenter in eval mode.
    """
    import copy

    from vlp.models.denseclip import DenseCLIPSegmenter

    clip = copy.deepcopy(model).to(device).train()
    for p in clip.text.parameters():
        p.requires_grad_(False)
    clip.text_proj.requires_grad_(False)
    seg = DenseCLIPSegmenter(clip, tokenizer, ["background", *train.classnames], n_ctx=n_ctx).to(device)
    backbone = [p for p in list(clip.visual.parameters()) + list(clip.image_proj.parameters()) if p.requires_grad]
    head = [p for n, p in seg.named_parameters() if p.requires_grad and not n.startswith("clip.")]
    opt = torch.optim.AdamW([{"params": backbone, "lr": lr * backbone_lr_mult}, {"params": head, "lr": lr}],
                            weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    g = torch.Generator().manual_seed(seed)
    masks_all = torch.as_tensor(train.masks)
    labelled = masks_all[masks_all != train.ignore_index].long()
    freq = torch.bincount(labelled, minlength=train.num_classes)[:train.num_classes] / max(1, labelled.numel())
    class_weight = balance_weights(freq, balance).to(device)
    for _ in range(steps):
        idx = torch.randint(len(train), (min(batch_size, len(train)),), generator=g).numpy()
        x = preprocess_images(train.images[idx], seg.preprocess, device)
        y = masks_all[idx].to(device)
        if flip:
            f = (torch.rand(len(idx), generator=g) < 0.5).to(device)
            x, y = torch.where(f[:, None, None, None], x.flip(-1), x), torch.where(f[:, None, None], y.flip(-1), y)
        loss = seg.loss(seg(x), y, aux_weight, train.ignore_index, class_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return seg.eval()


@torch.no_grad()
def denseclip_predict(seg: nn.Module, data: SegmentationDataset, batch_size: int = 64,
                      device: torch.device | str = "cpu", ctx: EvalContext | None = None) -> torch.Tensor:
    """uint8 predictions [n, H, W] of this rank's slice of `data` (all of it without `ctx`)."""
    preds = [torch.zeros(0, *data.masks.shape[1:], dtype=torch.uint8)]
    for b in _batches(len(data), batch_size, ctx)[1]:
        if b is not None:
            logits = seg(preprocess_images(data.images[b[0]:b[1]], seg.preprocess, device))["logits"]
            preds.append(_upsample_argmax(logits, data.masks.shape[1:]).to(torch.uint8).cpu())
    return torch.cat(preds)


def _from_rank0(value: Any, ctx: EvalContext | None) -> Any:
    """rank 0's `value` on every rank (a no-op in one process)."""
    if ctx is None or ctx.world_size == 1:
        return value
    import torch.distributed as dist

    box = [value if ctx.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---- the evaluator --------------------------------------------------------------------------------


def evaluate_segmentation(
    model: nn.Module,
    tokenizer,
    dataset: SegmentationDataset,
    mode: str = "zeroshot",
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    train_dataset: SegmentationDataset | None = None,
    background: str = "prompt",
    bg_threshold: float = 0.5,
    probe_epochs: int = 30,
    probe_lr: float = 1e-2,
    probe_weight_decay: float = 1e-4,
    probe_balance: float = 0.5,
    num_examples: int = 4,
    finetune_steps: int = 1000,
    denseclip_options: dict[str, Any] | None = None,
    ctx: EvalContext | None = None,
    dense: str = "maskclip",
) -> dict[str, Any]:
    """Segmentation metrics of `model` (a vlp CLIP; linear_probe also takes a Backbone) on `dataset`.

    mode "zeroshot": MaskCLIP patch embeddings (`dense="tokens"`: the plain patch tokens) vs class
    prompts (`tokenizer` needed; `background` is "prompt" | "threshold" | "none"). mode "linear_probe": a linear head on frozen patch tokens trained
    on `train_dataset` (required). mode "denseclip": a copy of the model fine-tuned with a DenseCLIP
    head on `train_dataset` for `finetune_steps` (the model passed in is not changed). Returns miou, miou_fg (without background), pixel_accuracy,
    per_class_iou {name: IoU}, the confusion matrix (list of lists; rows ground truth), and
    `examples`: the first `num_examples` (image uint8 [H, W, 3], pred, gt uint8 [H, W]) triples.
    `denseclip_options`: further keywords of `finetune_denseclip`. `ctx`: rank and world size under
    torchrun (the test set, and the probe's train set, split across ranks; the same metrics on every rank).
    """
    if mode not in MODES:
        raise ValueError(f"unknown segmentation mode '{mode}' (known: {', '.join(MODES)})")
    was_training = model.training
    model.eval()
    try:
        if mode == "zeroshot":
            if tokenizer is None:
                raise ValueError("zero-shot segmentation needs a tokenizer")
            preds = zeroshot_predict(model, tokenizer, dataset, batch_size, device, background, bg_threshold, ctx,
                                     dense)
        elif mode == "linear_probe":
            preds = _probe_predict(model, dataset, train_dataset, batch_size, device, ctx,
                                   dict(epochs=probe_epochs, lr=probe_lr, weight_decay=probe_weight_decay,
                                        balance=probe_balance))
        else:
            preds = _denseclip_predict(model, tokenizer, dataset, train_dataset, batch_size, device, ctx,
                                       finetune_steps, denseclip_options or {})
    finally:
        model.train(was_training)
    return segmentation_report(preds, dataset, mode, num_examples, ctx)


def _probe_predict(model: nn.Module, dataset: SegmentationDataset, train_dataset: SegmentationDataset | None,
                   batch_size: int, device: torch.device | str, ctx: EvalContext | None,
                   head_options: dict[str, Any]) -> torch.Tensor:
    """A linear head fitted (on rank 0) to the frozen patch tokens of `train_dataset`, applied to `dataset`."""
    if train_dataset is None:
        raise ValueError("linear_probe segmentation needs train_dataset")
    if train_dataset.classnames != dataset.classnames:
        raise ValueError("train_dataset and dataset have different classnames")
    grid = grid_size(model)
    train_feats = extract_patch_features(model, train_dataset, batch_size, device, ctx)
    if ctx is not None and ctx.world_size > 1:
        train_feats = gather_rows(train_feats, ctx)
    head = None
    if ctx is None or ctx.rank == 0:
        targets = soft_patch_targets(train_dataset.masks, dataset.num_classes, grid, train_dataset.ignore_index)
        head = train_linear_head(train_feats, targets, head_options["epochs"], head_options["lr"],
                                 head_options["weight_decay"], balance=head_options["balance"])
    head = _from_rank0(head, ctx)
    test_feats = extract_patch_features(model, dataset, batch_size, device, ctx)
    return linear_head_predict(head, test_feats, dataset.masks.shape[1:])


def _denseclip_predict(model: nn.Module, tokenizer, dataset: SegmentationDataset,
                       train_dataset: SegmentationDataset | None, batch_size: int, device: torch.device | str,
                       ctx: EvalContext | None, steps: int, options: dict[str, Any]) -> torch.Tensor:
    """A DenseCLIP copy of `model` fine-tuned on `train_dataset` (on rank 0, then broadcast), applied to `dataset`."""
    if train_dataset is None or tokenizer is None:
        raise ValueError("denseclip segmentation needs train_dataset and a tokenizer")
    rank0 = ctx is None or ctx.rank == 0
    seg = finetune_denseclip(model, tokenizer, train_dataset, steps if rank0 else 0, device=device, **options)
    if ctx is not None and ctx.world_size > 1:  # fitted on rank 0, weights broadcast
        state = _from_rank0({k: v.cpu() for k, v in seg.state_dict().items()} if rank0 else None, ctx)
        seg.load_state_dict(state)
    return denseclip_predict(seg, dataset, batch_size, device, ctx)


def segmentation_report(preds: torch.Tensor, dataset: SegmentationDataset, mode: str = "",
                        num_examples: int = 4, ctx: EvalContext | None = None) -> dict[str, Any]:
    """Metrics dict for uint8 predictions [n, H, W] against `dataset.masks`: all of them, or with a
    distributed `ctx` this rank's slice (the confusion matrices are summed over ranks)."""
    rows = _batches(len(dataset), 1, ctx)[0]
    if len(preds) != len(rows):
        raise ValueError(f"{len(preds)} predictions for {len(rows)} images")
    gt = torch.as_tensor(dataset.masks[rows.start:rows.stop])
    cm = confusion_matrix(preds, gt, dataset.num_classes, dataset.ignore_index)
    shown = preds[:num_examples]
    if ctx is not None and ctx.world_size > 1:
        cm = gather_rows(cm[None], ctx).sum(0)
        shown = gather_rows(shown, ctx)[:num_examples]  # rank order: the set's first images
    m = iou_from_confusion(cm)
    names = ["background", *dataset.classnames]
    fg = [v for v in m["iou"][1:] if not math.isnan(v)]
    return {
        "mode": mode,
        "miou": m["miou"],
        "miou_fg": sum(fg) / len(fg) if fg else float("nan"),
        "pixel_accuracy": m["pixel_accuracy"],
        "per_class_iou": dict(zip(names, m["iou"])),
        "confusion_matrix": cm.tolist(),
        "num_samples": len(dataset),
        "examples": [(dataset.images[i], shown[i].numpy(), dataset.masks[i]) for i in range(len(shown))],
    }


def colorize(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """uint8 [H, W] labels -> RGB with a fixed palette (background black, ignore white)."""
    rng = np.random.RandomState(3)
    palette = np.concatenate([[[0, 0, 0]], rng.randint(40, 256, size=(max(num_classes, 256) - 1, 3))]).astype(np.uint8)
    palette[255] = 255
    return palette[mask]


def examples_image(results: dict[str, dict[str, Any]], num_classes: int) -> np.ndarray:
    """One row per example: image, ground truth, then each mode's prediction (RGB uint8)."""
    modes = list(results)
    rows = []
    for i in range(len(results[modes[0]]["examples"])):
        image, _, gt = results[modes[0]]["examples"][i]
        tiles = [image, colorize(gt, num_classes)] + [colorize(results[m]["examples"][i][1], num_classes)
                                                      for m in modes]
        rows.append(np.concatenate(tiles, axis=1))
    return np.concatenate(rows, axis=0)


def main(argv: list[str] | None = None) -> int:
    """`python -m vlp.eval.segmentation ...`: an alias of `python -m vlp.eval --tasks segmentation`."""
    import argparse

    from vlp.eval.__main__ import main as eval_main

    ap = argparse.ArgumentParser(prog="python -m vlp.eval.segmentation",
                                 description="alias of `python -m vlp.eval --tasks segmentation` (same code, "
                                             "results.json in --out)")
    ap.add_argument("--checkpoint", required=True, help="run directory, model.safetensors or checkpoint dir")
    ap.add_argument("--dataset", default="clipart", help="'clipart' (generated) or a dir from vlp.data.build clipart")
    ap.add_argument("--modes", default="zeroshot,linear_probe", help="comma list of zeroshot, linear_probe, denseclip")
    ap.add_argument("--finetune-steps", type=int, help="denseclip mode")
    ap.add_argument("--max-train", type=int, default=2000, help="train scenes for linear_probe / denseclip")
    ap.add_argument("--max-test", type=int, default=0, help="0: the whole test split")
    ap.add_argument("--background", default="prompt", choices=["prompt", "threshold", "none"])
    ap.add_argument("--zeroshot-dense", default="maskclip", choices=sorted(DENSE_READOUTS),
                    help="zero-shot patch embeddings: MaskCLIP's, or the plain tokens through image_proj")
    ap.add_argument("--random-init", action="store_true",
                    help="evaluate the checkpoint's architecture with random weights (seed 0): the baseline")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", help="output directory (default: CHECKPOINT/eval)")
    ap.add_argument("--examples", help="write a PNG here: image | ground truth | prediction per mode")
    ap.add_argument("--num-examples", type=int, help="rows of the examples grid (default 4)")
    ap.add_argument("--train-split", default="train", help="split the probe / DenseCLIP train on")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="any option of the segmentation task (vlp.eval.segmentation_task.SegmentationOptions), "
                         "e.g. bg_threshold=0.3, probe_epochs=10, denseclip.lr=1e-3; repeatable")
    args = ap.parse_args(argv)
    forward = ["--checkpoint", args.checkpoint, "--tasks", "segmentation", "--datasets", args.dataset,
               "--train-samples", str(args.max_train), "--train-split", args.train_split,
               "--max-samples", str(args.max_test),
               "--batch-size", str(args.batch_size), "--workers", "0", "--no-report",
               "--option", f"segmentation.modes={args.modes}", "--option", f"segmentation.background={args.background}",
               "--option", f"segmentation.dense={args.zeroshot_dense}"]
    if args.finetune_steps is not None:
        forward += ["--option", f"segmentation.finetune_steps={args.finetune_steps}"]
    if args.examples:
        forward += ["--option", f"segmentation.examples={args.examples}"]
    if args.num_examples is not None:
        forward += ["--option", f"segmentation.num_examples={args.num_examples}"]
    for item in args.option:  # after the flags: an --option wins
        forward += ["--option", item if item.startswith("segmentation.") else f"segmentation.{item}"]
    forward += ["--random-init"] * args.random_init + (["--device", args.device] if args.device else [])
    forward += ["--out", args.out] if args.out else []
    return eval_main(forward)


if __name__ == "__main__":
    raise SystemExit(main())

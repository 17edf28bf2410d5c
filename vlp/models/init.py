"""Weight init of timm image towers: CLIP's (open_clip's) or timm's own.

timm initialises a ViT for supervised ImageNet training: every linear layer truncated-normal
with std 0.02 and zero bias, the position embedding at std 0.02 and the class token at std 1e-6.
At the small widths of CPU-sized CLIP models that start is nearly input-independent (the class
token carries almost nothing, every projection is ~0.02 / (1/sqrt(width)) of PyTorch's scale),
and contrastive training learns far less in the same budget: issue 13 measured 69.0% zero-shot
with timm's init against 89.1% with open_clip's on the same shards and budget.

`init="clip"` therefore re-initialises timm ViTs the way open_clip initialises its own
`VisionTransformer` (its blocks are nn.Linear / nn.MultiheadAttention left at PyTorch's init):

* class / register tokens and the position embedding: `width**-0.5 * randn`;
* attention qkv weight: Xavier-uniform over the fused [3 * width, width] matrix, zero bias
  (nn.MultiheadAttention's `in_proj`); attention output projection: PyTorch's Linear init,
  zero bias (its `out_proj`);
* every other linear layer (MLP, attention-pool head): PyTorch's Linear init, weight and bias;
* convolutions (patch embedding, hybrid stems) and norms: PyTorch's own init.

Towers that are not timm ViTs (ConvNeXt, ResNet ...) keep timm's init, as open_clip's TimmModel
does. `init="timm"` keeps timm's init for every tower.
"""

from __future__ import annotations

import torch
from torch import nn

INIT_MODES = ("clip", "timm")


def _reset_default(module: nn.Module) -> None:
    """PyTorch's own init for every parametrised leaf (Linear, Conv, norms) under `module`."""
    for m in module.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset) and not isinstance(m, nn.MultiheadAttention):
            reset()


@torch.no_grad()
def clip_init_vit(trunk: nn.Module) -> None:
    """Re-initialise a timm VisionTransformer in place as open_clip initialises its ViT."""
    width = int(trunk.embed_dim)
    scale = width**-0.5
    for name in ("cls_token", "reg_token", "pos_embed"):
        p = getattr(trunk, name, None)
        if isinstance(p, nn.Parameter):
            p.normal_(std=scale)
    parts = [getattr(trunk, n, None) for n in ("blocks", "norm_pre", "norm", "fc_norm", "attn_pool")]
    for part in parts:
        if isinstance(part, nn.Module):
            _reset_default(part)
    for blk in trunk.blocks:
        attn = getattr(blk, "attn", None)
        qkv, proj = getattr(attn, "qkv", None), getattr(attn, "proj", None)
        if isinstance(qkv, nn.Linear):
            nn.init.xavier_uniform_(qkv.weight)
            if qkv.bias is not None:
                nn.init.zeros_(qkv.bias)
        if isinstance(proj, nn.Linear) and proj.bias is not None:
            nn.init.zeros_(proj.bias)


def init_image_trunk(trunk: nn.Module, mode: str) -> None:
    """Apply `vision.init` to a freshly created timm trunk (see the module docstring)."""
    if mode not in INIT_MODES:
        raise ValueError(f"vision.init must be one of {', '.join(INIT_MODES)}, got '{mode}'")
    from timm.models.vision_transformer import VisionTransformer

    if mode == "clip" and isinstance(trunk, VisionTransformer):
        clip_init_vit(trunk)

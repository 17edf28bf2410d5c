"""Image tower: any timm model by name, used as a pooled-feature extractor.

Keeping the timm model intact (as `.trunk`) means every timm architecture works unchanged and
its own helpers (forward_features, forward_intermediates, grad checkpointing) stay reachable.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from timm.layers import PatchDropout
from timm.models._manipulate import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vlp.models.config import VisionTowerConfig
from vlp.models.init import init_image_trunk


class VisionTower(nn.Module):
    """timm model with no classifier head; `forward` returns pooled features `[B, num_features]`."""

    def __init__(self, cfg: VisionTowerConfig) -> None:
        super().__init__()
        self.config = cfg
        # num_classes=0 makes timm return pre-logits pooled features (ViT: class token after the
        # final norm; ConvNeXt: pooled + head norm), which is exactly what a CLIP projection needs.
        no_flip = ValueError(f"vision.patch_dropout: timm model '{cfg.timm_model}' has no patch dropout "
                             "(it needs a ViT-style token sequence)")
        try:
            self.trunk: nn.Module = timm.create_model(
                cfg.timm_model, pretrained=False, num_classes=0, **cfg.timm_kwargs, **_patch_dropout_kwargs(cfg)
            )
        except TypeError as e:
            if cfg.patch_dropout and "patch_drop_rate" in str(e):
                raise no_flip from e
            raise
        if cfg.patch_dropout and not isinstance(getattr(self.trunk, "patch_drop", None), PatchDropout):
            raise no_flip
        init_image_trunk(self.trunk, cfg.init)
        num_features = getattr(self.trunk, "num_features", None)
        if not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"timm model '{cfg.timm_model}' does not expose an integer num_features")
        self.num_features: int = num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unpooled trunk output (tokens for ViTs, a feature map for CNNs)."""
        return self.trunk.forward_features(images)

    def forward_intermediates(self, images: torch.Tensor, **kwargs: Any) -> Any:
        """Pass-through to timm's `forward_intermediates` (layer outputs for probing / dense tasks)."""
        fn = getattr(self.trunk, "forward_intermediates", None)
        if fn is None:
            raise NotImplementedError(f"{type(self.trunk).__name__} has no forward_intermediates")
        return fn(images, **kwargs)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        fn = getattr(self.trunk, "set_grad_checkpointing", None)
        if fn is None:
            raise NotImplementedError(f"{type(self.trunk).__name__} does not support grad checkpointing")
        fn(enable)


def _patch_dropout_kwargs(cfg: VisionTowerConfig) -> dict[str, Any]:
    """FLIP patch dropout through timm's own PatchDropout: during training each sample keeps a
    random subset of max(1, int(n_patches * (1 - p))) patch tokens (prefix tokens always kept),
    gathered by index so the blocks really run on fewer tokens; drawn from torch's global RNG,
    so a seeded (or resumed) run draws the same subsets. Eval mode drops nothing."""
    p = cfg.patch_dropout
    if not 0.0 <= p < 1.0:
        raise ValueError(f"vision.patch_dropout must be in [0, 1), got {p}")
    if "patch_drop_rate" in cfg.timm_kwargs:
        raise ValueError("set vision.patch_dropout, not vision.timm_kwargs.patch_drop_rate")
    return {"patch_drop_rate": p} if p > 0 else {}


def require_vit(trunk: nn.Module, what: str) -> VisionTransformer:
    """`trunk` if it is a timm VisionTransformer (hybrid conv-stem ViTs included), else an error saying
    that `what` needs one: the token path below reads its patch embedding, blocks and norms."""
    if not isinstance(trunk, VisionTransformer):
        raise NotImplementedError(f"{what} needs a timm VisionTransformer image trunk; this one is a "
                                  f"{type(trunk).__name__}")
    return trunk


def vit_tokens(trunk: VisionTransformer, images: torch.Tensor, mask: torch.Tensor | None = None,
               mask_token: torch.Tensor | None = None, blocks: slice = slice(None)) -> torch.Tensor:
    """The one ViT token path of TIPS and the dense evaluators: all tokens (prefix tokens included,
    `[B, prefix + N, C]`) after patch embedding, position embedding, `norm_pre` and `blocks[blocks]`
    (no final norm). `mask` (bool `[B, N]`) replaces those patch embeddings by `mask_token` first."""
    x = trunk.patch_embed(images)
    if mask is not None:
        if mask.shape != x.shape[:2]:
            raise ValueError(f"mask shape {tuple(mask.shape)} != patch grid {tuple(x.shape[:2])}")
        x = torch.where(mask.unsqueeze(-1), mask_token.to(x.dtype), x)
    x = trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(x)))
    chosen = trunk.blocks[blocks]
    return checkpoint_seq(chosen, x) if trunk.grad_checkpointing and torch.is_grad_enabled() else chosen(x)


def patch_tokens_of_features(trunk: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """A timm ViT's `forward_features` output (final norm applied) as patch tokens that took the pooled
    path's per-token steps: prefix (class / register) tokens dropped, then `fc_norm` for mean-pooled
    ViTs. `[B, N_patches, C]`."""
    x = features[:, int(getattr(trunk, "num_prefix_tokens", 0)):]
    fc_norm = getattr(trunk, "fc_norm", None)
    return fc_norm(x) if isinstance(fc_norm, nn.Module) else x


def final_patch_tokens(trunk: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """A timm ViT's last-block tokens through its final norm and `patch_tokens_of_features`."""
    return patch_tokens_of_features(trunk, trunk.norm(tokens))

"""A vlp checkpoint's image tower as a timm-style backbone.

    backbone = vlp.load_backbone("runs/exp1")                       # run dir, .safetensors, ZeRO checkpoint dir
    feats = backbone.forward_intermediates(x, indices=[0, 1], output_fmt="NCHW", intermediates_only=True)
    dense = backbone.forward_dense(x)                                # [B, N, embed_dim] in the text space
    net = vlp.load_backbone("runs/exp1", features_only=True, out_indices=(0, 1))   # timm feature wrapper

The timm trunk is kept whole, so everything timm implements (forward_intermediates, feature_info,
dynamic_img_size with position-embedding interpolation) is delegated to it unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from vlp.models.config import CLIPConfig, PreprocessConfig
from vlp.models.families import FamilyError, family_of
from vlp.models.vision import patch_tokens_of_features


class Backbone(nn.Module):
    """timm image trunk of a CLIP checkpoint plus its `image_proj` into the joint image-text space."""

    def __init__(self, trunk: nn.Module, image_proj: nn.Linear, config: CLIPConfig) -> None:
        super().__init__()
        self.trunk = trunk
        self.image_proj = image_proj
        self.config = config
        self.preprocess: PreprocessConfig = config.preprocess
        self.num_features: int = int(trunk.num_features)
        self.embed_dim: int = image_proj.out_features

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """The trunk's timm pretrained_cfg (the checkpoint's preprocessing; timm.data.resolve_data_config reads it)."""
        return self.trunk.pretrained_cfg

    @property
    def feature_info(self) -> Any:
        """timm's feature_info of the trunk (channels, reduction and module name per stage / block)."""
        return getattr(self.trunk, "feature_info", None)

    @property
    def num_prefix_tokens(self) -> int:
        return int(getattr(self.trunk, "num_prefix_tokens", 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features `[B, num_features]` (before the projection), as timm with num_classes=0."""
        return self.trunk(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled trunk output: `[B, prefix + N, C]` tokens for ViTs, `[B, C, H, W]` for CNNs."""
        return self.trunk.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = True) -> torch.Tensor:
        return self.trunk.forward_head(x, pre_logits=pre_logits)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NCHW",
        return_prefix_tokens: bool = False,
        intermediates_only: bool = False,
        stop_early: bool = False,
    ) -> Any:
        """timm's forward_intermediates: block outputs (`indices`: last n if int, else those blocks).

        `output_fmt` "NCHW" gives spatial maps, "NLC" token sequences; `return_prefix_tokens` (ViT)
        adds the class/register tokens as a second element per index.
        """
        fn = getattr(self.trunk, "forward_intermediates", None)
        if fn is None:
            raise NotImplementedError(f"{type(self.trunk).__name__} has no forward_intermediates")
        kwargs: dict[str, Any] = dict(indices=indices, norm=norm, output_fmt=output_fmt,
                                      intermediates_only=intermediates_only, stop_early=stop_early)
        if return_prefix_tokens:
            kwargs["return_prefix_tokens"] = True
        return fn(x, **kwargs)

    def forward_dense(self, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Per-location embeddings in the text space, `[B, N, embed_dim]` (prefix tokens dropped).

        Each patch token takes the pooled path's per-token steps (final norm, then `fc_norm` for
        mean-pooled ViTs or the head norm for CNNs) and `image_proj`; for class-token ViTs the same
        steps applied to the class token give exactly `encode_image`.
        """
        feats = self.trunk.forward_features(x)
        if feats.ndim == 4:  # CNN map [B, C, H, W] -> tokens; ConvNeXt-style heads normalize per location
            tokens = feats.flatten(2).transpose(1, 2)
            head_norm = getattr(getattr(self.trunk, "head", None), "norm", None)
            if isinstance(head_norm, nn.Module):
                tokens = _norm_tokens(head_norm, tokens)
        else:
            tokens = patch_tokens_of_features(self.trunk, feats)
        out = self.image_proj(tokens)
        return torch.nn.functional.normalize(out, dim=-1) if normalize else out

    def set_input_size(self, img_size: int | tuple[int, int]) -> None:
        """Fixed new input size (ViT: position embeddings resampled once, timm's set_input_size)."""
        fn = getattr(self.trunk, "set_input_size", None)
        if fn is None:
            raise NotImplementedError(f"{type(self.trunk).__name__} has no set_input_size")
        fn(img_size=img_size)


def _norm_tokens(norm: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Apply a channel norm (LayerNorm or timm's LayerNorm2d) to `[B, N, C]` tokens."""
    if isinstance(norm, nn.LayerNorm) and type(norm) is nn.LayerNorm:
        return norm(tokens)
    b, n, c = tokens.shape
    return norm(tokens.transpose(1, 2).reshape(b, c, n, 1)).reshape(b, c, n).transpose(1, 2)


def trunk_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The timm trunk's weights out of a vlp CLIP state dict (prefix `visual.trunk.` removed)."""
    prefix = "visual.trunk."
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def timm_pretrained_cfg(pre: PreprocessConfig) -> dict[str, Any]:
    """timm's `pretrained_cfg` preprocessing fields for a checkpoint's eval preprocessing (resize to the
    crop, no border: crop_pct 1), so `timm.data.resolve_data_config(model=...)` gives its size, mean, std."""
    return {"input_size": (3, pre.image_size, pre.image_size), "mean": tuple(pre.mean), "std": tuple(pre.std),
            "interpolation": pre.interpolation, "crop_pct": 1.0, "crop_mode": "center", "num_classes": 0}


def build_trunk(cfg: CLIPConfig, sd: dict[str, torch.Tensor], **timm_kwargs: Any) -> nn.Module:
    """timm model of the checkpoint's image tower (no head) with its weights loaded strictly and its
    `pretrained_cfg` describing the checkpoint's preprocessing (not timm's ImageNet defaults)."""
    kwargs = {**cfg.vision.timm_kwargs, **timm_kwargs}
    trunk = timm.create_model(cfg.vision.timm_model, pretrained=False, num_classes=0, **kwargs)
    trunk.load_state_dict(trunk_state_dict(sd), strict=True)
    trunk.pretrained_cfg = {**trunk.pretrained_cfg, **timm_pretrained_cfg(cfg.preprocess)}
    return trunk


def load_backbone(
    path: str | Path,
    features_only: bool = False,
    out_indices: int | Sequence[int] = 4,
    output_fmt: str = "NCHW",
    dynamic_img_size: bool = False,
    device: str | torch.device = "cpu",
    **timm_kwargs: Any,
) -> nn.Module:
    """Image tower of a checkpoint (run dir, .safetensors file, DeepSpeed ZeRO checkpoint dir), eval mode.

    Returns a `Backbone`, or with `features_only=True` timm's FeatureGetterNet over the trunk (forward
    returns the `out_indices` feature maps; `.feature_info` describes them). `dynamic_img_size=True`
    (ViTs) accepts any input size, interpolating the position embeddings per call. Extra keyword
    arguments go to `timm.create_model` on top of the saved ones.
    """
    from vlp.loading import load_state

    cfg, sd = load_state(path)
    if dynamic_img_size:
        timm_kwargs["dynamic_img_size"] = True
    trunk = build_trunk(cfg, sd, **timm_kwargs)
    if features_only:
        from timm.models._features import FeatureGetterNet

        if not hasattr(trunk, "forward_intermediates"):
            raise NotImplementedError(f"{type(trunk).__name__} has no forward_intermediates for features_only")
        net: nn.Module = FeatureGetterNet(trunk, out_indices=out_indices, output_fmt=output_fmt)
        net.pretrained_cfg = trunk.pretrained_cfg
        return net.to(device).eval()
    family = family_of(cfg)
    if not family.can("backbone"):
        raise FamilyError(f"'{path}' is a {family.title} model: its image embedding does not come from the trunk "
                          "(CoCa's comes from the attentional pooler); use features_only=True for the trunk's feature maps")
    proj = nn.Linear(int(trunk.num_features), cfg.embed_dim, bias=False)
    if cfg.image_proj:
        proj.load_state_dict({"weight": sd["image_proj.weight"]})
    else:  # SigLIP layout: the pooled trunk output is the embedding
        nn.init.eye_(proj.weight)
    return Backbone(trunk, proj, cfg).to(device).eval()

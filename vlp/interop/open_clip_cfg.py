"""The parts of an open_clip ViT model config that CLIP and CoCa share, read into vlp's configs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vlp.models.config import OPENAI_MEAN, OPENAI_STD, PreprocessConfig, TextTowerConfig


def towers_from_open_clip(model_cfg: Mapping[str, Any], preprocess: Mapping[str, Any] | None = None
                          ) -> tuple[dict[str, Any], TextTowerConfig, PreprocessConfig]:
    """timm ViT kwargs of the image tower, the text tower and the preprocessing of an open_clip
    model config (`quick_gelu` -> QuickGELU in both towers, as OpenAI's checkpoints need)."""
    v, t, pre = dict(model_cfg.get("vision_cfg", {})), dict(model_cfg.get("text_cfg", {})), dict(preprocess or {})
    size = v.get("image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    width = v.get("width", 768)
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    vision_kw = dict(img_size=size, patch_size=v.get("patch_size", 16), embed_dim=width, depth=v.get("layers", 12),
                     num_heads=width // v.get("head_width", 64), mlp_ratio=v.get("mlp_ratio", 4.0))
    if act != "gelu":
        vision_kw["act_layer"] = act
    text = TextTowerConfig(context_length=t.get("context_length", 77), vocab_size=t.get("vocab_size", 49408),
                           width=t.get("width", 512), heads=t.get("heads", 8), layers=t.get("layers", 12),
                           mlp_ratio=t.get("mlp_ratio", 4.0), act=act)
    preprocess_cfg = PreprocessConfig(image_size=size, mean=tuple(pre.get("mean", OPENAI_MEAN)),
                                      std=tuple(pre.get("std", OPENAI_STD)),
                                      interpolation=pre.get("interpolation", "bicubic"))
    return vision_kw, text, preprocess_cfg

"""Conversions between vlp checkpoints and other CLIP implementations (open_clip, OpenAI, HF, timm)."""

from vlp.interop.open_clip import (
    export_open_clip,
    load_open_clip_as_vlp,
    load_open_clip_checkpoint,
    open_clip_to_vlp_state_dict,
    vlp_to_open_clip_state_dict,
)

__all__ = [
    "export_open_clip",
    "load_open_clip_as_vlp",
    "load_open_clip_checkpoint",
    "open_clip_to_vlp_state_dict",
    "vlp_to_open_clip_state_dict",
]

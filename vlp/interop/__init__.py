"""Conversions between vlp checkpoints and other CLIP implementations."""

from vlp.interop.open_clip import (
    load_open_clip_checkpoint,
    open_clip_to_vlp_state_dict,
    vlp_to_open_clip_state_dict,
)

__all__ = ["load_open_clip_checkpoint", "open_clip_to_vlp_state_dict", "vlp_to_open_clip_state_dict"]

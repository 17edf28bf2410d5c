from torch import nn

from .coca import CoCaLoss
from .contrastive import ClipLoss, all_gather_with_grad, local_sizes
from .sigmoid import SigLipLoss
from .tiled import blocked_logsumexp_sum, tiled_logsumexp, tiled_sigmoid_loss

LOSSES = {"clip": ClipLoss, "siglip": SigLipLoss, "coca": CoCaLoss}


def build_loss(name: str, tile_size: int = 0, clip_weight: float = 1.0, caption_weight: float = 2.0) -> nn.Module:
    """The training loss named in the config (`loss.name`, `loss.tile_size`, CoCa's weights)."""
    if name == "coca":
        return CoCaLoss(clip_weight=clip_weight, caption_weight=caption_weight, tile_size=tile_size)
    if name == "clip":
        return ClipLoss(tile_size=tile_size)
    if name == "siglip":
        return SigLipLoss(tile_size=tile_size)
    raise ValueError(f"unknown loss '{name}' (known: {', '.join(LOSSES)})")


__all__ = ["LOSSES", "ClipLoss", "CoCaLoss", "blocked_logsumexp_sum", "SigLipLoss", "all_gather_with_grad",
           "build_loss", "local_sizes", "tiled_logsumexp", "tiled_sigmoid_loss"]

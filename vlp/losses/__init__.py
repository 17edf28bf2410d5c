"""Loss functions. Which one a run trains with is the objective's choice (vlp/objectives/)."""

from .coca import CoCaLoss
from .contrastive import ClipLoss, all_gather_with_grad, local_sizes
from .sigmoid import SigLipLoss
from .small_loss import SmallLossClipLoss
from .soft import SoftClipLoss
from .tiled import blocked_logsumexp_sum, tiled_logsumexp, tiled_sigmoid_loss

# the pairwise image-text losses, `loss(image_features, text_features, logit_scale, logit_bias=None)`,
# each taking `tile_size=`
PAIRWISE_LOSSES = {"clip": ClipLoss, "siglip": SigLipLoss, "soft_clip": SoftClipLoss,
                   "small_loss": SmallLossClipLoss}

__all__ = ["PAIRWISE_LOSSES", "ClipLoss", "CoCaLoss", "blocked_logsumexp_sum", "SigLipLoss", "SmallLossClipLoss", "SoftClipLoss", "all_gather_with_grad",
           "local_sizes", "tiled_logsumexp", "tiled_sigmoid_loss"]

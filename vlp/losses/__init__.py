from .contrastive import ClipLoss, all_gather_with_grad, local_sizes

__all__ = ["ClipLoss", "all_gather_with_grad", "local_sizes"]

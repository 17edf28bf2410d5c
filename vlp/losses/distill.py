"""Self-distillation losses of DINO / iBOT: cross-entropy between a sharpened, centred teacher
distribution and the student's, over prototype logits.

    loss_row = - sum_k softmax((t - c) / tau_t)_k * log_softmax(s / tau_s)_k

`c` is a running mean of the teacher's logits (centering keeps one prototype from taking every
sample; a low tau_t sharpens against the uniform collapse). The centre is updated after the loss
with the mean over the global batch (all ranks), c <- m c + (1 - m) mean(t).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def distill_cross_entropy(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor,
                          student_temp: float, teacher_temp: float) -> torch.Tensor:
    """Per-row loss `[M]` for student / teacher logits `[M, K]` and centre `[K]` (teacher not differentiated)."""
    target = F.softmax((teacher.detach().float() - center.float()) / teacher_temp, dim=-1)
    return -(target * F.log_softmax(student.float() / student_temp, dim=-1)).sum(dim=-1)


def masked_patch_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, center: torch.Tensor,
                      student_temp: float, teacher_temp: float) -> torch.Tensor:
    """iBOT's patch term: per image the mean of `distill_cross_entropy` over its masked patches, then the
    mean over the images that have any masked patch (0 when none has).

    `student` `[M, K]` holds the student's logits at the masked positions only (in `mask.nonzero()`
    order), `teacher` `[B, N, K]` the teacher's logits at every position, `mask` bool `[B, N]`.
    """
    per_patch = distill_cross_entropy(student, teacher[mask], center, student_temp, teacher_temp)
    counts = mask.sum(dim=1)
    per_image = torch.zeros(mask.shape[0], device=per_patch.device, dtype=per_patch.dtype)
    per_image = per_image.index_add(0, mask.nonzero()[:, 0], per_patch)
    has = counts > 0
    if not has.any():
        return per_patch.sum() * 0.0
    return (per_image[has] / counts[has]).mean()


class Center(nn.Module):
    """Running centre of the teacher's logits, averaged over the global batch (all ranks)."""

    def __init__(self, dim: int, momentum: float) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"center momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(dim))

    @torch.no_grad()
    def update(self, teacher: torch.Tensor) -> None:
        """`teacher` `[..., K]` logits of this rank; the new centre uses every rank's rows."""
        rows = teacher.detach().float().reshape(-1, teacher.shape[-1])
        stats = torch.cat([rows.sum(dim=0), rows.new_tensor([rows.shape[0]])])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)
        if stats[-1] > 0:
            mean = stats[:-1] / stats[-1]
            self.center.mul_(self.momentum).add_(mean.to(self.center.dtype), alpha=1.0 - self.momentum)

"""LiT-style locking of the image and/or text tower, fully or all but their last groups.

Locked parameters get `requires_grad=False`, so the optimizer never sees them (no state, no
update) and DeepSpeed stores them as frozen parameters; the modules made only of locked
parameters are listed so the task keeps them in eval mode (no dropout, drop-path or patch
dropout, frozen normalization statistics). Layer groups of the image trunk come from timm's own
`group_matcher` (stem, blocks, final norm), so every timm architecture is supported as it is.
"""

from __future__ import annotations

from omegaconf import DictConfig
from timm.models import group_parameters
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

_NORMS = (nn.LayerNorm, nn.GroupNorm, _NormBase, nn.LocalResponseNorm)


class LockError(ValueError):
    """A lock setting the model cannot satisfy; the message names the key."""


def image_groups(trunk: nn.Module) -> list[list[str]]:
    """Parameter names of the timm trunk in layer groups, input side first."""
    matcher = getattr(trunk, "group_matcher", None)
    if matcher is None:
        raise LockError(f"lock.image_unlocked_groups: timm model {type(trunk).__name__} has no group_matcher")
    groups = group_parameters(trunk, matcher(coarse=False))
    return [groups[k] for k in sorted(groups)]


def text_groups(text: nn.Module) -> list[list[str]]:
    """Embeddings, each block, final norm: the text tower's layer groups, input side first."""
    names = [n for n, _ in text.named_parameters()]
    out = [[n for n in names if n.startswith(("token_embedding.", "positional_embedding", "prefix_embedding"))]]
    out += [[n for n in names if n.startswith(f"blocks.{i}.")] for i in range(len(text.blocks))]
    out.append([n for n in names if n.startswith("ln_final.")])
    return out


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, _NORMS) or type(m).__name__.lower().endswith(("norm", "norm2d"))


def lock_tower(tower: nn.Module, groups: list[list[str]], unlocked_groups: int, unlock_norms: bool,
               key: str) -> list[nn.Module]:
    """Freeze `tower` except its last `unlocked_groups` groups (and its norms if `unlock_norms`);
    return the locked modules to keep in eval mode (decided before the norms are unlocked: a
    trainable norm inside a locked block does not bring the block's dropout back)."""
    if unlocked_groups > len(groups):
        raise LockError(f"{key}={unlocked_groups} but the tower has only {len(groups)} layer groups")
    keep = {n for g in groups[len(groups) - unlocked_groups:] for n in g} if unlocked_groups else set()
    for name, p in tower.named_parameters():
        p.requires_grad_(name in keep)
    evals = frozen_modules(tower)
    if unlock_norms:
        for m in tower.modules():
            if _is_norm(m):
                for p in m.parameters(recurse=False):
                    p.requires_grad_(True)
    return evals


def frozen_modules(root: nn.Module) -> list[nn.Module]:
    """The largest submodules of `root` whose parameters are all frozen (modules without
    parameters of their own count only as part of a frozen parent)."""
    params = list(root.parameters())
    if params and not any(p.requires_grad for p in params):
        return [root]
    out: list[nn.Module] = []
    for child in root.children():
        out += frozen_modules(child)
    return out


def apply_locks(model: nn.Module, lock: DictConfig) -> list[nn.Module]:
    """Lock the towers of a vlp CLIP model as `lock` (the config's `lock` section) says; return
    the modules to keep in eval mode."""
    evals: list[nn.Module] = []
    if lock.image:
        trunk = model.visual.trunk
        groups = image_groups(trunk) if lock.image_unlocked_groups else [[n for n, _ in trunk.named_parameters()]]
        evals += lock_tower(trunk, groups, lock.image_unlocked_groups, lock.image_unlock_norms,
                            "lock.image_unlocked_groups")
    if lock.text:
        groups = text_groups(model.text)
        evals += lock_tower(model.text, groups, lock.text_unlocked_groups, lock.text_unlock_norms,
                            "lock.text_unlocked_groups")
    return evals

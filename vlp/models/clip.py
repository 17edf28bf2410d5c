"""Dual-encoder CLIP model: timm image tower + causal text tower, each linearly projected to a shared space.

Deliberately free of torch.distributed / deepspeed so it can be built, loaded and evaluated anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlp.models.config import CLIPConfig, PreprocessConfig
from vlp.models.text import TextTower
from vlp.models.vision import VisionTower

# Position and token embedding tables (what `optim.decay_embeddings` gives weight decay back).
EMBEDDING_TABLE_FRAGMENTS = ("positional_embedding", "pos_embed", "token_embedding")
# Parameter-name fragments that are embeddings / tokens / temperature: decaying them hurts CLIP training.
_NO_DECAY_FRAGMENTS = (
    *EMBEDDING_TABLE_FRAGMENTS,
    "cls_token",
    "reg_token",
    "class_embedding",
    "logit_scale",
    "logit_bias",
    "prefix_embedding",
)


class CLIP(nn.Module):
    """Contrastive image-text model; `forward` returns normalized features and the clamped temperature."""

    # state-dict key prefixes of each part a run can start from separately (model.init_from.parts);
    # a family whose model adds parameters extends these, and every key must belong to one part
    PARTS: dict[str, tuple[str, ...]] = {
        "image": ("visual.", "image_proj."),
        "text": ("text.", "text_proj."),
        "logit": ("logit_scale", "logit_bias"),
    }

    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.config = cfg
        self.preprocess: PreprocessConfig = cfg.preprocess
        self.visual = VisionTower(cfg.vision)
        if cfg.image_proj:
            self.image_proj = nn.Linear(self.visual.num_features, cfg.embed_dim, bias=False)
        elif self.visual.num_features == cfg.embed_dim:
            self.image_proj = nn.Identity()
        else:
            raise ValueError(f"image_proj=False needs the image tower's width ({self.visual.num_features}) "
                             f"to equal embed_dim ({cfg.embed_dim})")
        self.text = TextTower(cfg.text)
        self.text_proj = nn.Linear(cfg.text.width, cfg.embed_dim, bias=False)
        # shape [1], not 0-dim: DeepSpeed's initial parameter broadcast cannot view 0-dim tensors as bytes
        self.logit_scale = nn.Parameter(torch.full((1,), float(cfg.init_logit_scale)))
        self.logit_bias = None
        if cfg.init_logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.full((1,), float(cfg.init_logit_bias)))
        self._init_projections()

    @torch.no_grad()
    def _init_projections(self) -> None:
        # CLIP scales projections by fan-in^-0.5 so initial embeddings have roughly unit-variance entries.
        if isinstance(self.image_proj, nn.Linear):
            nn.init.normal_(self.image_proj.weight, std=self.visual.num_features**-0.5)
        nn.init.normal_(self.text_proj.weight, std=self.config.text.width**-0.5)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.image_proj(self.visual(images))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False,
                    kinds: str | Sequence[str] | torch.Tensor | None = None) -> torch.Tensor:
        """Text embeddings; `kinds` (prefix-conditioned models only): one kind name for all texts, a
        name per text, or prefix indices; None means "caption" (see TextTower.kind_ids)."""
        x = self.text_proj(self.text(tokens, kinds))
        return F.normalize(x, dim=-1) if normalize else x

    def clamped_logit_scale(self) -> torch.Tensor:
        """exp of the learned log-temperature, capped so logits cannot blow up (CLIP caps at 100).

        Computed in fp32 even when the module is cast to bf16/fp16: exp in bf16 would move the
        temperature by up to ~0.4%."""
        return self.logit_scale.float().clamp(max=self.config.max_logit_scale).exp().reshape(())

    def forward(
        self, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
        kinds: str | Sequence[str] | torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {"logit_scale": self.clamped_logit_scale()}
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias.float().reshape(())
        if images is not None:
            out["image_features"] = self.encode_image(images, normalize=True)
        if tokens is not None:
            out["text_features"] = self.encode_text(tokens, normalize=True, kinds=kinds)
        return out

    def no_weight_decay(self) -> set[str]:
        """Names of parameters to exclude from weight decay: all norms/biases/scalars plus embeddings."""
        return {
            name
            for name, p in self.named_parameters()
            if p.ndim < 2 or any(frag in name for frag in _NO_DECAY_FRAGMENTS)
        }

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

"""TIPS (Maninis et al. 2024, "Text-Image Pretraining with Spatial awareness"): a CLIP whose image
tower emits one global embedding per text stream, plus the heads of a masked-image self-distillation.

    image -> timm ViT trunk -> patch tokens x_i (final norm(s), as the dense evaluators take them)
             per stream k: a learned pooling query q_k attends over the tokens,
                 g_k = sum_i softmax_i(q_k . W x_i / sqrt(C)) x_i        ("CLS" of stream k)
                 stream k's image embedding = proj_k(g_k)
             stream 0 owns `image_proj`, so `encode_image` (zero-shot classification, retrieval)
             and the per-patch embeddings of MaskCLIP / `Backbone.forward_dense` (proj_0(x_i)) are
             in stream 0's text space; the image embedding is a convex combination of them
    text  -> one shared text tower and projection for every stream
    head  -> MLP -> l2-normalised bottleneck -> weight-normalised prototypes (DINO/iBOT head),
             applied to the pooled g_k (global term) and to patch tokens (masked-image term)

Queries start at zero, so every stream starts as the mean of the patch tokens (a bare class token
stalls at this tiny size, see the registry). A `mask` replaces the patch embeddings it marks by a
learned mask token before the position embedding (iBOT). The losses and the EMA teacher live in
`vlp.objectives.tips`; the model holds no distributed code. Heads and the mask token are part of
the model's weights, and `vlp.load_backbone` keeps only the trunk and `image_proj`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlp.models.clip import _NO_DECAY_FRAGMENTS, CLIP
from vlp.models.config import TIPSConfig
from vlp.models.vision import final_patch_tokens, require_vit, vit_tokens


class DistillHead(nn.Module):
    """DINO/iBOT projection head: Linear-GELU-Linear-GELU-Linear, l2 norm, weight-normed prototypes."""

    def __init__(self, dim: int, hidden: int, bottleneck: int, prototypes: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.prototypes = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck, prototypes, bias=False))
        with torch.no_grad():  # DINO fixes the prototype norms at 1 (weight_g = 1)
            self.prototypes.parametrizations.weight.original0.fill_(1.0)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prototypes(F.normalize(self.mlp(x), dim=-1))


class TIPS(CLIP):
    """CLIP with `num_streams` pooled image embeddings and DINO/iBOT heads (see module doc)."""

    # see CLIP.PARTS: the stream poolers, their projections, the mask token and the distillation
    # head all act on image tokens
    PARTS: dict[str, tuple[str, ...]] = {
        **CLIP.PARTS,
        "image": ("visual.", "image_proj.", "pool_key.", "pool_query", "stream_proj.", "mask_token", "head."),
    }

    def __init__(self, cfg: TIPSConfig) -> None:
        if cfg.num_streams < 1:
            raise ValueError(f"num_streams must be >= 1, got {cfg.num_streams}")
        if cfg.vision.patch_dropout:
            raise ValueError("TIPS: vision.patch_dropout must be 0 (masked-image modeling needs every patch position)")
        if not cfg.image_proj:
            raise ValueError("TIPS: image_proj must be true (each stream has its own projection)")
        super().__init__(cfg)
        trunk = require_vit(self.visual.trunk, f"TIPS ('{cfg.vision.timm_model}')")
        width = self.visual.num_features
        self.num_patches = int(trunk.patch_embed.num_patches)
        self.pool_key = nn.Linear(width, width, bias=False)
        self.pool_query = nn.Parameter(torch.zeros(cfg.num_streams, width))
        self.stream_proj = nn.ModuleList(nn.Linear(width, cfg.embed_dim, bias=False)
                                         for _ in range(cfg.num_streams - 1))
        self.mask_token = nn.Parameter(torch.zeros(int(trunk.embed_dim)))
        self.head = DistillHead(width, cfg.head_hidden, cfg.head_bottleneck, cfg.prototypes)
        with torch.no_grad():
            nn.init.normal_(self.pool_key.weight, std=width**-0.5)
            nn.init.normal_(self.mask_token, std=0.02)
            for p in self.stream_proj:
                nn.init.normal_(p.weight, std=width**-0.5)

    # ---- image side ------------------------------------------------------------------------------

    def patch_tokens(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Patch tokens `[B, N, C]` after the final norm(s); `mask` (bool `[B, N]`) marks patches whose
        embedding is replaced by the mask token before the position embedding."""
        t = self.visual.trunk
        return final_patch_tokens(t, vit_tokens(t, images, mask, self.mask_token))

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """One attention-pooled token per stream, `[B, num_streams, C]` (convex combinations of tokens)."""
        scores = torch.einsum("bnc,sc->bsn", self.pool_key(tokens), self.pool_query.to(tokens.dtype))
        weights = (scores * tokens.shape[-1] ** -0.5).softmax(dim=-1)
        return torch.einsum("bsn,bnc->bsc", weights, tokens)

    def project_streams(self, pooled: torch.Tensor) -> torch.Tensor:
        """Stream k's pooled token through its projection: `[B, num_streams, embed_dim]`."""
        projs = [self.image_proj, *self.stream_proj]
        return torch.stack([p(pooled[:, k]) for k, p in enumerate(projs)], dim=1)

    def encode_image_streams(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.project_streams(self.pool(self.patch_tokens(images)))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Stream 0's embedding: the one zero-shot classification, retrieval and dense evaluation use."""
        x = self.image_proj(self.pool(self.patch_tokens(images))[:, 0])
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text_streams(self, tokens: torch.Tensor, normalize: bool = False,
                            kinds: str | list[str] | torch.Tensor | None = None) -> torch.Tensor:
        """`[B, S, T]` tokens (one caption per stream) -> `[B, S, embed_dim]`; `kinds` `[B]` (prefix-
        conditioned text towers only) applies to every stream of a sample."""
        b, s, t = tokens.shape
        if isinstance(kinds, torch.Tensor):
            kinds = kinds.repeat_interleave(s)
        elif kinds is not None and not isinstance(kinds, str):  # one name per sample
            kinds = [k for k in kinds for _ in range(s)]
        return self.encode_text(tokens.reshape(b * s, t), normalize, kinds=kinds).reshape(b, s, -1)

    def no_weight_decay(self) -> set[str]:
        frags = (*_NO_DECAY_FRAGMENTS, "pool_query", "mask_token", "prototypes")
        return {name for name, p in self.named_parameters() if p.ndim < 2 or any(f in name for f in frags)}

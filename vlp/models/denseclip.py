"""DenseCLIP-style pixel-text score maps (Rao et al. 2022) as a head for dense fine-tuning.

    seg = DenseCLIPSegmenter(clip_model, tokenizer, ["background", "fruit", ...])
    out = seg(images)          # {"logits": [B, K, gh, gw], "score_map": [B, K, gh, gw]}

Pieces:
  - `PromptLearner`: language-domain prompts: n learnable context vectors replace the placeholder
    words before each class name (CoOp), run through the CLIP text tower -> class embeddings [K, D].
  - `ContextDecoder`: post-model, vision-to-language prompting: the class embeddings attend to the
    image's visual context (global + patch embeddings) through a small transformer decoder and are
    updated as t + gamma * decoder(t, visual), gamma starting near 0 so training starts from CLIP.
  - `DenseCLIPHead`: score maps = normalized patch embeddings x normalized updated class embeddings;
    segmentation logits from a small conv decoder over [patch features, score maps]; the score maps
    themselves (times a temperature) take an auxiliary loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlp.models.text import eot_positions
from vlp.models.vision import patch_tokens_of_features


class PromptLearner(nn.Module):
    """Class embeddings `[K, embed_dim]` from learnable context + class-name tokens through `clip.text`."""

    def __init__(self, clip: nn.Module, tokenizer, classnames: list[str], n_ctx: int = 4) -> None:
        super().__init__()
        if not classnames:
            raise ValueError("PromptLearner needs at least one class name")
        self.text, self.text_proj = clip.text, clip.text_proj
        width = self.text.width
        self.n_ctx = n_ctx
        self.ctx = nn.Parameter(torch.randn(n_ctx, width) * 0.02)
        placeholder = " ".join(["x"] * n_ctx)
        prompts = [f"{placeholder} {name}." for name in classnames]
        for prompt in prompts:
            if len(tokenizer.encode(prompt)) + 2 > self.text.context_length:
                raise ValueError(f"class prompt '{prompt}' does not fit the text context length "
                                 f"{self.text.context_length}")
        tokens = tokenizer(prompts)
        x_id = tokenizer.encode("x")
        if len(x_id) != 1 or not bool((tokens[:, 1:1 + n_ctx] == x_id[0]).all()):
            raise ValueError("the tokenizer does not map the context placeholder to one token per word")
        self.register_buffer("tokens", tokens, persistent=False)

    def forward(self) -> torch.Tensor:
        tokens = self.tokens
        emb = self.text.token_embedding(tokens)
        ctx = self.ctx.to(emb.dtype).unsqueeze(0).expand(len(tokens), -1, -1)
        x = torch.cat([emb[:, :1], ctx, emb[:, 1 + self.n_ctx:]], dim=1)
        x = x + self.text.positional_embedding[: x.shape[1]]
        for blk in self.text.blocks:
            x = blk(x, is_causal=True)
        x = self.text.ln_final(x)
        pooled = x[torch.arange(len(tokens), device=x.device), eot_positions(tokens, self.text.eot_token_id)]
        return self.text_proj(pooled)


class ContextDecoder(nn.Module):
    """Text embeddings `[K, D]` (or `[B, K, D]`) updated from visual context `[B, N, D]` -> `[B, K, D]`."""

    def __init__(self, embed_dim: int, width: int = 128, heads: int = 4, layers: int = 2,
                 dropout: float = 0.1, gamma_init: float = 1e-4) -> None:
        super().__init__()
        self.memory_proj = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, width), nn.LayerNorm(width))
        self.text_in = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, width))
        layer = nn.TransformerDecoderLayer(width, heads, 4 * width, dropout=dropout, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.decoder = nn.TransformerDecoder(layer, layers)
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, embed_dim))
        self.gamma = nn.Parameter(torch.full((embed_dim,), gamma_init))

    def forward(self, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        if text.ndim == 2:
            text = text.unsqueeze(0).expand(visual.shape[0], -1, -1)
        update = self.out(self.decoder(self.text_in(text), self.memory_proj(visual)))
        return text + self.gamma * update


class DenseCLIPHead(nn.Module):
    """Pixel-text score maps and segmentation logits.

    forward(pixel_emb [B, gh, gw, D] in the text space, global_emb [B, D], text_emb [K, D],
    features [B, gh, gw, C] or None) -> {"score_map": cosine [B, K, gh, gw], "aux_logits": score map x
    temperature, "logits": conv decoder over [features, score maps] (the scaled score map if no
    features), "text": updated class embeddings [B, K, D]}.
    """

    def __init__(self, embed_dim: int, num_classes: int, feature_dim: int = 0, hidden: int = 128,
                 context_width: int = 128, context_layers: int = 2, init_temperature: float = 0.07) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.context_decoder = ContextDecoder(embed_dim, context_width, layers=context_layers)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))
        self.decoder: nn.Module | None = None
        if feature_dim > 0:
            self.decoder = nn.Sequential(
                nn.Conv2d(feature_dim + num_classes, hidden, 3, padding=1),
                nn.GroupNorm(8 if hidden % 8 == 0 else 1, hidden),
                nn.GELU(),
                nn.Conv2d(hidden, num_classes, 1),
            )

    def forward(self, pixel_emb: torch.Tensor, global_emb: torch.Tensor, text_emb: torch.Tensor,
                features: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if text_emb.shape[-2] != self.num_classes:
            raise ValueError(f"text_emb has {text_emb.shape[-2]} classes, the head {self.num_classes}")
        b, gh, gw, d = pixel_emb.shape
        visual = torch.cat([global_emb.unsqueeze(1), pixel_emb.reshape(b, gh * gw, d)], dim=1)
        text = self.context_decoder(text_emb, visual)
        score = torch.einsum("bhwd,bkd->bkhw", F.normalize(pixel_emb, dim=-1), F.normalize(text, dim=-1))
        aux = score * self.logit_scale.clamp(max=math.log(100.0)).exp()
        if self.decoder is not None and features is not None:
            logits = self.decoder(torch.cat([features.permute(0, 3, 1, 2), aux], dim=1))
        else:
            logits = aux
        return {"score_map": score, "aux_logits": aux, "logits": logits, "text": text}


class DenseCLIPSegmenter(nn.Module):
    """A vlp CLIP image tower + learnable prompts + DenseCLIPHead: images -> per-patch class logits.

    `classnames` are all the classes the head predicts, background included if the data has one.
    Patch embeddings are the last block's tokens through the final norm(s) and `image_proj`; the global
    embedding is `clip.encode_image`'s (pooled) one, computed from the same forward pass.
    """

    def __init__(self, clip: nn.Module, tokenizer, classnames: list[str], n_ctx: int = 4,
                 hidden: int = 128, use_features: bool = True) -> None:
        super().__init__()
        self.clip = clip
        self.preprocess = clip.preprocess
        self.prompts = PromptLearner(clip, tokenizer, classnames, n_ctx)
        trunk = clip.visual.trunk
        self.head = DenseCLIPHead(clip.image_proj.out_features, len(classnames),
                                  int(trunk.num_features) if use_features else 0, hidden)

    def dense(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pixel embeddings [B, gh, gw, D], global embedding [B, D], patch features [B, gh, gw, C])."""
        trunk = self.clip.visual.trunk
        tokens = trunk.forward_features(images)
        pooled = self.clip.image_proj(trunk.forward_head(tokens, pre_logits=True))
        patches = patch_tokens_of_features(trunk, tokens)
        gh, gw = trunk.patch_embed.grid_size
        feats = patches.reshape(patches.shape[0], gh, gw, -1)
        return self.clip.image_proj(feats), pooled, feats

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        pixel, pooled, feats = self.dense(images)
        return self.head(pixel, pooled, self.prompts(), feats if self.head.decoder is not None else None)

    def loss(self, out: dict[str, torch.Tensor], masks: torch.Tensor, aux_weight: float = 0.4,
             ignore_index: int = 255, class_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy of the upsampled logits (+ `aux_weight` x that of the score map) against masks,
        each class's pixels weighted by `class_weight` [K] if given."""
        size = masks.shape[-2:]
        ce = F.cross_entropy(F.interpolate(out["logits"], size=size, mode="bilinear", align_corners=False),
                             masks.long(), weight=class_weight, ignore_index=ignore_index)
        if aux_weight > 0:
            aux = F.interpolate(out["aux_logits"], size=size, mode="bilinear", align_corners=False)
            ce = ce + aux_weight * F.cross_entropy(aux, masks.long(), weight=class_weight, ignore_index=ignore_index)
        return ce

"""Text tower: CLIP-style causal transformer over BPE tokens, pooled at the end-of-text token.

Blocks reuse timm's pre-norm ViT `Block` (fused SDPA, `is_causal=True`) so the math matches
open_clip's `TextTransformer` (LayerNorm eps 1e-5, exact GELU, causal mask, ln_final before pooling).
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import get_act_layer
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlp.models.config import TextTowerConfig


def eot_positions(tokens: torch.Tensor, eot_token_id: int) -> torch.Tensor:
    """Index of the first end-of-text token per row; rows without one fall back to argmax.

    The fallback matches open_clip's argmax pooling (eot has the largest id in CLIP's vocab).
    """
    is_eot = tokens == eot_token_id
    first = is_eot.int().argmax(dim=-1)
    return torch.where(is_eot.any(dim=-1), first, tokens.argmax(dim=-1))


class TextTower(nn.Module):
    """`forward(tokens [B, L]) -> pooled [B, width]`; `forward_tokens` gives every position."""

    def __init__(self, cfg: TextTowerConfig) -> None:
        super().__init__()
        if cfg.pool not in ("eot", "last"):
            raise ValueError(f"text pool must be 'eot' or 'last', got '{cfg.pool}'")
        if cfg.width % cfg.heads:
            raise ValueError(f"text width {cfg.width} is not divisible by heads {cfg.heads}")
        self.config = cfg
        self.context_length = cfg.context_length
        self.width = cfg.width
        self.eot_token_id = cfg.eot_token_id
        self.grad_checkpointing = False

        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        norm = partial(nn.LayerNorm, eps=1e-5)
        self.blocks = nn.ModuleList(
            Block(
                dim=cfg.width,
                num_heads=cfg.heads,
                mlp_ratio=cfg.mlp_ratio,
                qkv_bias=True,
                norm_layer=norm,
                act_layer=nn.GELU if cfg.act == "gelu" else get_act_layer(cfg.act),
            )
            for _ in range(cfg.layers)
        )
        self.ln_final = norm(cfg.width)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """CLIP's init: small embeddings and depth-scaled residual projections for stable early training."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        attn_std = self.width**-0.5
        proj_std = attn_std * (2 * max(len(self.blocks), 1)) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for blk in self.blocks:
            nn.init.normal_(blk.attn.qkv.weight, std=attn_std)
            nn.init.zeros_(blk.attn.qkv.bias)
            nn.init.normal_(blk.attn.proj.weight, std=proj_std)
            nn.init.zeros_(blk.attn.proj.bias)
            nn.init.normal_(blk.mlp.fc1.weight, std=fc_std)
            nn.init.zeros_(blk.mlp.fc1.bias)
            nn.init.normal_(blk.mlp.fc2.weight, std=proj_std)
            nn.init.zeros_(blk.mlp.fc2.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-position outputs after ln_final, `[B, L, width]`; position i sees only tokens <= i."""
        seq_len = tokens.shape[1]
        if seq_len > self.context_length:
            raise ValueError(f"token length {seq_len} exceeds context_length {self.context_length}")
        x = self.token_embedding(tokens) + self.positional_embedding[:seq_len]
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, None, self.config.causal, use_reentrant=False)
            else:
                x = blk(x, is_causal=self.config.causal)
        return self.ln_final(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.forward_tokens(tokens)
        if self.config.pool == "last":
            return x[:, -1]
        idx = eot_positions(tokens, self.eot_token_id)
        return x[torch.arange(x.shape[0], device=x.device), idx]

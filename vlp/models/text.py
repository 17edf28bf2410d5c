"""Text tower: CLIP-style causal transformer over BPE tokens, pooled at the end-of-text token.

Blocks reuse timm's pre-norm ViT `Block` (fused SDPA, `is_causal=True`) so the math matches
open_clip's `TextTransformer` (LayerNorm eps 1e-5, exact GELU, causal mask, ln_final before pooling).

Prefix Conditioning (Saito et al. 2022, `prefix_kinds`): one learned embedding per data kind is
inserted as an extra token right after the start-of-text token, so the sequence is
[sot, prefix(kind), t1, ..., eot, pad...]. The word tokens keep their own positional embeddings
(index i of `tokens` still gets row i) and the prefix gets none: a learned per-kind vector already
marks its place, and a position vector added to it would be the same for every kind. Every later
position attends to the prefix (the mask stays causal), so the pooled end-of-text output depends on
the kind; the outputs are returned at the token positions only, so pooling indices are unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
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
        self.prefix_kinds: tuple[str, ...] = tuple(cfg.prefix_kinds)
        if any(not isinstance(k, str) or not k for k in self.prefix_kinds) or \
                len(set(self.prefix_kinds)) != len(self.prefix_kinds):
            raise ValueError(f"text prefix_kinds must be distinct non-empty names, got {list(self.prefix_kinds)}")
        self.prefix_embedding = (nn.Parameter(torch.empty(len(self.prefix_kinds), cfg.width))
                                 if self.prefix_kinds else None)
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
            # MLP biases keep PyTorch's Linear init, as open_clip's (only attention biases start at 0)
            blk.mlp.fc1.reset_parameters()
            nn.init.normal_(blk.mlp.fc1.weight, std=fc_std)
            blk.mlp.fc2.reset_parameters()
            nn.init.normal_(blk.mlp.fc2.weight, std=proj_std)
        if self.prefix_embedding is not None:
            # drawn without advancing the global RNG: the other parameters start exactly as in the
            # same model without prefixes at the same seed, so a with/without comparison isolates them
            with torch.random.fork_rng(devices=[]):
                nn.init.normal_(self.prefix_embedding, std=0.02)

    def kind_ids(self, kinds: str | Sequence[str] | torch.Tensor | None, batch: int,
                 device: torch.device | str) -> torch.Tensor | None:
        """Per-sample prefix index [batch] from one kind name, a name per sample or indices.

        None on a prefix-conditioned tower means "caption" (the mode zero-shot use defaults to).
        """
        if not self.prefix_kinds:
            if kinds is not None:
                raise ValueError(f"text kinds {kinds!r} given, but this text tower has no prefix "
                                 "conditioning (model text.prefix_kinds is empty)")
            return None
        if kinds is None:
            if "caption" not in self.prefix_kinds:
                raise ValueError(f"this text tower is prefix-conditioned on {list(self.prefix_kinds)}: "
                                 "pass the kind of the texts (there is no 'caption' kind to default to)")
            kinds = "caption"
        if isinstance(kinds, torch.Tensor):
            ids = kinds.to(device=device, dtype=torch.long).reshape(-1)
            if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < len(self.prefix_kinds)):
                raise ValueError(f"text kind index out of range [0, {len(self.prefix_kinds)}): {ids.tolist()}")
        else:
            names = [kinds] * batch if isinstance(kinds, str) else list(kinds)
            unknown = sorted({k for k in names if k not in self.prefix_kinds})
            if unknown:
                raise ValueError(f"unknown text kind(s) {unknown} (this model's prefix_kinds: "
                                 f"{', '.join(self.prefix_kinds)})")
            ids = torch.tensor([self.prefix_kinds.index(k) for k in names], dtype=torch.long, device=device)
        if ids.shape[0] != batch:
            raise ValueError(f"got {ids.shape[0]} text kinds for a batch of {batch} texts")
        return ids

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward_tokens(self, tokens: torch.Tensor,
                       kinds: str | Sequence[str] | torch.Tensor | None = None) -> torch.Tensor:
        """Per-position outputs after ln_final, `[B, L, width]`; position i sees only tokens <= i
        (and, with prefix conditioning, the kind's prefix token, which every token after sot sees)."""
        seq_len = tokens.shape[1]
        if seq_len > self.context_length:
            raise ValueError(f"token length {seq_len} exceeds context_length {self.context_length}")
        x = self.token_embedding(tokens) + self.positional_embedding[:seq_len]
        ids = self.kind_ids(kinds, tokens.shape[0], tokens.device)
        if ids is not None:
            prefix = self.prefix_embedding[ids].to(x.dtype)[:, None]
            x = torch.cat([x[:, :1], prefix, x[:, 1:]], dim=1)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, None, self.config.causal, use_reentrant=False)
            else:
                x = blk(x, is_causal=self.config.causal)
        if ids is not None:
            x = torch.cat([x[:, :1], x[:, 2:]], dim=1)  # drop the prefix position
        return self.ln_final(x)

    def forward(self, tokens: torch.Tensor, kinds: str | Sequence[str] | torch.Tensor | None = None) -> torch.Tensor:
        x = self.forward_tokens(tokens, kinds)
        if self.config.pool == "last":
            return x[:, -1]
        idx = eot_positions(tokens, self.eot_token_id)
        return x[torch.arange(x.shape[0], device=x.device), idx]

"""CoCa (Yu et al. 2022, "Contrastive Captioners"): a CLIP-style dual encoder plus a captioning decoder.

    image -> timm trunk tokens -> attentional pooler (1 + n learned queries) -> ln_post
             query 0 -> image_proj -> contrastive image embedding
             queries 1..n -> image tokens the decoder cross-attends to
    text  -> unimodal causal text tower with a learned CLS embedding appended after the tokens
             CLS output -> ln_final -> text_proj -> contrastive text embedding
             token outputs -> multimodal decoder (causal self-attention, then cross-attention to the
             image tokens, per layer) -> next-token logits for the captioning loss

The layout follows open_clip's `coca_*` models (one pooler whose first query is the contrastive one),
so their checkpoints convert by renaming (vlp/interop/open_clip_coca.py). Blocks are timm's
pre-norm `Block` (fused attention) and torch's `nn.MultiheadAttention` where keys and queries
differ in width. Like CLIP, the module holds no distributed code.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import Mlp, get_act_layer
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlp.models.clip import _NO_DECAY_FRAGMENTS
from vlp.models.config import CoCaConfig, DecoderConfig, PreprocessConfig, TextTowerConfig
from vlp.models.text import TextTower
from vlp.models.vision import VisionTower

LayerNorm = partial(nn.LayerNorm, eps=1e-5)


def _act(name: str) -> type[nn.Module]:
    return nn.GELU if name == "gelu" else get_act_layer(name)


class AttentionalPooler(nn.Module):
    """`n_queries` learned queries attend over the image tokens (layer-normed queries and keys)."""

    def __init__(self, dim: int, context_dim: int, heads: int, n_queries: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attentional pooler width {dim} is not divisible by pool_heads {heads}")
        self.query = nn.Parameter(torch.randn(n_queries, dim))  # scale is irrelevant: ln_q follows
        self.attn = nn.MultiheadAttention(dim, heads, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.ln_q = LayerNorm(dim)
        self.ln_k = LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_k(x)
        q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.attn(q, x, x, need_weights=False)[0]


class CrossAttentionBlock(nn.Module):
    """Pre-norm block: text positions attend to (separately normed) image tokens, then an MLP."""

    def __init__(self, dim: int, context_dim: int, heads: int, mlp_ratio: float, act: type[nn.Module]) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.norm_kv = LayerNorm(context_dim)
        self.attn = nn.MultiheadAttention(dim, heads, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(context)
        x = x + self.attn(self.norm1(x), kv, kv, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


@torch.no_grad()
def _init_residual(attn_in: torch.Tensor, attn_out: nn.Linear, mlp: nn.Module, width: int, depth: int) -> None:
    """CLIP's init: width^-0.5 for attention inputs, depth-scaled residual outputs, zero biases."""
    proj_std = width**-0.5 * (2 * max(depth, 1)) ** -0.5
    nn.init.normal_(attn_in, std=width**-0.5)
    nn.init.normal_(attn_out.weight, std=proj_std)
    nn.init.normal_(mlp.fc1.weight, std=(2 * width) ** -0.5)
    nn.init.normal_(mlp.fc2.weight, std=proj_std)
    for b in (attn_out.bias, mlp.fc1.bias, mlp.fc2.bias):
        nn.init.zeros_(b)


class MultimodalDecoder(nn.Module):
    """`forward(text_tokens [B, T, width], image_tokens [B, n, C]) -> logits [B, T, num_classes]`, causal in T.

    Without a shortlist the classes are the token ids; with `vocab_ids` class 0 is "any other id"
    and class i the id vocab_ids[i-1] (`token_to_class` / `class_to_token` convert).
    """

    def __init__(self, cfg: DecoderConfig, context_dim: int, act: str = "gelu") -> None:
        super().__init__()
        if cfg.width % cfg.heads:
            raise ValueError(f"decoder width {cfg.width} is not divisible by heads {cfg.heads}")
        self.config = cfg
        self.grad_checkpointing = False
        act_layer = _act(act)
        self.self_blocks = nn.ModuleList(
            Block(dim=cfg.width, num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True,
                  norm_layer=LayerNorm, act_layer=act_layer)
            for _ in range(cfg.layers)
        )
        self.cross_blocks = nn.ModuleList(
            CrossAttentionBlock(cfg.width, context_dim, cfg.heads, cfg.mlp_ratio, act_layer)
            for _ in range(cfg.layers)
        )
        self.ln_final = LayerNorm(cfg.width)
        ids = torch.tensor(cfg.vocab_ids, dtype=torch.long)
        if ids.numel() and (ids.min() < 0 or ids.max() >= cfg.vocab_size or ids.unique().numel() != ids.numel()):
            raise ValueError(f"decoder.vocab_ids must be distinct ids in [0, {cfg.vocab_size})")
        self.num_classes = ids.numel() + 1 if ids.numel() else cfg.vocab_size
        # token id -> output class and back; derived from the config, so not saved with the weights
        to_class = torch.zeros(cfg.vocab_size, dtype=torch.long)  # ids off the shortlist -> class 0
        to_class[ids] = torch.arange(1, ids.numel() + 1)
        if not ids.numel():
            to_class = torch.arange(cfg.vocab_size)
        self.register_buffer("_to_class", to_class, persistent=False)
        self.register_buffer("_to_token", torch.cat([ids.new_zeros(1), ids]) if ids.numel() else to_class,
                             persistent=False)
        self.head = nn.Linear(cfg.width, self.num_classes, bias=False)
        with torch.no_grad():
            for blk in self.self_blocks:
                _init_residual(blk.attn.qkv.weight, blk.attn.proj, blk.mlp, cfg.width, cfg.layers)
                nn.init.zeros_(blk.attn.qkv.bias)
            for blk in self.cross_blocks:
                mha = blk.attn
                ins = [mha.in_proj_weight] if mha.in_proj_weight is not None else [
                    mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight]
                for w in ins:
                    _init_residual(w, mha.out_proj, blk.mlp, cfg.width, cfg.layers)
                nn.init.zeros_(mha.in_proj_bias)
            nn.init.normal_(self.head.weight, std=cfg.width**-0.5)

    def token_to_class(self, tokens: torch.Tensor) -> torch.Tensor:
        """Output-class index of each token id (identity without a shortlist)."""
        return self._to_class[tokens]

    def class_to_token(self, classes: torch.Tensor) -> torch.Tensor:
        return self._to_token[classes]

    def allowed_classes(self) -> torch.Tensor:
        """Bool [num_classes]: classes generation may emit (not the shortlist's "other" class)."""
        ok = torch.ones(self.num_classes, dtype=torch.bool, device=self.head.weight.device)
        if self.config.vocab_ids:
            ok[0] = False
        return ok

    def forward(self, x: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        for sblk, xblk in zip(self.self_blocks, self.cross_blocks):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(sblk, x, None, True, use_reentrant=False)
                x = checkpoint(xblk, x, image_tokens, use_reentrant=False)
            else:
                x = xblk(sblk(x, is_causal=True), image_tokens)
        return self.head(self.ln_final(x))


class CoCaTextTower(TextTower):
    """Unimodal text tower: a learned CLS embedding is appended after the tokens (one more position).

    Attention is causal and padding keys are masked, so the CLS output summarises the caption; it
    is layer-normed and returned as the pooled feature. The per-token outputs (not layer-normed,
    as in open_clip) feed the multimodal decoder.
    """

    def __init__(self, cfg: TextTowerConfig, pad_token_id: int = 0, cls_mask: str = "correct") -> None:
        if cls_mask not in ("correct", "legacy"):
            raise ValueError(f"cls_mask must be 'correct' or 'legacy', got '{cls_mask}'")
        super().__init__(replace(cfg, context_length=cfg.context_length + 1))
        self.context_length = cfg.context_length  # tokens; the extra position is the CLS
        self.pad_token_id = pad_token_id
        self.cls_mask = cls_mask
        self.cls_emb = nn.Parameter(torch.empty(cfg.width))
        nn.init.normal_(self.cls_emb, std=0.01)

    def attention_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """Additive [B, 1, T+1, T+1] mask: causal, and padding keys hidden.

        "legacy" aligns the key-padding mask one position late (open_clip's default for CoCa), so
        position j is hidden when token j-1 is padding; kept for converted checkpoints.
        """
        b, t = tokens.shape
        valid = tokens != self.pad_token_id
        ones = valid.new_ones(b, 1)
        keys = torch.cat([valid, ones] if self.cls_mask == "correct" else [ones, valid], dim=1)
        causal = torch.ones(t + 1, t + 1, dtype=torch.bool, device=tokens.device).tril()
        allowed = causal[None, None] & keys[:, None, None, :]
        mask = torch.zeros(allowed.shape, dtype=self.cls_emb.dtype, device=tokens.device)
        return mask.masked_fill(~allowed, float("-inf"))

    def forward_with_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled CLS [B, width] after ln_final, token outputs [B, T, width])."""
        b, t = tokens.shape
        if t > self.context_length:
            raise ValueError(f"token length {t} exceeds context_length {self.context_length}")
        x = self.token_embedding(tokens)
        x = torch.cat([x, self.cls_emb.to(x.dtype).expand(b, 1, -1)], dim=1)
        x = x + self.positional_embedding[: t + 1].to(x.dtype)
        mask = self.attention_mask(tokens).to(x.dtype)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, mask, use_reentrant=False)
            else:
                x = blk(x, attn_mask=mask)
        return self.ln_final(x[:, -1]), x[:, :-1]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.forward_with_tokens(tokens)[0]


class CoCa(nn.Module):
    """Contrastive captioner. `forward(images, tokens)` returns CLIP's outputs plus next-token
    `logits` [B, T-1, classes] for `tokens[:, :-1]` and their targets `labels`: the classes of
    `tokens[:, 1:]`, -100 (ignored by cross-entropy) at padding."""

    # see CLIP.PARTS: the attentional pooler reads image tokens; the decoder is a part of its own
    PARTS: dict[str, tuple[str, ...]] = {
        "image": ("visual.", "attn_pool.", "ln_post.", "image_proj."),
        "text": ("text.", "text_proj."),
        "decoder": ("decoder.",),
        "logit": ("logit_scale",),
    }

    def __init__(self, cfg: CoCaConfig) -> None:
        super().__init__()
        if cfg.caption_queries < 1:
            raise ValueError(f"caption_queries must be >= 1, got {cfg.caption_queries}")
        if cfg.text.prefix_kinds:
            raise ValueError("text.prefix_kinds: prefix conditioning is implemented for the CLIP text tower; "
                             "CoCa's text tower (CLS token, captioning decoder) does not take prefixes")
        if cfg.decoder.width != cfg.text.width:
            raise ValueError(f"decoder.width ({cfg.decoder.width}) must equal text.width ({cfg.text.width}): "
                             "the decoder continues the text tower's token outputs")
        self.config = cfg
        self.preprocess: PreprocessConfig = cfg.preprocess
        self.pad_token_id = cfg.pad_token_id
        self.visual = VisionTower(cfg.vision)
        self.attn_pool = AttentionalPooler(cfg.embed_dim, self.visual.num_features, cfg.pool_heads,
                                           1 + cfg.caption_queries)
        self.ln_post = LayerNorm(cfg.embed_dim)
        self.image_proj = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=False)
        self.text = CoCaTextTower(cfg.text, cfg.pad_token_id, cfg.cls_mask)
        self.text_proj = nn.Linear(cfg.text.width, cfg.embed_dim, bias=False)
        self.decoder = MultimodalDecoder(cfg.decoder, cfg.embed_dim, cfg.text.act)
        self.logit_scale = nn.Parameter(torch.full((1,), float(cfg.init_logit_scale)))
        self.logit_bias = None
        if cfg.init_logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.full((1,), float(cfg.init_logit_bias)))
        with torch.no_grad():
            nn.init.normal_(self.image_proj.weight, std=cfg.embed_dim**-0.5)
            nn.init.normal_(self.text_proj.weight, std=cfg.text.width**-0.5)

    # ---- towers ----------------------------------------------------------------------------------

    def image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(projected contrastive embedding [B, embed_dim], captioning tokens [B, n, embed_dim])."""
        x = self.visual.forward_features(images)
        if x.ndim == 4:  # CNN trunks: feature map -> token sequence
            x = x.flatten(2).transpose(1, 2)
        x = self.ln_post(self.attn_pool(x))
        return self.image_proj(x[:, 0]), x[:, 1:]

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.image_tokens(images)[0]
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.text_proj(self.text(tokens))
        return F.normalize(x, dim=-1) if normalize else x

    def caption_logits(self, tokens: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits [B, T, classes] at every position of `tokens` (position i sees tokens <= i)."""
        return self.decoder(self.text.forward_with_tokens(tokens)[1], image_tokens)

    def clamped_logit_scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=self.config.max_logit_scale).exp().reshape(())

    def forward(
        self, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {"logit_scale": self.clamped_logit_scale()}
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias.reshape(())
        img_tokens = None
        if images is not None:
            pooled, img_tokens = self.image_tokens(images)
            out["image_features"] = F.normalize(pooled, dim=-1)
        if tokens is not None:
            pooled, tok = self.text.forward_with_tokens(tokens)
            out["text_features"] = F.normalize(self.text_proj(pooled), dim=-1)
            if img_tokens is not None:  # teacher forcing: predict token i+1 from tokens <= i
                out["logits"] = self.decoder(tok[:, :-1], img_tokens)
                nxt = tokens[:, 1:]
                out["labels"] = self.decoder.token_to_class(nxt).masked_fill(nxt == self.pad_token_id, -100)
        return out

    # ---- training helpers --------------------------------------------------------------------------

    def no_weight_decay(self) -> set[str]:
        frags = (*_NO_DECAY_FRAGMENTS, "cls_emb", "attn_pool.query")
        return {name for name, p in self.named_parameters() if p.ndim < 2 or any(f in name for f in frags)}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)
        self.decoder.grad_checkpointing = enable

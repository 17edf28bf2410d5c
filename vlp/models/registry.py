"""Named model presets. Each preset is a small function returning a fresh CLIPConfig."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import fields, replace
from typing import Any

from vlp.models.clip import CLIP
from vlp.models.coca import CoCa
from vlp.models.config import (
    CLIPConfig,
    CoCaConfig,
    DecoderConfig,
    PreprocessConfig,
    TextTowerConfig,
    VisionTowerConfig,
    apply_overrides,
)
from vlp.models.families import build_model
from vlp.models.tips import TIPS, TIPSConfig

ConfigFn = Callable[[], CLIPConfig]
_REGISTRY: dict[str, ConfigFn] = {}

FASHION_MNIST_MEAN = (0.2860, 0.2860, 0.2860)
FASHION_MNIST_STD = (0.3530, 0.3530, 0.3530)
# sklearn 8x8 digits scaled to [0, 1]
DIGITS_MEAN = (0.3053, 0.3053, 0.3053)
DIGITS_STD = (0.3760, 0.3760, 0.3760)


def register_model(name: str) -> Callable[[ConfigFn], ConfigFn]:
    """Decorator registering a function that returns a CLIPConfig under `name`."""

    def deco(fn: ConfigFn) -> ConfigFn:
        if name in _REGISTRY:
            raise ValueError(f"model preset '{name}' is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_model_config(name: str, **overrides: Any) -> CLIPConfig:
    """Preset config with nested `overrides` applied (unknown keys raise ValueError naming the key)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model '{name}'; known models: {', '.join(list_models())}")
    cfg = _REGISTRY[name]()
    return apply_overrides(cfg, overrides) if overrides else cfg


def create_model(name: str, **overrides: Any) -> CLIP | CoCa | TIPS:
    """Build a randomly initialised model from a preset name (+ overrides)."""
    return build_model(get_model_config(name, **overrides))


def _vit_text(width: int, heads: int, layers: int = 12) -> TextTowerConfig:
    return TextTowerConfig(context_length=77, vocab_size=49408, width=width, heads=heads, layers=layers)


# ---- tiny presets for CPU demos and tests ---------------------------------------------------------


@register_model("clip-nano")
def clip_nano() -> CLIPConfig:
    """Seconds-fast model for unit tests: 8x8 digits upsampled to 16 px."""
    return CLIPConfig(
        embed_dim=64,
        vision=VisionTowerConfig(
            timm_model="vit_base_patch32_clip_224",
            # mean-pooled patch tokens (tests rely on this layout; a class token learns as well since
            # vision.init=clip - under timm's init it stalled, see tests/test_init.py)
            timm_kwargs=dict(img_size=16, patch_size=4, embed_dim=64, depth=2, num_heads=2,
                             global_pool="avg", class_token=False),
        ),
        text=TextTowerConfig(context_length=16, width=64, heads=2, layers=2),
        preprocess=PreprocessConfig(
            image_size=16, mean=DIGITS_MEAN, std=DIGITS_STD, interpolation="bilinear"
        ),
    )


@register_model("clip-tiny")
def clip_tiny() -> CLIPConfig:
    """CPU demo on 28x28 Fashion-MNIST (gray repeated to RGB): 16 patches of 7 px + a class token.

    Patch 7 is ~3x cheaper than patch 4 on two CPU cores; captions fit in 16 tokens. The class-token
    layout is open_clip's, so the demo model exports to open_clip and transformers.
    """
    return CLIPConfig(
        embed_dim=128,
        vision=VisionTowerConfig(
            timm_model="vit_base_patch32_clip_224",
            timm_kwargs=dict(img_size=28, patch_size=7, embed_dim=192, depth=4, num_heads=3),
        ),
        text=TextTowerConfig(context_length=16, width=128, heads=4, layers=3),
        preprocess=PreprocessConfig(
            image_size=28, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD, interpolation="bilinear"
        ),
    )


@register_model("siglip-tiny")
def siglip_tiny() -> CLIPConfig:
    """clip-tiny with SigLIP's learnable logit bias and its initial temperature (t=10, b=-10).

    Train it with loss.name=siglip.
    """
    return replace(clip_tiny(), init_logit_scale=math.log(10.0), init_logit_bias=-10.0)


@register_model("siglip-nano")
def siglip_nano() -> CLIPConfig:
    """clip-nano with SigLIP's logit bias, for fast tests of the sigmoid loss."""
    return replace(clip_nano(), init_logit_scale=math.log(10.0), init_logit_bias=-10.0)


def _siglip_architecture(base: CLIPConfig) -> CLIPConfig:
    """SigLIP's own layout on a small preset, as in transformers' SiglipModel: ViT without class
    token or pre-norm, MAP attention-pooling head, no image projection; bidirectional text pooled
    at the last position. Exportable with `python -m vlp.export RUN --to hf` (SiglipModel)."""
    kw = {k: v for k, v in base.vision.timm_kwargs.items() if k not in ("global_pool", "class_token")}
    return replace(
        base,
        embed_dim=kw["embed_dim"],
        vision=VisionTowerConfig("vit_base_patch16_siglip_224", {**kw, "global_pool": "map"}),
        text=replace(base.text, causal=False, pool="last"),
        image_proj=False,
    )


@register_model("siglip-map-nano")
def siglip_map_nano() -> CLIPConfig:
    """siglip-nano in SigLIP's own architecture (MAP head, bidirectional text): tests of the HF export."""
    return _siglip_architecture(siglip_nano())


@register_model("siglip-map-tiny")
def siglip_map_tiny() -> CLIPConfig:
    """siglip-tiny in SigLIP's own architecture (MAP head, bidirectional text, no image projection)."""
    return _siglip_architecture(siglip_tiny())


@register_model("siglip_vit_b16")
def siglip_vit_b16() -> CLIPConfig:
    """SigLIP ViT-B/16 at 224 px (Zhai et al. 2023) in SigLIP's own layout: ViT-B/16 without class
    token, MAP head, embedding width 768; a 12-layer, 768-wide bidirectional text tower over 64
    tokens pooled at the last position; t=10, b=-10 at init; mean = std = 0.5. The text tower uses
    vlp's BPE vocabulary (49,408) instead of SigLIP's SentencePiece one, so it trains from scratch
    with loss.name=siglip and exports to transformers' SiglipModel."""
    return CLIPConfig(
        embed_dim=768,
        vision=VisionTowerConfig(
            "vit_base_patch16_siglip_224",
            dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, global_pool="map"),
        ),
        text=TextTowerConfig(context_length=64, vocab_size=49408, width=768, heads=12, layers=12,
                             causal=False, pool="last"),
        preprocess=PreprocessConfig(image_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        init_logit_scale=math.log(10.0),
        init_logit_bias=-10.0,
        image_proj=False,
    )


# ---- open_clip-equivalent architectures (GELU, OpenAI mean/std, bicubic 224) ----------------------


@register_model("ViT-B-32")
def vit_b_32() -> CLIPConfig:
    return CLIPConfig(
        embed_dim=512,
        vision=VisionTowerConfig(
            "vit_base_patch32_clip_224",
            dict(img_size=224, patch_size=32, embed_dim=768, depth=12, num_heads=12),
        ),
        text=_vit_text(width=512, heads=8),
    )


@register_model("ViT-B-16")
def vit_b_16() -> CLIPConfig:
    return CLIPConfig(
        embed_dim=512,
        vision=VisionTowerConfig(
            "vit_base_patch16_clip_224",
            dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),
        ),
        text=_vit_text(width=512, heads=8),
    )


@register_model("ViT-L-14")
def vit_l_14() -> CLIPConfig:
    return CLIPConfig(
        embed_dim=768,
        vision=VisionTowerConfig(
            "vit_large_patch14_clip_224",
            dict(img_size=224, patch_size=14, embed_dim=1024, depth=24, num_heads=16),
        ),
        text=_vit_text(width=768, heads=12),
    )


# ---- CNN image tower example ----------------------------------------------------------------------


@register_model("convnext-tiny-clip")
def convnext_tiny_clip() -> CLIPConfig:
    """timm ConvNeXt-T (pooled + head norm, 768-d) with a ViT-B-32-sized text tower."""
    return CLIPConfig(
        embed_dim=512,
        vision=VisionTowerConfig("convnext_tiny", {}),
        text=_vit_text(width=512, heads=8),
    )


# ---- CoCa ---------------------------------------------------------------------------------------


def demo_caption_vocab() -> tuple[int, ...]:
    """Every BPE id in the built-in sources' captions and prompts (Fashion-MNIST, digits), sot and eot.

    coca-tiny's decoder scores only these (plus an "other" class): a 49,408-way head would make the
    CPU demo about six times slower, for ids its captions never contain.
    """
    from vlp.data.captions import CLASSNAMES, EVAL_TEMPLATES, SYNONYMS, TRAIN_TEMPLATES
    from vlp.data.tokenizer import Tokenizer

    tok = Tokenizer(2)
    ids = {tok.sot_token_id, tok.eot_token_id}
    for src in CLASSNAMES:
        words = [w for syn in SYNONYMS[src] for w in syn] + list(CLASSNAMES[src])
        for template in TRAIN_TEMPLATES[src] + EVAL_TEMPLATES[src]:
            for w in words:
                ids.update(tok.encode(template.replace("{c}", w) if "{c}" in template else template.format(w)))
    return tuple(sorted(ids))


def _coca_on(base: CLIPConfig, heads: int, layers: int, queries: int) -> CoCaConfig:
    """A small CLIP preset's towers + CoCa's pooler and decoder (shortlisted demo vocabulary)."""
    kw = {**base.vision.timm_kwargs, "final_norm": False}  # the pooler norms its keys itself
    return CoCaConfig(
        embed_dim=base.embed_dim,
        vision=VisionTowerConfig(base.vision.timm_model, kw),
        text=base.text,
        preprocess=base.preprocess,
        decoder=DecoderConfig(width=base.text.width, heads=heads, layers=layers, vocab_ids=demo_caption_vocab()),
        caption_queries=queries,
        pool_heads=heads,
    )


@register_model("coca-tiny")
def coca_tiny() -> CoCaConfig:
    """clip-tiny's towers with CoCa's attentional pooler (1 + 16 queries) and a 2-layer decoder
    whose head scores the demo captions' ids (`demo_caption_vocab`)."""
    return _coca_on(clip_tiny(), heads=4, layers=2, queries=16)


@register_model("coca-nano")
def coca_nano() -> CoCaConfig:
    """clip-nano's towers with a 1 + 8 query pooler and a 1-layer decoder, for fast tests."""
    return _coca_on(clip_nano(), heads=2, layers=1, queries=8)


@register_model("coca_ViT-B-32")
def coca_vit_b_32() -> CoCaConfig:
    """open_clip's `coca_ViT-B-32`: ViT-B/32 trunk (no final norm), 256-query pooler, 12 + 12 text layers.

    Text holds 76 tokens (+ the CLS position); open_clip's key-padding mask for the CLS is kept.
    """
    return CoCaConfig(
        embed_dim=512,
        vision=VisionTowerConfig(
            "vit_base_patch32_clip_224",
            dict(img_size=224, patch_size=32, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, final_norm=False),
        ),
        text=replace(_vit_text(width=512, heads=8), context_length=76),
        decoder=DecoderConfig(width=512, heads=8, layers=12),
        caption_queries=255,
        pool_heads=8,
        cls_mask="legacy",
    )


# ---- TIPS ---------------------------------------------------------------------------------------


def _tips_on(base: CLIPConfig, **kw: Any) -> TIPSConfig:
    """A small CLIP preset's towers with two pooled image embeddings and a DINO/iBOT head."""
    return TIPSConfig(**{f.name: getattr(base, f.name) for f in fields(CLIPConfig)}, **kw)


@register_model("tips-tiny")
def tips_tiny() -> TIPSConfig:
    """clip-tiny's towers (class-token ViT trunk) with two attention-pooled image embeddings (stream 0,
    the default embedding, and stream 1) and a 256-prototype DINO/iBOT head; train with loss.name=tips
    and data.text_streams (two caption keys)."""
    return _tips_on(clip_tiny(), num_streams=2, head_hidden=256, head_bottleneck=64, prototypes=256)


@register_model("tips-nano")
def tips_nano() -> TIPSConfig:
    """clip-nano's towers with two streams and a 64-prototype head, for fast tests."""
    return _tips_on(clip_nano(), num_streams=2, head_hidden=64, head_bottleneck=32, prototypes=64)

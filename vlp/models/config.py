"""Typed model configs. A checkpoint stores `asdict(CLIPConfig)`, so it can rebuild its model alone."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any

# the image side of a model config lives with the data code that applies it (vlp/data/preprocess.py)
from vlp.data.preprocess import OPENAI_MEAN, OPENAI_STD, PreprocessConfig  # noqa: F401  (re-exported)


@dataclass
class VisionTowerConfig:
    """A timm image model by name, created with no pretrained weights and no classifier head."""

    timm_model: str = "vit_base_patch32_clip_224"
    # extra keyword arguments for timm.create_model (patch_size, embed_dim, depth, num_heads, ...)
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    # FLIP: fraction of patch tokens (never prefix / class tokens) dropped at random per sample
    # before the transformer blocks, in training only; ViT-style timm models (timm's PatchDropout)
    patch_dropout: float = 0.0
    # weight init of the trunk: "clip" re-initialises timm ViTs as open_clip initialises its ViT
    # (vlp/models/init.py; far better contrastive learning at small widths), "timm" keeps timm's
    init: str = "clip"


@dataclass
class TextTowerConfig:
    """Causal transformer over BPE tokens, pooled at the end-of-text token."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    eot_token_id: int = 49407
    # "gelu" (open_clip's default) or "quick_gelu" (OpenAI's CLIP checkpoints)
    act: str = "gelu"
    # CLIP: causal attention pooled at the end-of-text token; SigLIP: bidirectional, pooled at the
    # last position (causal=False, pool="last")
    causal: bool = True
    pool: str = "eot"  # eot | last
    # Prefix Conditioning (Saito et al. 2022): one learned token per data kind (e.g. caption, label),
    # inserted after the start-of-text token, so that label-made and caption texts train the tower
    # without one biasing the other. Empty: no prefix (the plain CLIP text tower).
    prefix_kinds: tuple[str, ...] = ()


@dataclass
class CLIPConfig:
    embed_dim: int = 512
    vision: VisionTowerConfig = field(default_factory=VisionTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = math.log(100.0)
    # a learnable logit bias (SigLIP's b, init -10); None: the model has none
    init_logit_bias: float | None = None
    # False: the image tower's pooled output is the embedding (SigLIP; needs num_features == embed_dim)
    image_proj: bool = True


@dataclass
class DecoderConfig:
    """CoCa's multimodal text decoder: per layer a causal self-attention block, then a block that
    cross-attends to the image's captioning tokens; a linear head scores the next token."""

    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    vocab_size: int = 49408
    # token ids the head scores (a shortlist, + one "other" class for every id outside it);
    # empty: all vocab_size ids. A small caption domain trains many times faster with a shortlist.
    vocab_ids: tuple[int, ...] = ()


@dataclass
class CoCaConfig(CLIPConfig):
    """CLIPConfig plus CoCa's attentional pooler and multimodal decoder (`text` is the unimodal part).

    The pooler holds 1 + caption_queries learned queries over the image tokens: query 0 gives the
    contrastive embedding, the others the tokens the decoder cross-attends to (open_clip's layout).
    The text tower appends a learned CLS embedding after the tokens; its output is the text embedding.
    """

    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    caption_queries: int = 255
    pool_heads: int = 8
    pad_token_id: int = 0
    # which key the CLS position's padding mask is aligned to: "legacy" shifts the key-padding mask
    # by one (open_clip's default, needed for its checkpoints), "correct" masks exactly the pad tokens
    cls_mask: str = "correct"


@dataclass
class TIPSConfig(CLIPConfig):
    """CLIPConfig plus the number of text streams and the self-distillation head's sizes."""

    num_streams: int = 2  # text streams (e.g. noisy alt-text, synthetic caption), one pooled embedding each
    head_hidden: int = 256  # DINO head: MLP width
    head_bottleneck: int = 64  # l2-normalised bottleneck before the prototypes
    prototypes: int = 256  # number of prototypes (softmax classes of the distillation)


def apply_overrides(obj: Any, overrides: dict[str, Any], prefix: str = "") -> Any:
    """Return a copy of dataclass `obj` with (nested) `overrides` applied.

    Unknown keys raise ValueError naming the dotted key, so a typo never passes silently.
    Dict-valued fields (e.g. timm_kwargs) are merged key by key.
    """
    known = {f.name: f for f in fields(obj)}
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        dotted = f"{prefix}{key}"
        if key not in known:
            raise ValueError(
                f"unknown model config key '{dotted}' (known: {', '.join(sorted(known))})"
            )
        current = getattr(obj, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"model config key '{dotted}' expects a mapping, got {type(value).__name__}")
            changes[key] = apply_overrides(current, value, prefix=f"{dotted}.")
        elif isinstance(current, dict) and isinstance(value, dict):
            changes[key] = {**current, **value}
        elif isinstance(current, tuple):
            changes[key] = tuple(value)
        else:
            changes[key] = value
    return replace(obj, **changes)

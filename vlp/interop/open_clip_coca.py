"""open_clip CoCa <-> vlp CoCa: state dicts and model configs.

Both sides keep the same tensors; names differ and four tensors change layout (class token and
image positional embedding gain leading singleton dims; the image, text and vocabulary projections
are stored as `x @ P` in open_clip and as `nn.Linear` weights in vlp). The attentional pooler and
the decoder's cross-attention are `nn.MultiheadAttention` on both sides, so their keys only move.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from vlp.interop.open_clip_cfg import towers_from_open_clip
from vlp.models.config import (
    CoCaConfig,
    DecoderConfig,
    VisionTowerConfig,
)

_RESBLOCK = {"ln_1": "norm1", "attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias": "attn.qkv.bias",
             "attn.out_proj": "attn.proj", "ln_2": "norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_CROSSBLOCK = {"ln_1_kv": "norm_kv", "ln_1": "norm1", "attn": "attn", "ln_2": "norm2", "mlp.c_fc": "mlp.fc1",
               "mlp.c_proj": "mlp.fc2"}
# open_clip block-list prefix -> (vlp prefix, per-block suffix table)
_BLOCK_LISTS = {
    "visual.transformer.resblocks": ("visual.trunk.blocks", _RESBLOCK),
    "text.transformer.resblocks": ("text.blocks", _RESBLOCK),
    "text_decoder.resblocks": ("decoder.self_blocks", _RESBLOCK),
    "text_decoder.cross_attn": ("decoder.cross_blocks", _CROSSBLOCK),
}
_PLAIN = {
    "visual.conv1": "visual.trunk.patch_embed.proj",
    "visual.ln_pre": "visual.trunk.norm_pre",
    "visual.attn_pool": "attn_pool",
    "visual.ln_post": "ln_post",
    "text.token_embedding": "text.token_embedding",
    "text.positional_embedding": "text.positional_embedding",
    "text.cls_emb": "text.cls_emb",
    "text.ln_final": "text.ln_final",
    "text_decoder.ln_final": "decoder.ln_final",
}
# (open_clip key, vlp key, open_clip -> vlp, vlp -> open_clip)
_LAYOUT = [
    ("visual.class_embedding", "visual.trunk.cls_token", lambda t: t.reshape(1, 1, -1), lambda t: t.reshape(-1)),
    ("visual.positional_embedding", "visual.trunk.pos_embed", lambda t: t.unsqueeze(0), lambda t: t.squeeze(0)),
    ("visual.proj", "image_proj.weight", lambda t: t.t(), lambda t: t.t()),
    ("text.text_projection", "text_proj.weight", lambda t: t.t(), lambda t: t.t()),
    ("text_decoder.text_projection", "decoder.head.weight", lambda t: t.t(), lambda t: t.t()),
    ("logit_scale", "logit_scale", lambda t: t.reshape(1), lambda t: t.reshape(())),
    ("logit_bias", "logit_bias", lambda t: t.reshape(1), lambda t: t.reshape(())),
]
_DROPPED = {"text.attn_mask", "text_decoder.attn_mask", "visual.attn_mask"}


def _swap(key: str, table: Mapping[str, str]) -> str | None:
    for src, dst in table.items():
        if key == src or key.startswith(src + "."):
            return dst + key[len(src):]
    return None


def _convert(sd: Mapping[str, torch.Tensor], to_vlp: bool) -> dict[str, torch.Tensor]:
    lists = _BLOCK_LISTS if to_vlp else {v[0]: (k, {b: a for a, b in v[1].items()}) for k, v in _BLOCK_LISTS.items()}
    plain = _PLAIN if to_vlp else {v: k for k, v in _PLAIN.items()}
    layout = {(oc if to_vlp else v): ((v, f) if to_vlp else (oc, g)) for oc, v, f, g in _LAYOUT}
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        if to_vlp and key in _DROPPED:
            continue
        if key in layout:
            new, fn = layout[key]
            out[new] = fn(value).contiguous()
            continue
        new_key = None
        for prefix, (dst, table) in lists.items():
            m = re.match(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$", key)
            if m:
                suffix = _swap(m.group(2), table)
                new_key = None if suffix is None else f"{dst}.{m.group(1)}.{suffix}"
                break
        else:
            new_key = _swap(key, plain)
        if new_key is None:
            unknown.append(key)
        else:
            out[new_key] = value
    if unknown:
        side = "open_clip CoCa" if to_vlp else "vlp CoCa"
        raise ValueError(f"{side} keys with no counterpart (not a ViT CoCa?): {unknown[:10]}")
    return out


def open_clip_coca_to_vlp(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip `CoCa` state dict -> vlp `CoCa` keys (strict-loadable)."""
    return _convert(sd, to_vlp=True)


def vlp_coca_to_open_clip(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """vlp `CoCa` state dict -> open_clip `CoCa` keys (strict-loadable)."""
    return _convert(sd, to_vlp=False)


def is_open_clip_coca(sd: Mapping[str, Any]) -> bool:
    return any(k.startswith("text_decoder.") for k in sd)


def vlp_coca_config_from_open_clip(model_cfg: Mapping[str, Any],
                                   preprocess: Mapping[str, Any] | None = None) -> CoCaConfig:
    """vlp CoCaConfig equal to an open_clip CoCa model config (ViT towers, token-less pooler layout)."""
    v, t = dict(model_cfg.get("vision_cfg", {})), dict(model_cfg.get("text_cfg", {}))
    m = dict(model_cfg.get("multimodal_cfg", {}))
    bad = [k for k in ("timm_model_name", "hf_model_name", "ls_init_value", "pos_embed_type", "no_ln_pre")
           if v.get(k) or t.get(k) or m.get(k)]
    if v.get("attentional_pool") is not True:
        bad.append(f"vision attentional_pool={v.get('attentional_pool')!r} (vlp has open_clip's shared pooler)")
    if not t.get("embed_cls", False):
        bad.append("text embed_cls=False")
    if t.get("correct_cls_mask"):
        bad.append("text correct_cls_mask (set cls_mask='correct' on a vlp preset instead)")
    if bad or isinstance(v.get("layers"), (list, tuple)):
        raise ValueError(f"open_clip CoCa config not representable in vlp: {bad}")
    vision_kw, text, pre = towers_from_open_clip(model_cfg, preprocess)
    return CoCaConfig(
        embed_dim=model_cfg["embed_dim"],
        vision=VisionTowerConfig("vit_base_patch32_clip_224", {**vision_kw, "final_norm": False}),
        text=text,
        preprocess=pre,
        decoder=DecoderConfig(width=m.get("width", 512), heads=m.get("heads", 8), layers=m.get("layers", 12),
                              mlp_ratio=m.get("mlp_ratio", 4.0), vocab_size=m.get("vocab_size", 49408)),
        caption_queries=v.get("attn_pooler_queries", 256) - 1,
        pool_heads=v.get("attn_pooler_heads", 8),
        cls_mask="legacy",
    )


def open_clip_coca_config_from_vlp(cfg: CoCaConfig, sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """open_clip CoCa `model_cfg` of a vlp CoCa with a class-token CLIP-layout ViT trunk."""
    kw = cfg.vision.timm_kwargs
    if "visual.trunk.cls_token" not in sd or "visual.trunk.norm_pre.weight" not in sd:
        raise ValueError("open_clip's CoCa needs a class-token CLIP-layout ViT image tower (this one has none)")
    if kw.get("final_norm", True) or cfg.cls_mask != "legacy":
        raise ValueError("open_clip's CoCa has no norm before its pooler and the legacy CLS mask; this model "
                         f"has final_norm={kw.get('final_norm', True)}, cls_mask={cfg.cls_mask!r}")
    if cfg.decoder.width != cfg.embed_dim:
        raise ValueError(f"open_clip's CoCa decoder width equals embed_dim ({cfg.decoder.width} != {cfg.embed_dim})")
    t, d = cfg.text, cfg.decoder
    if t.act != kw.get("act_layer", "gelu"):
        raise ValueError("open_clip uses one activation for every tower")
    w = sd["visual.trunk.patch_embed.proj.weight"]
    width = w.shape[0]
    layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("visual.trunk.blocks."))
    return {
        "embed_dim": cfg.embed_dim,
        **({"quick_gelu": True} if t.act == "quick_gelu" else {}),
        "vision_cfg": {"image_size": cfg.preprocess.image_size, "layers": layers, "width": width,
                       "patch_size": w.shape[-1], "head_width": width // int(kw.get("num_heads", 12)),
                       "mlp_ratio": sd["visual.trunk.blocks.0.mlp.fc1.weight"].shape[0] / width,
                       "attentional_pool": True, "attn_pooler_queries": cfg.caption_queries + 1,
                       "attn_pooler_heads": cfg.pool_heads, "output_tokens": True},
        "text_cfg": {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
                     "heads": t.heads, "layers": t.layers, "mlp_ratio": t.mlp_ratio, "embed_cls": True,
                     "output_tokens": True},
        "multimodal_cfg": {"context_length": t.context_length, "vocab_size": d.vocab_size, "width": d.width,
                           "heads": d.heads, "layers": d.layers, "mlp_ratio": d.mlp_ratio,
                           "attn_pooler_heads": cfg.pool_heads},
        "custom_text": True,
    }

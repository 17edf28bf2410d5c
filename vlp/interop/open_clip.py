"""open_clip <-> vlp state-dict conversion for ViT CLIP models (OpenAI layout: `visual.transformer...`).

vlp's ViT image tower is timm's CLIP-layout VisionTransformer and its text tower uses timm blocks, so
the mapping is pure renaming plus three reshapes: the class token and image positional embedding gain
leading singleton dims, and the two projections are stored transposed (`x @ P` vs `nn.Linear`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from vlp.models.clip import CLIP
from vlp.models.registry import create_model

# Per residual block (same names in both towers): open_clip suffix -> timm Block suffix.
_BLOCK_MAP = {
    "ln_1": "norm1",
    "attn.in_proj_weight": "attn.qkv.weight",
    "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj": "attn.proj",
    "ln_2": "norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
# Non-block prefixes: open_clip -> vlp (matched on the whole key or key + ".").
_PREFIX_MAP = {
    "visual.conv1": "visual.trunk.patch_embed.proj",
    "visual.ln_pre": "visual.trunk.norm_pre",
    "visual.ln_post": "visual.trunk.norm",
    "token_embedding": "text.token_embedding",
    "positional_embedding": "text.positional_embedding",
    "ln_final": "text.ln_final",
}
# Tensors whose layout changes: open_clip key -> vlp key.
_RESHAPED = {
    "visual.class_embedding": "visual.trunk.cls_token",
    "visual.positional_embedding": "visual.trunk.pos_embed",
    "visual.proj": "image_proj.weight",
    "text_projection": "text_proj.weight",
    "logit_scale": "logit_scale",  # open_clip: 0-dim; vlp: shape [1] (DeepSpeed broadcasts need >= 1 dim)
}
_DROPPED = {"attn_mask", "visual.attn_mask"}

_OC_BLOCK = re.compile(r"^(visual\.transformer|transformer)\.resblocks\.(\d+)\.(.+)$")
_VLP_BLOCK = re.compile(r"^(visual\.trunk|text)\.blocks\.(\d+)\.(.+)$")


def _map_suffix(suffix: str, table: Mapping[str, str]) -> str | None:
    for src, dst in table.items():
        if suffix == src or suffix.startswith(src + "."):
            return dst + suffix[len(src):]
    return None


def _rename(
    key: str,
    block_re: re.Pattern[str],
    block_map: Mapping[str, str],
    tower_map: Mapping[str, str],
    prefix_map: Mapping[str, str],
) -> str | None:
    """New name for `key`; `tower_map` maps a source tower prefix to the target `<tower>.<blocks>` prefix."""
    m = block_re.match(key)
    if m:
        suffix = _map_suffix(m.group(3), block_map)
        return None if suffix is None else f"{tower_map[m.group(1)]}.{m.group(2)}.{suffix}"
    return _map_suffix(key, prefix_map)


def open_clip_to_vlp_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert an open_clip ViT CLIP state dict to vlp `CLIP` keys; unknown keys raise ValueError."""
    towers = {"visual.transformer": "visual.trunk.blocks", "transformer": "text.blocks"}
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        if key in _DROPPED:
            continue
        if key in _RESHAPED:
            new = _RESHAPED[key]
            if key == "visual.class_embedding":
                value = value.reshape(1, 1, -1)
            elif key == "visual.positional_embedding":
                value = value.unsqueeze(0)
            elif key == "logit_scale":
                value = value.reshape(1)
            else:
                value = value.t().contiguous()
            out[new] = value
            continue
        new_key = _rename(key, _OC_BLOCK, _BLOCK_MAP, towers, _PREFIX_MAP)
        if new_key is None:
            unknown.append(key)
        else:
            out[new_key] = value
    if unknown:
        raise ValueError(f"cannot convert open_clip keys (not a ViT CLIP checkpoint?): {unknown[:10]}")
    return out


def vlp_to_open_clip_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `open_clip_to_vlp_state_dict` (loads into open_clip's CLIP with strict=True)."""
    towers = {"visual.trunk": "visual.transformer.resblocks", "text": "transformer.resblocks"}
    block_map = {v: k for k, v in _BLOCK_MAP.items()}
    prefix_map = {v: k for k, v in _PREFIX_MAP.items()}
    reshaped = {v: k for k, v in _RESHAPED.items()}
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        if key in reshaped:
            new = reshaped[key]
            if key == "visual.trunk.cls_token":
                value = value.reshape(-1)
            elif key == "visual.trunk.pos_embed":
                value = value.squeeze(0)
            elif key == "logit_scale":
                value = value.reshape(())
            else:
                value = value.t().contiguous()
            out[new] = value
            continue
        new_key = _rename(key, _VLP_BLOCK, block_map, towers, prefix_map)
        if new_key is None:
            unknown.append(key)
        else:
            out[new_key] = value
    if unknown:
        raise ValueError(f"vlp keys with no open_clip equivalent (non-ViT tower?): {unknown[:10]}")
    return out


def _read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(str(path), device="cpu")
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    # unwrap training-checkpoint containers
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    sd: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        while key.startswith("module."):  # DDP / DeepSpeed wrappers
            key = key[len("module."):]
        sd[key] = value
    return sd


def load_open_clip_checkpoint(path: str | Path, preset_name: str, **overrides: Any) -> CLIP:
    """Build vlp preset `preset_name` and load an open_clip checkpoint into it (strict).

    The model is built on the meta device and the checkpoint tensors are assigned in place, which skips
    the (slow, immediately overwritten) random init of a full-size model.
    """
    sd = open_clip_to_vlp_state_dict(_read_state_dict(path))
    with torch.device("meta"):
        model = create_model(preset_name, **overrides)
    model.load_state_dict(sd, strict=True, assign=True)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # non-persistent buffers are not in any checkpoint: fall back to a real init
        model = create_model(preset_name, **overrides)
        model.load_state_dict(sd, strict=True)
    return model

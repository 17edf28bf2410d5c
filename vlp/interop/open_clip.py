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

from vlp.interop.open_clip_cfg import towers_from_open_clip
from vlp.interop.open_clip_coca import (
    is_open_clip_coca,
    open_clip_coca_config_from_vlp,
    open_clip_coca_to_vlp,
    vlp_coca_config_from_open_clip,
    vlp_coca_to_open_clip,
)
from vlp.models.clip import CLIP
from vlp.models.coca import CoCa
from vlp.models.config import (
    CLIPConfig,
    VisionTowerConfig,
)
from vlp.models.families import require
from vlp.models.registry import create_model, list_models

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
    from vlp.loading import _read_safetensors, safe_torch_load

    path = Path(path)
    if path.suffix == ".safetensors":
        obj: Any = _read_safetensors(path)[1]  # a truncated or corrupt file: LoadError naming it
    else:
        obj = safe_torch_load(path)  # weights_only=True; a code-running pickle raises LoadError naming it
    return unwrap_state_dict(obj, path)


def unwrap_state_dict(obj: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded weights file: training-checkpoint containers unwrapped
    (`state_dict` / `model` / `module`) and DDP / DeepSpeed `module.` prefixes removed."""
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


def load_open_clip_checkpoint(path: str | Path, preset_name: str, **overrides: Any) -> CLIP | CoCa:
    """Build vlp preset `preset_name` and load an open_clip checkpoint into it (strict).

    The model is built on the meta device and the checkpoint tensors are assigned in place, which skips
    the (slow, immediately overwritten) random init of a full-size model.
    """
    raw = _read_state_dict(path)
    sd = open_clip_coca_to_vlp(raw) if is_open_clip_coca(raw) else open_clip_to_vlp_state_dict(raw)
    with torch.device("meta"):
        model = create_model(preset_name, **overrides)
    model.load_state_dict(sd, strict=True, assign=True)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # non-persistent buffers are not in any checkpoint: fall back to a real init
        model = create_model(preset_name, **overrides)
        model.load_state_dict(sd, strict=True)
    return model


# ---- model configs and folders --------------------------------------------------------------------

_OC_UNSUPPORTED = ("ls_init_value", "attentional_pool", "no_ln_pre", "final_ln_after_pool",
                   "timm_model_name", "hf_model_name", "output_tokens", "pos_embed_type", "act_kwargs",
                   "norm_kwargs", "patch_dropout", "proj_bias", "embed_cls", "no_causal_mask", "pad_id")


def vlp_config_from_open_clip(model_cfg: Mapping[str, Any], preprocess: Mapping[str, Any] | None = None) -> CLIPConfig:
    """vlp CLIPConfig equal to an open_clip ViT CLIP model config (refuses features vlp lacks)."""
    v, t = dict(model_cfg.get("vision_cfg", {})), dict(model_cfg.get("text_cfg", {}))
    bad = [k for k in _OC_UNSUPPORTED if model_cfg.get(k) or v.get(k) or t.get(k)]
    bad += [f"vision pool_type={v['pool_type']}" for _ in [0] if v.get("pool_type", "tok") != "tok"]
    bad += [f"text pool_type={t['pool_type']}" for _ in [0] if t.get("pool_type", "argmax") != "argmax"]
    if bad or isinstance(v.get("layers"), (list, tuple)):
        raise ValueError(f"open_clip config not representable in vlp (ViT CLIP, GELU, token pooling): {bad}")
    vision_kw, text, pre = towers_from_open_clip(model_cfg, preprocess)
    return CLIPConfig(embed_dim=model_cfg["embed_dim"], vision=VisionTowerConfig("vit_base_patch32_clip_224", vision_kw),
                      text=text, preprocess=pre)


def open_clip_config_from_vlp(cfg: CLIPConfig, sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """open_clip model config (`model_cfg`) of a vlp CLIP with a class-token CLIP-layout ViT."""
    kw = cfg.vision.timm_kwargs
    if "visual.trunk.cls_token" not in sd or kw.get("global_pool", "token") != "token":
        raise ValueError("open_clip's VisionTransformer pools a class token; this image tower has none")
    if not cfg.image_proj or not cfg.text.causal or cfg.text.pool != "eot":
        raise ValueError("open_clip's CLIP projects the image features and pools a causal text tower at the "
                         f"end-of-text token; this model has image_proj={cfg.image_proj}, "
                         f"text causal={cfg.text.causal}, pool={cfg.text.pool!r}")
    w = sd["visual.trunk.patch_embed.proj.weight"]
    width = w.shape[0]
    layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("visual.trunk.blocks."))
    mlp = sd["visual.trunk.blocks.0.mlp.fc1.weight"].shape[0] / width
    t = cfg.text
    if t.act != kw.get("act_layer", "gelu"):
        raise ValueError(f"open_clip uses one activation for both towers; this model has text {t.act}, "
                         f"image {kw.get('act_layer', 'gelu')}")
    return {
        "embed_dim": cfg.embed_dim,
        **({"quick_gelu": True} if t.act == "quick_gelu" else {}),
        "vision_cfg": {"image_size": cfg.preprocess.image_size, "layers": layers, "width": width,
                       "patch_size": w.shape[-1], "head_width": width // int(kw.get("num_heads", 12)),
                       "mlp_ratio": mlp},
        "text_cfg": {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
                     "heads": t.heads, "layers": t.layers, "mlp_ratio": t.mlp_ratio},
    }


def export_open_clip(cfg: CLIPConfig, sd: Mapping[str, torch.Tensor], out_dir: str | Path) -> Path:
    """Folder loadable by `open_clip.create_model_and_transforms("local-dir:" + out_dir)`."""
    import json

    from safetensors.torch import save_file

    coca = require(cfg, "export:open_clip", "export to open_clip").can("captioning")  # open_clip's CoCa
    if cfg.text.prefix_kinds:
        raise ValueError(f"this model is prefix-conditioned (text.prefix_kinds={list(cfg.text.prefix_kinds)}): "
                         "open_clip's text tower has no prefix tokens; export it with --to vlp (or --to timm "
                         "for the image tower)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    p = cfg.preprocess
    doc = {"model_cfg": open_clip_coca_config_from_vlp(cfg, sd) if coca else open_clip_config_from_vlp(cfg, sd),
           "preprocess_cfg": {"mean": list(p.mean), "std": list(p.std), "interpolation": p.interpolation,
                              "resize_mode": p.resize_mode, "size": p.image_size}}
    convert = vlp_coca_to_open_clip if coca else vlp_to_open_clip_state_dict
    oc_sd = {k: v.contiguous() for k, v in convert(dict(sd)).items()}
    save_file(oc_sd, str(out / "open_clip_model.safetensors"))
    (out / "open_clip_config.json").write_text(json.dumps(doc, indent=1))
    return out


def load_open_clip_as_vlp(path: str | Path, model: str | Mapping[str, Any]) -> CLIP | CoCa:
    """open_clip (or OpenAI CLIP) weights + an open_clip model name / config -> vlp CLIP (strict).

    A vlp preset of the same name is used when one exists; else the config comes from open_clip's
    registry (`open_clip.get_model_config`). An OpenAI checkpoint (QuickGELU, three extra integer
    entries) carries its architecture in its tensor shapes, so `model` is not consulted for it.
    """
    sd = _read_state_dict(path)
    if any(k in sd for k in _OPENAI_EXTRA):
        oc_sd, model_cfg = openai_state_dict_to_open_clip(sd)
        clip = CLIP(vlp_config_from_open_clip(model_cfg))
        clip.load_state_dict(open_clip_to_vlp_state_dict(oc_sd), strict=True)
        return clip
    if isinstance(model, str) and model in list_models():
        return load_open_clip_checkpoint(path, model)
    if isinstance(model, str):
        import open_clip

        model_cfg = open_clip.get_model_config(model)
        if model_cfg is None:
            raise ValueError(f"unknown open_clip model '{model}'")
    else:
        model_cfg = model
    if "multimodal_cfg" in model_cfg:  # CoCa
        coca = CoCa(vlp_coca_config_from_open_clip(model_cfg))
        coca.load_state_dict(open_clip_coca_to_vlp(sd), strict=True)
        return coca
    clip = CLIP(vlp_config_from_open_clip(model_cfg))
    clip.load_state_dict(open_clip_to_vlp_state_dict(sd), strict=True)
    return clip


_OPENAI_EXTRA = ("input_resolution", "context_length", "vocab_size")


def openai_state_dict_to_open_clip(sd: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """OpenAI CLIP ViT state dict -> (open_clip state dict, open_clip model_cfg with quick_gelu=True).

    The layouts are the same; OpenAI adds three integer entries, and the architecture is read off
    the tensor shapes (as open_clip's `build_model_from_openai_state_dict` does).
    """
    oc = {k: v for k, v in sd.items() if k not in _OPENAI_EXTRA}
    if "visual.proj" not in oc:
        raise ValueError("not an OpenAI ViT CLIP state dict (no visual.proj; ResNet towers are not supported)")
    width = oc["visual.conv1.weight"].shape[0]
    patch = oc["visual.conv1.weight"].shape[-1]
    grid = round((oc["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    vlayers = len({k.split(".")[3] for k in oc if k.startswith("visual.transformer.resblocks.")})
    twidth = oc["ln_final.weight"].shape[0]
    tlayers = len({k.split(".")[2] for k in oc if k.startswith("transformer.resblocks.")})
    model_cfg = {
        "embed_dim": oc["text_projection"].shape[1], "quick_gelu": True,
        "vision_cfg": {"image_size": grid * patch, "layers": vlayers, "width": width, "patch_size": patch},
        "text_cfg": {"context_length": oc["positional_embedding"].shape[0],
                     "vocab_size": oc["token_embedding.weight"].shape[0], "width": twidth,
                     "heads": twidth // 64, "layers": tlayers},
    }
    return oc, model_cfg

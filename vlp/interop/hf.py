"""vlp -> transformers `CLIPModel` (ViT image towers with a class token, CLIP text tower).

The config is built in code (no hub access) and the folder is written with `save_pretrained`, so
`transformers.CLIPModel.from_pretrained(out_dir)` loads it offline. vlp's presets use exact GELU in
both towers, hence `hidden_act="gelu"`; attention q/k/v are split out of timm's fused `qkv`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vlp.models.config import CLIPConfig


def _vit_dims(cfg: CLIPConfig, sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Vision-tower hyperparameters read off the weights (and heads from the timm kwargs)."""
    kw = cfg.vision.timm_kwargs
    if "visual.trunk.cls_token" not in sd:
        raise ValueError("HF CLIPModel needs a class-token ViT image tower (this checkpoint has none)")
    if not kw.get("global_pool", "token") == "token":
        raise ValueError(f"HF CLIPModel pools the class token; this tower uses global_pool={kw['global_pool']!r}")
    if "visual.trunk.norm_pre.weight" not in sd or "visual.trunk.patch_embed.proj.bias" in sd:
        raise ValueError("HF CLIPModel needs a CLIP-layout ViT (pre-norm, bias-free patch embedding)")
    w = sd["visual.trunk.patch_embed.proj.weight"]
    width, patch = w.shape[0], w.shape[-1]
    layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("visual.trunk.blocks."))
    heads = int(kw.get("num_heads", 12))
    return dict(hidden_size=width, patch_size=patch, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=sd["visual.trunk.blocks.0.mlp.fc1.weight"].shape[0],
                image_size=cfg.preprocess.image_size, num_channels=w.shape[1])


def hf_clip_config(cfg: CLIPConfig, sd: dict[str, torch.Tensor], layer_norm_eps: float = 1e-5) -> Any:
    """transformers.CLIPConfig equivalent to a vlp CLIP config (+ its weights, for the dims)."""
    from transformers import CLIPConfig as HFCLIPConfig

    t = cfg.text
    text = dict(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=int(t.width * t.mlp_ratio),
                num_hidden_layers=t.layers, num_attention_heads=t.heads, max_position_embeddings=t.context_length,
                hidden_act=t.act, layer_norm_eps=layer_norm_eps, projection_dim=cfg.embed_dim,
                bos_token_id=t.eot_token_id - 1, eos_token_id=t.eot_token_id, pad_token_id=0)
    vision_act = cfg.vision.timm_kwargs.get("act_layer", "gelu")
    vision = dict(**_vit_dims(cfg, sd), hidden_act=vision_act, layer_norm_eps=layer_norm_eps,
                  projection_dim=cfg.embed_dim)
    return HFCLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.embed_dim,
                        logit_scale_init_value=float(sd["logit_scale"].reshape(())))


_HF_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def _blocks(sd: dict[str, torch.Tensor], src: str, dst: str, out: dict[str, torch.Tensor]) -> None:
    for key, value in sd.items():
        if not key.startswith(src):
            continue
        idx, rest = key[len(src):].split(".", 1)
        base = f"{dst}.{idx}"
        if rest.startswith("attn.qkv."):
            kind = rest.rsplit(".", 1)[1]
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{base}.self_attn.{name}.{kind}"] = part.contiguous()
            continue
        mod, kind = rest.rsplit(".", 1)
        if mod not in _HF_BLOCK:
            raise ValueError(f"vlp key '{key}' has no HF CLIP equivalent")
        out[f"{base}.{_HF_BLOCK[mod]}.{kind}"] = value


def vlp_to_hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """vlp CLIP state dict -> transformers CLIPModel state dict (strict-loadable)."""
    v, t = "vision_model", "text_model"
    out: dict[str, torch.Tensor] = {
        f"{v}.embeddings.class_embedding": sd["visual.trunk.cls_token"].reshape(-1),
        f"{v}.embeddings.patch_embedding.weight": sd["visual.trunk.patch_embed.proj.weight"],
        f"{v}.embeddings.position_embedding.weight": sd["visual.trunk.pos_embed"].reshape(
            -1, sd["visual.trunk.pos_embed"].shape[-1]),
        f"{t}.embeddings.token_embedding.weight": sd["text.token_embedding.weight"],
        f"{t}.embeddings.position_embedding.weight": sd["text.positional_embedding"],
        "visual_projection.weight": sd["image_proj.weight"],
        "text_projection.weight": sd["text_proj.weight"],
        "logit_scale": sd["logit_scale"].reshape(()),
    }
    for kind in ("weight", "bias"):
        out[f"{v}.pre_layrnorm.{kind}"] = sd[f"visual.trunk.norm_pre.{kind}"]
        out[f"{v}.post_layernorm.{kind}"] = sd[f"visual.trunk.norm.{kind}"]
        out[f"{t}.final_layer_norm.{kind}"] = sd[f"text.ln_final.{kind}"]
    _blocks(sd, "visual.trunk.blocks.", f"{v}.encoder.layers", out)
    _blocks(sd, "text.blocks.", f"{t}.encoder.layers", out)
    return {k: x.contiguous() for k, x in out.items()}


def export_hf(cfg: CLIPConfig, sd: dict[str, torch.Tensor], out_dir: str | Path, layer_norm_eps: float = 1e-5) -> Path:
    """Write a transformers CLIPModel folder (config.json + model.safetensors + preprocessor_config.json)."""
    from transformers import CLIPModel

    out = Path(out_dir)
    hf_cfg = hf_clip_config(cfg, sd, layer_norm_eps)
    with torch.device("meta"):
        model = CLIPModel(hf_cfg)
    missing, unexpected = model.load_state_dict(vlp_to_hf_state_dict(sd), strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"HF conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, buf in list(model.named_buffers()):  # non-persistent position_ids: rebuild on CPU
        if buf.is_meta:
            mod_name, _, attr = name.rpartition(".")
            mod = model.get_submodule(mod_name)
            mod.register_buffer(attr, torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)
    model.save_pretrained(out)
    p = cfg.preprocess
    size = p.image_size
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
        "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(p.mean), "image_std": list(p.std),
        "resample": 3 if p.interpolation == "bicubic" else 2, "do_convert_rgb": True,
    }, indent=1))
    return out

"""vlp -> transformers `CLIPModel` (ViT image towers with a class token, CLIP text tower) and
`SiglipModel` (SigLIP's architecture: MAP-pooled ViT, bidirectional text pooled at the last position).

The config is built in code (no hub access) and the folder is written with `save_pretrained`, so
`transformers.CLIPModel.from_pretrained(out_dir)` loads it offline. vlp's presets use exact GELU in
both towers, hence `hidden_act="gelu"`; attention q/k/v are split out of timm's fused `qkv`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vlp.extras import require as require_extra
from vlp.models.config import CLIPConfig
from vlp.models.families import family_of, require


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
    HFCLIPConfig = require_extra("transformers", "export to transformers").CLIPConfig

    t = cfg.text
    if not t.causal or t.pool != "eot" or not cfg.image_proj:
        raise ValueError("HF CLIPModel has a causal text tower pooled at end-of-text and an image projection; "
                         f"this model has text causal={t.causal}, pool={t.pool!r}, image_proj={cfg.image_proj}")
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
    """Write a transformers folder (config.json + model.safetensors + preprocessor_config.json):
    a SiglipModel for a model with a logit bias, else a CLIPModel."""
    transformers = require_extra("transformers", "export to transformers")
    CLIPModel, SiglipModel = transformers.CLIPModel, transformers.SiglipModel

    require(cfg, "export:hf", "export to transformers")
    if cfg.text.prefix_kinds:
        raise ValueError(f"this model is prefix-conditioned (text.prefix_kinds={list(cfg.text.prefix_kinds)}): "
                         "transformers' text models have no prefix tokens; export it with --to vlp (or --to "
                         "timm for the image tower)")
    out = Path(out_dir)
    if cfg.init_logit_bias is not None:
        why = _siglip_refusals(cfg, sd)
        if why:
            raise ValueError("a model with a logit bias exports as transformers SiglipModel, which needs "
                             "SigLIP's architecture (the siglip-map-* presets); this one cannot: " + "; ".join(why))
        model_cls, hf_cfg, hf_sd = SiglipModel, hf_siglip_config(cfg, sd), vlp_to_hf_siglip_state_dict(sd)
    else:
        model_cls, hf_cfg, hf_sd = CLIPModel, hf_clip_config(cfg, sd, layer_norm_eps), vlp_to_hf_state_dict(sd)
    with torch.device("meta"):
        model = model_cls(hf_cfg)
    missing, unexpected = model.load_state_dict(hf_sd, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"HF conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, buf in list(model.named_buffers()):  # non-persistent position_ids: rebuild on CPU
        if buf.is_meta:
            mod_name, _, attr = name.rpartition(".")
            mod = model.get_submodule(mod_name)
            mod.register_buffer(attr, torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)
    model.save_pretrained(out)
    siglip = model_cls is SiglipModel
    _write_preprocessor(out, cfg, "SiglipImageProcessor" if siglip else "CLIPImageProcessor")
    write_tokenizer(out, cfg.text.context_length, siglip)
    _write_model_card(out, cfg, model_cls.__name__)
    return out


def _write_preprocessor(out: Path, cfg: CLIPConfig, processor: str) -> None:
    """preprocessor_config.json: the checkpoint's eval preprocessing (resize the short side, centre crop)."""
    p = cfg.preprocess
    size = p.image_size
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": processor, "do_resize": True, "size": {"shortest_edge": size},
        "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(p.mean), "image_std": list(p.std),
        "resample": 3 if p.interpolation == "bicubic" else 2, "do_convert_rgb": True,
    }, indent=1))


# open_clip's names of the two special tokens -> the names transformers' CLIP tokenizer files use
_HF_SPECIAL = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}


def write_tokenizer(out: str | Path, context_length: int, siglip: bool = False) -> Path:
    """transformers CLIPTokenizer files (vocab.json, merges.txt, tokenizer_config.json,
    special_tokens_map.json) from the BPE vlp tokenizes with, written offline: `AutoTokenizer` then
    gives vlp's ids (sot, BPE, eot; padded with vlp's pad id 0, the token "!"; `model_max_length` the
    text tower's context). A SigLIP text tower attends to its padding, so its tokenizer returns no
    attention mask (as transformers' own SigLIP tokenizers)."""
    from vlp.data.tokenizer import Tokenizer

    out = Path(out)
    tok = Tokenizer(context_length)
    vocab, merges = tok.vocab_and_merges()
    vocab = {_HF_SPECIAL.get(k, k): i for k, i in vocab.items()}
    names = {i: k for k, i in vocab.items()}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {"bos_token": names[tok.sot_token_id], "eos_token": names[tok.eot_token_id],
               "unk_token": names[tok.eot_token_id], "pad_token": names[tok.pad_token_id]}
    # the pad token is "!" (id 0): split_special_tokens keeps a "!" in a text an ordinary character, so
    # "wow!!" still becomes the BPE's merged "!!" instead of two pad ids
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": context_length, "do_lower_case": True,
              "padding_side": "right", "split_special_tokens": True, **special}
    if siglip:
        config["model_input_names"] = ["input_ids"]
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=1))
    return out


def _write_model_card(out: Path, cfg: CLIPConfig, model_class: str) -> None:
    """README.md: what the folder holds and how transformers loads it."""
    p, t = cfg.preprocess, cfg.text
    (out / "README.md").write_text(f"""---
library_name: transformers
pipeline_tag: zero-shot-image-classification
tags: [vlp, clip, contrastive-image-text]
---

# {model_class} exported by vlp

A contrastive image-text model trained with vlp and converted with `python -m vlp.export RUN --to hf`.

- image tower: {cfg.vision.timm_model} at {p.image_size} px, mean {list(p.mean)}, std {list(p.std)},
  {p.interpolation} resize of the short side then a centre crop (`preprocessor_config.json`)
- text tower: {t.layers} layers, width {t.width}, context {t.context_length} tokens; CLIP's byte-level BPE
  (`vocab.json`, `merges.txt`), the same ids as vlp's tokenizer
- embedding: {cfg.embed_dim} dimensions

```python
from transformers import pipeline
classify = pipeline("zero-shot-image-classification", model="PATH/TO/THIS/FOLDER")
classify("image.png", candidate_labels=["a cat", "a dog"])
```

`{model_class}.from_pretrained`, `AutoProcessor` and `AutoTokenizer` load it the same way.
""")


# ---- SigLIP -> transformers SiglipModel -------------------------------------------------------------

_HF_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu"}


def _siglip_refusals(cfg: CLIPConfig, sd: dict[str, torch.Tensor]) -> list[str]:
    """What keeps a vlp model from being a transformers SiglipModel (empty: exportable)."""
    why = []
    family = family_of(cfg)
    if not family.can("export:hf"):
        why.append(f"it is a {family.title} model")
    if cfg.init_logit_bias is None:
        why.append("it has no logit bias")
    if "visual.trunk.attn_pool.latent" not in sd:
        why.append("its ViT does not pool with a MAP head (timm global_pool='map')")
    if "visual.trunk.cls_token" in sd or "visual.trunk.norm_pre.weight" in sd:
        why.append("its ViT has a class token or a pre-norm (CLIP layout)")
    if cfg.image_proj:
        why.append("it projects the pooled image features (SiglipModel has no image projection)")
    if cfg.text.causal or cfg.text.pool != "last":
        why.append(f"its text tower is causal={cfg.text.causal}, pool={cfg.text.pool!r} "
                   "(SiglipModel: bidirectional, last position)")
    acts = {cfg.text.act, cfg.vision.timm_kwargs.get("act_layer", "gelu")}
    if not acts <= set(_HF_ACT):
        why.append(f"activations {sorted(acts)} have no transformers name")
    return why


def hf_siglip_config(cfg: CLIPConfig, sd: dict[str, torch.Tensor]) -> Any:
    """transformers.SiglipConfig of a vlp SigLIP-architecture model (see `_siglip_architecture`)."""
    SiglipConfig = require_extra("transformers", "export to transformers").SiglipConfig

    from vlp.models.vision import VisionTower

    with torch.device("meta"):  # the tower's own norm eps (timm's generic ViT: 1e-6)
        vision_eps = VisionTower(cfg.vision).trunk.norm.eps
    w = sd["visual.trunk.patch_embed.proj.weight"]
    t = cfg.text
    text = dict(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=int(t.width * t.mlp_ratio),
                num_hidden_layers=t.layers, num_attention_heads=t.heads, max_position_embeddings=t.context_length,
                hidden_act=_HF_ACT[t.act], layer_norm_eps=1e-5, projection_size=cfg.embed_dim,
                pad_token_id=0, bos_token_id=t.eot_token_id - 1, eos_token_id=t.eot_token_id)
    vision = dict(hidden_size=w.shape[0], intermediate_size=sd["visual.trunk.blocks.0.mlp.fc1.weight"].shape[0],
                  num_hidden_layers=1 + max(int(k.split(".")[3]) for k in sd if k.startswith("visual.trunk.blocks.")),
                  num_attention_heads=int(cfg.vision.timm_kwargs.get("num_heads", 12)), num_channels=w.shape[1],
                  image_size=cfg.preprocess.image_size, patch_size=w.shape[-1],
                  hidden_act=_HF_ACT[cfg.vision.timm_kwargs.get("act_layer", "gelu")], layer_norm_eps=vision_eps)
    return SiglipConfig(text_config=text, vision_config=vision)


def vlp_to_hf_siglip_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """vlp SigLIP-architecture state dict -> transformers SiglipModel state dict (strict-loadable)."""
    v, t, p = "vision_model", "text_model", "visual.trunk.attn_pool"
    pos = sd["visual.trunk.pos_embed"]
    out: dict[str, torch.Tensor] = {
        f"{v}.embeddings.patch_embedding.weight": sd["visual.trunk.patch_embed.proj.weight"],
        f"{v}.embeddings.patch_embedding.bias": sd["visual.trunk.patch_embed.proj.bias"],
        f"{v}.embeddings.position_embedding.weight": pos.reshape(-1, pos.shape[-1]),
        f"{v}.head.probe": sd[f"{p}.latent"],
        # timm keeps q and the fused kv apart; nn.MultiheadAttention packs q, k, v in one matrix
        f"{v}.head.attention.in_proj_weight": torch.cat([sd[f"{p}.q.weight"], sd[f"{p}.kv.weight"]]),
        f"{v}.head.attention.in_proj_bias": torch.cat([sd[f"{p}.q.bias"], sd[f"{p}.kv.bias"]]),
        f"{t}.embeddings.token_embedding.weight": sd["text.token_embedding.weight"],
        f"{t}.embeddings.position_embedding.weight": sd["text.positional_embedding"],
        f"{t}.head.weight": sd["text_proj.weight"],
        f"{t}.head.bias": sd["text_proj.weight"].new_zeros(sd["text_proj.weight"].shape[0]),
        "logit_scale": sd["logit_scale"].reshape(1),
        "logit_bias": sd["logit_bias"].reshape(1),
    }
    for kind in ("weight", "bias"):
        out[f"{v}.post_layernorm.{kind}"] = sd[f"visual.trunk.norm.{kind}"]
        out[f"{v}.head.attention.out_proj.{kind}"] = sd[f"{p}.proj.{kind}"]
        out[f"{v}.head.layernorm.{kind}"] = sd[f"{p}.norm.{kind}"]
        out[f"{v}.head.mlp.fc1.{kind}"] = sd[f"{p}.mlp.fc1.{kind}"]
        out[f"{v}.head.mlp.fc2.{kind}"] = sd[f"{p}.mlp.fc2.{kind}"]
        out[f"{t}.final_layer_norm.{kind}"] = sd[f"text.ln_final.{kind}"]
    _blocks(sd, "visual.trunk.blocks.", f"{v}.encoder.layers", out)
    _blocks(sd, "text.blocks.", f"{t}.encoder.layers", out)
    return {k: x.contiguous() for k, x in out.items()}


# ---- transformers -> vlp (model.init_from) ---------------------------------------------------------

_VLP_BLOCK = {hf: ours for ours, hf in _HF_BLOCK.items()}
_QKV = ("q_proj", "k_proj", "v_proj")


def _unblocks(sd: dict[str, torch.Tensor], src: str, dst: str, out: dict[str, torch.Tensor], used: set[str]) -> None:
    """Inverse of `_blocks`: transformers encoder layers -> timm blocks (q, k, v fused into qkv)."""
    for key in sd:
        if not key.startswith(src):
            continue
        idx, rest = key[len(src):].split(".", 1)
        mod, kind = rest.rsplit(".", 1)
        if mod in (f"self_attn.{n}" for n in _QKV):
            if mod == "self_attn.q_proj":
                parts = [f"{src}{idx}.self_attn.{n}.{kind}" for n in _QKV]
                out[f"{dst}.{idx}.attn.qkv.{kind}"] = torch.cat([sd[p] for p in parts])
                used.update(parts)
            continue
        if mod in _VLP_BLOCK:
            out[f"{dst}.{idx}.{_VLP_BLOCK[mod]}.{kind}"] = sd[key]
            used.add(key)


def _clip_from_hf(sd: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> list[str]:
    v = "vision_model"
    pos = sd[f"{v}.embeddings.position_embedding.weight"]
    table = {
        f"{v}.embeddings.class_embedding": ("visual.trunk.cls_token", lambda x: x.reshape(1, 1, -1)),
        f"{v}.embeddings.patch_embedding.weight": ("visual.trunk.patch_embed.proj.weight", None),
        f"{v}.embeddings.position_embedding.weight": ("visual.trunk.pos_embed", lambda x: x.reshape(1, *pos.shape)),
        "visual_projection.weight": ("image_proj.weight", None),
    }
    for kind in ("weight", "bias"):
        table[f"{v}.pre_layrnorm.{kind}"] = (f"visual.trunk.norm_pre.{kind}", None)
        table[f"{v}.post_layernorm.{kind}"] = (f"visual.trunk.norm.{kind}", None)
    return _apply_table(sd, table, out)


def _siglip_from_hf(sd: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> list[str]:
    v, t, p = "vision_model", "text_model", "visual.trunk.attn_pool"
    bias = sd.get(f"{t}.head.bias")
    if bias is not None and bool(bias.abs().max() > 0):
        raise ValueError(f"{t}.head.bias is non-zero, but vlp's text projection has no bias: this SiglipModel "
                         "cannot start a vlp model exactly")
    pos = sd[f"{v}.embeddings.position_embedding.weight"]
    width = pos.shape[-1]
    table = {
        f"{v}.embeddings.patch_embedding.weight": ("visual.trunk.patch_embed.proj.weight", None),
        f"{v}.embeddings.patch_embedding.bias": ("visual.trunk.patch_embed.proj.bias", None),
        f"{v}.embeddings.position_embedding.weight": ("visual.trunk.pos_embed", lambda x: x.reshape(1, *pos.shape)),
        f"{v}.head.probe": (f"{p}.latent", None),
        f"{t}.head.weight": ("text_proj.weight", None),
        f"{t}.head.bias": (None, None),  # checked to be zero above
        "logit_bias": ("logit_bias", lambda x: x.reshape(1)),
    }
    for kind in ("weight", "bias"):
        table[f"{v}.post_layernorm.{kind}"] = (f"visual.trunk.norm.{kind}", None)
        table[f"{v}.head.attention.out_proj.{kind}"] = (f"{p}.proj.{kind}", None)
        table[f"{v}.head.layernorm.{kind}"] = (f"{p}.norm.{kind}", None)
        table[f"{v}.head.mlp.fc1.{kind}"] = (f"{p}.mlp.fc1.{kind}", None)
        table[f"{v}.head.mlp.fc2.{kind}"] = (f"{p}.mlp.fc2.{kind}", None)
    packed = {"weight": f"{v}.head.attention.in_proj_weight", "bias": f"{v}.head.attention.in_proj_bias"}
    for kind, key in packed.items():  # nn.MultiheadAttention's packed q, k, v -> timm's q and fused kv
        if key in sd:
            out[f"{p}.q.{kind}"], out[f"{p}.kv.{kind}"] = sd[key][:width], sd[key][width:]
    return [*_apply_table(sd, table, out), *packed.values()]


def _apply_table(sd: dict[str, torch.Tensor], table: dict[str, tuple[str | None, Any]],
                 out: dict[str, torch.Tensor]) -> list[str]:
    used = []
    for src, (dst, fn) in table.items():
        if src in sd:
            used.append(src)
            if dst is not None:
                out[dst] = fn(sd[src]) if fn is not None else sd[src]
    return used


def hf_to_vlp_state_dict(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """transformers CLIPModel / SiglipModel state dict -> (vlp state dict, HF keys that have no vlp
    equivalent). A SiglipModel is recognised by its MAP head (`vision_model.head.probe`)."""
    v, t = "vision_model", "text_model"
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    siglip = f"{v}.head.probe" in sd
    used.update(_siglip_from_hf(sd, out) if siglip else _clip_from_hf(sd, out))
    common = {
        f"{t}.embeddings.token_embedding.weight": ("text.token_embedding.weight", None),
        f"{t}.embeddings.position_embedding.weight": ("text.positional_embedding", None),
        "text_projection.weight": ("text_proj.weight", None),
        "logit_scale": ("logit_scale", lambda x: x.reshape(1)),
    }
    for kind in ("weight", "bias"):
        common[f"{t}.final_layer_norm.{kind}"] = (f"text.ln_final.{kind}", None)
    used.update(_apply_table(sd, common, out))
    _unblocks(sd, f"{v}.encoder.layers.", "visual.trunk.blocks", out, used)
    _unblocks(sd, f"{t}.encoder.layers.", "text.blocks", out, used)
    # position ids are buffers transformers rebuilds; everything else unread is reported
    rest = [k for k in sd if k not in used and not k.endswith("position_ids")]
    return {k: x.contiguous() for k, x in out.items()}, rest

"""Start a model from pretrained weights (`model.init_from`): read another run or library's weights in
vlp's key names, and copy the chosen parts into a freshly built model, with a report.

Sources, told apart by what they hold (or named with `format`):

    vlp        a run directory, its model.safetensors / model_ema.safetensors, or a checkpoint dir
               (any ZeRO stage; `ema: true` takes the run's EMA weights)
    open_clip  an open_clip state dict (.pt / .bin / .safetensors, training checkpoints unwrapped) or an
               exported folder (open_clip_config.json + open_clip_model.safetensors); CLIP and CoCa
    openai     an OpenAI CLIP ViT state dict (its integer entries mark it; QuickGELU)
    hf         a transformers CLIPModel / SiglipModel folder (config.json + model.safetensors)
    timm       timm weights for the image trunk only: a timm local-dir folder (config.json with
               "architecture" + model.safetensors) or a state-dict file in timm's key names

Parts are the model class's `PARTS` (image, text, logit; CoCa adds decoder). A tensor whose shape
differs from the model's is refused with the keys named; tensors of the chosen parts that the source
lacks keep their fresh init and are listed in the report; source tensors of the chosen parts the model
has no place for are refused (`strict`) or listed.

Nothing here depends on the number of ranks: each rank reads the file and fills its full-size model
before DeepSpeed partitions it (ZeRO-3 partitions at `deepspeed.initialize`), so the cost is one read
of the weights per rank and a full copy of the model in each rank's CPU/GPU memory at start-up.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlp.loading import LoadError, _read_safetensors, load_state, safe_torch_load

FORMATS = ("auto", "vlp", "open_clip", "openai", "hf", "timm")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
                 "open_clip_pytorch_model.bin", "pytorch_model.pth")


class InitError(ValueError):
    """Weights that cannot start this model as asked; the message names the source and the keys."""


@dataclass
class Pretrained:
    """A source's tensors in vlp key names."""

    path: str
    format: str
    state: dict[str, torch.Tensor]
    dropped: list[str] = field(default_factory=list)  # source keys with no vlp equivalent (e.g. a classifier)
    quick_gelu: bool | None = None  # what the source's activations are, when the format says


@dataclass
class InitReport:
    source: str
    format: str
    parts: list[str]
    loaded: dict[str, int]  # part -> tensors copied
    missing: list[str]  # model tensors of the chosen parts the source lacks (fresh init kept)
    unexpected: list[str]  # source tensors of the chosen parts the model lacks
    dropped: list[str]  # source tensors with no vlp equivalent

    def summary(self) -> str:
        loaded = ", ".join(f"{p} {n}" for p, n in self.loaded.items())
        out = f"init_from {self.source} ({self.format}): loaded {loaded} tensors"
        if self.missing:
            out += f"; {len(self.missing)} not in the source keep their init ({', '.join(self.missing[:4])}"
            out += ", ...)" if len(self.missing) > 4 else ")"
        if self.unexpected:
            out += f"; {len(self.unexpected)} source tensors unused ({', '.join(self.unexpected[:4])})"
        if self.dropped:
            out += f"; {len(self.dropped)} source tensors have no vlp equivalent ({', '.join(self.dropped[:4])})"
        return out

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ---- reading -----------------------------------------------------------------------------------


def _read_file(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(safetensors metadata or {}, state dict) of a weights file, read once; a corrupt file raises
    LoadError naming it."""
    from vlp.interop.open_clip import unwrap_state_dict

    if path.suffix == ".safetensors":
        meta, obj = _read_safetensors(path)
        return meta, unwrap_state_dict(obj, path)
    return {}, unwrap_state_dict(safe_torch_load(path), path)


def _weights_in(folder: Path) -> Path:
    for name in _WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise LoadError(f"'{folder}' holds no weights file (looked for {', '.join(_WEIGHT_FILES)})")


def _folder_format(folder: Path) -> str:
    if (folder / "open_clip_config.json").is_file():
        return "open_clip"
    if (folder / "model_config.json").is_file() or (folder / "meta.json").is_file() or (folder / "checkpoints").is_dir():
        return "vlp"
    if (folder / "config.json").is_file():
        doc = json.loads((folder / "config.json").read_text())
        if "architecture" in doc:
            return "timm"
        if doc.get("model_type") in ("clip", "siglip"):
            return "hf"
        raise LoadError(f"'{folder}/config.json' is neither a transformers CLIP/SigLIP config (model_type "
                        f"{doc.get('model_type')!r}) nor a timm one (no 'architecture')")
    raise LoadError(f"'{folder}': cannot tell what it holds (no model_config.json, open_clip_config.json or config.json)")


def _keys_format(path: Path, keys: list[str]) -> str:
    if any(k.startswith(("vision_model.", "text_model.")) for k in keys):
        return "hf"
    if any(k.startswith("visual.trunk.") for k in keys):
        return "vlp"
    if "input_resolution" in keys:
        return "openai"
    if any(k.startswith(("visual.conv1", "visual.transformer.", "transformer.resblocks.")) for k in keys):
        return "open_clip"
    if any(k.startswith(("patch_embed.", "blocks.", "stem.", "stages.", "cls_token", "pos_embed")) for k in keys):
        return "timm"
    raise LoadError(f"'{path}': cannot tell which library's key names it uses (first keys: {keys[:3]}); "
                    "set model.init_from.format")


def _from_open_clip(p: Path, raw: dict[str, torch.Tensor]) -> Pretrained:
    from vlp.interop.open_clip import (
        _OPENAI_EXTRA,
        open_clip_to_vlp_state_dict,
        openai_state_dict_to_open_clip,
    )
    from vlp.interop.open_clip_coca import is_open_clip_coca, open_clip_coca_to_vlp

    if any(k in raw for k in _OPENAI_EXTRA):
        oc, _ = openai_state_dict_to_open_clip(raw)
        return Pretrained(str(p), "openai", open_clip_to_vlp_state_dict(oc), quick_gelu=True)
    quick = None
    if p.is_dir():
        quick = bool(json.loads((p / "open_clip_config.json").read_text()).get("model_cfg", {}).get("quick_gelu", False))
    sd = open_clip_coca_to_vlp(raw) if is_open_clip_coca(raw) else open_clip_to_vlp_state_dict(raw)
    return Pretrained(str(p), "open_clip", sd, quick_gelu=quick)


def _from_hf(p: Path, raw: dict[str, torch.Tensor]) -> Pretrained:
    from vlp.interop.hf import hf_to_vlp_state_dict

    sd, rest = hf_to_vlp_state_dict(raw)
    return Pretrained(str(p), "hf", sd, dropped=rest)


def _from_timm(p: Path, raw: dict[str, torch.Tensor]) -> Pretrained:
    classifier = "head"
    if p.is_dir():
        doc = json.loads((p / "config.json").read_text())
        classifier = (doc.get("pretrained_cfg") or {}).get("classifier") or "head"
    dropped = [k for k in raw if k == classifier or k.startswith(f"{classifier}.")]
    sd = {f"visual.trunk.{k}": v for k, v in raw.items() if k not in dropped}
    return Pretrained(str(p), "timm", sd, dropped=dropped)


def read_pretrained(path: str | Path, fmt: str = "auto", ema: bool = False) -> Pretrained:
    """The tensors of `path` in vlp key names (`fmt`: one of FORMATS, "auto" tells it by what the path
    holds; `ema`: a vlp run's EMA weights). A weights file is read once."""
    if fmt not in FORMATS:
        raise InitError(f"model.init_from.format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    p = Path(path)
    if not p.exists():
        raise LoadError(f"model.init_from.path '{path}' does not exist")
    meta: dict[str, str] = {}
    raw: dict[str, torch.Tensor] | None = None
    if p.is_dir():
        fmt = _folder_format(p) if fmt == "auto" else fmt
    else:
        meta, raw = _read_file(p)
        fmt = ("vlp" if "model_config" in meta else _keys_format(p, list(raw))) if fmt == "auto" else fmt
    if ema and fmt != "vlp":
        raise InitError(f"model.init_from.ema: '{path}' holds {fmt} weights; only vlp runs keep EMA weights")
    if fmt == "vlp":  # a run or checkpoint dir, an EMA, a file without config metadata: vlp's own loader
        sd = raw if raw is not None and "model_config" in meta and not ema else load_state(p, ema=ema)[1]
        return Pretrained(str(p), "vlp", sd)
    if raw is None:
        raw = _read_file(_weights_in(p))[1]
    if fmt in ("open_clip", "openai"):
        return _from_open_clip(p, raw)
    return _from_hf(p, raw) if fmt == "hf" else _from_timm(p, raw)


# ---- applying ----------------------------------------------------------------------------------


def part_of(model: nn.Module, key: str) -> str | None:
    for part, prefixes in type(model).PARTS.items():
        if key.startswith(prefixes):
            return part
    return None


def _uses_quick_gelu(model: nn.Module) -> bool:
    cfg = model.config
    return "quick_gelu" in (cfg.text.act, cfg.vision.timm_kwargs.get("act_layer", "gelu"))


def _check_activation(model: nn.Module, src: Pretrained, parts: list[str]) -> None:
    if src.quick_gelu is None or not {"image", "text"} & set(parts) or src.quick_gelu == _uses_quick_gelu(model):
        return
    trained, ours = ("QuickGELU", "GELU") if src.quick_gelu else ("GELU", "QuickGELU")
    raise InitError(f"model.init_from: '{src.path}' was trained with {trained} activations but this model uses "
                    f"{ours}; set the model's activations to match "
                    f"(e.g. model.overrides.text.act={'quick_gelu' if src.quick_gelu else 'gelu'} and "
                    "model.overrides.vision.timm_kwargs.act_layer) or the weights compute something else")


def init_from(model: nn.Module, src: Pretrained, parts: list[str] | None = None, strict: bool = True) -> InitReport:
    """Copy the tensors of `parts` (None: every part `src` holds) from `src` into `model` in place; the report of what was done."""
    known = list(type(model).PARTS)
    held = [p for p in known if any(part_of(model, k) == p for k in src.state)]
    if not held:
        raise InitError(f"model.init_from '{src.path}' ({src.format}) holds no weights of a {type(model).__name__} "
                        f"(parts {known}): first keys {list(src.state)[:4]}")
    parts = list(parts or held)  # default: every part the source has
    bad = [p for p in parts if p not in known]
    if bad:
        raise InitError(f"model.init_from.parts: {bad} are not parts of a {type(model).__name__} (parts: {known})")
    _check_activation(model, src, parts)
    own = model.state_dict()
    chosen = {k: v for k, v in src.state.items() if part_of(model, k) in parts}
    shapes = [f"{k}: source {tuple(v.shape)} vs model {tuple(own[k].shape)}"
              for k, v in chosen.items() if k in own and v.shape != own[k].shape]
    if shapes:
        raise InitError(f"model.init_from '{src.path}': {len(shapes)} tensors differ in shape from the model "
                        f"(different architecture or image size?): {'; '.join(shapes[:6])}")
    unexpected = sorted(k for k in chosen if k not in own)
    if unexpected and strict:
        raise InitError(f"model.init_from '{src.path}': {len(unexpected)} tensors of parts {parts} have no place in "
                        f"the model (deeper or different architecture?): {unexpected[:6]}; "
                        "set model.init_from.strict=false to start from the rest")
    loaded = {p: 0 for p in parts}
    with torch.no_grad():
        for k, v in chosen.items():
            if k in own:
                own[k].copy_(v.to(own[k].dtype))
                loaded[part_of(model, k)] += 1  # type: ignore[index]
    empty = [p for p, n in loaded.items() if not n]
    if empty:
        raise InitError(f"model.init_from '{src.path}' ({src.format}) has no weights for parts {empty}; "
                        f"choose the parts it holds with model.init_from.parts")
    missing = sorted(k for k in own if part_of(model, k) in parts and k not in chosen)
    return InitReport(src.path, src.format, parts, loaded, missing, unexpected, list(src.dropped))


def init_model(model: nn.Module, path: str | Path, fmt: str = "auto", parts: list[str] | None = None,
               ema: bool = False, strict: bool = True) -> InitReport:
    """`read_pretrained` + `init_from`: start `model` from the weights at `path`."""
    return init_from(model, read_pretrained(path, fmt, ema), parts, strict)


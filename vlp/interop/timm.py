"""vlp -> timm: the image tower as a plain timm model (weights + the arguments that create it).

The export folder holds `model.safetensors` (the trunk's state dict, timm key names) and
`timm_config.json` (`{"model_name", "kwargs", "pretrained_cfg"}`); `load_timm_export` rebuilds it,
and timm alone can too:

    timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": ".../model.safetensors"}, **kwargs)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from vlp.models.config import CLIPConfig

TIMM_CONFIG = "timm_config.json"
TIMM_WEIGHTS = "model.safetensors"


def timm_create_args(cfg: CLIPConfig) -> dict[str, Any]:
    """`timm.create_model` arguments of a checkpoint's image tower (no classifier head)."""
    p = cfg.preprocess
    return {
        "model_name": cfg.vision.timm_model,
        "kwargs": {**cfg.vision.timm_kwargs, "num_classes": 0},
        "pretrained_cfg": {
            "input_size": [3, p.image_size, p.image_size], "mean": list(p.mean), "std": list(p.std),
            "interpolation": p.interpolation, "crop_pct": 1.0, "num_classes": 0,
        },
    }


def export_timm(cfg: CLIPConfig, sd: dict[str, torch.Tensor], out_dir: str | Path) -> Path:
    """Write the image tower of a vlp state dict as a timm model folder."""
    from vlp.backbone import trunk_state_dict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in trunk_state_dict(sd).items()}
    if not tensors:
        raise ValueError("state dict has no 'visual.trunk.' weights (not a vlp CLIP state dict?)")
    args = timm_create_args(cfg)
    save_file(tensors, str(out / TIMM_WEIGHTS), metadata={"format": "pt", "timm_model": args["model_name"]})
    (out / TIMM_CONFIG).write_text(json.dumps(args, indent=1))
    return out


def load_timm_export(path: str | Path, **overrides: Any) -> nn.Module:
    """timm model from an `export_timm` folder (strict load); `overrides` go to timm.create_model."""
    import timm

    folder = Path(path)
    args = json.loads((folder / TIMM_CONFIG).read_text())
    model = timm.create_model(args["model_name"], pretrained=True,
                              pretrained_cfg_overlay={**args["pretrained_cfg"], "file": str(folder / TIMM_WEIGHTS)},
                              **{**args["kwargs"], **overrides})
    return model.eval()

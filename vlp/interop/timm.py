"""vlp -> timm: the image tower as a plain timm model folder, in timm's own `local-dir:` layout.

The folder holds `model.safetensors` (the trunk's state dict, timm key names) and `config.json`
(`{"architecture", "num_classes", "model_args", "pretrained_cfg"}`, as timm's `push_to_hf_hub` writes
it), so timm alone rebuilds it with the checkpoint's preprocessing in `pretrained_cfg`:

    timm.create_model("local-dir:OUT", pretrained=True)

(`pretrained=True` is timm's switch for "load the folder's weights"; without it the architecture comes
up randomly initialised.) `load_timm_export` does exactly that, and still reads the `timm_config.json`
of folders exported before this layout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from vlp.models.config import CLIPConfig

TIMM_CONFIG = "config.json"
LEGACY_CONFIG = "timm_config.json"  # written by vlp before the local-dir layout
TIMM_WEIGHTS = "model.safetensors"


def timm_create_args(cfg: CLIPConfig) -> dict[str, Any]:
    """timm's `config.json` of a checkpoint's image tower (no classifier head)."""
    from vlp.backbone import timm_pretrained_cfg

    return {"architecture": cfg.vision.timm_model, "num_classes": 0,
            "model_args": {**cfg.vision.timm_kwargs, "num_classes": 0},
            "pretrained_cfg": timm_pretrained_cfg(cfg.preprocess)}


def export_timm(cfg: CLIPConfig, sd: dict[str, torch.Tensor], out_dir: str | Path) -> Path:
    """Write the image tower of a vlp state dict as a timm `local-dir:` model folder."""
    from vlp.backbone import trunk_state_dict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in trunk_state_dict(sd).items()}
    if not tensors:
        raise ValueError("state dict has no 'visual.trunk.' weights (not a vlp CLIP state dict?)")
    args = timm_create_args(cfg)
    save_file(tensors, str(out / TIMM_WEIGHTS), metadata={"format": "pt", "timm_model": args["architecture"]})
    (out / TIMM_CONFIG).write_text(json.dumps(args, indent=1))
    return out


def load_timm_export(path: str | Path, **overrides: Any) -> nn.Module:
    """timm model from an `export_timm` folder (timm's local-dir loading; strict); `overrides` go to
    timm.create_model."""
    import timm

    folder = Path(path)
    if (folder / TIMM_CONFIG).is_file():
        return timm.create_model(f"local-dir:{folder}", pretrained=True, **overrides).eval()
    args = json.loads((folder / LEGACY_CONFIG).read_text())
    model = timm.create_model(args["model_name"], pretrained=True,
                              pretrained_cfg_overlay={**args["pretrained_cfg"], "file": str(folder / TIMM_WEIGHTS)},
                              **{**args["kwargs"], **overrides})
    return model.eval()

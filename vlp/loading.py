"""Load a trained model from whatever a run leaves behind, without executing pickled code.

Accepted: a run directory (model.safetensors + model_config.json), a .safetensors file (its
metadata carries the model config), or a DeepSpeed checkpoint directory (checkpoints/step_*,
consolidated from any ZeRO stage on the CPU).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vlp.data.tokenizer import Tokenizer, get_tokenizer
from vlp.models import CLIP
from vlp.models.config import CLIPConfig, PreprocessConfig, config_from_dict


class LoadError(ValueError):
    """A path that is not a loadable vlp checkpoint; the message names it."""


def _from_safetensors(path: Path) -> tuple[CLIPConfig, dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    cfg_json = meta.get("model_config")
    side = path.parent / "model_config.json"
    if cfg_json is not None:
        cfg = config_from_dict(json.loads(cfg_json))
    elif side.is_file():
        d = json.loads(side.read_text())
        d.pop("model_name", None)
        cfg = config_from_dict(d)
    else:
        raise LoadError(f"'{path}' carries no model config (no metadata, no model_config.json beside it)")
    return cfg, load_file(str(path))


def _from_deepspeed(ckpt_dir: Path) -> tuple[CLIPConfig, dict[str, torch.Tensor]]:
    meta = json.loads((ckpt_dir / "meta.json").read_text())
    cfg = config_from_dict(meta["model_config"])
    files = sorted(ckpt_dir.glob("*mp_rank_00_model_states.pt"))  # ZeRO-3 prefixes zero_pp_rank_N_
    if not files:
        raise LoadError(f"DeepSpeed checkpoint '{ckpt_dir}' has no model states file")
    states = torch.load(files[0], map_location="cpu", weights_only=True)
    ds = states.get("ds_config") or {}
    plain = ds.get("zero_optimization", {}).get("stage", 0) == 0 and not any(
        ds.get(k, {}).get("enabled") for k in ("bf16", "fp16"))
    if plain:  # no ZeRO, fp32: the module state is the full model
        full = states["module"]
    else:  # partitioned or low-precision params: fp32 master weights from the optimizer shards
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        full = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)
    sd = {k[len("model."):]: v.float() for k, v in full.items() if k.startswith("model.")}
    return cfg, sd


def load_state(path: str | Path) -> tuple[CLIPConfig, dict[str, torch.Tensor]]:
    """Model config and fp32 state dict from a run dir, a .safetensors file or a checkpoint dir."""
    p = Path(path)
    if not p.exists():
        raise LoadError(f"checkpoint '{path}' does not exist")
    if p.is_dir():
        if (p / "model.safetensors").is_file():
            return _from_safetensors(p / "model.safetensors")
        if (p / "meta.json").is_file():
            return _from_deepspeed(p)
        if (p / "checkpoints").is_dir():
            from vlp.train.checkpoint import find_latest

            latest = find_latest(p / "checkpoints")
            if latest is not None:
                return _from_deepspeed(latest)
        raise LoadError(f"'{path}' holds neither model.safetensors nor a vlp DeepSpeed checkpoint")
    if p.suffix == ".safetensors":
        return _from_safetensors(p)
    raise LoadError(f"'{path}': unsupported checkpoint file (expected .safetensors or a run directory)")


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[CLIP, PreprocessConfig, Tokenizer]:
    """(model in eval mode, preprocessing config, tokenizer) from a checkpoint path."""
    cfg, sd = load_state(path)
    model = CLIP(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise LoadError(f"'{path}' does not match its model config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device).eval(), cfg.preprocess, get_tokenizer(cfg.text)

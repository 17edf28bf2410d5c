"""Load a trained model from whatever a run leaves behind, without executing pickled code.

Accepted: a run directory (model.safetensors + model_config.json), a .safetensors file (its
metadata carries the model config), or a DeepSpeed checkpoint directory (checkpoints/step_*,
consolidated from any ZeRO stage and world size on the CPU).

Every pickle is read with `torch.load(weights_only=True)`. DeepSpeed's optimizer files name three
DeepSpeed classes; they are mapped to inert local stand-ins (never imported from DeepSpeed), so
no code from a checkpoint runs. A file that needs anything else is refused with a LoadError naming it.
"""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from vlp.data.tokenizer import Tokenizer, get_tokenizer
from vlp.extras import MissingExtraError
from vlp.models import CLIP, build_model
from vlp.models.config import CLIPConfig, PreprocessConfig
from vlp.models.families import config_from_dict

# the layout of a run's checkpoints, written by vlp.train.checkpoint / vlp.train.ema and read here
META = "meta.json"  # written last: a step_* directory without it is incomplete
LATEST = "latest"  # a pointer file naming the newest complete step_* directory
FULL_EMA_FILE = "ema.pt"  # the EMA weights in one file (ZeRO-3 writes ema_rank*.pt instead)


class LoadError(ValueError):
    """A path that is not a loadable vlp checkpoint; the message names it."""


# what a command-line entry point reports as one "error: ..." line (exit status 2) instead of a traceback:
# an unloadable checkpoint, a bad argument value, a missing file - each message names the input
LOAD_ERRORS = (LoadError, ValueError, FileNotFoundError, MissingExtraError)


class _PlainRecord:
    """Stand-in for DeepSpeed's attribute-only objects (LossScaler, fragment_address): data, no methods."""


class _EnumValue(int):
    """Stand-in for DeepSpeed's ZeroStageEnum: keeps the integer value only."""


# DeepSpeed names -> inert stand-ins. Only instance attributes / an int are restored; nothing is called.
_DEEPSPEED_STANDINS: list[tuple[Any, str]] = [
    (_PlainRecord, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (_PlainRecord, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
    (_PlainRecord, "deepspeed.utils.tensor_fragment.fragment_address"),
    (_EnumValue, "deepspeed.runtime.zero.config.ZeroStageEnum"),
]


def safe_torch_load(path: str | Path, deepspeed_records: bool = False) -> Any:
    """`torch.load(weights_only=True)` on CPU; a file that would run code raises LoadError naming it."""
    try:
        if deepspeed_records:
            with torch.serialization.safe_globals(_DEEPSPEED_STANDINS):
                return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise LoadError(
            f"refusing to load '{path}': it is not a plain weights file (loading it would need to run "
            f"code from the file; only tensors and plain containers are accepted). Detail: {first[:300]}"
        ) from None


def _read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a .safetensors file; a truncated or corrupt file raises LoadError naming it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return meta, load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise LoadError(f"'{path}' is not a readable .safetensors file (truncated or corrupt?): {e}") from None


def _from_safetensors(path: Path) -> tuple[CLIPConfig, dict[str, torch.Tensor]]:
    meta, sd = _read_safetensors(path)
    return _safetensors_config(path, meta), sd


def _safetensors_config(path: Path, meta: dict[str, str]) -> CLIPConfig:
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
    return cfg


def load_model_config(path: str | Path) -> CLIPConfig:
    """The model config of a checkpoint path (as load_model resolves it), without reading its weights."""
    p = resolve_checkpoint(path)
    if p.is_dir():
        return config_from_dict(json.loads((p / META).read_text())["model_config"])
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise LoadError(f"'{p}' is not a readable .safetensors file (truncated or corrupt?): {e}") from None
    return _safetensors_config(p, meta)


# ---- DeepSpeed consolidation -------------------------------------------------------------------


def _rank_files(ckpt_dir: Path, pattern: str) -> list[Path]:
    """Files of `pattern` ('*_optim_states.pt' ...) ordered by their zero_pp_rank_N number."""
    def rank_of(p: Path) -> int:
        part = p.name.split("zero_pp_rank_")[-1].split("_")[0]
        return int(part) if part.isdigit() else 0

    return sorted(ckpt_dir.glob(pattern), key=rank_of)


def _merged_shapes(param_shapes: Any) -> dict[str, torch.Size]:
    groups = param_shapes if isinstance(param_shapes, list) else [param_shapes]
    out: dict[str, torch.Size] = {}
    for g in groups:
        out.update({k: torch.Size(v) for k, v in g.items()})
    return out


def _unflatten_zero12(flats: Iterable[torch.Tensor], param_shapes: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """ZeRO 1/2 (and bf16): per group, the rank partitions concatenated hold the params back to back."""
    out: dict[str, torch.Tensor] = {}
    for flat, shapes in zip(flats, param_shapes, strict=True):
        offset = 0
        for name, shape in shapes.items():
            n = math.prod(shape)
            if offset + n > flat.numel():
                raise LoadError(f"fp32 partitions hold {flat.numel()} values, fewer than the parameters need")
            out[name] = flat[offset:offset + n].view(tuple(shape)).clone()
            offset += n
    return out


def _unflatten_zero3(rank_flats: list[torch.Tensor], shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """ZeRO 3: every param is split in ceil(numel / world) pieces, piece r at the same offset on rank r."""
    world = len(rank_flats)
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        part = math.ceil(n / world)
        full = torch.cat([f[offset:offset + part] for f in rank_flats])
        out[name] = full[:n].view(tuple(shape)).clone()
        offset += part
    return out


def consolidate_deepspeed(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """fp32 state dict of the engine module from a DeepSpeed checkpoint dir (any ZeRO stage, any world size).

    Reads only with weights_only=True. Trainable params come from the fp32 master partitions in the
    optimizer files when the run was partitioned or low precision, else from the module state.
    """
    ckpt_dir = Path(ckpt_dir)
    model_files = _rank_files(ckpt_dir, "*mp_rank_00_model_states.pt")
    if not model_files:
        raise LoadError(f"DeepSpeed checkpoint '{ckpt_dir}' has no model states file")
    states = safe_torch_load(model_files[0], deepspeed_records=True)
    ds = states.get("ds_config") or {}
    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    low_precision = any(ds.get(k, {}).get("enabled") for k in ("bf16", "fp16"))
    module: dict[str, torch.Tensor] = dict(states.get("module") or {})
    buffers = {k: module[k].float() for k in states.get("buffer_names") or [] if k in module}
    if stage == 0 and not low_precision:  # the module state is the full fp32 model
        return {k: v.float() for k, v in module.items()}
    optim_files = _rank_files(ckpt_dir, "*_optim_states.pt")
    if not optim_files:
        raise LoadError(f"DeepSpeed checkpoint '{ckpt_dir}' (ZeRO {stage}) has no optimizer states files")
    osds = [safe_torch_load(f, deepspeed_records=True)["optimizer_state_dict"] for f in optim_files]
    param_shapes = states["param_shapes"]
    if "fp32_flat_groups" in osds[0]:  # ZeRO 3
        rank_flats = [torch.cat([t.float() for t in o["fp32_flat_groups"]]) for o in osds]
        params = _unflatten_zero3(rank_flats, _merged_shapes(param_shapes))
        frozen = _zero3_frozen(model_files) if states.get("frozen_param_shapes") else {}
    elif "single_partition_of_fp32_groups" in osds[0]:  # ZeRO 1/2, bf16 optimizer
        groups = zip(*(o["single_partition_of_fp32_groups"] for o in osds), strict=True)
        flats = [torch.cat([t.float() for t in parts]) for parts in groups]
        params = _unflatten_zero12(flats, param_shapes if isinstance(param_shapes, list) else [param_shapes])
        frozen = {k: v.float() for k, v in (states.get("frozen_param_fragments") or {}).items()}
    else:
        raise LoadError(f"'{optim_files[0]}': no fp32 master weights found (unsupported optimizer layout)")
    return {**buffers, **frozen, **params}


def _zero3_frozen(model_files: list[Path]) -> dict[str, torch.Tensor]:
    """ZeRO 3 frozen params: each rank stores its fragment; concatenate and trim to the shape."""
    per_rank = [safe_torch_load(f, deepspeed_records=True) for f in model_files]
    out: dict[str, torch.Tensor] = {}
    for name, shape in per_rank[0]["frozen_param_shapes"].items():
        full = torch.cat([s["frozen_param_fragments"][name].flatten().float() for s in per_rank])
        out[name] = full[:math.prod(shape)].view(tuple(shape)).clone()
    return out


def _from_deepspeed(ckpt_dir: Path) -> tuple[CLIPConfig, dict[str, torch.Tensor]]:
    meta = json.loads((ckpt_dir / META).read_text())
    cfg = config_from_dict(meta["model_config"])
    full = consolidate_deepspeed(ckpt_dir)
    sd = {k[len("model."):]: v.float() for k, v in full.items() if k.startswith("model.")}
    return cfg, sd


def find_latest(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None if there is none."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if (cand / META).is_file():
            return cand
    done = sorted(p for p in root.glob("step_*") if (p / META).is_file())
    return done[-1] if done else None


def consolidate_ema(ckpt_dir: Path) -> dict[str, torch.Tensor] | None:
    """Full fp32 EMA weights from a checkpoint directory (any stage), or None if it holds none.
    Reads with weights_only=True."""
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / FULL_EMA_FILE).is_file():
        return dict(torch.load(ckpt_dir / FULL_EMA_FILE, map_location="cpu", weights_only=True)["shadow"])
    files = sorted(ckpt_dir.glob("ema_rank*.pt"))
    if not files:
        return None
    states = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    shapes = states[0]["shapes"]
    out = {}
    for name, t in states[0]["shadow"].items():
        if name not in shapes:
            out[name] = t
            continue
        full = torch.cat([s["shadow"][name] for s in states])
        out[name] = full[:math.prod(shapes[name])].view(shapes[name]).clone()
    return out


def resolve_checkpoint(path: str | Path) -> Path:
    """The file or directory `load_state` would read for `path` (run dir -> weights or latest checkpoint)."""
    p = Path(path)
    if not p.exists():
        raise LoadError(f"checkpoint '{path}' does not exist")
    if p.is_dir():
        if (p / "model.safetensors").is_file():
            return p / "model.safetensors"
        if (p / META).is_file():
            return p
        if (p / "checkpoints").is_dir():
            latest = find_latest(p / "checkpoints")
            if latest is not None:
                return latest
        raise LoadError(f"'{path}' holds neither model.safetensors nor a vlp DeepSpeed checkpoint")
    if p.suffix == ".safetensors":
        return p
    raise LoadError(f"'{path}': unsupported checkpoint file (expected .safetensors or a run directory)")


def _ema_state(path: str | Path) -> tuple[CLIPConfig, dict[str, torch.Tensor]]:
    """The EMA weights of a run (model_ema.safetensors, else its latest checkpoint's EMA) or of a
    checkpoint directory."""
    p = Path(path)
    if p.is_dir() and (p / "model_ema.safetensors").is_file():
        return _from_safetensors(p / "model_ema.safetensors")
    if p.suffix == ".safetensors":
        raise LoadError(f"'{path}' is a weights file: pass the EMA file (model_ema.safetensors) itself, without ema")
    ckpt_dir = resolve_checkpoint(p)
    if not ckpt_dir.is_dir():
        raise LoadError(f"'{path}' holds no EMA weights (no model_ema.safetensors; trained without ema.enabled?)")
    sd = consolidate_ema(ckpt_dir)
    if sd is None:
        raise LoadError(f"checkpoint '{ckpt_dir}' holds no EMA weights (trained without ema.enabled?)")
    meta = json.loads((ckpt_dir / META).read_text())
    return config_from_dict(meta["model_config"]), sd


def load_state(path: str | Path, ema: bool = False) -> tuple[CLIPConfig, dict[str, torch.Tensor]]:
    """Model config and fp32 state dict from a run dir, a .safetensors file or a checkpoint dir;
    `ema=True` gives the run's EMA weights instead of the trained ones."""
    if ema:
        return _ema_state(path)
    p = resolve_checkpoint(path)
    return _from_deepspeed(p) if p.is_dir() else _from_safetensors(p)


def load_model(path: str | Path, device: str | torch.device = "cpu",
               ema: bool = False) -> tuple[CLIP, PreprocessConfig, Tokenizer]:
    """(model in eval mode, preprocessing config, tokenizer) from a checkpoint path (`ema`: its EMA weights)."""
    cfg, sd = load_state(path, ema=ema)
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise LoadError(f"'{path}' does not match its model config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device).eval(), cfg.preprocess, get_tokenizer(cfg.text)

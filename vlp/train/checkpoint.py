"""Resumable DeepSpeed checkpoints with atomic publication, and the final safetensors export.

A checkpoint is written into `checkpoints/.tmp-<tag>/` and renamed to `checkpoints/<tag>/`
only when every rank has finished; `checkpoints/latest` is then replaced atomically. A kill
at any moment leaves the previous checkpoint and `latest` intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from vlp.loading import LATEST, META, find_latest  # reading a run lives in vlp.loading
from vlp.models.config import CLIPConfig
from vlp.models.families import FamilyError, config_from_dict, config_to_dict

from .engine import barrier

DATA_POSITION = "data_position.npz"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here; the message names it and why."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain values, so they load with weights_only=True."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": (version, torch.tensor(words, dtype=torch.int64), gauss),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(int(w) for w in words.tolist()), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(engine, root: Path, step: int, meta: dict[str, Any], keep_last: int,
                    extra: Callable[[Path], None] | None = None,
                    extra_files: dict[str, bytes] | None = None) -> Path:
    """Collective: every rank calls; `extra(dir)` (every rank) adds files before publication
    (the EMA); `extra_files` (name -> bytes, given on rank 0) are written too (the data
    position). Returns the published checkpoint directory."""
    root = Path(root)
    tag = tag_for(step)
    tmp_tag = f".tmp-{tag}"
    tmp_dir, final_dir = root / tmp_tag, root / tag
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)  # debris of an earlier killed save
    barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state={"vlp_step": step}, save_latest=False)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), tmp_dir / f"rng_rank{_rank():05d}.pt")
    if extra is not None:
        extra(tmp_dir)
    if _rank() == 0:
        for name, data in (extra_files or {}).items():
            atomic_write_bytes(tmp_dir / name, data)
        atomic_write_bytes(tmp_dir / META, json.dumps({**meta, "step": step}, indent=1).encode())
    barrier()
    if _rank() == 0:
        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.replace(tmp_dir, final_dir)
        atomic_write_bytes(root / LATEST, tag.encode())
        _prune(root, keep_last)
    barrier()
    return final_dir


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    done = sorted(p for p in root.glob("step_*") if (p / META).is_file())
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def read_meta(ckpt_dir: Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / META
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{ckpt_dir}' has no {META}: not a complete vlp checkpoint")
    return json.loads(path.read_text())


def check_compatible(ckpt_dir: Path, model_cfg: CLIPConfig, model_name: str) -> dict[str, Any]:
    """Refuse, before any expensive work, a checkpoint written for another model."""
    meta = read_meta(ckpt_dir)
    try:  # through the dataclass: a config saved before families were recorded compares equal too
        saved = config_to_dict(config_from_dict(meta.get("model_config") or {}))
    except (FamilyError, ValueError) as e:
        raise CheckpointError(f"checkpoint '{ckpt_dir}': its model config cannot be read ({e})") from None
    if saved != config_to_dict(model_cfg):
        raise CheckpointError(
            f"checkpoint '{ckpt_dir}' was written for model '{meta.get('model_name')}' with a different "
            f"architecture than the configured model '{model_name}'; resume with the same model config"
        )
    return meta


def resolve_resume(resume: str | None, run_dir: Path, ckpt_root: Path) -> Path | None:
    """The checkpoint a run continues from: None for a fresh run (refused if the run dir already holds
    checkpoints), the newest for 'latest' (None if there is none yet), else the given directory."""
    if resume is None:
        if find_latest(ckpt_root) is not None:
            raise CheckpointError(f"run directory '{run_dir}' already holds checkpoints; pass --resume latest "
                                  "to continue it or choose another run_dir")
        return None
    if resume == "latest":
        return find_latest(ckpt_root)
    path = Path(resume)
    if not (path / META).is_file():
        raise CheckpointError(f"--resume '{resume}' is not a vlp checkpoint directory (no {META})")
    return path


def check_resume(ckpt_dir: Path, cfg: Any, model_cfg: CLIPConfig, world_size: int) -> dict[str, Any]:
    """Refuse, before DeepSpeed starts, a resume that cannot restore this checkpoint: another model, ZeRO
    stage or lock, or another world size under ZeRO >= 1. Returns the checkpoint's meta."""
    from vlp.config import from_container, to_container

    meta = check_compatible(ckpt_dir, model_cfg, cfg.model.name)
    saved_stage = meta["run_config"]["train"]["zero_stage"]
    if saved_stage != cfg.train.zero_stage:
        raise CheckpointError(f"checkpoint '{ckpt_dir}' was written with ZeRO stage {saved_stage}; "
                              f"resume with train.zero_stage={saved_stage}")
    if meta["world_size"] != world_size and cfg.train.zero_stage > 0:
        raise CheckpointError(
            f"checkpoint '{ckpt_dir}' was written by {meta['world_size']} ranks with ZeRO stage "
            f"{cfg.train.zero_stage}; DeepSpeed cannot re-partition its optimizer state for {world_size} ranks. "
            f"Resume on {meta['world_size']} ranks (or from a ZeRO stage 0 run)")
    saved_lock = {**to_container(from_container({}))["lock"], **meta["run_config"].get("lock", {})}
    if saved_lock != to_container(cfg)["lock"]:
        raise CheckpointError(f"checkpoint '{ckpt_dir}' was written with lock={saved_lock}; the optimizer state "
                              "holds exactly the parameters that were trainable: resume with the same lock")
    if meta.get("batches_in_epoch"):  # mid-epoch: the data position is a cursor into the epoch's read order
        from vlp.data.mixture import read_order_settings

        saved, now = read_order_settings(meta["run_config"]), read_order_settings(to_container(cfg))
        changed = [k for k in sorted(saved.keys() | now.keys()) if saved.get(k) != now.get(k)]
        if changed:
            k = changed[0]
            raise CheckpointError(
                f"checkpoint '{ckpt_dir}' stopped inside epoch {meta['epoch']}, read with {k}={saved.get(k)!r}; "
                f"this run has {k}={now.get(k)!r}. The data position is a cursor into that epoch's read order, "
                f"which {', '.join(changed)} determine: resume with the checkpoint's values (they may change at "
                "an epoch boundary)")
    offload = [_offload_device(c) for c in (meta["run_config"], to_container(cfg))]
    if offload[0] != offload[1]:
        raise CheckpointError(f"checkpoint '{ckpt_dir}' was written with optimizer offload {offload[0]!r}, this run "
                              f"asks for {offload[1]!r}: the optimizer (and its saved state) differs; resume with "
                              "the same train.deepspeed.zero_optimization.offload_optimizer")
    return meta


def _offload_device(run_config: dict[str, Any]) -> str:
    off = ((run_config.get("train", {}).get("deepspeed") or {}).get("zero_optimization") or {}).get("offload_optimizer")
    device = str((off or {}).get("device", "none")).lower()
    return "none" if device not in ("cpu", "nvme") else device


def load_checkpoint(engine, ckpt_dir: Path) -> int:
    """Collective: restores weights, optimizer, schedule and this rank's RNG. Returns the step."""
    ckpt_dir = Path(ckpt_dir)
    _, client = engine.load_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)
    if client is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint '{ckpt_dir}'")
    rng_file = ckpt_dir / f"rng_rank{_rank():05d}.pt"
    if rng_file.is_file():  # absent when resuming on more ranks than saved: fresh streams then
        set_rng_state(torch.load(rng_file, weights_only=True))
    return int(client["vlp_step"])


def load_data_position(ckpt_dir: Path, epoch: int):
    """The checkpoint's record of consumed samples in `epoch`, or None (older checkpoints)."""
    from vlp.data.position import DataPosition

    path = Path(ckpt_dir) / DATA_POSITION
    if not path.is_file():
        return None
    pos = DataPosition.load(path)
    if pos.epoch != epoch:
        raise CheckpointError(f"checkpoint '{ckpt_dir}': data position is for epoch {pos.epoch}, meta says {epoch}")
    return pos


def export_weights(state_dict: dict[str, torch.Tensor], model_cfg: CLIPConfig, model_name: str, out_dir: Path,
                   filename: str = "model.safetensors") -> Path:
    """Write `filename` (model.safetensors, or model_ema.safetensors) + model_config.json +
    preprocess.json atomically (rank 0)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_dict = config_to_dict(model_cfg)
    meta = {"format": "vlp", "model_name": model_name, "model_config": json.dumps(cfg_dict)}
    tensors = {k: v.contiguous() for k, v in state_dict.items()}
    path = out_dir / filename
    tmp = out_dir / f".{filename}.tmp-{os.getpid()}"
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    doc = {"model_name": model_name, **cfg_dict}
    atomic_write_bytes(out_dir / "model_config.json", json.dumps(doc, indent=1).encode())
    atomic_write_bytes(out_dir / "preprocess.json", json.dumps(cfg_dict["preprocess"], indent=1).encode())
    return path

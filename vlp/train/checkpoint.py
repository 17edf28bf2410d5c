"""Resumable DeepSpeed checkpoints with atomic publication, and the final safetensors export.

A checkpoint is written into `checkpoints/.tmp-<tag>/` and renamed to `checkpoints/<tag>/`
only when every rank has finished; `checkpoints/latest` is then replaced atomically. A kill
at any moment leaves the previous checkpoint and `latest` intact. meta.json, written last,
records the size and SHA-256 of every file (vlp/checkpoint.py); a resume verifies them and
`--resume latest` falls back to the newest checkpoint that verifies. A write that fails (full
disk, file size limit) on any rank is seen by every rank: the partial checkpoint is removed,
the previous one and `latest` stay as they were, and the save raises CheckpointWriteError.
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

from vlp import checkpoint as integrity
from vlp.loading import LATEST, META, find_latest  # reading a run lives in vlp.loading
from vlp.models.config import CLIPConfig
from vlp.models.families import FamilyError, config_from_dict, config_to_dict

from .engine import barrier

DATA_POSITION = "data_position.npz"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here; the message names it and why."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint that could not be written (no space, a file size limit, an I/O error)."""


# what a failed write raises: OSError from Python's own writes, RuntimeError from torch.save's writer
WRITE_ERRORS = (OSError, RuntimeError)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _gather(obj: Any) -> list[Any]:
    """Every rank's `obj` (a small picklable value), in rank order, on every rank."""
    if _world() == 1:
        return [obj]
    parts: list[Any] = [None] * _world()
    dist.all_gather_object(parts, obj)
    return parts


class _Writes:
    """The first failed write of this rank; later writes of the same save are not attempted."""

    def __init__(self) -> None:
        self.failure: tuple[str, str] | None = None

    def run(self, path: Path | str, fn: Callable[[], Any], always: bool = False) -> None:
        """`fn()`, unless an earlier write failed (`always`: a collective every rank must enter)."""
        if self.failure is not None and not always:
            return
        try:
            fn()
        except WRITE_ERRORS as e:
            if self.failure is None:
                self.failure = (str(path), f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else e!r}")
            if Path(path).is_file():
                Path(path).unlink(missing_ok=True)

    def around(self, engine) -> Callable[[], None]:
        """Route DeepSpeed's file writes through `run`, so a rank whose write fails still reaches
        DeepSpeed's own barriers (no rank is left waiting); returns the undo."""
        ce = engine.checkpoint_engine
        original = ce.save
        ce.save = lambda state_dict, path: self.run(path, lambda: original(state_dict, path))
        return lambda: setattr(ce, "save", original)


def _bytes_needed(root: Path, tmp_dir: Path) -> str:
    """How much a checkpoint of this run takes: the newest complete one's recorded size, else what the
    failed save had written (a lower bound)."""
    for cand in integrity.candidates(root):
        meta, _ = integrity.read_meta_checked(cand)
        if meta and meta.get("files"):
            return f"about {sum(int(r['bytes']) for r in meta['files'].values()):,} bytes (the size of {cand.name})"
    written = sum(p.stat().st_size for p in tmp_dir.rglob("*") if p.is_file()) if tmp_dir.is_dir() else 0
    return f"more than the {written:,} bytes written before the failure"


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
    position). Returns the published checkpoint directory; raises CheckpointWriteError on every
    rank if any rank's write failed (nothing is published then)."""
    root = Path(root)
    tag = tag_for(step)
    tmp_tag = f".tmp-{tag}"
    tmp_dir, final_dir = root / tmp_tag, root / tag
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)  # debris of an earlier killed save
    barrier()
    writes = _Writes()
    undo = writes.around(engine)
    try:
        writes.run(tmp_dir, lambda: engine.save_checkpoint(str(root), tag=tmp_tag, client_state={"vlp_step": step},
                                                           save_latest=False))
    finally:
        undo()
    tmp_dir.mkdir(parents=True, exist_ok=True)
    rng_file = tmp_dir / f"rng_rank{_rank():05d}.pt"
    writes.run(rng_file, lambda: torch.save(rng_state(), rng_file))
    if extra is not None:
        writes.run(tmp_dir, lambda: extra(tmp_dir), always=True)  # collective under ZeRO-3
    if _rank() == 0:
        for name, data in (extra_files or {}).items():
            writes.run(tmp_dir / name, lambda name=name, data=data: atomic_write_bytes(tmp_dir / name, data))
    failures = [f for f in _gather(writes.failure) if f is not None]  # also: every rank's files are written
    if not failures:  # sizes and SHA-256 of every file, each rank hashing its share
        names = integrity.checkpoint_files(tmp_dir)
        files: dict[str, dict] = {}
        for part in _gather(integrity.records(tmp_dir, names, _rank(), _world())):
            files.update(part)
        if _rank() == 0:
            doc = json.dumps({**meta, "step": step, "files": files}, indent=1).encode()
            writes.run(tmp_dir / META, lambda: atomic_write_bytes(tmp_dir / META, doc))
            if writes.failure is None:
                if final_dir.exists():
                    shutil.rmtree(final_dir)
                os.replace(tmp_dir, final_dir)
                writes.run(root / LATEST, lambda: atomic_write_bytes(root / LATEST, tag.encode()))
        failures = [f for f in _gather(writes.failure) if f is not None]
    if failures:
        _fail(root, tmp_dir, tag, *failures[0])
    if _rank() == 0:
        _prune(root, keep_last)
    barrier()
    return final_dir


def _fail(root: Path, tmp_dir: Path, tag: str, path, why) -> None:
    """Collective: removes the partial tmp dir and raises CheckpointWriteError on every rank."""
    need = _bytes_needed(root, tmp_dir)
    barrier()
    if _rank() == 0:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    free = shutil.disk_usage(root).free if root.exists() else 0
    prev = find_latest(root)
    raise CheckpointWriteError(
        f"checkpoint {tag} could not be written: {path}: {why}. The file system of '{root}' has {free:,} "
        f"bytes free; a checkpoint of this run needs {need}. Nothing was published: "
        + (f"'{prev}' and '{root / LATEST}' are unchanged" if prev is not None else "no earlier checkpoint exists")
        + "; free space (or raise the file size limit) and resume with --resume latest")


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


def verify_distributed(ckpt_dir: Path) -> integrity.Verdict:
    """Collective: verify a checkpoint's recorded sizes and SHA-256s, each rank hashing its share."""
    verdict = integrity.verify(ckpt_dir, _rank(), _world())
    verdict.problems = [p for part in _gather(verdict.problems) for p in part]
    return verdict


def resolve_resume(resume: str | None, run_dir: Path, ckpt_root: Path,
                   notes: list[str] | None = None) -> Path | None:
    """Collective: the checkpoint a run continues from. None for a fresh run (refused if the run dir
    already holds checkpoints); for 'latest' the newest checkpoint that verifies (None if there is
    none yet; a corrupt one is skipped with a note naming its files); else the given directory,
    refused if it does not verify."""
    notes = notes if notes is not None else []
    if resume is None:
        if find_latest(ckpt_root) is not None:
            raise CheckpointError(f"run directory '{run_dir}' already holds checkpoints; pass --resume latest "
                                  "to continue it or choose another run_dir")
        return None
    if resume == "latest":
        found = integrity.candidates(ckpt_root)
        for cand in found:
            verdict = verify_distributed(cand)
            if verdict.ok:
                return cand
            notes.append(f"checkpoint '{cand}' is corrupt, skipped: " + "; ".join(verdict.problems))
        if found:
            raise CheckpointError(f"no checkpoint under '{ckpt_root}' verifies: " + " | ".join(notes))
        return None
    path = Path(resume)
    if not (path / META).is_file():
        raise CheckpointError(f"--resume '{resume}' is not a vlp checkpoint directory (no {META})")
    verdict = verify_distributed(path)
    if not verdict.ok:
        raise CheckpointError(f"--resume '{resume}' is corrupt: " + "; ".join(verdict.problems)
                              + " (python -m vlp.checkpoint verify lists every checkpoint of the run)")
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
        _check_selections(ckpt_dir, meta, cfg)
    offload = [_offload_device(c) for c in (meta["run_config"], to_container(cfg))]
    if offload[0] != offload[1]:
        raise CheckpointError(f"checkpoint '{ckpt_dir}' was written with optimizer offload {offload[0]!r}, this run "
                              f"asks for {offload[1]!r}: the optimizer (and its saved state) differs; resume with "
                              "the same train.deepspeed.zero_optimization.offload_optimizer")
    return meta


def _check_selections(ckpt_dir: Path, meta: dict[str, Any], cfg: Any) -> None:
    """Mid-epoch, a selection must be the one the epoch began with (its samples are the epoch)."""
    from vlp.data.mixture import source_specs
    from vlp.data.selection import selection_fingerprints

    saved, now = meta.get("selections") or {}, selection_fingerprints(source_specs(cfg.data))
    for name in sorted(saved.keys() | now.keys()):
        if saved.get(name) != now.get(name):
            raise CheckpointError(
                f"checkpoint '{ckpt_dir}' stopped inside epoch {meta['epoch']} reading source '{name}' with "
                f"selection {saved.get(name) or 'none'}; this run's selection is {now.get(name) or 'none'} (the "
                "file changed): resume with the same selection, or change it at an epoch boundary")


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

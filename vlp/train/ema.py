"""Exponential moving average of the model weights, in fp32, under any ZeRO stage.

ZeRO 0-2 keep full parameters on every rank, so the EMA is a full fp32 copy (written once, by
rank 0). Under ZeRO-3 each rank holds one partition of every parameter (`param.ds_tensor`);
the EMA is kept per partition, updated without communication, and written per rank; gathering
happens only to export or evaluate it. The update after optimizer step t is

    t <  start_step:                        ema = w
    t >= start_step, t % every_n == 0:      ema = d * ema + (1 - d) * w,
                                            d = decay, or min(decay, (1 + n) / (10 + n)) with
                                            warmup (n = EMA updates made so far)

Under bf16/fp16 `w` is the low-precision working copy of the fp32 master weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn

from vlp.loading import FULL_EMA_FILE as FULL_FILE  # the layout is read in vlp.loading
from vlp.loading import consolidate_ema  # noqa: F401  (re-exported)


def rank_file(rank: int) -> str:
    return f"ema_rank{rank:05d}.pt"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class WeightEMA:
    def __init__(self, model: nn.Module, cfg: DictConfig, zero3: bool) -> None:
        self.model, self.cfg, self.zero3 = model, cfg, zero3
        self.updates = 0
        self.shadow = {name: src.detach().float().clone() for name, src in self._sources()}

    def _sources(self):
        """(name, tensor) of what this rank holds: full params, or ZeRO-3 partitions; buffers full."""
        for name, p in self.model.named_parameters():
            yield name, (p.ds_tensor if self.zero3 else p)
        for name, b in self.model.named_buffers():
            yield name, b

    def decay(self) -> float:
        d = float(self.cfg.decay)
        if self.cfg.warmup:
            d = min(d, (1 + self.updates) / (10 + self.updates))
        return d

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Call after optimizer step `step` (1-based)."""
        if step < self.cfg.start_step:
            for name, src in self._sources():
                self.shadow[name].copy_(src.detach())
            return
        if step % self.cfg.update_every_n_steps:
            return
        d = self.decay()
        for name, src in self._sources():
            self.shadow[name].lerp_(src.detach().float(), 1.0 - d)
        self.updates += 1

    # ------------------------------------------------------------------ state
    def _param_shapes(self) -> dict[str, list[int]]:
        return {n: list(p.ds_shape) for n, p in self.model.named_parameters()}

    def save(self, ckpt_dir: Path) -> None:
        """Every rank calls; ZeRO-3 writes one partition file per rank, otherwise rank 0 one file."""
        state = {"updates": self.updates, "shadow": self.shadow}
        if self.zero3:
            torch.save({**state, "shapes": self._param_shapes()}, Path(ckpt_dir) / rank_file(_rank()))
        elif _rank() == 0:
            torch.save(state, Path(ckpt_dir) / FULL_FILE)

    def load(self, ckpt_dir: Path) -> bool:
        """Restore the EMA saved in `ckpt_dir`; False (EMA left as the current weights) if it has none."""
        path = Path(ckpt_dir) / (rank_file(_rank()) if self.zero3 else FULL_FILE)
        if not path.is_file():
            return False
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["shadow"].keys() != self.shadow.keys():
            from .checkpoint import CheckpointError

            raise CheckpointError(f"'{path}': EMA entries do not match the model")
        for name, t in state["shadow"].items():
            self.shadow[name].copy_(t)
        self.updates = int(state["updates"])
        return True

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The full fp32 EMA weights on every rank (collective under ZeRO-3)."""
        if not self.zero3:
            return {k: v.detach().clone().cpu() for k, v in self.shadow.items()}
        world = dist.get_world_size()
        out: dict[str, torch.Tensor] = {}
        params = dict(self.model.named_parameters())
        for name, t in self.shadow.items():
            if name not in params:  # buffer: already full
                out[name] = t.detach().clone().cpu()
                continue
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t.contiguous())
            p = params[name]
            out[name] = torch.cat(parts)[: p.ds_numel].view(p.ds_shape).cpu()
        return out

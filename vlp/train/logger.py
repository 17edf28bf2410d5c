"""Metrics to a JSON-lines file, a tqdm progress bar and (optionally) wandb, on rank 0 only."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from tqdm import tqdm


class MetricsLogger:
    def __init__(self, cfg: DictConfig, run_dir: Path, total_steps: int, start_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.bar = None
        self.wandb = None
        if not enabled:
            return
        if cfg.train.progress_bar:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stdout, mininterval=1.0)
        if cfg.logging.wandb and cfg.logging.wandb_mode != "disabled":
            os.environ.setdefault("WANDB_MODE", cfg.logging.wandb_mode)
            os.environ.setdefault("WANDB_SILENT", "true")
            from vlp.extras import require

            wandb = require("wandb", "logging.wandb")

            from vlp.config import to_container

            self.wandb = wandb.init(project=cfg.logging.wandb_project, dir=str(run_dir),
                                    name=Path(run_dir).name, config=to_container(cfg),
                                    mode=cfg.logging.wandb_mode, resume="allow")

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def rewound(self, step: int) -> None:
        """The run went back to `step` (train.nonfinite.policy=rewind)."""
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def log(self, step: int, metrics: dict[str, Any], show: dict[str, str] | None = None) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.bar is not None and show:
            self.bar.set_postfix(show, refresh=False)

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()

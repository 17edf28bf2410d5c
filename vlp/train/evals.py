"""The `evals:` of a run config during training: which are due at a step, running them, logging them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from .logger import MetricsLogger


class EvalScheduler:
    """Runs each `evals.NAME` every `every_n_steps` optimizer steps and at the end of training, at most
    once per step, with the live weights or (`ema: true`) the EMA's; logs `eval/NAME/METRIC`."""

    def __init__(self, evals: DictConfig, tokenizer: Any, preprocess: Any, device: torch.device, seed: int,
                 log: MetricsLogger) -> None:
        self.evals, self.tokenizer, self.preprocess = evals, tokenizer, preprocess
        self.device, self.seed, self.log = device, seed, log
        self._done: dict[str, int] = {}  # eval name -> step it last ran at

    def due(self, step: int, final: bool) -> list[str]:
        names = []
        for name, ev in self.evals.items():
            if (final or (ev.every_n_steps and step % ev.every_n_steps == 0)) and self._done.get(name) != step:
                names.append(name)
        return names

    def run(self, step: int, model_for: Callable[[bool], nn.Module], final: bool) -> dict[str, Any]:
        """Every eval due at `step`; `model_for(ema)` gives the model to score. Results by eval name."""
        from vlp.eval.common import make_context
        from vlp.eval.tasks import DatasetSpec, run_task

        out: dict[str, Any] = {}
        for name in self.due(step, final):
            ev = self.evals[name]
            self._done[name] = step
            model = model_for(bool(ev.ema))
            model.eval()
            spec = DatasetSpec(ev.dataset, ev.split, ev.max_samples, ev.batch_size, dict(ev.options))
            ctx = make_context(self.device, figures=False, seed=self.seed)
            res = run_task(ev.task, model, self.tokenizer, self.preprocess, spec, ctx).metrics
            self.log.log(step, {f"eval/{name}/{k}": v for k, v in res.items() if isinstance(v, (int, float))})
            self.log.write(f"[step {step}] eval {name} ({ev.dataset}): "
                           + ", ".join(f"{k}={v:.4f}" for k, v in res.items() if isinstance(v, float)))
            out[name] = res
        return out

"""What an objective declares, and the module (model + loss) the trainer hands to DeepSpeed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from vlp.losses.contrastive import ClipLoss

Refuse = Callable[[str, str], None]  # bad(key, why): raises a ConfigError naming the key


class ObjectiveError(ValueError):
    """A model that the objective cannot train; the message names what is missing."""


@dataclass(frozen=True)
class Supports:
    """What an objective can run under; the run config is checked against it before any work starts.

    `why` gives, per setting (`zero_stage`, `precision`, `contrastive_accumulation`), the reason a
    value outside the supported ones is refused; it is shown in the error.
    """

    # train.contrastive_accumulation=exact (GradCache): the module's `loss` must then be pairwise,
    # loss(image_features, text_features, logit_scale, logit_bias)
    exact_accumulation: bool = True
    zero_stages: tuple[int, ...] = (0, 1, 2, 3)
    precisions: tuple[str, ...] = ("fp32", "bf16", "fp16")
    text_streams: bool = False  # several texts per image (data.text_streams)
    why: dict[str, str] = field(default_factory=dict)


class ObjectiveModule(nn.Module):
    """Model + loss, returning {"loss": ..., **metrics}; the model itself stays free of distributed code.

    `forward(..., features_only=True)` returns the model's output (exact accumulation takes the
    loss over several micro-batches itself, with `self.loss`). `terms(out)` turns one model output
    into the loss and its logged terms: here the pairwise loss of image and text features (CLIP,
    SigLIP); objectives whose loss reads more of the output override it.

    `locked` modules (LiT locking, see `vlp.train.locking`) stay in eval mode whatever `train()`
    is asked, so their dropout and normalization statistics are off during training too.
    """

    def __init__(self, model: nn.Module, loss: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.loss = loss if loss is not None else ClipLoss()
        self.locked: list[nn.Module] = []

    def forward(self, image: torch.Tensor, text: torch.Tensor, kinds: torch.Tensor | None = None,
                features_only: bool = False) -> dict[str, torch.Tensor]:
        """`kinds`: per-sample prefix indices for a prefix-conditioned text tower, else None."""
        out = self.model(image, text) if kinds is None else self.model(image, text, kinds)
        return out if features_only else self.terms(out)

    def terms(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        loss = self.loss(out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias"))
        metrics = {"loss": loss, "logit_scale": out["logit_scale"].detach()}
        if "logit_bias" in out:
            metrics["logit_bias"] = out["logit_bias"].detach()
        return metrics

    def train(self, mode: bool = True) -> ObjectiveModule:
        super().train(mode)
        for m in self.locked:
            m.eval()
        return self

    def no_weight_decay(self) -> set[str]:
        return {f"model.{n}" for n in self.model.no_weight_decay()}

    def after_step(self, step: int) -> None:
        """Called after optimizer step `step` (1-based); objectives with a teacher move it here."""


class Objective:
    """One training objective. Subclass, set the class attributes, override what differs, and register
    an instance with `vlp.objectives.register_objective`.

    - `name`: the value of `loss.name` that selects it.
    - `options`: a dataclass of its own settings, or None. It becomes the run config's top-level section
      named `name` (typed, refusing unknown keys); `build` reads it as `cfg[name]`.
    - `supports`: checked by `vlp.config.validate` against train.* and data.text_streams.
    - `example`: dotted overrides that make a run config of this objective with its smallest model
      (the registry-driven tests train every objective from them).
    """

    name: ClassVar[str] = ""
    options: ClassVar[type | None] = None
    supports: ClassVar[Supports] = Supports()
    example: ClassVar[tuple[str, ...]] = ("model.name=clip-nano",)

    def validate(self, cfg: Any, bad: Refuse) -> None:
        """Config-only checks beyond `supports` (its own section's values, data keys it needs)."""

    def check_model(self, model_cfg: Any, cfg: Any) -> None:
        """Raise ObjectiveError if the model of `model_cfg` (a resolved model config) cannot be trained
        with this objective. Runs before any process group or worker starts."""

    def build(self, model: nn.Module, cfg: Any, total_steps: int) -> ObjectiveModule:
        raise NotImplementedError

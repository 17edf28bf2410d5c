"""The objective registry: every registered objective trains, checks its model and config, and a new
objective registered from outside vlp (a `plugins:` module) trains through train.py untouched."""

from __future__ import annotations

import json
import math
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.helpers import run
from vlp.config import ConfigError, load_config
from vlp.data.tokenizer import get_tokenizer
from vlp.models import create_model, get_model_config
from vlp.objectives import (
    Objective,
    ObjectiveError,
    ObjectiveModule,
    UnknownObjectiveError,
    get_objective,
    objective_names,
    register_objective,
)

NAMES = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "zero"]


def digits_batch(image_size: int, n: int = 32) -> tuple[torch.Tensor, list[str]]:
    """Real sklearn digits (first n), scaled to the model's input, with their class captions."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:n] / 16.0, dtype=torch.float32).unsqueeze(1).expand(-1, 3, -1, -1)
    x = F.interpolate(x, size=image_size, mode="bilinear", align_corners=False)
    return (x - 0.5) / 0.25, [f"a photo of the digit {NAMES[c - 1]}." for c in d.target[:n]]


def test_builtin_objectives_are_registered() -> None:
    assert {"clip", "siglip", "coca", "tips"} <= set(objective_names())
    with pytest.raises(UnknownObjectiveError, match="unknown objective 'nope'.*clip"):
        get_objective("nope")
    with pytest.raises(ConfigError, match="loss.name.*unknown objective 'nope'"):
        load_config("tests/configs/digits_nano.yaml", ["loss.name=nope"])


@pytest.mark.parametrize("name", objective_names())
def test_every_objective_trains_on_its_example_model(name: str) -> None:
    """Built from the registry alone (its `example` config): the model passes `check_model`; a training
    step on a real batch gives a finite loss with gradients in both towers, and a short step against
    that gradient lowers the loss (deterministic eval-mode forward, so the gradient is checked)."""
    objective = get_objective(name)
    cfg = load_config("tests/configs/digits_nano.yaml", [f"loss.name={name}", *objective.example])
    model_cfg = get_model_config(cfg.model.name)
    objective.check_model(model_cfg, cfg)
    torch.manual_seed(0)
    module = objective.build(create_model(cfg.model.name), cfg, total_steps=20)
    assert isinstance(module, ObjectiveModule)
    image, captions = digits_batch(model_cfg.preprocess.image_size)
    text = get_tokenizer(model_cfg.text)(captions)
    if cfg.data.text_streams:  # one text per stream: the same caption in each here
        text = text.unsqueeze(1).expand(-1, len(cfg.data.text_streams), -1).contiguous()
    params = [p for p in module.parameters() if p.requires_grad]
    module.train()
    out = module(image, text)
    assert out["loss"].ndim == 0 and math.isfinite(float(out["loss"].detach())) and "logit_scale" in out
    out["loss"].backward()
    for tower in ("visual", "text"):
        grads = [p.grad for n, p in module.model.named_parameters() if n.startswith(tower) and p.grad is not None]
        assert grads and sum(float(g.abs().sum()) for g in grads) > 0, f"{name}: no gradient in {tower}"
    torch.optim.AdamW(params, lr=1e-3).step()
    module.after_step(1)
    module.eval()
    module.zero_grad()
    before = module(image, text)["loss"]
    before.backward()
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params if p.grad is not None))
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p -= 1e-2 * p.grad / norm
        after = module(image, text)["loss"]
    assert float(after) < float(before.detach()), (name, float(before.detach()), float(after))


@pytest.mark.parametrize("name", ["siglip", "coca", "tips"])
def test_objective_refuses_a_model_it_cannot_train(name: str) -> None:
    objective = get_objective(name)
    extra = [o for o in objective.example if not o.startswith("model.name=")]
    cfg = load_config("tests/configs/digits_nano.yaml", [f"loss.name={name}", "model.name=clip-nano", *extra])
    with pytest.raises(ObjectiveError, match=f"loss.name={name} needs"):
        objective.check_model(get_model_config("clip-nano"), cfg)


def test_supports_are_checked_against_the_run_config() -> None:
    with pytest.raises(ConfigError, match="train.contrastive_accumulation.*loss.name=coca"):
        load_config("tests/configs/digits_nano.yaml", ["loss.name=coca", "train.contrastive_accumulation=exact"])
    with pytest.raises(ConfigError, match="data.text_streams.*only by loss.name=tips"):
        load_config("tests/configs/digits_nano.yaml", ["data.text_streams=[txt,syn.txt]"])
    with pytest.raises(ConfigError, match="key 'loss.caption_weight' is now 'coca.caption_weight'"):
        load_config("tests/configs/digits_nano.yaml", ["loss.name=coca", "loss.caption_weight=1.0"])


def test_saved_configs_with_moved_keys_are_migrated() -> None:
    from vlp.config import from_container, to_container

    saved = to_container(load_config("tests/configs/digits_nano.yaml", ["loss.name=coca", "model.name=coca-nano"]))
    del saved["coca"]
    saved["loss"].update(clip_weight=0.5, caption_weight=3.0)  # as an earlier version wrote it
    cfg = from_container(saved)
    assert (cfg.coca.clip_weight, cfg.coca.caption_weight) == (0.5, 3.0) and "caption_weight" not in cfg.loss


def test_registration_refusals() -> None:
    class Other(Objective):
        name = "clip"

    with pytest.raises(ValueError, match="already registered"):
        register_objective(Other())
    with pytest.raises(TypeError, match="Objective instance"):
        register_objective(get_objective)  # type: ignore[arg-type]


PLUGIN = '''
"""An objective from outside vlp: InfoNCE with label smoothing, options in `smooth_clip:`."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlp.objectives import Objective, ObjectiveModule, register_objective


@dataclass
class SmoothOptions:
    smoothing: float = 0.1


class SmoothLoss(torch.nn.Module):
    def __init__(self, smoothing):
        super().__init__()
        self.smoothing = smoothing

    def forward(self, image, text, scale, bias=None):
        logits = scale * image @ text.t()
        target = torch.arange(len(logits))
        return (F.cross_entropy(logits, target, label_smoothing=self.smoothing)
                + F.cross_entropy(logits.t(), target, label_smoothing=self.smoothing)) / 2


class SmoothModule(ObjectiveModule):
    def terms(self, out):
        terms = super().terms(out)
        terms["loss/smoothing"] = torch.tensor(self.loss.smoothing)
        return terms


class SmoothCLIP(Objective):
    name = "smooth_clip"
    options = SmoothOptions

    def validate(self, cfg, bad):
        if not 0 <= cfg.smooth_clip.smoothing < 1:
            bad("smooth_clip.smoothing", "must be in [0, 1)")

    def build(self, model, cfg, total_steps):
        return SmoothModule(model, SmoothLoss(cfg.smooth_clip.smoothing))


register_objective(SmoothCLIP())
'''


@pytest.mark.slow
def test_an_objective_registered_outside_vlp_trains_and_resumes(tmp_path: Path, digits_shards_dir: Path) -> None:
    plugin_dir = tmp_path / "plugin"
    plugin_dir.mkdir()
    (plugin_dir / "smooth_objective.py").write_text(textwrap.dedent(PLUGIN))
    env = {"PYTHONPATH": f"{Path(__file__).resolve().parents[1]}:{plugin_dir}"}
    run_dir = tmp_path / "run"
    args = [sys.executable, "train.py", "--config", "tests/configs/digits_nano.yaml", "plugins=[smooth_objective]",
            "loss.name=smooth_clip", f"run_dir={run_dir}", f"data.train_shards={digits_shards_dir}/train.json",
            "train.steps=4", "train.checkpoint_every_n_steps=2", "train.stop_after_steps=2", "evals={}"]
    bad = run([*args, "smooth_clip.smoothing=1.5"], env=env, check=False)
    assert bad.returncode == 2 and "smooth_clip.smoothing" in bad.stderr, bad.stderr
    typo = run([*args, "smooth_clip.smoothin=0.2"], env=env, check=False)
    assert typo.returncode == 2 and "smoothin" in typo.stderr, typo.stderr
    run([*args, "smooth_clip.smoothing=0.2"], env=env)
    # resumed from the saved config alone: the plugin is imported again from `plugins`
    ckpt = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    run([sys.executable, "train.py", "--resume", str(ckpt), "train.stop_after_steps=0"], env=env)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4], steps
    assert all(r["loss/smoothing"] == pytest.approx(0.2) for r in steps), steps
    assert np.isfinite([r["loss"] for r in steps]).all()


@pytest.mark.slow
def test_small_loss_resumes_its_ramp_and_its_trajectory(tmp_path: Path, digits_shards_dir: Path) -> None:
    """The dropped share follows its ramp step by step (drop 0.5 over the first 2 of 4 steps), and a run
    stopped after step 2 and resumed takes steps 3-4 as the uninterrupted one: the step counter is
    restored from the checkpoint, not restarted (a restart would drop 0.25 again at step 3)."""
    from tests.test_train import assert_same_weights, train, weights

    opts = {"loss.name": "small_loss", "small_loss.drop": 0.5, "small_loss.ramp": 0.5, "train.steps": 4,
            "evals": "{}"}
    full, split = tmp_path / "full", tmp_path / "split"
    train(full, digits_shards_dir, **opts)
    train(split, digits_shards_dir, **opts, **{"train.stop_after_steps": 2})
    train(split, digits_shards_dir, resume=True, **opts)
    for run_dir in (full, split):
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        shares = {r["step"]: r["loss/dropped_share"] for r in rows if "loss" in r}
        assert shares == {1: 0.25, 2: 0.5, 3: 0.5, 4: 0.5}, shares
    assert_same_weights(weights(full), weights(split))

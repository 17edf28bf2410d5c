"""Training features for large batches and fine-tuning: exact (GradCache) accumulation, LiT
locking, EMA, gradient checkpointing, torch.compile, precision of the loss.

References: one DeepSpeed step on the k-times-larger batch and a plain-torch full-graph
computation (accumulation), the weights before training (locking), an EMA computed by hand
from the per-step checkpoints (EMA), the same model without checkpointing / compilation.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import run, torchrun

ACCUM_TOL = 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_exact_accumulation_equals_the_large_batch(tmp_path, nproc):
    out = tmp_path / "res.pt"
    if nproc == 1:
        import sys

        run([sys.executable, "tests/workers/exact_accumulation.py", str(out)])
    else:
        torchrun(2, "tests/workers/exact_accumulation.py", str(out))
    res = torch.load(out, weights_only=True)
    cases = {f"zero{z}/{m}/{c}" for z in (0, 2) for m in ("clip-nano", "siglip-nano")
             for c in ("clip0.0", "clip0.05", "dropout")}
    assert set(res) == cases
    for key, r in res.items():
        # weight deltas of one step: unclipped they are about the gradient itself
        assert r["delta_rel"] <= ACCUM_TOL, (key, r)
        if "weight_rel" in r:
            assert r["weight_rel"] <= ACCUM_TOL, (key, r)
            assert r["max_delta"] > 1e-2, (key, r)  # the step moved the weights: the check has teeth
            assert r["loss_exact"] == pytest.approx(r["loss_ref"], rel=1e-6), (key, r)


# ---------------------------------------------------------------- helpers for end-to-end runs

CONFIG = "tests/configs/digits_nano.yaml"


def train(run_dir, shards, nproc=1, resume=False, **extra):
    import sys

    args = ["--config", CONFIG, f"run_dir={run_dir}", f"data.train_shards={shards}/train.json",
            *[f"{k}={v}" for k, v in extra.items()]]
    if resume:
        args += ["--resume", "latest"]
    if nproc == 1:
        return run([sys.executable, "train.py", *args])
    return torchrun(nproc, "train.py", *args)


def losses(run_dir):
    import json

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def initial_weights(name="clip-nano"):
    """The weights the trainer starts from (it seeds with train.seed=0 before building)."""
    from vlp.models import create_model
    from vlp.train.trainer import seed_everything

    seed_everything(0)
    return {k: v.detach().clone() for k, v in create_model(name).state_dict().items()}


# ---------------------------------------------------------------- locking


@pytest.mark.slow
def test_lit_lock_keeps_image_tower_bit_identical_without_optimizer_state(tmp_path, digits_shards_dir):
    from safetensors.torch import load_file

    from vlp.loading import safe_torch_load
    from vlp.train.checkpoint import find_latest

    run_dir = tmp_path / "lit"
    train(run_dir, digits_shards_dir, **{"train.steps": 4, "lock.image": "true", "evals": "{}"})
    start, end = initial_weights(), load_file(str(run_dir / "model.safetensors"))
    image = [k for k in start if k.startswith("visual.")]
    assert image and all(torch.equal(start[k], end[k]) for k in image)
    moved = [k for k in start if not k.startswith("visual.") and not torch.equal(start[k], end[k])]
    assert "image_proj.weight" in moved and any(k.startswith("text.blocks.") for k in moved)
    # ZeRO 0: the torch AdamW state inside the model states file; one entry per trainable param
    states = safe_torch_load(next(find_latest(run_dir / "checkpoints").glob("*model_states.pt")),
                             deepspeed_records=True)
    optim = states["optimizer"]
    in_groups = [i for g in optim["param_groups"] for i in g["params"]]
    trainable = [k for k in start if not k.startswith("visual.")]
    assert len(in_groups) == len(optim["state"]) == len(trainable)


@pytest.mark.slow
def test_partial_lock_trains_only_the_chosen_groups_and_resumes(tmp_path, digits_shards_dir):
    """ZeRO 2, image trunk locked but its last block + final norm, text tower locked but its final
    norm, EMA on; an interrupted and resumed run equals an uninterrupted one (weights and EMA)."""
    from safetensors.torch import load_file

    from vlp.loading import safe_torch_load
    from vlp.train.checkpoint import find_latest

    opts = {"train.steps": 6, "train.zero_stage": 2, "lock.image": "true", "lock.image_unlocked_groups": 2,
            "lock.text": "true", "lock.text_unlocked_groups": 1, "ema.enabled": "true", "ema.decay": 0.7,
            "evals": "{}"}
    full, split = tmp_path / "full", tmp_path / "split"
    train(full, digits_shards_dir, **opts)
    train(split, digits_shards_dir, **opts, **{"train.stop_after_steps": 3})
    train(split, digits_shards_dir, resume=True, **opts)
    start = initial_weights()
    for name in ("model.safetensors", "model_ema.safetensors"):
        a, b = load_file(str(full / name)), load_file(str(split / name))
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst <= 1e-6, (name, worst)
    end = load_file(str(full / "model.safetensors"))
    trainable = ("visual.trunk.blocks.1.", "visual.trunk.fc_norm.", "text.ln_final.", "image_proj.", "text_proj.",
                 "logit_scale")
    for k in start:
        assert torch.equal(start[k], end[k]) != k.startswith(trainable), k
    # DeepSpeed's ZeRO-2 optimizer holds only the trainable params; the locked ones are stored frozen
    states = safe_torch_load(next(find_latest(full / "checkpoints").glob("*model_states.pt")), deepspeed_records=True)
    shapes = {n for g in states["param_shapes"] for n in g}
    assert shapes == {f"model.{k}" for k in start if k.startswith(trainable)}
    assert set(states["frozen_param_fragments"]) == {f"model.{k}" for k in start if not k.startswith(trainable)}


def test_lock_config_errors_name_the_key():
    from vlp.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="lock.image_unlocked_groups"):
        load_config(None, ["lock.image_unlocked_groups=2"])
    with pytest.raises(ConfigError, match="train.contrastive_accumulation"):
        load_config(None, ["train.contrastive_accumulation=approx"])
    with pytest.raises(ConfigError, match="evals.x.ema"):
        load_config(None, ["+evals.x.ema=true"])
    from omegaconf import OmegaConf

    from vlp.models import create_model
    from vlp.train.locking import LockError, apply_locks

    lock = OmegaConf.create({"image": True, "image_unlocked_groups": 9, "image_unlock_norms": False,
                             "text": False, "text_unlocked_groups": 0, "text_unlock_norms": False})
    with pytest.raises(LockError, match="lock.image_unlocked_groups=9"):
        apply_locks(create_model("clip-nano"), lock)


def test_locked_modules_stay_in_eval_mode_and_unlock_norms():
    from omegaconf import OmegaConf

    from vlp.models import create_model
    from vlp.train.locking import apply_locks
    from vlp.train.task import CLIPTask

    model = create_model("clip-nano")
    task = CLIPTask(model)
    task.locked = apply_locks(model, OmegaConf.create({
        "image": True, "image_unlocked_groups": 0, "image_unlock_norms": True,
        "text": True, "text_unlocked_groups": 2, "text_unlock_norms": False}))
    task.train()
    assert not any(m.training for m in model.visual.trunk.modules())
    assert model.text.blocks[1].training and not model.text.blocks[0].training
    assert model.image_proj.training
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    image_trainable = {n for n in trainable if n.startswith("visual.")}
    # norms only: LayerNorm weights and biases of the trunk
    assert image_trainable and all(".norm" in n or "fc_norm" in n or "norm_pre" in n for n in image_trainable)
    assert {n for n in trainable if n.startswith("text.")} == {
        n for n, _ in model.named_parameters() if n.startswith(("text.blocks.1.", "text.ln_final."))}

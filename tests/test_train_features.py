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


# one process is an extended re-check: the 2-process run checks the same cases (and ZeRO-3) against the same
# one-process large-batch reference, and the accumulation code has no world-size branch
@pytest.mark.slow
@pytest.mark.parametrize("nproc", [pytest.param(1, marks=pytest.mark.extended), 2])
def test_exact_accumulation_equals_the_large_batch(tmp_path, nproc):
    out = tmp_path / "res.pt"
    stages = (0, 2) if nproc == 1 else (0, 2, 3)
    if nproc == 1:
        import sys

        run([sys.executable, "tests/workers/exact_accumulation.py", str(out), "0,2"])
    else:
        torchrun(2, "tests/workers/exact_accumulation.py", str(out), "0,2,3")
    res = torch.load(out, weights_only=True)
    cases = {f"zero{z}/{m}/{c}" for z in stages for m in ("clip-nano", "siglip-nano")
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


def initial_weights(name="clip-nano", **overrides):
    """The weights the trainer starts from (it seeds with train.seed=0 before building)."""
    from vlp.models import create_model
    from vlp.train.trainer import seed_everything

    seed_everything(0)
    return {k: v.detach().clone() for k, v in create_model(name, **overrides).state_dict().items()}


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
    from vlp.objectives import ObjectiveModule
    from vlp.train.locking import apply_locks

    model = create_model("clip-nano")
    task = ObjectiveModule(model)
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


# ---------------------------------------------------------------- EMA


def hand_ema(per_step: list[dict], decay: float, start: int, every: int, warmup: bool) -> dict:
    """The EMA after len(per_step) steps from the weights saved after steps 1..T."""
    ema, n = None, 0
    for t, w in enumerate(per_step, start=1):
        if t < start:
            ema = {k: v.clone() for k, v in w.items()}
            continue
        if t % every:
            continue
        d = min(decay, (1 + n) / (10 + n)) if warmup else decay
        ema = {k: d * ema[k] + (1 - d) * w[k] for k in w}
        n += 1
    return ema


@pytest.mark.slow
def test_ema_zero3_two_processes_matches_hand_computed(tmp_path, digits_shards_dir):
    """ZeRO-3 keeps the EMA per parameter partition; the exported, per-checkpoint and evaluated EMA
    equal an EMA computed here from the weights saved after every step."""
    import json

    from safetensors.torch import load_file

    from vlp import load_model  # the public entry point: it must pass ema= through
    from vlp.data.datasets import load_eval_dataset
    from vlp.eval.zeroshot import evaluate_zeroshot
    from vlp.loading import load_state
    from vlp.train.checkpoint import tag_for

    run_dir = tmp_path / "ema3"
    # warmup: decay min(0.15, 0.1) at the first update, then 0.15; updates at steps 2 and 4 only
    train(run_dir, digits_shards_dir, nproc=2, **{
        "train.steps": 5, "train.zero_stage": 3, "train.checkpoint_every_n_steps": 1,
        "train.keep_last_n_checkpoints": 0, "ema.enabled": "true", "ema.decay": 0.15, "ema.start_step": 2,
        "ema.update_every_n_steps": 2, "ema.warmup": "true", "evals.digits.ema": "true"})
    per_step = [load_state(run_dir / "checkpoints" / tag_for(t))[1] for t in range(1, 6)]
    assert not torch.equal(per_step[1]["text_proj.weight"], per_step[3]["text_proj.weight"])
    for t in (1, 2, 3, 4, 5):
        expected = hand_ema(per_step[:t], 0.15, 2, 2, True)
        got = load_state(run_dir / "checkpoints" / tag_for(t), ema=True)[1]
        assert got.keys() == expected.keys()
        worst = max((got[k] - expected[k]).abs().max().item() for k in got)
        assert worst <= 1e-6, (t, worst)
    exported = load_file(str(run_dir / "model_ema.safetensors"))
    assert all(torch.equal(exported[k], got[k]) for k in got)
    # the EMA differs from the trained weights, and the in-training eval used the EMA
    assert not torch.equal(exported["text_proj.weight"], per_step[-1]["text_proj.weight"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "eval/digits/top1" in r][-1]
    model, pre, tok = load_model(run_dir, ema=True)
    res = evaluate_zeroshot(model, tok, load_eval_dataset("digits", split="test", max_samples=100), pre, 256, "cpu")
    assert logged["eval/digits/top1"] == pytest.approx(res["top1"])
    assert logged["eval/digits/top5"] == pytest.approx(res["top5"])


def test_ema_config_errors():
    from vlp.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="ema.decay"):
        load_config(None, ["ema.enabled=true", "ema.decay=1.0"])
    with pytest.raises(ConfigError, match="ema.update_every_n_steps"):
        load_config(None, ["ema.enabled=true", "ema.update_every_n_steps=0"])


# ---------------------------------------------------------------- gradient checkpointing, precision


def _nano_batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 16, 16, generator=g)
    tokens = torch.randint(1, 400, (n, 16), generator=g)
    tokens[:, 9] = 49407
    return images, tokens


def _grads(model, images, tokens, seed):
    from vlp.losses import ClipLoss

    model.zero_grad()
    torch.manual_seed(seed)
    out = model(images, tokens)
    ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"]).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _saved_tensors(model, images, tokens) -> int:
    """How many tensors the autograd graph of one forward keeps for the backward."""
    count = [0]

    def pack(t):
        count[0] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(images, tokens)
    return count[0]


def test_grad_checkpointing_gives_the_same_gradients():
    from vlp.models import create_model

    torch.manual_seed(0)
    # drop-path on: the recomputation must replay the same random masks
    model = create_model("clip-nano", vision={"timm_kwargs": {"drop_path_rate": 0.2}}).train()
    images, tokens = _nano_batch()
    plain = _grads(model, images, tokens, seed=3)
    saved_plain = _saved_tensors(model, images, tokens)
    model.set_grad_checkpointing(True)
    ckpt = _grads(model, images, tokens, seed=3)
    # each tower checkpoints: the graph keeps fewer activations with both on than with one
    saved_both = _saved_tensors(model, images, tokens)
    model.visual.set_grad_checkpointing(False)
    assert saved_both < _saved_tensors(model, images, tokens) < saved_plain
    for n in plain:
        assert (plain[n] - ckpt[n]).abs().max().item() <= 1e-6, n


def test_bf16_model_computes_loss_and_logit_scale_in_fp32():
    """DeepSpeed bf16 casts the whole module; the temperature, bias and loss must still be fp32."""
    from vlp.losses import PAIRWISE_LOSSES
    from vlp.models import create_model
    from vlp.objectives import ObjectiveModule

    images, tokens = _nano_batch()
    for name, loss in (("clip-nano", "clip"), ("siglip-nano", "siglip")):
        torch.manual_seed(0)
        task = ObjectiveModule(create_model(name), PAIRWISE_LOSSES[loss]()).to(torch.bfloat16)
        out = task.model(images.bfloat16(), tokens)
        assert out["image_features"].dtype == torch.bfloat16  # the towers do run in bf16
        assert out["logit_scale"].dtype == torch.float32
        assert out["logit_scale"].item() == pytest.approx(task.model.logit_scale.float().exp().item(), rel=1e-7)
        value = task(images.bfloat16(), tokens)["loss"]
        assert value.dtype == torch.float32
        # the same loss from the bf16 features upcast by hand, in float64: the loss math is not bf16
        ref = PAIRWISE_LOSSES[loss]()(out["image_features"].double(), out["text_features"].double(),
                               out["logit_scale"].double(), out.get("logit_bias", torch.zeros(())).double())
        assert value.item() == pytest.approx(ref.item(), rel=1e-6)


# ---------------------------------------------------------------- torch.compile


@pytest.mark.slow
@pytest.mark.parametrize("backend", [
    "aot_eager",
    # inductor generates and compiles C++: minutes on a 2-core CPU; VLP_TEST_INDUCTOR=1 runs it
    pytest.param("inductor", marks=pytest.mark.skipif(
        not __import__("os").environ.get("VLP_TEST_INDUCTOR"), reason="set VLP_TEST_INDUCTOR=1 (slow on CPU)")),
])
def test_compiled_training_matches_eager(tmp_path, digits_shards_dir, backend):
    """train.compile with exact accumulation and gradient checkpointing: the same losses as eager."""
    opts = {"train.steps": 3, "train.gradient_accumulation_steps": 2, "train.contrastive_accumulation": "exact",
            "train.grad_checkpointing": "true", "evals": "{}"}
    train(tmp_path / "eager", digits_shards_dir, **opts)
    train(tmp_path / "compiled", digits_shards_dir, **opts, **{"train.compile": "true",
                                                               "train.compile_backend": backend})
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert len(eager) == 3
    assert compiled == pytest.approx(eager, rel=1e-5)

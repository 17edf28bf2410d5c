"""TIPS: two text streams with their own image embedding and contrastive loss, and masked-image
self-distillation from an EMA teacher. References: hand-written loops over small tensors, separate
CLIP losses computed from the model's own encoders, and the EMA / cosine formulas written out."""

from __future__ import annotations

import io
import json
import math
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import vlp
from tests.helpers import run, torchrun
from vlp.config import ConfigError, load_config
from vlp.data.build import encode_image
from vlp.losses.distill import Center, distill_cross_entropy, masked_patch_loss
from vlp.models import TIPS, create_model
from vlp.objectives.tips import TIPSModule


def tips_cfg(**kw):
    base = {"stream_weights": [1.0, 0.5], "ibot_weight": 1.0, "dino_weight": 0.5, "mask_prob": 0.5,
            "mask_ratio": [0.2, 0.5], "student_temp": 0.1, "teacher_temp": 0.04, "center_momentum": 0.9,
            "teacher_momentum": 0.9, "teacher_momentum_end": 1.0, "contrastive_view": "masked"}
    return OmegaConf.create({**base, **kw})


def _ce(s, t, c, ts, tt):
    """One row, written out: - sum_k p_t(k) log p_s(k)."""
    pt = np.exp((t - c) / tt - np.max((t - c) / tt))
    pt /= pt.sum()
    z = s / ts
    log_ps = z - (np.max(z) + np.log(np.exp(z - np.max(z)).sum()))
    return float(-(pt * log_ps).sum())


def test_masked_patch_loss_and_center_against_loops() -> None:
    g = torch.Generator().manual_seed(0)
    b, n, k = 3, 5, 7
    teacher = torch.randn(b, n, k, generator=g)
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [0, 1, 1, 1, 0]], dtype=torch.bool)
    student_all = torch.randn(b, n, k, generator=g)
    center = torch.randn(k, generator=g) * 0.1
    got = masked_patch_loss(student_all[mask], teacher, mask, center, 0.1, 0.04)
    per_image = []
    for i in range(b):
        rows = [_ce(student_all[i, j].numpy(), teacher[i, j].numpy(), center.numpy(), 0.1, 0.04)
                for j in range(n) if mask[i, j]]
        if rows:
            per_image.append(sum(rows) / len(rows))
    assert got.item() == pytest.approx(sum(per_image) / len(per_image), rel=1e-5)
    # only masked positions count: changing the student at an unmasked position changes nothing
    student_all[0, 1] += 5.0
    assert masked_patch_loss(student_all[mask], teacher, mask, center, 0.1, 0.04).item() == pytest.approx(got.item())
    # no masked patch at all: a zero that still has a graph
    none = torch.zeros_like(mask)
    s = torch.zeros(0, k, requires_grad=True)
    z = masked_patch_loss(s, teacher, none, center, 0.1, 0.04)
    assert z.item() == 0.0 and z.requires_grad
    # global term rows
    row = distill_cross_entropy(student_all[2], teacher[2], center, 0.1, 0.04)
    ref = [_ce(student_all[2, j].numpy(), teacher[2, j].numpy(), center.numpy(), 0.1, 0.04) for j in range(n)]
    assert row.tolist() == pytest.approx(ref, rel=1e-5)
    # centre: c <- m c + (1 - m) mean over all rows
    c = Center(k, momentum=0.9)
    c.center.copy_(center)
    c.update(teacher)
    ref_c = 0.9 * center.numpy() + 0.1 * teacher.reshape(-1, k).numpy().mean(0)
    assert c.center.numpy() == pytest.approx(ref_c, abs=1e-6)


@pytest.fixture()
def task() -> TIPSModule:
    torch.manual_seed(0)
    return TIPSModule(create_model("tips-nano"), tips_cfg(), total_steps=10, seed=3)


def test_stream_losses_equal_separate_clip_losses(task: TIPSModule) -> None:
    task.eval()  # no mask: the student sees what encode_image_streams sees
    m = task.model
    g = torch.Generator().manual_seed(1)
    images = torch.randn(6, 3, 16, 16, generator=g)
    tokens = torch.randint(1, 400, (6, 2, 16), generator=g)
    out = task(images, tokens)
    scale = m.clamped_logit_scale()
    total = 0.0
    for k, w in enumerate((1.0, 0.5)):
        img = F.normalize(m.encode_image_streams(images)[:, k], dim=-1)
        txt = F.normalize(m.encode_text(tokens[:, k]), dim=-1)
        logits = scale * img @ txt.t()
        labels = torch.arange(6)
        ref = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        assert out[f"loss/stream{k}"].item() == pytest.approx(ref.item(), rel=1e-5)
        total += w * ref.item()
    total += out["loss/ibot"].item() * 1.0 + out["loss/dino"].item() * 0.5
    assert out["loss"].item() == pytest.approx(total, rel=1e-5)
    assert out["loss/ibot"].item() == 0.0  # eval: nothing masked
    # contrastive_view=full: in training too the stream terms see the unmasked images
    task.cfg.contrastive_view = "full"
    task.train()
    out_full = task(images, tokens)
    assert out_full["loss/stream0"].item() == pytest.approx(out["loss/stream0"].item(), rel=1e-5)
    assert out_full["loss/ibot"].item() > 0
    task.cfg.contrastive_view = "masked"
    assert task(images, tokens)["loss/stream0"].item() != pytest.approx(out["loss/stream0"].item(), rel=1e-5)
    # stream 0 is the default embedding
    assert torch.allclose(m.encode_image(images), m.encode_image_streams(images)[:, 0], atol=1e-6)


def test_mask_hides_the_masked_pixels_and_is_reproducible(task: TIPSModule) -> None:
    m = task.model
    task.train()
    mask = task.draw_mask(64, torch.device("cpu"))
    counts = mask.sum(1)
    masked = counts > 0
    assert 0.2 < masked.float().mean() < 0.8  # mask_prob 0.5
    assert counts[masked].min() >= round(0.2 * 16) and counts.max() <= round(0.5 * 16)
    task.mask_draws.zero_()
    assert torch.equal(task.draw_mask(64, torch.device("cpu")), mask)  # seeded by the draw count
    # pixels under a masked patch do not reach the student; pixels elsewhere do
    x = torch.randn(1, 3, 16, 16)
    one = torch.zeros(1, 16, dtype=torch.bool)
    one[0, 5] = True  # patch (1, 1): rows 4..7, cols 4..7
    y = x.clone()
    y[..., 4:8, 4:8] += 3.0
    with torch.no_grad():
        assert torch.allclose(m.patch_tokens(x, one), m.patch_tokens(y, one), atol=1e-6)
        assert not torch.allclose(m.patch_tokens(x), m.patch_tokens(y), atol=1e-3)


def test_teacher_gets_no_gradient_and_follows_the_ema(task: TIPSModule) -> None:
    task.train()
    g = torch.Generator().manual_seed(2)
    images, tokens = torch.randn(8, 3, 16, 16, generator=g), torch.randint(1, 400, (8, 2, 16), generator=g)
    out = task(images, tokens)
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in task.teacher.parameters())
    assert task.model.head.mlp[0].weight.grad is not None and task.model.mask_token.grad is not None
    assert not any(n.startswith("teacher.") for n, p in task.named_parameters() if p.requires_grad)
    assert task.patch_center.center.abs().sum() > 0  # updated in training
    before = {n: p.detach().clone() for n, p in task.teacher.named_parameters()}
    student = dict(task.model.named_parameters())
    with torch.no_grad():
        for p in task.model.parameters():
            p.add_(0.1)
    task.after_step(3)
    mom = 1.0 - (1.0 - 0.9) * (1 + math.cos(math.pi * 3 / 10)) / 2  # cosine 0.9 -> 1 over 10 steps
    for n, t in task.teacher.named_parameters():
        assert torch.allclose(t, mom * before[n] + (1 - mom) * student[n].detach(), atol=1e-6), n
    assert task.teacher_momentum(10) == pytest.approx(1.0) and task.teacher_momentum(0) == pytest.approx(0.9)


def test_dense_and_backbone_paths_on_a_tips_model(tmp_path: Path) -> None:
    """The export drops the heads from the backbone; forward_dense gives stream 0's per-patch embeddings,
    whose attention-weighted mean is the image embedding."""
    from safetensors.torch import save_file

    from vlp.eval.segmentation import patch_features, token_embeddings
    from vlp.models.families import config_to_dict

    torch.manual_seed(0)
    model = create_model("tips-nano").eval()
    with torch.no_grad():
        model.pool_query.normal_()  # non-uniform pooling
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "model_config.json").write_text(json.dumps(config_to_dict(model.config)))
    (tmp_path / "meta.json").write_text(json.dumps({"model_name": "tips-nano"}))
    loaded, _, _ = vlp.load_model(tmp_path)
    assert isinstance(loaded, TIPS)
    bb = vlp.load_backbone(tmp_path)
    assert not any("head" in n or "pool" in n for n, _ in bb.named_parameters())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        dense = bb.forward_dense(x)
        tokens = model.patch_tokens(x)
        assert torch.allclose(dense, model.image_proj(tokens), atol=1e-5)
        assert torch.allclose(patch_features(loaded, x).flatten(1, 2), tokens, atol=1e-5)
        assert torch.allclose(token_embeddings(loaded, x).flatten(1, 2), dense, atol=1e-5)
        w = (torch.einsum("bnc,c->bn", model.pool_key(tokens), model.pool_query[0]) * tokens.shape[-1] ** -0.5).softmax(-1)
        assert torch.allclose(model.encode_image(x), torch.einsum("bn,bnd->bd", w, dense), atol=1e-5)


def test_config_refusals(tmp_path: Path) -> None:
    base = ["loss.name=tips", "model.name=tips-nano", "data.text_streams=[txt,syn.txt]"]
    load_config("tests/configs/digits_nano.yaml", base)
    with pytest.raises(ConfigError, match="train.zero_stage.*ZeRO-3"):
        load_config("tests/configs/digits_nano.yaml", [*base, "train.zero_stage=3"])
    with pytest.raises(ConfigError, match="tips.stream_weights"):
        load_config("tests/configs/digits_nano.yaml", [*base, "tips.stream_weights=[1.0]"])
    with pytest.raises(ConfigError, match="tips.mask_ratio"):
        load_config("tests/configs/digits_nano.yaml", [*base, "tips.mask_ratio=[0.5,0.2]"])
    with pytest.raises(ConfigError, match="data.text_streams"):
        load_config("tests/configs/digits_nano.yaml", ["data.text_streams=[txt,syn.txt]"])
    with pytest.raises(ConfigError, match="train.precision"):
        load_config("tests/configs/digits_nano.yaml", [*base, "train.precision=bf16", "train.zero_stage=2"])
    proc = run([sys.executable, "train.py", "--config", "tests/configs/digits_nano.yaml", "loss.name=tips",
                "data.text_streams=[txt,syn.txt]", f"run_dir={tmp_path / 'r'}", "data.train_shards=nowhere.tar"],
               check=False)
    assert proc.returncode != 0 and "needs a TIPS model" in proc.stderr


def two_caption_shards(out: Path, n: int = 400) -> Path:
    """sklearn digits as png + a noisy `txt` and a descriptive `syn.txt`, one tar."""
    from sklearn.datasets import load_digits

    d = load_digits()
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    path = out / "two.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            img = encode_image((d.images[i] * 255 / 16).astype(np.uint8))
            files = {"png": img, "txt": f"scan {i % 7} of a form".encode(),
                     "syn.txt": f"a handwritten {names[d.target[i]]}".encode()}
            for ext, data in files.items():
                info = tarfile.TarInfo(f"s{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_batches_carry_one_text_per_stream(tmp_path: Path) -> None:
    from vlp.data.pipeline import build_train_loader
    from vlp.data.tokenizer import Tokenizer

    shards = two_caption_shards(tmp_path, 40)
    cfg = load_config("tests/configs/digits_nano.yaml", [
        "loss.name=tips", "model.name=tips-nano", "data.text_streams=[syn.txt,txt]",
        f"data.train_shards={shards}", "data.workers=0", "data.batch_size=8"]).data
    tok = Tokenizer(16)
    batch = next(iter(build_train_loader(cfg, tokenizer=tok, preprocess=create_model("tips-nano").preprocess)))
    assert batch["text"].shape == (8, 2, 16)
    with tarfile.open(shards) as tar:
        texts = {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers() if "txt" in m.name}
    for i, key in enumerate(batch["key"]):
        assert torch.equal(batch["text"][i, 0], tok(texts[f"{key}.syn.txt"])[0].long())
        assert torch.equal(batch["text"][i, 1], tok(texts[f"{key}.txt"])[0].long())


@pytest.mark.slow
# ZeRO-0 is an extended re-check: ZeRO-2 shards the same state and restores it the same way
@pytest.mark.parametrize("zero", [pytest.param(0, marks=pytest.mark.extended), 2])
def test_two_process_deepspeed_run_checkpoints_and_resumes(tmp_path: Path, zero: int) -> None:
    """tips-nano under torchrun x2: a run stopped and resumed ends with the same weights (teacher, centres
    and mask draws restored from the checkpoint) as an uninterrupted one; the loss terms are logged."""
    from tests.test_train import assert_same_weights, weights

    shards = two_caption_shards(tmp_path)
    args = ["--config", "tests/configs/digits_nano.yaml", "model.name=tips-nano", "loss.name=tips",
            "data.text_streams=[syn.txt,txt]", f"data.train_shards={shards}", "train.steps=8",
            f"train.zero_stage={zero}", "data.batch_size=16", "data.workers=1", "evals={}"]
    full, split = tmp_path / "full", tmp_path / "split"
    torchrun(2, "train.py", *args, f"run_dir={full}")
    torchrun(2, "train.py", *args, f"run_dir={split}", "train.stop_after_steps=5")
    assert not (split / "model.safetensors").exists()
    torchrun(2, "train.py", *args, f"run_dir={split}", "--resume", "latest")
    assert_same_weights(weights(full), weights(split), tol=1e-5)
    rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    terms = [r for r in rows if "loss/ibot" in r]
    assert len(terms) == 8 and all(r["loss/stream0"] > 0 and r["loss/dino"] > 0 for r in terms)
    model, _, _ = vlp.load_model(full)
    assert isinstance(model, TIPS)


def test_prefix_kinds_apply_to_every_stream() -> None:
    """With a prefix-conditioned text tower each stream's text takes its sample's prefix."""
    torch.manual_seed(0)
    m = create_model("tips-nano", text={"prefix_kinds": ["caption", "label"]}).eval()
    tokens = torch.randint(1, 400, (3, 2, 16))
    kinds = torch.tensor([0, 1, 0])
    with torch.no_grad():
        got = m.encode_text_streams(tokens, kinds=kinds)
        for k in range(2):
            assert torch.allclose(got[:, k], m.encode_text(tokens[:, k], kinds=kinds), atol=1e-6)
        assert torch.allclose(got, m.encode_text_streams(tokens, kinds=["caption", "label", "caption"]), atol=1e-6)
        assert not torch.allclose(got, m.encode_text_streams(tokens, kinds=torch.tensor([1, 1, 1])), atol=1e-4)

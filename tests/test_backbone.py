"""Checkpoints as backbones: timm-style feature API on the image tower, from every checkpoint kind."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import vlp
from tests.helpers import ROOT, torchrun
from vlp.models import CLIP, create_model
from vlp.train.checkpoint import export_weights, find_latest

CLS_NANO = {"vision": {"timm_kwargs": {"global_pool": "token", "class_token": True}}}


@pytest.fixture(scope="module")
def nano(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CLIP]:
    torch.manual_seed(0)
    model = create_model("clip-nano", **CLS_NANO).eval()
    out = tmp_path_factory.mktemp("nano")
    export_weights(model.state_dict(), model.config, "clip-nano", out)
    return out, model


def test_forward_features_and_intermediates(nano: tuple[Path, CLIP]) -> None:
    path, model = nano
    bb = vlp.load_backbone(path)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(bb(x), model.visual(x))
        assert bb.forward_features(x).shape == (2, 1 + 16, 64)
        maps = bb.forward_intermediates(x, indices=[0, 1], output_fmt="NCHW", intermediates_only=True)
        assert [m.shape for m in maps] == [(2, 64, 4, 4)] * 2
        final, seqs = bb.forward_intermediates(x, indices=1, output_fmt="NLC", norm=True,
                                               return_prefix_tokens=True)
        spatial, prefix = seqs[0]
        assert spatial.shape == (2, 16, 64) and prefix.shape == (2, 1, 64)
        assert final.shape == (2, 17, 64)
    assert [f["num_chs"] for f in bb.feature_info] == [64, 64]


def test_dense_tokens_in_text_space(nano: tuple[Path, CLIP]) -> None:
    path, model = nano
    bb = vlp.load_backbone(path)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        dense = bb.forward_dense(x)
        assert dense.shape == (2, 16, model.config.embed_dim)
        # the class token through the same per-token path is exactly the CLIP image embedding
        cls = bb.image_proj(bb.trunk.fc_norm(bb.forward_features(x)[:, 0]))
        assert torch.allclose(cls, model.encode_image(x), atol=1e-6)


def test_features_only_and_dynamic_size(nano: tuple[Path, CLIP]) -> None:
    path, model = nano
    net = vlp.load_backbone(path, features_only=True, out_indices=(0, 1))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        feats = net(x)
        assert [f.shape for f in feats] == [(2, 64, 4, 4)] * 2
    assert net.feature_info.channels() == [64, 64] and net.feature_info.reduction() == [4, 4]
    dyn = vlp.load_backbone(path, dynamic_img_size=True)
    with torch.no_grad():
        assert torch.allclose(dyn(x), model.visual(x), atol=1e-6)  # native size: unchanged
        maps = dyn.forward_intermediates(torch.randn(1, 3, 24, 32), indices=1, intermediates_only=True)
        assert maps[0].shape == (1, 64, 6, 8)
        assert dyn.forward_dense(torch.randn(1, 3, 24, 32)).shape == (1, 48, 64)


def test_timm_data_config_is_the_checkpoints_preprocessing(nano: tuple[Path, CLIP]) -> None:
    """timm.data.resolve_data_config / create_transform on a backbone give the checkpoint's size, mean,
    std and interpolation (not timm's ImageNet defaults), and the transform's output equals vlp's eval
    preprocessing of the same image."""
    import numpy as np
    import timm
    from PIL import Image

    from vlp.data.transforms import eval_transform

    path, model = nano
    pre = model.config.preprocess
    for net in (vlp.load_backbone(path), vlp.load_backbone(path, features_only=True, out_indices=(1,))):
        cfg = timm.data.resolve_data_config(model=net)
        assert tuple(cfg["input_size"]) == (3, pre.image_size, pre.image_size)
        assert cfg["mean"] == pytest.approx(pre.mean) and cfg["std"] == pytest.approx(pre.std)
        assert cfg["interpolation"] == pre.interpolation and cfg["crop_pct"] == 1.0
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8))
    ours = eval_transform(pre)(image)
    theirs = timm.data.create_transform(**timm.data.resolve_data_config(model=vlp.load_backbone(path)))(image)
    assert ours.shape == theirs.shape == (3, pre.image_size, pre.image_size)
    assert (ours - theirs).abs().max() <= 1e-5


@pytest.mark.slow
def test_zero3_checkpoint_backbone_matches_live_model(tmp_path: Path, digits_shards_dir: Path) -> None:
    run_dir, dump = tmp_path / "z3", tmp_path / "live.pt"
    torchrun(2, str(ROOT / "tests/workers/zero3_features.py"), str(dump), "tests/configs/digits_nano.yaml",
             f"run_dir={run_dir}", f"data.train_shards={digits_shards_dir}/train.json",
             "train.steps=3", "train.zero_stage=3", "evals={}", timeout=240)
    live = torch.load(dump, weights_only=True)
    ckpt = find_latest(run_dir / "checkpoints")
    assert any(ckpt.glob("zero_pp_rank_1_*model_states.pt"))  # really partitioned over 2 ranks
    bb = vlp.load_backbone(ckpt)
    from tests.workers.zero3_features import fixed_images

    x = fixed_images()
    with torch.no_grad():
        assert (bb(x) - live["pooled"]).abs().max() <= 1e-6
        assert (bb.image_proj(bb(x)) - live["image_embed"]).abs().max() <= 1e-6
        got = bb.forward_intermediates(x, indices=[0, 1], output_fmt="NCHW", intermediates_only=True)
        for a, b in zip(got, live["intermediates"], strict=True):
            assert (a - b).abs().max() <= 1e-6
        assert (bb.forward_dense(x) - live["dense"]).abs().max() <= 1e-6

"""FLIP patch dropout in the image tower: eval untouched, train runs the blocks on the kept tokens."""

import pytest
import torch

import vlp
from vlp.models.config import VisionTowerConfig
from vlp.models.vision import VisionTower

# 16 patches of 4 px plus a class token (a prefix token that must never be dropped)
VIT = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)


def _towers(p: float, class_token: bool) -> tuple[VisionTower, VisionTower]:
    kw = {**VIT, "class_token": class_token, "global_pool": "token" if class_token else "avg"}
    torch.manual_seed(0)
    plain = VisionTower(VisionTowerConfig("vit_base_patch16_224", kw))
    flip = VisionTower(VisionTowerConfig("vit_base_patch16_224", kw, patch_dropout=p))
    flip.load_state_dict(plain.state_dict())
    return plain, flip


@pytest.mark.parametrize("class_token", [True, False])
def test_eval_output_is_unaffected(class_token):
    plain, flip = _towers(0.5, class_token)
    x = torch.randn(3, 3, 16, 16)
    plain.eval(), flip.eval()
    torch.testing.assert_close(flip(x), plain(x), rtol=0, atol=0)


@pytest.mark.parametrize("p, kept", [(0.5, 8), (0.75, 4), (0.3, 11)])
@pytest.mark.parametrize("class_token", [True, False])
def test_train_output_equals_blocks_on_kept_tokens(p, kept, class_token):
    plain, flip = _towers(p, class_token)
    flip.train()
    trunk = flip.trunk
    seen = {}
    hook = trunk.blocks.register_forward_pre_hook(lambda m, args: seen.update(tokens=args[0].detach()))
    x = torch.randn(4, 3, 16, 16)
    out = flip(x)
    hook.remove()
    prefix = 1 if class_token else 0
    # all tokens as the blocks would see them without dropout (dropout-free path of the plain tower)
    with torch.no_grad():
        full = plain.trunk.norm_pre(plain.trunk._pos_embed(plain.trunk.patch_embed(x)))
    got = seen["tokens"]
    assert got.shape == (4, prefix + kept, 32)  # compute really drops: the blocks get fewer tokens
    ref_tokens = []
    for b in range(4):
        torch.testing.assert_close(got[b, :prefix], full[b, :prefix], rtol=0, atol=0)  # prefix kept
        # each kept token is one of this sample's own patch tokens, each at most once
        match = torch.cdist(got[b, prefix:], full[b, prefix:]) < 1e-6
        assert (match.sum(dim=1) == 1).all()
        idx = match.float().argmax(dim=1)
        assert idx.unique().numel() == kept
        ref_tokens.append(torch.cat([full[b, :prefix], full[b, prefix:][idx]]))
    with torch.no_grad():  # by hand: blocks, final norm, pooling on exactly the kept tokens
        ref = plain.trunk.forward_head(plain.trunk.norm(plain.trunk.blocks(torch.stack(ref_tokens))))
    torch.testing.assert_close(out.detach(), ref, rtol=1e-5, atol=1e-6)


def test_subsets_differ_per_sample_and_follow_the_torch_seed():
    _, flip = _towers(0.5, class_token=False)
    flip.train()
    x = torch.randn(1, 3, 16, 16).expand(6, -1, -1, -1)  # the same image six times
    torch.manual_seed(7)
    a = flip(x)
    torch.manual_seed(7)
    b = flip(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # a resumed run (same RNG state) draws the same subsets
    assert not torch.allclose(a[0], a[1])  # per-sample subsets


def test_preset_override_and_bad_values_name_the_key():
    model = vlp.create_model("clip-nano", vision={"patch_dropout": 0.5})
    assert model.config.vision.patch_dropout == 0.5
    with pytest.raises(ValueError, match="vision.patch_dropout"):
        vlp.create_model("clip-nano", vision={"patch_dropout": 1.0})
    with pytest.raises(ValueError, match="vision.patch_dropout"):
        VisionTower(VisionTowerConfig("convnext_atto", {}, patch_dropout=0.5))

"""open_clip interop: ViT-B-32 forward parity through a saved checkpoint; B-16 / L-14 shape parity."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.model import CLIP as OpenCLIP

from vlp.interop import (
    load_open_clip_checkpoint,
    open_clip_to_vlp_state_dict,
    vlp_to_open_clip_state_dict,
)
from vlp.interop.open_clip import _read_state_dict
from vlp.models import create_model


@pytest.fixture(scope="module")
def open_clip_b32() -> OpenCLIP:
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    # open_clip inits norms to 1/0 and several biases to 0: perturb everything so a swapped or
    # dropped mapping (e.g. ln_pre vs ln_post, a missing bias) changes the output.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
        model.logit_scale.fill_(3.0)
    return model


@pytest.fixture(scope="module")
def checkpoint(open_clip_b32: OpenCLIP, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("oc") / "vit_b32.pt"
    torch.save(open_clip_b32.state_dict(), path)
    return path


def test_vit_b32_forward_parity(open_clip_b32: OpenCLIP, checkpoint: Path) -> None:
    model = load_open_clip_checkpoint(checkpoint, "ViT-B-32").eval()
    assert all(p.requires_grad and not p.is_meta for p in model.parameters())
    torch.manual_seed(1)
    images = torch.randn(2, 3, 224, 224)
    tokens = open_clip.get_tokenizer("ViT-B-32")(["a diagram of a cat", "two dogs playing in snow"])
    with torch.no_grad():
        ref_img = open_clip_b32.encode_image(images)
        ref_txt = open_clip_b32.encode_text(tokens)
        img = model.encode_image(images)
        txt = model.encode_text(tokens)
        out = model(images, tokens)
    assert (img - ref_img).abs().max().item() <= 1e-4
    assert (txt - ref_txt).abs().max().item() <= 1e-4
    assert (out["image_features"] - ref_img / ref_img.norm(dim=-1, keepdim=True)).abs().max() <= 1e-4
    assert (out["text_features"] - ref_txt / ref_txt.norm(dim=-1, keepdim=True)).abs().max() <= 1e-4
    assert torch.equal(model.logit_scale.detach().reshape(()), open_clip_b32.logit_scale.detach())


def test_round_trip_loads_strict(open_clip_b32: OpenCLIP) -> None:
    oc_sd = open_clip_b32.state_dict()
    vlp_sd = open_clip_to_vlp_state_dict(oc_sd)
    with torch.device("meta"):  # strict key/shape checks need no real init
        model = create_model("ViT-B-32")
        target = OpenCLIP(**open_clip.get_model_config("ViT-B-32"))
    model.load_state_dict(vlp_sd, strict=True, assign=True)
    back = vlp_to_open_clip_state_dict(model.state_dict())
    target.load_state_dict(back, strict=True, assign=True)
    assert back.keys() == oc_sd.keys()
    for key, value in oc_sd.items():
        assert torch.equal(back[key], value), key


def test_read_state_dict_unwraps(tmp_path: Path) -> None:
    sd = {"visual.proj": torch.randn(3, 2), "logit_scale": torch.tensor(1.0)}
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, path)
    got = _read_state_dict(path)
    assert got.keys() == sd.keys() and torch.equal(got["visual.proj"], sd["visual.proj"])
    from safetensors.torch import save_file

    st = tmp_path / "plain.safetensors"
    save_file(sd, str(st))
    assert _read_state_dict(st).keys() == sd.keys()


def test_unknown_keys_refused() -> None:
    with pytest.raises(ValueError, match="visual.trunk.whatever"):
        open_clip_to_vlp_state_dict({"visual.trunk.whatever": torch.zeros(1)})
    with pytest.raises(ValueError, match="no open_clip equivalent"):
        vlp_to_open_clip_state_dict({"visual.trunk.stages.0.weight": torch.zeros(1)})


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-16", "ViT-L-14"])
def test_architecture_parity(name: str) -> None:
    """Same parameter names (after conversion), shapes, counts, heads and eps as open_clip; no forward."""
    with torch.device("meta"):  # shapes only: no memory, no init cost
        ref = OpenCLIP(**open_clip.get_model_config(name))
        model = create_model(name)
    ref_shapes = {k: v.shape for k, v in open_clip_to_vlp_state_dict(ref.state_dict()).items()}
    ours = {k: v.shape for k, v in model.state_dict().items()}
    assert ours == ref_shapes
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())
    assert model.visual.trunk.blocks[0].attn.num_heads == ref.visual.transformer.resblocks[0].attn.num_heads
    assert model.text.blocks[0].attn.num_heads == ref.transformer.resblocks[0].attn.num_heads
    assert model.visual.trunk.norm_pre.eps == ref.visual.ln_pre.eps
    assert model.text.ln_final.eps == ref.ln_final.eps
    ref_act = ref.visual.transformer.resblocks[0].mlp.gelu
    assert type(model.visual.trunk.blocks[0].mlp.act) is type(ref_act)
    assert type(model.text.blocks[0].mlp.act) is type(ref.transformer.resblocks[0].mlp.gelu)
    assert model.preprocess.image_size == ref.visual.image_size[0]
    assert model.text.context_length == ref.context_length

"""Model families: saved with every config, looked up when loading, and asked for capabilities by the
exporters, load_backbone and generate (tests driven by the family and preset registries)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import vlp
from vlp.models import create_model, get_model_config, list_models
from vlp.models.config import CLIPConfig
from vlp.models.families import (
    CAPABILITIES,
    Family,
    FamilyError,
    config_from_dict,
    config_to_dict,
    families,
    family_of,
    get_family,
    require,
)

EXPORTS = {"export:hf": "vlp.interop.hf:export_hf", "export:open_clip": "vlp.interop.open_clip:export_open_clip",
           "export:timm": "vlp.interop.timm:export_timm"}
# one small preset per family, with a class-token ViT (what the open_clip and transformers layouts need)
EXAMPLE = {"clip": "clip-tiny", "coca": "coca-tiny", "tips": "tips-tiny"}
EXPORT_OVERRIDES = {"coca": {"cls_mask": "legacy"}}  # open_clip's CoCa masks the CLS position its own way


def _exporter(capability: str):
    import importlib

    module, fn = EXPORTS[capability].split(":")
    return getattr(importlib.import_module(module), fn)


@pytest.mark.parametrize("name", list_models())
def test_every_preset_saves_its_family_and_reads_back_equal(name: str) -> None:
    cfg = get_model_config(name)
    d = config_to_dict(cfg)
    assert d["family"] == family_of(cfg).name
    assert config_from_dict(json.loads(json.dumps(d))) == cfg


def test_every_family_builds_its_model_and_has_an_example() -> None:
    assert {f.name for f in families()} == set(EXAMPLE)
    for f in families():
        cfg = get_model_config(EXAMPLE[f.name])
        assert family_of(cfg) is f and type(cfg) is f.config
        model = create_model(EXAMPLE[f.name])
        assert type(model) is f.model and family_of(model) is f


def test_configs_saved_before_families_are_read_the_old_way() -> None:
    for name in ("clip-nano", "coca-nano", "tips-nano", "siglip-nano"):
        cfg = get_model_config(name)
        legacy = config_to_dict(cfg)
        del legacy["family"]
        assert config_from_dict(legacy) == cfg, name


def test_resume_accepts_a_checkpoint_whose_config_has_no_family(tmp_path: Path) -> None:
    from vlp.train.checkpoint import CheckpointError, check_compatible

    cfg = get_model_config("coca-nano")
    legacy = config_to_dict(cfg)
    del legacy["family"]
    (tmp_path / "meta.json").write_text(json.dumps({"model_config": legacy, "model_name": "coca-nano"}))
    check_compatible(tmp_path, cfg, "coca-nano")
    with pytest.raises(CheckpointError, match="different architecture"):
        check_compatible(tmp_path, get_model_config("coca-nano", embed_dim=16), "coca-nano")
    (tmp_path / "meta.json").write_text(json.dumps({"model_config": {**legacy, "family": "nope"}}))
    with pytest.raises(CheckpointError, match="unknown model family 'nope'"):
        check_compatible(tmp_path, cfg, "coca-nano")


@pytest.mark.parametrize("family", sorted(EXAMPLE))
@pytest.mark.parametrize("capability", sorted(EXPORTS))
def test_exports_follow_the_declared_capabilities(family: str, capability: str, tmp_path: Path) -> None:
    """A declared export writes its folder; an undeclared one is refused by the family check, with a
    message naming the family and what it supports."""
    cfg = get_model_config(EXAMPLE[family], **EXPORT_OVERRIDES.get(family, {}))
    torch.manual_seed(0)
    sd = create_model(EXAMPLE[family], **EXPORT_OVERRIDES.get(family, {})).state_dict()
    export = _exporter(capability)
    if get_family(family).can(capability):
        out = export(cfg, sd, tmp_path / "out")
        assert any(Path(out).iterdir())
    else:
        with pytest.raises(FamilyError, match=f"family '{family}'.*supports: .*contrastive"):
            export(cfg, sd, tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_generate_and_backbone_ask_for_their_capability(tmp_path: Path) -> None:
    from vlp.train.checkpoint import export_weights

    clip = create_model("clip-nano").eval()
    with pytest.raises(FamilyError, match="generate needs a model that generates captions.*CLIP model"):
        vlp.generate(clip, torch.randn(1, 3, 16, 16), None)  # refused before the tokenizer is needed
    coca = create_model("coca-nano")
    export_weights(coca.state_dict(), coca.config, "coca-nano", tmp_path)
    with pytest.raises(FamilyError, match="is a CoCa model"):
        vlp.load_backbone(tmp_path)
    feats = vlp.load_backbone(tmp_path, features_only=True, out_indices=(1,))(torch.randn(1, 3, 16, 16))
    assert len(feats) == 1 and feats[0].ndim == 4  # the trunk alone is fine


def test_family_registry_refusals() -> None:
    with pytest.raises(ValueError, match="unknown capabilities"):
        Family("x", "X", CLIPConfig, torch.nn.Module, frozenset({"flying"}))
    with pytest.raises(ValueError, match="unknown capability 'captionin'"):
        get_family("coca").can("captionin")
    with pytest.raises(FamilyError, match="no registered model family"):
        family_of(object())
    with pytest.raises(FamilyError, match="unknown model family"):
        config_from_dict({"family": "nope"})
    assert require(get_model_config("coca-nano"), "captioning", "x").name == "coca"
    assert set(CAPABILITIES) >= set().union(*(f.capabilities for f in families()))


def _shrunk(name: str) -> CLIPConfig:
    """The preset with one block per tower (widths, heads, pooling, patching and image size kept):
    every architecture is exercised at the cost of one layer each."""
    cfg = get_model_config(name)
    over: dict = {"text": {"layers": 1}}
    if cfg.vision.timm_model.startswith("vit_"):
        over["vision"] = {"timm_kwargs": {"depth": 1}}
    if getattr(cfg, "decoder", None) is not None:
        over["decoder"] = {"layers": 1}
    return get_model_config(name, **over)


@pytest.mark.parametrize("name", list_models())
def test_every_preset_trains_a_step_and_round_trips_through_its_weights_file(name: str, tmp_path: Path) -> None:
    from vlp.models import build_model
    from vlp.train.checkpoint import export_weights

    cfg = _shrunk(name)
    torch.manual_seed(0)
    model = build_model(cfg)
    size, ctx = cfg.preprocess.image_size, cfg.text.context_length
    images = torch.randn(2, 3, size, size)
    tokens = torch.randint(1, 1000, (2, ctx))
    tokens[:, -1] = cfg.text.eot_token_id
    out = model(images, tokens)
    assert out["image_features"].shape == out["text_features"].shape == (2, cfg.embed_dim)
    loss = sum(v.float().square().mean() for v in out.values() if v.is_floating_point())
    loss.backward()
    for tower in (model.visual, model.text):  # gradients reach both towers' parameters
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tower.parameters())
    export_weights(model.state_dict(), cfg, name, tmp_path)
    loaded, pre, _ = vlp.load_model(tmp_path / "model.safetensors")
    assert type(loaded) is type(model) and loaded.config == cfg and pre == cfg.preprocess
    model.eval()
    with torch.no_grad():
        want, got = model(images, tokens), loaded(images, tokens)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)

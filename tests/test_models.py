"""Model registry, towers, CLIP forward semantics and the tokenizer (CPU, small presets)."""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
from torch import nn

from vlp.data.tokenizer import Tokenizer, get_tokenizer
from vlp.models import (
    CLIP,
    CLIPConfig,
    PreprocessConfig,
    create_model,
    get_model_config,
    list_models,
    register_model,
)
from vlp.models import registry as registry_mod
from vlp.models.families import config_from_dict, config_to_dict
from vlp.models.text import eot_positions

EXPECTED_PRESETS = {"clip-nano", "clip-tiny", "ViT-B-32", "ViT-B-16", "ViT-L-14", "convnext-tiny-clip"}


@pytest.fixture(scope="module")
def nano() -> CLIP:
    torch.manual_seed(0)
    return create_model("clip-nano").eval()


@pytest.fixture(scope="module")
def nano_tok(nano: CLIP) -> Tokenizer:
    return get_tokenizer(nano.config.text)


# ---- registry -------------------------------------------------------------------------------------


def test_list_models_has_presets() -> None:
    names = list_models()
    assert EXPECTED_PRESETS <= set(names)
    assert names == sorted(names)


def test_unknown_model_error_names_it_and_lists_known() -> None:
    with pytest.raises(ValueError, match="no-such-model") as exc:
        create_model("no-such-model")
    assert "clip-nano" in str(exc.value)


def test_overrides_applied() -> None:
    cfg = get_model_config(
        "clip-nano", embed_dim=32, text={"layers": 1}, vision={"timm_kwargs": {"depth": 1}}
    )
    assert cfg.embed_dim == 32 and cfg.text.layers == 1
    # dict fields merge key by key: other timm kwargs survive
    assert cfg.vision.timm_kwargs["depth"] == 1 and cfg.vision.timm_kwargs["img_size"] == 16
    model = CLIP(cfg)
    assert len(model.text.blocks) == 1 and len(model.visual.trunk.blocks) == 1
    assert model.image_proj.out_features == 32
    # presets return fresh configs: overriding did not mutate the registered one
    assert get_model_config("clip-nano").embed_dim == 64


def test_unknown_override_key_names_dotted_key() -> None:
    with pytest.raises(ValueError, match=r"text\.widht"):
        create_model("clip-nano", text={"widht": 3})
    with pytest.raises(ValueError, match="embed_dimm"):
        get_model_config("clip-nano", embed_dimm=3)


def test_register_model_and_duplicate() -> None:
    name = "test-only-preset"

    @register_model(name)
    def _preset() -> CLIPConfig:
        return get_model_config("clip-nano", embed_dim=16)

    try:
        assert name in list_models()
        assert get_model_config(name).embed_dim == 16
        with pytest.raises(ValueError, match="already registered"):
            register_model(name)(_preset)
    finally:
        registry_mod._REGISTRY.pop(name, None)


def test_config_round_trip_rebuilds_same_shapes(nano: CLIP) -> None:
    cfg = config_from_dict(config_to_dict(nano.config))
    assert cfg == nano.config
    rebuilt = CLIP(cfg)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in nano.state_dict().items()
    }


def test_preset_numbers() -> None:
    tiny = get_model_config("clip-tiny")
    assert tiny.preprocess.image_size == 28 and tiny.embed_dim == 128
    assert tiny.preprocess.interpolation == "bilinear"
    assert tiny.preprocess.mean == pytest.approx((0.286,) * 3, abs=1e-3)
    assert tiny.preprocess.std == pytest.approx((0.353,) * 3, abs=1e-3)
    b32 = get_model_config("ViT-B-32")
    assert b32.preprocess == PreprocessConfig()  # OpenAI mean/std, bicubic, 224
    assert b32.text.context_length == 77 and b32.embed_dim == 512


# ---- towers and forward ----------------------------------------------------------------------------


def _images(model: CLIP, n: int = 2) -> torch.Tensor:
    s = model.preprocess.image_size
    return torch.randn(n, 3, s, s)


def _check_forward(model: CLIP, tok: Tokenizer) -> None:
    tokens = tok(["a photo of a shirt", "trousers"])
    with torch.no_grad():
        out = model(_images(model), tokens)
    e = model.config.embed_dim
    assert out["image_features"].shape == (2, e) and out["text_features"].shape == (2, e)
    for key in ("image_features", "text_features"):
        assert torch.allclose(out[key].norm(dim=-1), torch.ones(2), atol=1e-5)
    assert out["logit_scale"].ndim == 0
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        raw = model.encode_image(_images(model))
    assert raw.shape == (2, e)


def test_forward_nano(nano: CLIP, nano_tok: Tokenizer) -> None:
    _check_forward(nano, nano_tok)


def test_forward_tiny() -> None:
    model = create_model("clip-tiny").eval()
    assert model.visual.num_features == 192 and model.text.width == 128
    _check_forward(model, get_tokenizer(model.config.text))


def test_forward_convnext() -> None:
    model = create_model(
        "convnext-tiny-clip",
        embed_dim=48,
        text={"width": 32, "heads": 2, "layers": 1, "context_length": 16},
        preprocess={"image_size": 64},
    ).eval()
    assert model.visual.num_features == 768
    _check_forward(model, get_tokenizer(model.config.text))
    with torch.no_grad():
        fmap = model.visual.forward_features(_images(model))
    assert fmap.shape == (2, 768, 2, 2)


def test_vit_tower_is_clip_layout() -> None:
    # the small presets mean-pool; the CLIP layout (class-token pooling) is the ViT-B/L one
    nano = create_model("clip-nano", vision={"timm_kwargs": {"global_pool": "token", "class_token": True}})
    trunk = nano.visual.trunk
    assert trunk.patch_embed.proj.bias is None  # CLIP's conv1 has no bias
    assert isinstance(trunk.norm_pre, nn.LayerNorm) and trunk.norm_pre.eps == 1e-5
    assert trunk.norm.eps == 1e-5 and trunk.global_pool == "token"
    assert isinstance(trunk.blocks[0].mlp.act, nn.GELU) and trunk.blocks[0].mlp.act.approximate == "none"
    tokens = nano.visual.forward_features(_images(nano))
    assert tokens.shape == (2, 1 + (16 // 4) ** 2, 64)


def test_logit_scale_clamped(nano: CLIP, nano_tok: Tokenizer) -> None:
    model = create_model("clip-nano")
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    out = model(_images(model), nano_tok("x"))
    assert out["logit_scale"].item() == pytest.approx(100.0, rel=1e-5)
    assert model.config.max_logit_scale == pytest.approx(math.log(100.0))


def test_text_pools_at_eot(nano: CLIP, nano_tok: Tokenizer) -> None:
    tokens = nano_tok(["a red shirt"])
    eot = int((tokens[0] == nano_tok.eot_token_id).nonzero()[0])
    assert eot == 4 and int(eot_positions(tokens, nano_tok.eot_token_id)[0]) == eot
    with torch.no_grad():
        base = nano.encode_text(tokens)
        after = tokens.clone()
        after[0, eot + 1 :] = torch.randint(1, 40000, (tokens.shape[1] - eot - 1,))
        assert torch.allclose(nano.encode_text(after), base, atol=1e-6)
        before = tokens.clone()
        before[0, 2] = 1234
        assert not torch.allclose(nano.encode_text(before), base, atol=1e-4)


def test_eot_fallback_argmax() -> None:
    tokens = torch.tensor([[5, 9, 7, 0], [1, 49407, 3, 49407]])
    assert eot_positions(tokens, 49407).tolist() == [1, 1]


def test_text_is_causal(nano: CLIP) -> None:
    tokens = torch.randint(1, 49000, (2, nano.text.context_length))
    changed = tokens.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 49000
    with torch.no_grad():
        a = nano.text.forward_tokens(tokens)
        b = nano.text.forward_tokens(changed)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:], atol=1e-4)


def test_no_weight_decay(nano: CLIP) -> None:
    nwd = nano.no_weight_decay()
    params = dict(nano.named_parameters())
    assert nwd <= set(params)
    for name, p in params.items():
        if p.ndim < 2:
            assert name in nwd, name
    for name in (
        "logit_scale",
        "text.token_embedding.weight",
        "text.positional_embedding",
        "visual.trunk.pos_embed",
    ):
        assert name in nwd
    with_cls = create_model("clip-nano", vision={"timm_kwargs": {"global_pool": "token", "class_token": True}})
    assert "visual.trunk.cls_token" in with_cls.no_weight_decay()
    for name in ("image_proj.weight", "text_proj.weight", "text.blocks.0.attn.qkv.weight"):
        assert name not in nwd


def test_grad_flows_to_both_towers(nano_tok: Tokenizer) -> None:
    model = create_model("clip-nano")
    model.set_grad_checkpointing(True)
    out = model(_images(model), nano_tok(["a", "b"]))
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    torch.nn.functional.cross_entropy(logits, torch.arange(2)).backward()
    assert model.visual.trunk.patch_embed.proj.weight.grad is not None
    assert model.text.token_embedding.weight.grad is not None
    assert model.logit_scale.grad is not None


# ---- tokenizer -------------------------------------------------------------------------------------

TEXTS = [
    "a photo of a cat",
    "A Photo Of TWO Dogs, running!!",
    "naïve café — 1234 ümlaut",
    "",
    "word " * 100,  # truncated, eot kept last
]


def test_tokenizer_matches_open_clip() -> None:
    ours = Tokenizer(77)
    ref = open_clip.get_tokenizer("ViT-B-32")
    assert torch.equal(ours(TEXTS), ref(TEXTS))
    assert torch.equal(ours(TEXTS[0]), ref(TEXTS[0]))
    assert ours.vocab_size == 49408 and ours.eot_token_id == 49407 and ours.sot_token_id == 49406
    assert ours(TEXTS[-1])[0, -1].item() == ours.eot_token_id


def test_a_training_process_starts_without_open_clips_package_or_transformers() -> None:
    """What train.py imports loads open_clip's tokenizer file alone: the package's __init__ builds all
    of open_clip's models and imports transformers (about 1.8 s of every rank's start)."""
    import pickle
    import subprocess
    import sys

    code = ("import sys, vlp.train.cli, vlp.data.tokenizer as t; t.Tokenizer(77); "
            "print(sorted(m for m in ('open_clip', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
    # a pickled tokenizer, alone or in its wrapper, loads in a fresh process (a spawned loader worker)
    want = Tokenizer(77)(["a photo of a cat"]).tolist()
    for tok in (Tokenizer(77), Tokenizer(77)._tok):
        code = "import pickle, sys; print(pickle.loads(sys.stdin.buffer.read())(['a photo of a cat']).tolist())"
        out = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(tok), capture_output=True)
        assert out.stdout.decode().strip() == str(want), out.stderr.decode()[-2000:]


def test_tokenizer_short_context_and_decode(nano_tok: Tokenizer) -> None:
    out = nano_tok(["a photo of a cat", "word " * 50])
    assert out.shape == (2, 16) and out.dtype == torch.long
    assert out[1, -1].item() == nano_tok.eot_token_id and out[1, 0].item() == nano_tok.sot_token_id
    assert nano_tok.decode(out[0]) == "a photo of a cat"


def test_get_tokenizer_refuses_mismatch() -> None:
    cfg = get_model_config("clip-nano", text={"eot_token_id": 3})
    with pytest.raises(ValueError, match="eot"):
        get_tokenizer(cfg.text)

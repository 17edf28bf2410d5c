"""Conversions with parity: vlp -> transformers / open_clip / timm, open_clip -> vlp (CLI included).

Small class-token CLIP-layout models keep each test around a second; the full-size open_clip
ViT-B-32 parity lives in test_open_clip_parity.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import open_clip
import pytest
import torch

from tests.helpers import run
from vlp.export import main as export_main
from vlp.importer import main as import_main
from vlp.models import CLIP, create_model
from vlp.train.checkpoint import export_weights

TOL = 1e-4
# clip-nano with a class token: the layout open_clip's and HF's ViTs have
CLS_NANO = {"vision": {"timm_kwargs": {"global_pool": "token", "class_token": True}}}
SMALL_OC_CFG = {"embed_dim": 32,
                "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
                "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 48, "heads": 3, "layers": 2}}


def _perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random init plus noise on every tensor, so a swapped or dropped mapping shows up."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g), alpha=0.02)
    return model.eval()


def _tokens(n: int, length: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    tok = torch.randint(1, 49000, (n, length), generator=g)
    tok[:, 0] = 49406
    tok[0, 5], tok[0, 6:] = 49407, 0
    tok[1, -1] = 49407
    return tok


def _pooled(out: object) -> torch.Tensor:
    return getattr(out, "pooler_output", out)  # transformers 5 returns an output object


@pytest.fixture(scope="module", params=["clip-nano", "clip-tiny"])
def run_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CLIP]:
    """A class-token nano model, and the demo preset exactly as it ships (it has a class token)."""
    torch.manual_seed(0)
    model = _perturbed(create_model(request.param, **(CLS_NANO if request.param == "clip-nano" else {})))
    out = tmp_path_factory.mktemp("run")
    export_weights(model.state_dict(), model.config, request.param, out)
    return out, model


def _inputs(model: CLIP) -> tuple[torch.Tensor, torch.Tensor]:
    size = model.preprocess.image_size
    return torch.randn(2, 3, size, size), _tokens(2, model.config.text.context_length)


def test_export_hf_parity(run_dir: tuple[Path, CLIP], tmp_path: Path) -> None:
    from transformers import CLIPModel

    path, model = run_dir
    assert export_main([str(path), "--to", "hf", str(tmp_path / "hf")]) == 0
    hf = CLIPModel.from_pretrained(tmp_path / "hf").eval()
    images, tokens = _inputs(model)
    with torch.no_grad():
        img = _pooled(hf.get_image_features(pixel_values=images))
        txt = _pooled(hf.get_text_features(input_ids=tokens))
        assert (img - model.encode_image(images)).abs().max() <= TOL
        assert (txt - model.encode_text(tokens)).abs().max() <= TOL
    assert hf.config.vision_config.hidden_act == "gelu" and hf.config.text_config.hidden_act == "gelu"
    assert (tmp_path / "hf" / "preprocessor_config.json").is_file()


def test_export_open_clip_parity(run_dir: tuple[Path, CLIP], tmp_path: Path) -> None:
    path, model = run_dir
    assert export_main([str(path), "--to", "open_clip", str(tmp_path / "oc")]) == 0
    oc, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    oc.eval()
    images, tokens = _inputs(model)
    with torch.no_grad():
        assert (oc.encode_image(images) - model.encode_image(images)).abs().max() <= TOL
        assert (oc.encode_text(tokens) - model.encode_text(tokens)).abs().max() <= TOL
    assert torch.equal(oc.logit_scale.detach().reshape(1), model.logit_scale.detach())


def test_import_open_clip_parity(tmp_path: Path) -> None:
    """A custom small open_clip config -> `python -m vlp.importer` -> vlp.load_model: same embeddings."""
    import json

    import vlp

    torch.manual_seed(0)
    oc = _perturbed(open_clip.model.CLIP(**SMALL_OC_CFG))
    torch.save(oc.state_dict(), tmp_path / "oc.pt")
    (tmp_path / "cfg.json").write_text(json.dumps(SMALL_OC_CFG))
    assert import_main(["open_clip", str(tmp_path / "oc.pt"), "--model", str(tmp_path / "cfg.json"),
                        str(tmp_path / "vlp")]) == 0
    model, pre, tok = vlp.load_model(tmp_path / "vlp")
    images, tokens = torch.randn(2, 3, 32, 32), _tokens(2, 16)
    with torch.no_grad():
        assert (oc.encode_image(images) - model.encode_image(images)).abs().max() <= TOL
        assert (oc.encode_text(tokens) - model.encode_text(tokens)).abs().max() <= TOL
    assert pre.image_size == 32 and tok.context_length == 16


def test_export_timm_parity(tmp_path: Path) -> None:
    """Mean-pooled tower (no class token) too: timm export needs no CLIP layout."""
    from vlp.export import export
    from vlp.interop.timm import load_timm_export

    torch.manual_seed(0)
    model = _perturbed(create_model("clip-nano"))
    export_weights(model.state_dict(), model.config, "clip-nano", tmp_path / "run")
    export(tmp_path / "run", "timm", tmp_path / "timm")
    tm = load_timm_export(tmp_path / "timm")
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (tm(images) - model.visual(images)).abs().max() <= TOL
        assert (model.image_proj(tm(images)) - model.encode_image(images)).abs().max() <= TOL
    # timm alone, the way its users load a folder: the same features and the checkpoint's preprocessing
    import timm

    own = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    with torch.no_grad():
        assert (own(images) - model.visual(images)).abs().max() <= TOL
    data_cfg = timm.data.resolve_data_config(model=own)
    pre = model.config.preprocess
    assert tuple(data_cfg["input_size"]) == (3, pre.image_size, pre.image_size)
    assert data_cfg["mean"] == pytest.approx(tuple(pre.mean)) and data_cfg["std"] == pytest.approx(tuple(pre.std))
    assert data_cfg["interpolation"] == pre.interpolation
    # a folder exported before the local-dir layout (timm_config.json) still loads
    import json

    cfg = json.loads((tmp_path / "timm" / "config.json").read_text())
    (tmp_path / "timm" / "config.json").unlink()
    (tmp_path / "timm" / "timm_config.json").write_text(json.dumps(
        {"model_name": cfg["architecture"], "kwargs": cfg["model_args"], "pretrained_cfg": cfg["pretrained_cfg"]}))
    with torch.no_grad():
        assert (load_timm_export(tmp_path / "timm")(images) - model.visual(images)).abs().max() <= TOL


def test_export_refuses_what_target_cannot_hold(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = create_model("clip-nano")  # mean-pooled, no class token
    export_weights(model.state_dict(), model.config, "clip-nano", tmp_path / "run")
    assert export_main([str(tmp_path / "run"), "--to", "hf", str(tmp_path / "o")]) == 2
    assert "class" in capsys.readouterr().err


def test_openai_checkpoint_imports_with_quickgelu_parity(tmp_path: Path) -> None:
    from vlp.interop.open_clip import openai_state_dict_to_open_clip

    # OpenAI's layout implies 64-wide heads; the shapes carry everything else
    small = {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "patch_size": 8, "head_width": 64},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2}}
    oc = _perturbed(open_clip.model.CLIP(**small, quick_gelu=True)).eval()
    sd = {**oc.state_dict(), "input_resolution": 32, "context_length": 16, "vocab_size": 49408}
    oc_sd, cfg = openai_state_dict_to_open_clip(sd)
    assert oc_sd.keys() == oc.state_dict().keys() and cfg["quick_gelu"] is True
    assert cfg["vision_cfg"] == {"image_size": 32, "layers": 2, "width": 128, "patch_size": 8}
    torch.save(sd, tmp_path / "openai.pt")
    assert import_main(["openai", str(tmp_path / "openai.pt"), "--model", "openai-small", str(tmp_path / "o")]) == 0
    import vlp

    model, _, _ = vlp.load_model(tmp_path / "o")
    assert model.config.text.act == "quick_gelu"
    images = torch.randn(2, 3, 32, 32)
    tokens = open_clip.get_tokenizer("ViT-B-32", context_length=16)(["a dog", "two red cars"])
    with torch.no_grad():
        assert (model.encode_image(images) - oc.encode_image(images)).abs().max() <= TOL
        assert (model.encode_text(tokens) - oc.encode_text(tokens)).abs().max() <= TOL
    # and the same activation in a GELU build would not match: the test can tell them apart
    gelu = open_clip.model.CLIP(**small).eval()
    gelu.load_state_dict(oc.state_dict())
    with torch.no_grad():
        assert (gelu.encode_text(tokens) - oc.encode_text(tokens)).abs().max() > 1e-3


def test_cli_runs_as_module(run_dir: tuple[Path, CLIP], tmp_path: Path) -> None:
    """`python -m vlp.export` in a fresh process (the in-process tests call the same main)."""
    path, model = run_dir
    run([sys.executable, "-m", "vlp.export", str(path), "--to", "vlp", str(tmp_path / "again")])
    import vlp

    again, _, _ = vlp.load_model(tmp_path / "again")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


@pytest.mark.parametrize("preset", ["siglip-map-nano", "siglip_vit_b16"])
def test_export_siglip_to_hf_siglipmodel(tmp_path: Path, preset: str) -> None:
    """siglip-map-nano and the SigLIP ViT-B/16 preset (MAP head, bidirectional text) ->
    SiglipModel.from_pretrained: same embeddings and logits."""
    from dataclasses import replace

    from transformers import SiglipModel, SiglipTextConfig, SiglipVisionConfig

    torch.manual_seed(0)
    model = _perturbed(create_model(preset))
    export_weights(model.state_dict(), model.config, preset, tmp_path / "run")
    assert export_main([str(tmp_path / "run"), "--to", "hf", str(tmp_path / "hf")]) == 0
    hf = SiglipModel.from_pretrained(tmp_path / "hf").eval()
    if preset == "siglip_vit_b16":  # transformers' defaults are SigLIP base-patch16-224's architecture
        for ours, ref in ((hf.config.vision_config, SiglipVisionConfig()), (hf.config.text_config, SiglipTextConfig())):
            for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
                assert getattr(ours, key) == getattr(ref, key), key
        assert (hf.config.vision_config.image_size, hf.config.vision_config.patch_size) == (224, 16)
        assert hf.config.text_config.max_position_embeddings == 64
    size, ctx = model.config.preprocess.image_size, model.config.text.context_length
    images, tokens = torch.randn(2, 3, size, size), _tokens(2, ctx)
    with torch.no_grad():
        img = _pooled(hf.get_image_features(pixel_values=images))
        txt = _pooled(hf.get_text_features(input_ids=tokens))
        assert (img - model.encode_image(images)).abs().max() <= TOL
        assert (txt - model.encode_text(tokens)).abs().max() <= TOL
        out = model(images, tokens)
        ours = out["logit_scale"] * out["image_features"] @ out["text_features"].t() + out["logit_bias"]
        assert (hf(pixel_values=images, input_ids=tokens).logits_per_image - ours).abs().max() <= TOL
        # the text tower's attention pattern matters: a causal one would not match
        causal = CLIP(replace(model.config, text=replace(model.config.text, causal=True))).eval()
        causal.load_state_dict(model.state_dict())
        assert (txt - causal.encode_text(tokens)).abs().max() > 1e-3
    assert torch.equal(hf.logit_scale.detach(), model.logit_scale.detach())
    assert torch.equal(hf.logit_bias.detach(), model.logit_bias.detach())
    # the folder's tokenizer pads as vlp does and, like transformers' SigLIP tokenizers, returns no attention
    # mask (the bidirectional tower attends to its padding): text in, vlp's text embedding out
    from transformers import AutoTokenizer

    from vlp.data.tokenizer import Tokenizer

    got = AutoTokenizer.from_pretrained(tmp_path / "hf")(TOKENIZER_TEXTS, padding="max_length", truncation=True,
                                                          max_length=ctx, return_tensors="pt")
    assert set(got) == {"input_ids"}
    with torch.no_grad():
        want = model.encode_text(Tokenizer(ctx)(TOKENIZER_TEXTS))
        assert (_pooled(hf.get_text_features(**got)) - want).abs().max() <= TOL


def test_export_hf_refuses_clip_layout_siglip(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """siglip-nano (CLIP layout + logit bias) is neither a CLIPModel nor a SiglipModel: the error says why."""
    model = create_model("siglip-nano")
    export_weights(model.state_dict(), model.config, "siglip-nano", tmp_path / "run")
    assert export_main([str(tmp_path / "run"), "--to", "hf", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "SiglipModel" in err and "MAP head" in err and "causal=True" in err


TOKENIZER_TEXTS = ["a photo of a mouse.", "This is a photo of T-shirt/top.", "Clipart by Nicu Buculei - antenna",
                   "  Hello,   WORLD!! 123 4567 don't  it's", "hi !", "café naïve ß 日本語 😀", "word " * 40]


def test_hf_export_is_usable_in_transformers_own_tools(tmp_path: Path, digits_shards_dir: Path) -> None:
    """A trained class-token model exported --to hf: AutoTokenizer gives vlp's ids (padding and truncation
    included), CLIPProcessor loads, and pipeline("zero-shot-image-classification") over the digits test
    split predicts what vlp's zero-shot evaluator predicts with the same template."""
    from PIL import Image
    from transformers import AutoTokenizer, CLIPProcessor, pipeline

    import vlp
    from vlp.data.datasets import load_eval_dataset
    from vlp.eval.zeroshot import evaluate_zeroshot

    run_dir, out = tmp_path / "run", tmp_path / "hf"
    run([sys.executable, "train.py", "--config", "tests/configs/digits_nano.yaml", f"run_dir={run_dir}",
         f"data.train_shards={digits_shards_dir}/train.json", "data.workers=1", "train.steps=90", "evals={}",
         "model.overrides.vision.timm_kwargs={global_pool: token, class_token: true}"])
    assert export_main([str(run_dir), "--to", "hf", str(out)]) == 0
    model, pre, tok = vlp.load_model(run_dir)
    hf_tok = AutoTokenizer.from_pretrained(out)
    ctx = tok.context_length
    assert hf_tok.model_max_length == ctx
    got = hf_tok(TOKENIZER_TEXTS, padding="max_length", truncation=True, max_length=ctx, return_tensors="pt")
    assert torch.equal(got["input_ids"], tok(TOKENIZER_TEXTS))
    assert isinstance(CLIPProcessor.from_pretrained(out).tokenizer, type(hf_tok))
    assert "pipeline_tag: zero-shot-image-classification" in (out / "README.md").read_text()

    data = load_eval_dataset("digits", split="test")
    template = data.templates[0]
    data.templates = [template]
    ours = evaluate_zeroshot(model, tok, data, pre, 64, "cpu")
    classify = pipeline("zero-shot-image-classification", model=str(out), device="cpu")
    images = [Image.fromarray(a).convert("RGB") for a in data.images]
    preds = [data.classnames.index(r[0]["label"])
             for r in classify(images, candidate_labels=data.classnames, hypothesis_template=template, batch_size=64)]
    top1 = sum(int(p == y) for p, y in zip(preds, data.labels)) / len(preds)
    assert ours["top1"] > 0.5  # trained (chance: 0.1), so agreeing means agreeing on real predictions
    assert top1 == pytest.approx(ours["top1"], abs=1e-6)


def test_importer_runs_under_its_new_and_its_old_name() -> None:
    import subprocess

    for module in ("vlp.importer", "vlp.import"):
        done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "python -m vlp.importer" in done.stdout

"""CoCa: parity with open_clip's CoCa (both directions, CLIs), the model's masking and loss, generation.

References: open_clip's own `CoCa` module (random init, loaded by its own API from an export), a
hand-written cross-entropy, and step-by-step argmax over full forward passes for greedy decoding.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.coca_model import CoCa as OCCoCa

import vlp
from tests.helpers import run
from vlp.caption import caption_class, dataset_synonyms
from vlp.caption import main as caption_main
from vlp.data.captions import DIGITS_CLASSNAMES, FASHION_CLASSNAMES
from vlp.data.datasets import load_eval_dataset
from vlp.data.tokenizer import Tokenizer
from vlp.generate import _filter, generate
from vlp.importer import main as import_main
from vlp.interop.open_clip_coca import (
    open_clip_coca_to_vlp,
    vlp_coca_config_from_open_clip,
    vlp_coca_to_open_clip,
)
from vlp.losses import ClipLoss, CoCaLoss
from vlp.models import CoCa, create_model
from vlp.train.checkpoint import export_weights

TOL = 1e-4
SMALL = {"embed_dim": 64,
         "vision_cfg": {"image_size": 32, "layers": 2, "width": 96, "patch_size": 8, "head_width": 32,
                        "attentional_pool": True, "attn_pooler_queries": 9, "attn_pooler_heads": 4,
                        "output_tokens": True},
         "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2,
                      "embed_cls": True, "output_tokens": True},
         "multimodal_cfg": {"context_length": 12, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2,
                            "attn_pooler_heads": 4},
         "custom_text": True}


def _perturbed(model: torch.nn.Module, seed: int = 0, scale: float = 0.02) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g), alpha=scale)
    return model.eval()


def _open_clip_coca(oc: OCCoCa) -> OCCoCa:
    """open_clip leaves its decoder's vocabulary projection uninitialised (torch.empty): give it values,
    then perturb every tensor so that a swapped or dropped mapping shows up."""
    torch.nn.init.normal_(oc.text_decoder.text_projection, std=oc.text_decoder.width**-0.5)
    return _perturbed(oc)


def _texts(context_length: int) -> torch.Tensor:
    tok = open_clip.get_tokenizer("ViT-B-32", context_length=context_length)
    return tok(["a dog on a mat", "two red cars driving on the long road of the city today"])


def _max_diff(a: dict, b: dict) -> dict[str, float]:
    return {k: (a[k] - b[k]).abs().max().item() for k in ("image_features", "text_features", "logits")}


def test_small_open_clip_coca_round_trip_and_clis(tmp_path: Path) -> None:
    """open_clip CoCa -> `python -m vlp.importer` -> vlp; vlp -> `python -m vlp.export --to open_clip` -> open_clip."""
    torch.manual_seed(0)
    cfg = {k: v for k, v in SMALL.items() if k != "custom_text"}
    oc = _open_clip_coca(OCCoCa(**cfg))
    torch.save(oc.state_dict(), tmp_path / "oc.pt")
    (tmp_path / "cfg.json").write_text(json.dumps(SMALL))
    assert import_main(["open_clip", str(tmp_path / "oc.pt"), "--model", str(tmp_path / "cfg.json"),
                        str(tmp_path / "vlp")]) == 0
    model, pre, tok = vlp.load_model(tmp_path / "vlp")
    assert isinstance(model, CoCa) and tok.context_length == 12 and pre.image_size == 32
    images, texts = torch.randn(2, 3, 32, 32), _texts(12)
    with torch.no_grad():
        ref, ours = oc(images, texts), model(images, texts)
        assert max(_max_diff(ref, ours).values()) <= TOL
        assert torch.equal(ours["labels"], texts[:, 1:].masked_fill(texts[:, 1:] == 0, -100))
        # the legacy CLS padding mask is what open_clip computes: the correct mask gives another embedding
        model.text.cls_mask = "correct"
        assert (model.encode_text(texts, normalize=True) - ref["text_features"]).abs().max() > 1e-3
        model.text.cls_mask = "legacy"

    # by preset name too (the path `--model coca_ViT-B-32` takes): a preset registered with this config
    from vlp.models import register_model

    register_model("test-coca-small")(lambda: vlp_coca_config_from_open_clip(SMALL))
    assert import_main(["open_clip", str(tmp_path / "oc.pt"), "--model", "test-coca-small", str(tmp_path / "p")]) == 0
    by_name, _, _ = vlp.load_model(tmp_path / "p")
    with torch.no_grad():
        assert max(_max_diff(ref, by_name(images, texts)).values()) <= TOL

    from vlp.export import main as export_main

    assert export_main([str(tmp_path / "vlp"), "--to", "open_clip", str(tmp_path / "oc_out")]) == 0
    back, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc_out'}")
    assert isinstance(back, OCCoCa)
    with torch.no_grad():
        assert max(_max_diff(back.eval()(images, texts), ours).values()) <= TOL


def test_coca_vit_b_32_parity_both_ways() -> None:
    """Random-init open_clip coca_ViT-B-32 -> vlp preset coca_ViT-B-32 -> back, same outputs."""
    torch.manual_seed(0)
    oc = _open_clip_coca(open_clip.create_model("coca_ViT-B-32"))
    model = create_model("coca_ViT-B-32").eval()
    model.load_state_dict(open_clip_coca_to_vlp(oc.state_dict()), strict=True)
    images, texts = torch.randn(2, 3, 224, 224), _texts(76)
    with torch.no_grad():
        ref, ours = oc(images, texts), model(images, texts)
        diffs = _max_diff(ref, ours)
        assert max(diffs.values()) <= TOL, diffs
        assert ref["logits"].shape == ours["logits"].shape == (2, 75, 49408)
        # the caption logits are not trivially equal: they depend on the image
        assert (model(images.flip(0), texts)["logits"] - ours["logits"]).abs().max() > 1e-3
        # preset config == open_clip's registered config
        assert vlp_coca_config_from_open_clip(open_clip.get_model_config("coca_ViT-B-32")) == model.config
        _perturbed(model, seed=1)
        again = open_clip.create_model("coca_ViT-B-32").eval()
        again.load_state_dict(vlp_coca_to_open_clip(model.state_dict()), strict=True)
        assert max(_max_diff(again(images, texts), model(images, texts)).values()) <= TOL


# ---- model behaviour --------------------------------------------------------------------------------


def test_padding_and_causality() -> None:
    torch.manual_seed(0)
    model = _perturbed(create_model("coca-nano"), scale=0.05)
    tok = Tokenizer(16)
    short, long_ = tok(["a handwritten 7"]), tok(["a handwritten 7 and more words after it"])
    with torch.no_grad():
        # correct CLS mask: padding is invisible to the text embedding; the legacy mask lets one pad in
        before = model.encode_text(short)
        model.text.cls_mask = "legacy"
        legacy = model.encode_text(short)
        model.text.token_embedding.weight[0].normal_()  # the pad id's embedding
        assert (model.encode_text(short) - legacy).abs().max() > 1e-3
        model.text.cls_mask = "correct"
        assert (model.encode_text(short) - before).abs().max() < 1e-5
        img_tokens = model.image_tokens(torch.randn(1, 3, 16, 16))[1]
        # causal decoder: logits at a position do not see later tokens
        n = 4
        a = model.caption_logits(short, img_tokens)[:, :n]
        b = model.caption_logits(long_, img_tokens)[:, :n]
        assert torch.equal(short[:, :n], long_[:, :n]) and (a - b).abs().max() < 1e-5
        assert (model.caption_logits(short, img_tokens) - model.caption_logits(short, torch.randn_like(img_tokens))).abs().max() > 1e-3


def test_shortlist_maps_tokens_and_other() -> None:
    model = create_model("coca-nano")
    ids = torch.tensor(model.config.decoder.vocab_ids)
    dec = model.decoder
    assert dec.num_classes == len(ids) + 1 and model.decoder.head.out_features == dec.num_classes
    assert torch.equal(dec.class_to_token(dec.token_to_class(ids)), ids)
    outside = torch.tensor([i for i in range(1000) if i not in set(ids.tolist())][:5])
    assert (dec.token_to_class(outside) == 0).all() and not dec.allowed_classes()[0]


def test_coca_loss_matches_hand_computation() -> None:
    torch.manual_seed(0)
    model = _perturbed(create_model("coca-nano"))
    tok = Tokenizer(16)
    texts = tok(["a handwritten 7", "the digit 3 written by hand, slowly", "zero"])
    out = model(torch.randn(3, 3, 16, 16), texts)
    terms = CoCaLoss(clip_weight=0.5, caption_weight=2.0)(out)
    nxt = texts[:, 1:]
    keep = nxt != 0
    cls = model.decoder.token_to_class(nxt)
    ce = -out["logits"].log_softmax(-1).gather(-1, cls[..., None]).squeeze(-1)[keep].mean()
    clip = ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"])
    assert torch.allclose(terms["caption_loss"], ce, atol=1e-6)
    assert torch.allclose(terms["loss"], 0.5 * clip + 2.0 * ce, atol=1e-6)
    with pytest.raises(ValueError, match="captioning model"):
        CoCaLoss()({k: v for k, v in out.items() if k != "logits"})


# ---- generation -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def captioner() -> tuple[CoCa, Tokenizer, torch.Tensor]:
    torch.manual_seed(0)
    model = _perturbed(create_model("coca-nano"), scale=0.3)
    return model, Tokenizer(16), torch.randn(3, 3, 16, 16)


def _reference_greedy(model: CoCa, tok: Tokenizer, images: torch.Tensor, max_len: int) -> list[list[int]]:
    """Argmax of a full forward pass (text tower + decoder on the whole prefix) per step, per image."""
    out = []
    allowed = model.decoder.allowed_classes()
    for img in images:
        seq = [tok.sot_token_id]
        img_tokens = model.image_tokens(img[None])[1]
        while len(seq) < max_len and seq[-1] != tok.eot_token_id:
            logits = model.caption_logits(torch.tensor([seq]), img_tokens)[0, -1]
            cls = logits.masked_fill(~allowed, float("-inf")).argmax()
            seq.append(int(model.decoder.class_to_token(cls)))
        out.append(seq)
    return out


def test_greedy_matches_stepwise_argmax_and_beam1(captioner) -> None:
    model, tok, images = captioner
    with torch.no_grad():
        ref = _reference_greedy(model, tok, images, 10)
        got = generate(model, images, tok, method="greedy", max_len=10)  # cached decoding
        beam1 = generate(model, images, tok, method="beam", num_beams=1, max_len=10)
        topk1 = generate(model, images, tok, method="top_k", top_k=1, max_len=10)
    assert [row[:len(r)].tolist() for row, r in zip(got.tokens, ref)] == ref
    assert all((row[len(r):] == 0).all() for row, r in zip(got.tokens, ref))
    assert torch.equal(beam1.tokens, got.tokens) and torch.equal(topk1.tokens, got.tokens)
    assert got.texts == [tok.decode(r) for r in ref]
    assert len({len(r) for r in ref}) > 1 or len(ref[0]) == 10  # captions of this model end with eot


def test_kv_cache_equals_rerunning_the_prefix(captioner) -> None:
    from vlp.generate import _KVCache, _Stepper

    model, tok, images = captioner
    with torch.no_grad():
        stepper = _Stepper(model, model.image_tokens(images)[1], tok.eot_token_id)
        cache = _KVCache(stepper, len(images))
        seqs = torch.full((len(images), 1), tok.sot_token_id)
        for _ in range(8):  # teacher-forced random continuations: every position compared
            full, cached = stepper.logits(seqs), cache.logits(seqs[:, -1])
            ok = stepper.allowed  # the masked "other" class is -inf in both
            assert (full[:, ok] - cached[:, ok]).abs().max() < 1e-4 and torch.isinf(cached[:, ~ok]).all()
            seqs = torch.cat([seqs, torch.tensor(model.config.decoder.vocab_ids)[
                torch.randint(0, len(model.config.decoder.vocab_ids), (len(images), 1))]], dim=1)
        for method in ("greedy", "top_k"):
            kw = dict(method=method, top_k=5, max_len=12)
            a = generate(model, images, tok, use_cache=True, generator=torch.Generator().manual_seed(0), **kw)
            b = generate(model, images, tok, use_cache=False, generator=torch.Generator().manual_seed(0), **kw)
            assert torch.equal(a.tokens, b.tokens), method


def test_beam_search_scores_at_least_greedy(captioner) -> None:
    """With length_penalty=0 a beam's caption has a sum log-prob >= greedy's (greedy is one path)."""
    model, tok, images = captioner

    def logprob(seq: torch.Tensor, img: torch.Tensor) -> float:
        seq = seq[: (seq != 0).sum()][None]
        logits = model.caption_logits(seq[:, :-1], model.image_tokens(img[None])[1])
        logp = logits.masked_fill(~model.decoder.allowed_classes(), float("-inf")).log_softmax(-1)
        return logp.gather(-1, model.decoder.token_to_class(seq[:, 1:])[..., None]).sum().item()

    with torch.no_grad():
        greedy = generate(model, images, tok, method="greedy", max_len=6)
        beam = generate(model, images, tok, method="beam", num_beams=5, max_len=6, length_penalty=0.0)
        for g, b, img in zip(greedy.tokens, beam.tokens, images):
            assert logprob(b, img) >= logprob(g, img) - 1e-5


def test_sampling_filters_and_reproducibility(captioner) -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    assert torch.isinf(_filter(logits, top_k=2)).tolist() == [[False, False, True, True]]
    p = logits.softmax(-1)[0]
    # nucleus: smallest prefix of the sorted probabilities reaching top_p
    assert torch.isinf(_filter(logits, top_p=float(p[0]) + 0.01)).tolist() == [[False, False, True, True]]
    assert torch.isinf(_filter(logits, top_p=float(p[0]) - 0.01)).tolist() == [[False, True, True, True]]
    model, tok, images = captioner
    a = generate(model, images, tok, method="top_p", top_p=0.95, generator=torch.Generator().manual_seed(3))
    b = generate(model, images, tok, method="top_p", top_p=0.95, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.tokens, b.tokens)
    with pytest.raises(ValueError, match="max_len"):
        generate(model, images, tok, max_len=40)
    with pytest.raises(ValueError, match="method"):
        generate(model, images, tok, method="nucleus")


def test_caption_class_matching() -> None:
    syn = dataset_synonyms("fashion-mnist", FASHION_CLASSNAMES)
    assert caption_class("a photo of a tee shirt.", syn) == 0  # longest phrase wins over "shirt"
    assert caption_class("a photo of a shirt.", syn) == 6
    assert caption_class("catalog image of a t-shirt/top", syn) == 0
    assert caption_class("product shot of short boot", syn) == 9
    assert caption_class("a photo of a.", syn) is None
    assert caption_class("a dress and a coat", syn) is None  # two classes, no winner
    assert caption_class("shortcoat", syn) is None  # whole words only


def test_caption_cli_on_images(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from PIL import Image

    torch.manual_seed(0)
    model = _perturbed(create_model("coca-nano"), scale=0.3)
    export_weights(model.state_dict(), model.config, "coca-nano", tmp_path / "run")
    Image.new("L", (8, 8), 200).save(tmp_path / "a.png")
    assert caption_main(["--checkpoint", str(tmp_path / "run"), "--images", str(tmp_path / "a.png"),
                         "--method", "greedy", "--max-len", "8"]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    from vlp.data.transforms import eval_transform

    expected = generate(model, eval_transform(model.preprocess)(Image.open(tmp_path / "a.png"))[None],
                        Tokenizer(16), max_len=8).texts[0]
    assert line == f"{tmp_path / 'a.png'}\t{expected}"
    assert caption_main(["--checkpoint", str(tmp_path / "run"), "--images", str(tmp_path / "missing.png")]) == 2
    assert "missing.png" in capsys.readouterr().err


def test_caption_accuracy_function_counts_class_words(monkeypatch: pytest.MonkeyPatch) -> None:
    """The eval measure itself: captions are scored by the class they name, against the labels."""
    import vlp.caption as cap
    from vlp.generate import Generated

    model = create_model("coca-nano")
    data = load_eval_dataset("digits", max_samples=6)
    names = [f"a handwritten {DIGITS_CLASSNAMES[int(y)]}" for y in data.labels]
    names[0] = "a handwritten blob"
    names[1] = f"a handwritten {DIGITS_CLASSNAMES[(int(data.labels[1]) + 1) % 10]}"
    monkeypatch.setattr(cap, "generate", lambda m, x, t, **kw: Generated(torch.zeros(len(x), 1), names[:len(x)]))
    res = cap.caption_accuracy(model, Tokenizer(16), "digits", max_samples=6)
    assert res["caption_accuracy"] == pytest.approx(4 / 6) and res["names_a_class"] == pytest.approx(5 / 6)


@pytest.mark.slow
def test_train_coca_two_processes(tmp_path: Path, digits_shards_dir: Path) -> None:
    """coca-nano under torchrun x2 with DeepSpeed ZeRO-1: both loss terms fall; the export loads as CoCa."""
    from tests.helpers import torchrun

    run_dir = tmp_path / "coca"
    torchrun(2, "train.py", "--config", "tests/configs/digits_nano.yaml", "model.name=coca-nano",
             "loss.name=coca", f"run_dir={run_dir}", f"data.train_shards={digits_shards_dir}/train.json",
             "train.steps=30", "train.zero_stage=1", "evals={}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < sum(losses[:3]) / 3 - 0.5, losses
    model, _, tok = vlp.load_model(run_dir)
    assert isinstance(model, CoCa)
    out = generate(model, torch.randn(2, 3, 16, 16), tok, max_len=6)
    assert out.tokens.shape[0] == 2 and all(isinstance(t, str) for t in out.texts)
    with pytest.raises(ValueError, match="CoCa model"):  # the trunk alone is not CoCa's image embedding
        vlp.load_backbone(run_dir)
    with pytest.raises(AssertionError, match="needs a captioning model"):
        run([sys.executable, "train.py", "--config", "tests/configs/digits_nano.yaml", "loss.name=coca",
             f"run_dir={tmp_path / 'bad'}", f"data.train_shards={digits_shards_dir}/train.json"])


def test_loss_weights_validated() -> None:
    from vlp.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="coca.caption_weight"):
        load_config("tests/configs/digits_nano.yaml", ["loss.name=coca", "coca.caption_weight=-1"])
    with pytest.raises(ValueError, match="weights"):
        CoCaLoss(clip_weight=0.0, caption_weight=0.0)

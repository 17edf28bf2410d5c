"""Dense evaluation: mIoU against a hand-computed case and scikit-learn, the MaskCLIP path against a
step-by-step recomputation, background handling, the linear probe on oracle features, and the
DenseCLIP head (prompt learner against encode_text, forward/backward, a few fitting steps)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import jaccard_score

from vlp.data.segmentation import SegmentationDataset
from vlp.data.tokenizer import get_tokenizer
from vlp.eval.segmentation import (
    build_classifier,
    confusion_matrix,
    evaluate_segmentation,
    iou_from_confusion,
    linear_head_predict,
    maskclip_embeddings,
    patch_features,
    segmentation_report,
    soft_patch_targets,
    train_linear_head,
    zeroshot_logits,
)
from vlp.models import create_model
from vlp.models.denseclip import DenseCLIPSegmenter, PromptLearner


def _tiny(class_token: bool = False, size: int = 32, conv_stem: bool = False):
    """clip-nano on a 4x4 grid: 8-px patches, or (conv_stem) timm's hybrid ViT whose ResNet stem
    (stride 4) feeds 2x2 patches, as in docs/dense.md's conv-stem run."""
    torch.manual_seed(0)
    pool = {"global_pool": "token", "class_token": True} if class_token else {}
    vision: dict = {"timm_kwargs": {"img_size": size, "patch_size": 2 if conv_stem else 8, **pool}}
    if conv_stem:
        vision["timm_model"] = "vit_tiny_r_s16_p8_224"
    return create_model("clip-nano", vision=vision, preprocess={"image_size": size}).eval()


def test_iou_hand_computed():
    gt = torch.tensor([0, 0, 1, 1, 2, 255])
    pred = torch.tensor([0, 1, 1, 1, 0, 2])  # the last pixel is ignored
    cm = confusion_matrix(pred, gt, num_classes=4)
    assert cm.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    m = iou_from_confusion(cm)
    # class 0: TP 1, FP 1, FN 1; class 1: TP 2, FP 1; class 2: TP 0, FN 1; class 3 absent -> NaN
    assert m["iou"][:3] == pytest.approx([1 / 3, 2 / 3, 0.0]) and math.isnan(m["iou"][3])
    assert m["miou"] == pytest.approx(1 / 3)
    assert m["pixel_accuracy"] == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="target values"):
        confusion_matrix(torch.tensor([0]), torch.tensor([7]), 4)


def test_iou_matches_sklearn():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 6, size=(4, 20, 20))
    pred = np.where(rng.random(gt.shape) < 0.6, gt, rng.integers(0, 6, size=gt.shape))
    m = iou_from_confusion(confusion_matrix(torch.tensor(pred), torch.tensor(gt), 6))
    ref = jaccard_score(gt.ravel(), pred.ravel(), labels=list(range(6)), average=None)
    assert m["iou"] == pytest.approx(ref.tolist())
    assert m["miou"] == pytest.approx(ref.mean())


@pytest.mark.parametrize("class_token,conv_stem", [(False, False), (True, False), (False, True)])
def test_maskclip_matches_a_step_by_step_value_path(class_token, conv_stem):
    model = _tiny(class_token, conv_stem=conv_stem)
    trunk, blk = model.visual.trunk, model.visual.trunk.blocks[-1]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = maskclip_embeddings(model, x)
        # tokens entering the last block, from timm's own forward_intermediates
        out = trunk.forward_intermediates(x, indices=[len(trunk.blocks) - 2], output_fmt="NLC",
                                          return_prefix_tokens=True, intermediates_only=True)[0]
        tok = torch.cat([out[1], out[0]], dim=1) if isinstance(out, tuple) else out  # (patches, prefix)
        c = tok.shape[-1]
        v = blk.attn.qkv(blk.norm1(tok))[..., 2 * c:]  # value embeddings, heads side by side
        y = tok + blk.ls1(blk.attn.proj(v))  # attention of each token to itself only
        y = y + blk.ls2(blk.mlp(blk.norm2(y)))
        y = trunk.norm(y)[:, trunk.num_prefix_tokens:]
        if isinstance(getattr(trunk, "fc_norm", None), torch.nn.LayerNorm):
            y = trunk.fc_norm(y)
        ref = model.image_proj(y).reshape(2, 4, 4, -1)
        # the frozen patch features are the ordinary forward's tokens
        feats = trunk.forward_features(x)[:, trunk.num_prefix_tokens:]
        if isinstance(getattr(trunk, "fc_norm", None), torch.nn.LayerNorm):
            feats = trunk.fc_norm(feats)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(patch_features(model, x), feats.reshape(2, 4, 4, -1), rtol=1e-5, atol=1e-5)


def test_zeroshot_logits_background():
    e = torch.eye(3)
    dense = torch.stack([e[0], e[1], e[2], (e[0] + e[1]) / 2]).reshape(1, 2, 2, 3)
    cls, bg = e[:2], e[2:]
    pred = zeroshot_logits(dense, cls, bg).argmax(1)
    assert pred.tolist() == [[[1, 2], [0, 1]]]  # background wins only where its prompt is closest
    no_bg = zeroshot_logits(dense, cls).argmax(1)
    assert (no_bg > 0).all()
    # threshold: the tie (0.5 / 0.5) falls below 0.6 -> background; confident patches keep their class
    thr = zeroshot_logits(dense, cls, logit_scale=100.0, bg_threshold=0.6).argmax(1)
    assert thr.tolist() == [[[1, 2], [0, 0]]]


def _rectangles(n: int, size: int = 32, classes: int = 3, seed: int = 0) -> SegmentationDataset:
    """Gray images with one coloured rectangle each; class k has colour k."""
    rng = np.random.default_rng(seed)
    colors = np.array([[220, 40, 40], [40, 200, 40], [40, 40, 220], [220, 220, 40]])[:classes]
    images = np.full((n, size, size, 3), 128, np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        k = rng.integers(classes)
        h, w = rng.integers(size // 3, size * 2 // 3, size=2)
        t, l_ = rng.integers(0, size - h), rng.integers(0, size - w)
        images[i, t:t + h, l_:l_ + w] = colors[k]
        masks[i, t:t + h, l_:l_ + w] = k + 1
    return SegmentationDataset(images, masks, ["red", "green", "blue", "yellow"][:classes], ["a {}."],
                               ["gray background"])


def test_linear_probe_on_oracle_features():
    train, test = _rectangles(120), _rectangles(40, seed=1)
    grid = (8, 8)
    oracle_train = soft_patch_targets(train.masks, 4, grid)
    oracle_test = soft_patch_targets(test.masks, 4, grid)
    head = train_linear_head(oracle_train + 0.01 * torch.randn_like(oracle_train), oracle_train, epochs=100)
    good = segmentation_report(linear_head_predict(head, oracle_test, (32, 32)), test)
    # the best a patch-level head can do: the true patch class fractions, upsampled like the head's logits
    best = F.interpolate(oracle_test.permute(0, 3, 1, 2), size=(32, 32), mode="bilinear", align_corners=False)
    best_miou = segmentation_report(best.argmax(1).to(torch.uint8), test)["miou"]
    assert best_miou > 0.75 and good["miou"] > best_miou - 0.03
    shuffled = linear_head_predict(head, oracle_test.roll(1, dims=0), (32, 32))  # other images' features
    assert segmentation_report(shuffled, test)["miou"] < 0.6


def test_evaluate_segmentation_modes():
    model = _tiny()
    tok = get_tokenizer(model.config.text)
    train, test = _rectangles(96), _rectangles(24, seed=1)
    res = evaluate_segmentation(model, tok, test, mode="zeroshot", batch_size=16, num_examples=2)
    assert set(res["per_class_iou"]) == {"background", "red", "green", "blue"}
    image, pred, gt = res["examples"][0]
    assert image.shape == (32, 32, 3) and pred.shape == gt.shape == (32, 32)
    # the evaluator's predictions are the argmax of the upsampled MaskCLIP scores
    with torch.no_grad():
        x = (torch.tensor(test.images[:2]).permute(0, 3, 1, 2).float() / 255
             - torch.tensor(model.preprocess.mean).view(1, 3, 1, 1)) / torch.tensor(model.preprocess.std).view(1, 3, 1, 1)
        logits = zeroshot_logits(maskclip_embeddings(model, x),
                                 build_classifier(model, tok, test.classnames, test.templates),
                                 build_classifier(model, tok, test.background_names, test.templates))
        ref = F.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False).argmax(1)
    assert np.array_equal(pred, ref[0].numpy())
    lp = evaluate_segmentation(model, tok, test, mode="linear_probe", train_dataset=train, batch_size=32)
    assert lp["miou"] > 0.5  # colour is linearly readable even from random-init patch tokens
    assert lp["miou"] > res["miou"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dc = evaluate_segmentation(model, tok, test, mode="denseclip", train_dataset=train, finetune_steps=3)
    assert set(dc["per_class_iou"]) == set(res["per_class_iou"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # fine-tunes a copy
    with pytest.raises(ValueError, match="train_dataset"):
        evaluate_segmentation(model, tok, test, mode="linear_probe")
    with pytest.raises(ValueError, match="mode"):
        evaluate_segmentation(model, tok, test, mode="panoptic")


def test_prompt_learner_matches_encode_text_when_context_is_the_placeholder():
    model = _tiny()
    tok = get_tokenizer(model.config.text)
    names = ["red", "green apple"]
    pl = PromptLearner(model, tok, names, n_ctx=3)
    with torch.no_grad():
        pl.ctx.copy_(model.text.token_embedding.weight[tok.encode("x")[0]].expand(3, -1))
        ref = model.encode_text(tok([f"x x x {n}." for n in names]))
        torch.testing.assert_close(pl(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="context length"):
        PromptLearner(model, tok, ["a very long class name " * 5])


def test_denseclip_forward_backward_and_fit():
    model = _tiny()
    model.train()
    tok = get_tokenizer(model.config.text)
    data = _rectangles(16)
    seg = DenseCLIPSegmenter(model, tok, ["background", *data.classnames], n_ctx=2, hidden=16)
    x = (torch.tensor(data.images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    masks = torch.tensor(data.masks)
    out = seg(x)
    assert out["logits"].shape == out["score_map"].shape == (16, 4, 4, 4)
    assert out["score_map"].abs().max() <= 1 + 1e-5  # cosine
    seg.loss(out, masks).backward()
    for name, p in [("ctx", seg.prompts.ctx), ("gamma", seg.head.context_decoder.gamma),
                    ("decoder", seg.head.context_decoder.decoder.layers[0].multihead_attn.in_proj_weight),
                    ("conv", seg.head.decoder[0].weight), ("trunk", model.visual.trunk.blocks[0].attn.qkv.weight)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    opt = torch.optim.AdamW(seg.parameters(), lr=3e-3)
    first = None
    for _ in range(15):
        loss = seg.loss(seg(x), masks)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first


def test_class_balance_weights_and_weighted_denseclip_loss():
    from vlp.eval.segmentation import balance_weights

    w = balance_weights(torch.tensor([0.8, 0.2, 0.0]), 0.5)
    raw = torch.tensor([0.8 ** -0.5, 0.2 ** -0.5, 1e-6 ** -0.5])
    torch.testing.assert_close(w, raw / raw[:2].mean())
    assert torch.equal(balance_weights(torch.tensor([0.8, 0.2]), 0.0), torch.ones(2))
    model = _tiny()
    seg = DenseCLIPSegmenter(model, get_tokenizer(model.config.text), ["background", "a", "b"], n_ctx=2, hidden=16)
    g = torch.Generator().manual_seed(0)
    out = {"logits": torch.randn(2, 3, 4, 4, generator=g), "aux_logits": torch.randn(2, 3, 4, 4, generator=g)}
    masks = torch.randint(0, 3, (2, 8, 8), generator=g)
    masks[0, 0, :3] = 255
    cw = torch.tensor([0.5, 2.0, 1.5])

    def weighted_ce(logits):  # hand-written: sum_i w[y_i] * nll_i / sum_i w[y_i] over labelled pixels
        logp = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False).log_softmax(1)
        keep = masks != 255
        y = masks.clamp(max=2)
        nll = -logp.gather(1, y[:, None])[:, 0]
        return (cw[y] * nll)[keep].sum() / cw[y][keep].sum()

    ref = weighted_ce(out["logits"]) + 0.4 * weighted_ce(out["aux_logits"])
    torch.testing.assert_close(seg.loss(out, masks, 0.4, class_weight=cw), ref)

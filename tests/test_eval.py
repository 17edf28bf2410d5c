"""Zero-shot metrics against scikit-learn (CLIP_benchmark computes mean per-class recall with
balanced_accuracy_score) and a hand-computed case; classifier construction (the 2-process split is in test_eval_dist.py)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score

from vlp.data.tokenizer import get_tokenizer
from vlp.eval.zeroshot import build_classifier, classification_metrics, fill_template
from vlp.models import create_model


def test_metrics_hand_computed():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1], [0.1, 0.2, 0.7]])
    labels = torch.tensor([0, 1, 1, 0])
    m = classification_metrics(logits, labels, 3)
    assert m["top1"] == pytest.approx(0.5)  # samples 0 and 1 right
    assert m["top5"] == pytest.approx(1.0)  # k capped at 3 classes
    # class 0: 1 of 2 right; class 1: 1 of 2 right; class 2 absent
    assert m["mean_per_class_recall"] == pytest.approx(0.5)
    assert m["num_samples"] == 4


def test_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    logits = torch.tensor(rng.normal(size=(500, 12)))
    labels = torch.tensor(rng.integers(0, 12, 500))
    labels[:60] = logits[:60].argmax(1)  # some signal
    m = classification_metrics(logits, labels, 12)
    assert m["top1"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert m["top5"] == pytest.approx(top_k_accuracy_score(labels, logits, k=5, labels=range(12)))
    assert m["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(labels, logits.argmax(1)))


def test_classifier_is_mean_of_normalized_prompt_embeddings():
    torch.manual_seed(0)
    model = create_model("clip-nano").eval()
    tok = get_tokenizer(model.config.text)
    names, templates = ["zero", "one"], ["a photo of {}.", "the digit {c}"]
    clf = build_classifier(model, tok, names, templates)
    assert clf.shape == (2, model.config.embed_dim)
    with torch.no_grad():
        for i, n in enumerate(names):
            emb = F.normalize(model.encode_text(tok([fill_template(t, n) for t in templates])), dim=-1)
            torch.testing.assert_close(clf[i], F.normalize(emb.mean(0), dim=-1))
    assert fill_template("the digit {c}", "one") == "the digit one"

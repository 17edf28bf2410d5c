"""Parity with CLIP_benchmark: the same random-init vlp model and the same data give the same
zero-shot classification and retrieval metrics (within 0.1 points) through CLIP_benchmark's own
`zeroshot_classification.evaluate` and `zeroshot_retrieval.evaluate`."""

import io
import random
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from vlp.data.datasets import load_eval_dataset, load_retrieval_dataset
from vlp.data.tokenizer import get_tokenizer
from vlp.data.transforms import eval_transform
from vlp.eval.common import make_context
from vlp.eval.retrieval import retrieval_features, retrieval_metrics
from vlp.eval.zeroshot import evaluate_zeroshot
from vlp.models import create_model

zc = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
zr = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
TOL = 0.001  # 0.1 points


class _Labelled(Dataset):
    def __init__(self, data, transform):
        self.data, self.transform, self.classes = data, transform, data.classnames

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.transform(self.data.image(i)), int(self.data.labels[i])


def _model():
    torch.manual_seed(0)
    model = create_model("clip-nano").eval()
    return model, get_tokenizer(model.config.text)


def _scalar_float(x=0.0):
    return float(np.asarray(x).reshape(-1)[0]) if isinstance(x, np.ndarray) else float(x)


def test_zeroshot_classification_matches_clip_benchmark(monkeypatch):
    # clip_benchmark 1.6.2's accuracy() calls float() on a 1-element array, which NumPy >= 2.x
    # refuses; shadowing `float` in its module keeps its own computation intact
    monkeypatch.setattr(zc, "float", _scalar_float, raising=False)
    model, tok = _model()
    data = load_eval_dataset("digits", "test")
    ours = evaluate_zeroshot(model, tok, data, model.preprocess, batch_size=64)
    loader = DataLoader(_Labelled(data, eval_transform(model.preprocess)), batch_size=64)
    templates = [t.replace("{}", "{c}") for t in data.templates]
    theirs = zc.evaluate(model, loader, tok, data.classnames, templates, "cpu", amp=False)
    assert ours["top1"] == pytest.approx(theirs["acc1"], abs=TOL)
    assert ours["top5"] == pytest.approx(theirs["acc5"], abs=TOL)
    assert ours["mean_per_class_recall"] == pytest.approx(theirs["mean_per_class_recall"], abs=TOL)
    assert 0 < ours["top5"] < 1  # a real, non-degenerate comparison


WORDS = "red blue small large old new bright dark round square cat dog tree house car boat bird hill lake road".split()


def _write_retrieval_wds(root, n=120, seed=0):
    """CLIP_benchmark retrieval layout: test/0.tar with png + txt (3 distinct captions per image)."""
    rng = random.Random(seed)
    images, _ = load_eval_dataset("digits", "test").images, None
    (root / "test").mkdir(parents=True)
    captions = []
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for i in range(n):
            caps = [f"a {rng.choice(WORDS)} {rng.choice(WORDS)} with a {rng.choice(WORDS)} number {i} {j}" for j in range(3)]
            captions.append(caps)
            buf = io.BytesIO()
            Image.fromarray(images[i]).save(buf, format="png")
            for ext, payload in (("png", buf.getvalue()), ("txt", "\n".join(caps).encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return [Image.fromarray(images[i]).convert("RGB") for i in range(n)], captions


class _Captioned(Dataset):
    def __init__(self, images, captions, transform):
        self.images, self.captions, self.transform = images, captions, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.captions[i]


def test_retrieval_matches_clip_benchmark(tmp_path):
    model, tok = _model()
    images, captions = _write_retrieval_wds(tmp_path / "ret")
    data = load_retrieval_dataset(str(tmp_path / "ret"), "test")
    assert len(data) == 120 and len(data.texts) == 360 and data.texts[:3] == captions[0]
    img, txt = retrieval_features(model, tok, data, model.preprocess, 32, make_context("cpu"))
    ours = retrieval_metrics(img, txt, data.image_groups, data.text_groups)
    loader = DataLoader(_Captioned(images, captions, eval_transform(model.preprocess)), batch_size=32,
                        collate_fn=lambda b: (torch.stack([x for x, _ in b]), [c for _, c in b]))
    theirs = zr.evaluate(model, loader, tok, "cpu", amp=False, recall_k_list=[1, 5, 10])
    for k in (1, 5, 10):
        for name in ("image_retrieval_recall", "text_retrieval_recall"):
            assert ours[f"{name}@{k}"] == pytest.approx(theirs[f"{name}@{k}"], abs=TOL), (name, k)
    assert 0 < ours["text_retrieval_recall@10"] < 1
    assert np.isclose(ours["image_retrieval_recall@1"], theirs["image_retrieval_recall@1"])

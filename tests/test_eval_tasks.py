"""Retrieval and linear-probe metrics against independent references, the task registry, the
dataset loaders, the unified CLI (JSON, table, report, classifier cache) and a headless-browser
screenshot of the report."""

import io
import json
import shutil
import subprocess
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlp.data.datasets import load_eval_dataset, load_retrieval_dataset
from vlp.data.transforms import eval_transform
from vlp.eval import tasks
from vlp.eval.__main__ import main
from vlp.eval.linear_probe import fit_probe
from vlp.eval.retrieval import retrieval_metrics


def test_retrieval_hand_computed():
    # 2 images, 3 texts (text 0, 1 caption image 0; text 2 captions image 1)
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = F.normalize(torch.tensor([[1.0, 0.1], [0.2, 1.0], [0.1, 1.0]]), dim=-1)
    m = retrieval_metrics(img, txt, np.array([0, 1]), np.array([0, 0, 1]), ks=(1, 2))
    # text->image top-1: text0 -> img0 (hit), text1 -> img1 (miss), text2 -> img1 (hit)
    assert m["image_retrieval_recall@1"] == pytest.approx(2 / 3)
    # image->text top-1: img0 -> text0 (hit); img1 -> text2 (0.995 > 0.98: hit)
    assert m["text_retrieval_recall@1"] == pytest.approx(1.0)
    assert m["image_retrieval_recall@2"] == pytest.approx(1.0)
    assert (m["num_images"], m["num_texts"]) == (2, 3)


def test_retrieval_matches_clip_benchmark_recall_at_k():
    zr = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(40, 8, generator=g), dim=-1)
    caps_per_image = torch.randint(1, 4, (40,), generator=g)
    owner = torch.repeat_interleave(torch.arange(40), caps_per_image)
    txt = F.normalize(img[owner] + 0.8 * torch.randn(len(owner), 8, generator=g), dim=-1)
    ours = retrieval_metrics(img, txt, np.arange(40), owner.numpy())
    scores = txt @ img.t()
    pos = torch.zeros_like(scores, dtype=torch.bool)
    pos[torch.arange(len(owner)), owner] = True
    for k in (1, 5, 10):
        t2i = (zr.recall_at_k(scores, pos, k) > 0).float().mean().item()
        i2t = (zr.recall_at_k(scores.t(), pos.t(), k) > 0).float().mean().item()
        assert ours[f"image_retrieval_recall@{k}"] == pytest.approx(t2i)
        assert ours[f"text_retrieval_recall@{k}"] == pytest.approx(i2t)
    assert 0 < ours["image_retrieval_recall@1"] < 1


def _blobs(n_per_class, classes=4, dim=6, seed=0, spread=1.0):
    """Gaussian blobs around fixed class centres; `seed` draws only the noise."""
    centers = np.random.default_rng(123).normal(size=(classes, dim)) * 2
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n_per_class)
    return centers[y] + spread * rng.normal(size=(len(y), dim)), y


def test_linear_probe_refit_equals_sklearn_on_all_train():
    from sklearn.linear_model import LogisticRegression

    x, y = _blobs(40)
    xt, yt = _blobs(25, seed=1)
    res = fit_probe(x, y, xt, num_classes=4, seed=3)
    assert res["C"] in (0.01, 0.1, 1.0, 10.0, 100.0) and res["num_train"] == len(y)
    # after choosing C, the probe is refit on train + validation = the whole train split
    ref = LogisticRegression(C=res["C"], max_iter=1000).fit(x, y)
    np.testing.assert_allclose(res["scores"], ref.predict_log_proba(xt), rtol=1e-6, atol=1e-6)
    assert (res["scores"].argmax(1) == yt).mean() > 0.8  # separable blobs are learned


def test_linear_probe_few_shot_is_k_per_class_and_seeded():
    x, y = _blobs(30)
    a = fit_probe(x, y, x[:10], num_classes=5, k_shot=4, seed=7)
    b = fit_probe(x, y, x[:10], num_classes=5, k_shot=4, seed=7)
    c = fit_probe(x, y, x[:10], num_classes=5, k_shot=4, seed=8)
    assert a["num_train"] == 16
    np.testing.assert_array_equal(a["scores"], b["scores"])
    assert not np.array_equal(a["scores"], c["scores"])
    assert np.isneginf(a["scores"][:, 4]).all()  # class absent from train never predicted


def test_registry_names_unknown_task_and_plugs_in_new_one():
    with pytest.raises(tasks.UnknownTaskError, match="'depth'"):
        tasks.get_task("depth")
    seen = {}

    def dummy(model, tokenizer, pre, spec, ctx):
        seen["spec"] = spec
        return tasks.TaskResult({"answer": 42.0})

    tasks.register_task("dummy", dummy)
    try:
        model = torch.nn.Linear(1, 1).train()
        res = tasks.run_task("dummy", model, None, None, tasks.DatasetSpec("x"), tasks.EvalContext())
        assert res.metrics == {"answer": 42.0} and seen["spec"].name == "x" and model.training
    finally:
        tasks._REGISTERED.pop("dummy")


def _png(arr):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="png")
    return buf.getvalue()


def test_retrieval_loaders(tmp_path):
    digits = load_eval_dataset("digits", "test", max_samples=3).images
    # image folder + captions.csv: repeated rows are several captions of one image
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(_png(digits[i]))
    (tmp_path / "captions.csv").write_text("file,caption\n0.png,zero a\n1.png,one a\n0.png,zero b\n2.png,two\n")
    d = load_retrieval_dataset(str(tmp_path))
    assert d.texts == ["zero a", "zero b", "one a", "two"] and list(d.text_groups) == [0, 0, 1, 2]
    assert len(d) == 3 and d.image(1).size == (8, 8)
    (tmp_path / "bad.csv").write_text("file,caption\nmissing.png,x\n")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_retrieval_dataset(str(tmp_path / "bad.csv"))
    # CLIP_benchmark retrieval webdataset: txt with one caption per line
    (tmp_path / "wds" / "test").mkdir(parents=True)
    with tarfile.open(tmp_path / "wds" / "test" / "0.tar", "w") as tar:
        for i, payload in ((0, b"a\nb\n"), (1, b"c")):
            for ext, data in (("png", _png(digits[i])), ("txt", payload)):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    w = load_retrieval_dataset(str(tmp_path / "wds"))
    assert w.texts == ["a", "b", "c"] and list(w.text_groups) == [0, 0, 1]
    # built-in class-level set: 5 templates x 10 classes, grouped by class
    b = load_retrieval_dataset("digits", max_samples=20)
    assert len(b.texts) == 50 and list(b.text_groups[:6]) == [0] * 5 + [1] and len(b) == 20
    with pytest.raises(ValueError, match="no-such-set"):
        load_retrieval_dataset("no-such-set")


def export_nano(out):
    """A random-init clip-nano (seed 0) saved as a vlp checkpoint directory."""
    from vlp.models import create_model
    from vlp.train.checkpoint import export_weights

    torch.manual_seed(0)
    model = create_model("clip-nano")
    export_weights(model.state_dict(), model.config, "clip-nano", out)
    return out


@pytest.fixture(scope="module")
def nano_dir(tmp_path_factory):
    return export_nano(tmp_path_factory.mktemp("nano"))


def test_cli_writes_json_table_report_and_caches_classifier(nano_dir, tmp_path, capsys):
    from vlp.eval.common import _LOADED
    from vlp.eval.zeroshot import evaluate_zeroshot
    from vlp.loading import load_model

    out = tmp_path / "out"
    args = ["--checkpoint", str(nano_dir), "--tasks", "zeroshot,retrieval,linear_probe", "--datasets", "digits",
            "--max-samples", "120", "--train-samples", "300", "--workers", "0", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "### retrieval" in printed and "| digits | test |" in printed
    res = json.loads((out / "results.json").read_text())
    by_task = {r["task"]: r["metrics"] for r in res["results"]}
    assert set(by_task) == {"zeroshot", "retrieval", "linear_probe"}
    model, pre, tok = load_model(nano_dir)
    direct = evaluate_zeroshot(model, tok, load_eval_dataset("digits", max_samples=120), pre, 64)
    assert by_task["zeroshot"] == pytest.approx(direct)
    assert by_task["linear_probe"]["num_train"] == 300 and by_task["retrieval"]["num_texts"] == 50
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3  # 2 confusion matrices + top retrieved images
    assert len(list((out / "cache").glob("image_features_*.pt"))) == 2  # test split (shared by all 3 tasks) + probe train split
    # the cached classifier is what a second run uses: replace it by a class-permuted one
    (clf_file,) = (out / "cache").glob("zeroshot_classifier_*.pt")
    clf = torch.load(clf_file, weights_only=True)
    torch.save(clf.roll(1, dims=0), clf_file)
    _LOADED.clear()
    assert main([*args[:3], "zeroshot", *args[4:], "--no-report"]) == 0
    again = json.loads((out / "results.json").read_text())["results"][0]["metrics"]
    data = load_eval_dataset("digits", max_samples=120)
    images = torch.stack([eval_transform(pre)(data.image(i)) for i in range(120)])
    feats = F.normalize(model.encode_image(images), dim=-1).detach()
    top1 = ((feats @ clf.roll(1, dims=0).t()).argmax(1).numpy() == data.labels).mean()
    assert again["top1"] == pytest.approx(top1) and again["top1"] != by_task["zeroshot"]["top1"]


@pytest.mark.parametrize("args, needle", [
    (["--tasks", "zeroshot,depth"], "'depth'"),
    (["--datasets", "no-such-set"], "'no-such-set'"),
    (["--tasks", "zeroshot", "--datasets", "retrieval:digits"], "'retrieval'"),
    (["--option", "zeroshot.k_shot"], "'zeroshot.k_shot'"),
    (["--option", "linear_probe.k_shot=3"], "'linear_probe'"),
])
def test_cli_names_bad_task_or_dataset(nano_dir, tmp_path, capsys, args, needle):
    assert main(["--checkpoint", str(nano_dir), "--out", str(tmp_path), *args]) == 2
    assert needle in capsys.readouterr().err


def _browser():
    return next((b for b in ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")
                 if shutil.which(b)), None)


def test_report_renders_in_headless_browser(nano_dir, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no headless browser: `apt-get install chromium-headless-shell` (scripts/install.sh does)")
    from PIL import Image

    out = tmp_path / "out"
    assert main(["--checkpoint", str(nano_dir), "--tasks", "zeroshot,retrieval", "--datasets", "digits",
                 "--max-samples", "60", "--workers", "0", "--out", str(out)]) == 0
    shot = tmp_path / "shot.png"
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                           "--window-size=1000,1400", (out / "report.html").as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.is_file(), proc.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape[:2] == (1400, 1000)
    # the page drew the blue confusion matrix (not a blank or an error page)
    blue = (img[..., 2] > img[..., 0] + 60) & (img[..., 2] > 120)
    assert blue.mean() > 0.01


def test_batched_native_size_images_equal_the_per_image_path():
    from PIL import Image

    from vlp.data.datasets import EvalDataset
    from vlp.eval.common import _native_uint8, encode_images, make_context
    from vlp.models import create_model

    torch.manual_seed(0)
    model = create_model("clip-nano").eval()  # 16 x 16 input
    rng = np.random.default_rng(0)
    for arr in (rng.integers(0, 256, (37, 16, 16), dtype=np.uint8), rng.integers(0, 256, (37, 16, 16, 3), dtype=np.uint8)):
        labels = np.zeros(37, dtype=np.int64)
        batched = EvalDataset(arr, labels, ["a"], ["{}"])
        per_image = EvalDataset([Image.fromarray(a) for a in arr], labels, ["a"], ["{}"])
        assert _native_uint8(batched, model.preprocess) is not None and _native_uint8(per_image, model.preprocess) is None
        ctx = make_context("cpu")
        a = encode_images(model, batched, model.preprocess, 16, ctx)
        b = encode_images(model, per_image, model.preprocess, 16, ctx)
        assert a.shape == (37, model.config.embed_dim) and torch.equal(a, b)


def test_segmentation_task_adapter(nano_dir):
    seg = pytest.importorskip("vlp.eval.segmentation", reason="the dense evaluator (vlp/eval/segmentation.py) is not in this tree")
    segdata = pytest.importorskip("vlp.data.segmentation")
    from vlp.eval.report import figure_png
    from vlp.loading import load_model

    model, pre, tok = load_model(nano_dir)
    spec = tasks.DatasetSpec("clipart", "test", 8, 8, {"modes": "zeroshot,linear_probe", "train_samples": 16})
    res = tasks.run_task("segmentation", model, tok, pre, spec, tasks.EvalContext())
    direct = seg.evaluate_segmentation(model, tok, segdata.load_segmentation_dataset("clipart", "test", 8), "zeroshot", 8)
    assert res.metrics["zeroshot/miou"] == pytest.approx(direct["miou"])
    assert {"linear_probe/miou", "linear_probe/pixel_accuracy", "num_samples"} <= set(res.metrics)
    assert res.details["zeroshot"]["per_class_iou"].keys() == direct["per_class_iou"].keys()
    assert len(res.figures) == 2 and all(figure_png(f)[:4] == b"\x89PNG" for f in res.figures)
    bad = tasks.DatasetSpec("clipart", "test", 8, 8, {"modes": "denseclip", "train_samples": 16, "denseclip": {"lrr": 1}})
    with pytest.raises(ValueError, match="lrr"):
        tasks.run_task("segmentation", model, tok, pre, bad, tasks.EvalContext())


def test_segmentation_alias_random_init_and_examples_png(tmp_path):
    """`python -m vlp.eval.segmentation` forwards to `python -m vlp.eval --tasks segmentation`;
    --random-init evaluates seed-0 random weights of the checkpoint's architecture; the examples PNG
    is the evaluator's examples grid. Reference: evaluate_segmentation on create_model(seed 0)."""
    from PIL import Image

    from vlp.data.segmentation import load_segmentation_dataset
    from vlp.data.tokenizer import get_tokenizer
    from vlp.eval.segmentation import evaluate_segmentation, examples_image
    from vlp.eval.segmentation import main as alias_main
    from vlp.models import create_model
    from vlp.train.checkpoint import export_weights

    torch.manual_seed(1)  # the checkpoint's weights differ from the seed-0 random init
    trained = create_model("clip-nano")
    export_weights(trained.state_dict(), trained.config, "clip-nano", tmp_path / "ckpt")
    png = tmp_path / "ex.png"
    assert alias_main(["--checkpoint", str(tmp_path / "ckpt"), "--modes", "zeroshot", "--max-test", "6",
                       "--random-init", "--examples", str(png), "--out", str(tmp_path / "out")]) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["random_init"] is True
    metrics = res["results"][0]["metrics"]
    torch.manual_seed(0)
    ref_model = create_model("clip-nano").eval()
    test = load_segmentation_dataset("clipart", "test", 6)
    ref = evaluate_segmentation(ref_model, get_tokenizer(ref_model.config.text), test, "zeroshot", 64)
    assert metrics["zeroshot/miou"] == pytest.approx(ref["miou"], abs=1e-12)
    assert metrics["num_samples"] == 6
    assert np.array_equal(np.asarray(Image.open(png)), examples_image({"zeroshot": ref}, test.num_classes))
    trained_res = evaluate_segmentation(trained.eval(), get_tokenizer(trained.config.text), test, "zeroshot", 64)
    assert trained_res["confusion_matrix"] != ref["confusion_matrix"]  # so the flag did change the weights


def test_cli_plan_ties_datasets_to_tasks():
    from vlp.eval.__main__ import plan

    assert plan(["zeroshot", "retrieval"], ["digits", "fashion-mnist"]) == [
        ("zeroshot", "digits"), ("zeroshot", "fashion-mnist"), ("retrieval", "digits"), ("retrieval", "fashion-mnist")]
    assert plan(["zeroshot", "retrieval"], ["digits", "retrieval:fashion-mnist"]) == [
        ("zeroshot", "digits"), ("retrieval", "fashion-mnist")]
    with pytest.raises(ValueError, match="'zeroshot' has no dataset"):
        plan(["zeroshot", "retrieval"], ["retrieval:digits"])


# ---- typed task options ---------------------------------------------------------------------------


def _misspelled(name: str) -> str:
    return name[:-1] + ("x" if name[-1] != "x" else "y")


@pytest.mark.parametrize("task", sorted(tasks._BUILTIN))
def test_misspelled_option_is_refused_naming_it(task):
    import dataclasses

    cls = tasks.options_class(task)
    assert dataclasses.is_dataclass(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    bad = _misspelled(names[0])
    for check in (tasks.parse_options, tasks.check_options):
        with pytest.raises(tasks.EvalOptionError) as err:
            check(task, {bad: 1})
        msg = str(err.value)
        assert f"'{task}'" in msg and f"'{bad}'" in msg and all(n in msg for n in names)
    assert isinstance(err.value, ValueError)
    # no options, None and the dataclass itself are all fine, and give the declared defaults
    assert tasks.parse_options(task, {}) == tasks.parse_options(task, None) == cls()
    assert tasks.parse_options(task, cls()) == cls()
    assert tasks.check_options(task, {}) is None


@pytest.mark.parametrize("task, options, needles", [
    ("linear_probe", {"k_shot": "ten"}, ["'linear_probe'", "'k_shot'", "int", "'ten'"]),
    ("linear_probe", {"cs": {"a": 1}}, ["'cs'", "a list of float"]),
    ("linear_probe", {"val_fraction": True}, ["'val_fraction'", "float"]),
    ("zeroshot", {"prefix": 3}, ["'zeroshot'", "'prefix'", "str or None"]),
    ("retrieval", {"text_key": ["a"]}, ["'retrieval'", "'text_key'", "str"]),
    ("segmentation", {"modes": 5}, ["'modes'", "a list of str"]),
    ("segmentation", {"modes": "zeroshot,depth"}, ["'modes'", "'depth'", "denseclip"]),
    ("segmentation", {"background": "sky"}, ["'background'", "threshold"]),
    ("segmentation", {"dense": "cls"}, ["'dense'", "maskclip"]),
    ("segmentation", {"num_examples": 2.5}, ["'num_examples'", "int"]),
    ("segmentation", {"denseclip": [1]}, ["'denseclip'", "a mapping"]),
    ("segmentation", {"denseclip": {"lr": "fast"}}, ["'denseclip.lr'", "float"]),
    ("segmentation", {"denseclip": {"lrr": 1}}, ["'lrr'", "backbone_lr_mult"]),
])
def test_wrong_type_or_value_is_refused_naming_the_key(task, options, needles):
    with pytest.raises(tasks.EvalOptionError) as err:
        tasks.check_options(task, options)
    assert all(n in str(err.value) for n in needles), str(err.value)


def test_cli_strings_are_coerced_to_the_declared_types():
    import argparse

    from omegaconf import OmegaConf

    from vlp.eval.__main__ import task_options

    lp = tasks.parse_options("linear_probe", {"k_shot": "10", "cs": "0.1, 1,10", "val_fraction": "0.25",
                                              "seed": "3", "train_samples": "1e3"})
    assert (lp.k_shot, lp.cs, lp.val_fraction, lp.seed, lp.train_samples) == (10, (0.1, 1.0, 10.0), 0.25, 3, 1000)
    assert tasks.parse_options("linear_probe", {"cs": "[0.5, 2]"}).cs == (0.5, 2.0)
    seg = tasks.parse_options("segmentation", {"modes": "zeroshot, denseclip", "probe_lr": "1e-3",
                                               "denseclip": "{lr: 1e-3, flip: false}",
                                               "bg_threshold": "0.25"})
    assert seg.modes == ("zeroshot", "denseclip") and seg.probe_lr == 1e-3 and seg.bg_threshold == 0.25
    assert seg.denseclip == {"lr": 1e-3, "flip": False}  # YAML reads 1e-3 as a string: coerced
    assert tasks.parse_options("segmentation", {"denseclip": {"flip": "true", "batch_size": "8"}}).denseclip == {
        "flip": True, "batch_size": 8}
    assert tasks.parse_options("zeroshot", {"prefix": "label"}).prefix == "label"
    assert tasks.parse_options("zeroshot", {"prefix": "null"}).prefix is None
    # what `python -m vlp.eval` hands over: the shared flags only where a task declares them, raw text
    # from --option, nested keys of a mapping option
    args = argparse.Namespace(train_split="train", train_samples=7, seed=3, k_shot=2, option=[
        "linear_probe.cs=[0.1,1]", "segmentation.denseclip={lr: 1e-3}", "segmentation.denseclip.n_ctx=2",
        "segmentation.num_examples=2", "retrieval.text_key=syn.txt"])
    raw = task_options(args, {"zeroshot", "retrieval", "linear_probe", "segmentation"})
    assert raw["zeroshot"] == {} and raw["retrieval"] == {"text_key": "syn.txt"}
    opts = {t: tasks.parse_options(t, o) for t, o in raw.items()}
    assert (opts["linear_probe"].k_shot, opts["linear_probe"].seed, opts["linear_probe"].cs) == (2, 3, (0.1, 1.0))
    assert opts["segmentation"].train_samples == 7 and opts["segmentation"].num_examples == 2
    assert opts["segmentation"].denseclip == {"lr": 1e-3, "n_ctx": 2}
    # what training hands over: dict(ev.options) of the run config, nested OmegaConf containers
    ev = OmegaConf.create({"options": {"modes": ["denseclip"], "denseclip": {"lr": 1e-3}, "cs": [0.1]}})
    seg = tasks.parse_options("segmentation", {k: v for k, v in dict(ev.options).items() if k != "cs"})
    assert seg.modes == ("denseclip",) and type(seg.denseclip) is dict and seg.denseclip == {"lr": 1e-3}
    assert tasks.parse_options("linear_probe", {"cs": dict(ev.options)["cs"]}).cs == (0.1,)


def test_option_defaults_are_the_evaluators_defaults():
    import inspect

    from vlp.eval.linear_probe import DEFAULT_CS, LinearProbeOptions, fit_probe
    from vlp.eval.retrieval import RetrievalOptions
    from vlp.eval.segmentation import evaluate_segmentation
    from vlp.eval.segmentation_task import SegmentationOptions
    from vlp.eval.zeroshot import ZeroShotOptions

    assert ZeroShotOptions() == ZeroShotOptions(prefix=None)
    assert RetrievalOptions() == RetrievalOptions(prefix=None, text_key="txt")
    assert LinearProbeOptions() == LinearProbeOptions(k_shot=0, train_split="train", train_samples=0,
                                                      val_fraction=0.2, cs=DEFAULT_CS, seed=None)
    sig = inspect.signature(fit_probe).parameters
    assert (sig["val_fraction"].default, sig["cs"].default) == (0.2, DEFAULT_CS)
    seg = SegmentationOptions()
    assert (seg.modes, seg.train_split, seg.train_samples, seg.examples, seg.denseclip) == (
        ("zeroshot", "linear_probe"), "train", 0, None, {})
    params = inspect.signature(evaluate_segmentation).parameters
    shared = {"background", "bg_threshold", "dense", "probe_epochs", "probe_lr", "probe_weight_decay",
              "probe_balance", "finetune_steps", "num_examples"}
    assert {k: params[k].default for k in shared} == {k: getattr(seg, k) for k in shared}
    # every keyword of evaluate_segmentation but the data, the device and the context is an option
    fixed = {"model", "tokenizer", "dataset", "mode", "batch_size", "device", "train_dataset", "ctx"}
    assert set(params) - fixed == shared | {"denseclip_options"}


class _FakeSegData:
    num_classes = 3
    images = np.zeros((2, 4, 4, 3), np.uint8)

    def __len__(self):
        return 2


class _Calls(list):
    pass


# options that the segmentation adapter used to drop (it forwarded only background, finetune_steps,
# num_examples and dense): they now reach evaluate_segmentation from every entry point
_NEWLY_REACHED = {"bg_threshold": 0.3, "probe_epochs": 3, "probe_lr": 0.05, "probe_weight_decay": 0.001,
                  "probe_balance": 0.0}


@pytest.fixture
def seg_calls(monkeypatch):
    import vlp.eval.segmentation_task as st

    calls = _Calls()
    calls.loaded = []

    def fake_eval(model, tokenizer, dataset, mode, batch_size, device, **kw):
        calls.append((mode, kw))
        return {"miou": 0.5, "miou_fg": 0.25, "pixel_accuracy": 0.75, "per_class_iou": {"background": 0.5},
                "confusion_matrix": [[1]], "examples": []}

    def fake_dataset(name, split, max_samples):
        calls.loaded.append((name, split, max_samples))
        return _FakeSegData()

    monkeypatch.setattr(st, "evaluate_segmentation", fake_eval)
    monkeypatch.setattr(st, "_dataset", fake_dataset)
    return calls


def _check_reached(calls, modes=("linear_probe",), denseclip=None):
    assert [m for m, _ in calls] == list(modes)
    for _, kw in calls:
        assert {k: kw[k] for k in _NEWLY_REACHED} == pytest.approx(_NEWLY_REACHED)
        assert kw["denseclip_options"] == (denseclip or {})


def test_segmentation_options_reach_the_evaluator_through_run_task(seg_calls):
    model = torch.nn.Linear(1, 1)
    spec = tasks.DatasetSpec("clipart", "test", 2, 2, {"modes": ["linear_probe", "denseclip"], "train_split": "val",
                                                        "train_samples": 9, "denseclip": {"lr": 1e-3},
                                                        "num_examples": 1, **_NEWLY_REACHED})
    res = tasks.run_task("segmentation", model, None, None, spec, tasks.EvalContext(figures=False))
    _check_reached(seg_calls, ("linear_probe", "denseclip"), {"lr": 1e-3})
    assert all(kw["num_examples"] == 1 for _, kw in seg_calls)
    assert seg_calls.loaded == [("clipart", "test", 2), ("clipart", "val", 9)]
    assert res.metrics["denseclip/miou"] == 0.5


def test_segmentation_options_reach_the_evaluator_from_a_run_config(seg_calls):
    """evals.NAME.options as training passes them (dict(ev.options)): a nested `denseclip` mapping is an
    OmegaConf DictConfig, which the adapter used to refuse as 'not a mapping'."""
    from vlp.config import load_config

    sets = [f"evals.seg.options.{k}={v}" for k, v in _NEWLY_REACHED.items()]
    cfg = load_config("tests/configs/digits_nano.yaml", [
        "evals.seg.task=segmentation", "evals.seg.dataset=clipart", "evals.seg.options.modes=[denseclip]",
        "evals.seg.options.denseclip.lr=1e-3", "evals.seg.options.denseclip.n_ctx=2", *sets])
    ev = cfg.evals.seg
    spec = tasks.DatasetSpec(ev.dataset, ev.split, ev.max_samples, ev.batch_size, dict(ev.options))
    tasks.run_task(ev.task, torch.nn.Linear(1, 1), None, None, spec, tasks.EvalContext(figures=False))
    _check_reached(seg_calls, ("denseclip",), {"lr": 1e-3, "n_ctx": 2})


def test_segmentation_options_reach_the_evaluator_from_both_clis(seg_calls, nano_dir, tmp_path, capsys):
    from vlp.eval.segmentation import main as alias_main

    base = ["--checkpoint", str(nano_dir), "--tasks", "segmentation", "--datasets", "clipart", "--workers", "0",
            "--no-report", "--out", str(tmp_path / "a")]
    assert main([*base, "--train-split", "val", "--train-samples", "5",
                 "--option", "segmentation.modes=linear_probe,denseclip", "--option", "segmentation.denseclip.lr=1e-3",
                 *[x for k, v in _NEWLY_REACHED.items() for x in ("--option", f"segmentation.{k}={v}")]]) == 0
    _check_reached(seg_calls, ("linear_probe", "denseclip"), {"lr": 1e-3})
    assert seg_calls.loaded[1] == ("clipart", "val", 5)
    seg_calls.clear()
    # the alias had no way to set these (nor num_examples, train_split, denseclip)
    assert alias_main(["--checkpoint", str(nano_dir), "--modes", "linear_probe", "--out", str(tmp_path / "b"),
                       "--num-examples", "1", "--train-split", "val", "--option", "denseclip.n_ctx=2",
                       *[x for k, v in _NEWLY_REACHED.items() for x in ("--option", f"{k}={v}")]]) == 0
    _check_reached(seg_calls, ("linear_probe",), {"n_ctx": 2})
    assert seg_calls[0][1]["num_examples"] == 1 and seg_calls.loaded[-1] == ("clipart", "val", 2000)
    capsys.readouterr()
    # a misspelled option stops the CLI before any model or data is loaded, naming it
    seg_calls.loaded.clear()
    assert main([*base, "--option", "segmentation.bg_treshold=0.3"]) == 2
    err = capsys.readouterr().err
    assert "'bg_treshold'" in err and "'segmentation'" in err and "bg_threshold" in err and not seg_calls.loaded


def test_bg_threshold_changes_real_zeroshot_segmentation(nano_dir):
    """On real clipart scenes: `bg_threshold` (dropped by the adapter before) decides the background:
    at 1.0 every pixel is predicted background, at 0.0 none is."""
    pytest.importorskip("vlp.data.segmentation")
    from vlp.loading import load_model

    model, pre, tok = load_model(nano_dir)

    def predicted_columns(threshold):
        spec = tasks.DatasetSpec("clipart", "test", 4, 4, {"modes": "zeroshot", "background": "threshold",
                                                           "bg_threshold": threshold})
        res = tasks.run_task("segmentation", model, tok, pre, spec, tasks.EvalContext(figures=False))
        return np.asarray(res.details["zeroshot"]["confusion_matrix"]).sum(0)  # pixels per predicted class

    always, never = predicted_columns(1.0), predicted_columns(0.0)
    assert always[0] == always.sum() > 0 and always[1:].sum() == 0
    assert never[0] == 0 and never[1:].sum() == always.sum()


def test_register_task_with_and_without_options():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class DepthOptions:
        max_depth: float = 10.0
        scales: tuple[int, ...] = (1,)

    seen = []

    def depth(model, tokenizer, pre, spec, ctx):
        seen.append(spec.options)
        return tasks.TaskResult({"n": 1})

    model = torch.nn.Linear(1, 1)
    try:
        tasks.register_task("depth_t", depth, options=DepthOptions)
        tasks.register_task("free_t", depth)
        assert {"depth_t", "free_t"} <= set(tasks.task_names())
        tasks.run_task("depth_t", model, None, None, tasks.DatasetSpec("x", options={"max_depth": "2.5",
                                                                                       "scales": "1,2"}),
                       tasks.EvalContext())
        assert seen[-1] == DepthOptions(max_depth=2.5, scales=(1, 2))
        with pytest.raises(tasks.EvalOptionError, match="'depth_t'.*'max_dpth'.*max_depth"):
            tasks.check_options("depth_t", {"max_dpth": 1})
        with pytest.raises(tasks.EvalOptionError, match="'scales'"):
            tasks.run_task("depth_t", model, None, None, tasks.DatasetSpec("x", options={"scales": "a"}),
                           tasks.EvalContext())
        # no declared options: any mapping, unchecked, reaches the evaluator as given
        given = {"anything": [1, 2], "k": "v"}
        tasks.check_options("free_t", given)
        assert tasks.parse_options("free_t", given) == given
        tasks.run_task("free_t", model, None, None, tasks.DatasetSpec("x", options=given), tasks.EvalContext())
        assert seen[-1] is given
        with pytest.raises(TypeError, match="dataclass"):
            tasks.register_task("bad_t", depth, options=dict)
        with pytest.raises(tasks.UnknownTaskError, match="'nope'"):
            tasks.check_options("nope", {})
    finally:
        tasks._REGISTERED.pop("depth_t", None)
        tasks._REGISTERED.pop("free_t", None)


def test_run_config_refuses_a_misspelled_eval_option_before_work_starts():
    from vlp.config import ConfigError, load_config

    load_config("tests/configs/digits_nano.yaml", ["evals.digits.options.prefix=caption"])
    with pytest.raises(ConfigError, match=r"evals.digits.options.*'zeroshot'.*'prefx'.*did you mean 'prefix'"):
        load_config("tests/configs/digits_nano.yaml", ["evals.digits.options.prefx=caption"])
    with pytest.raises(ConfigError, match=r"evals.probe.options.*'k_shot' must be int"):
        load_config("tests/configs/digits_nano.yaml", ["evals.probe.task=linear_probe", "evals.probe.dataset=digits",
                                                       "evals.probe.options.k_shot=many"])

"""CLIP_benchmark habits of `python -m vlp.eval`: `wds/NAME` with `--dataset-root` (CLIP_benchmark's
placeholders), its task names, and results in its JSON schema that its own `build` tool reads."""

from __future__ import annotations

import csv
import json
import sys

import numpy as np
import pytest
import webdataset as wds

from tests.helpers import run
from tests.test_export import _perturbed

SPLIT_SIZE = 60


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A checkpoint (a perturbed clip-nano) and digits' test split in CLIP_benchmark's webdataset layout
    under ROOT/wds_vtab-digits (two shards, nshards.txt, classnames, templates)."""
    from vlp.data.captions import CLASSNAMES
    from vlp.data.datasets import load_digits
    from vlp.models import create_model
    from vlp.train.checkpoint import export_weights

    base = tmp_path_factory.mktemp("cb")
    model = _perturbed(create_model("clip-nano"))
    export_weights(model.state_dict(), model.config, "clip-nano", base / "run")
    ds = base / "root" / "wds_vtab-digits"
    (ds / "test").mkdir(parents=True)
    x, y = load_digits("test")
    for s in range(2):
        with wds.TarWriter(str(ds / "test" / f"{s}.tar")) as w:
            for i in range(s * SPLIT_SIZE // 2, (s + 1) * SPLIT_SIZE // 2):
                w.write({"__key__": f"s{i:05d}", "png": np.stack([x[i]] * 3, -1), "cls": int(y[i])})
    (ds / "test" / "nshards.txt").write_text("2")
    (ds / "classnames.txt").write_text("\n".join(CLASSNAMES["digits"]) + "\n")
    (ds / "zeroshot_classification_templates.txt").write_text("a photo of the number {c}.\nthe digit {c}.\n")
    return base, ds


def _eval(out, *args, check=True):
    return run([sys.executable, "-m", "vlp.eval", "--no-report", "--no-cache", "--workers", "0", "--out", str(out),
                *args], check=check)


def test_wds_name_with_dataset_root_and_clip_benchmark_schema(setup, tmp_path):
    base, ds = setup
    ckpt = str(base / "run")
    _eval(tmp_path / "a", "--checkpoint", ckpt, "--tasks", "zeroshot_classification", "--datasets", "wds/vtab/digits",
          "--dataset-root", str(base / "root" / "wds_{dataset_cleaned}"))
    _eval(tmp_path / "b", "--checkpoint", ckpt, "--tasks", "zeroshot", "--datasets", str(ds))
    a = json.loads((tmp_path / "a" / "results.json").read_text())["results"]
    b = json.loads((tmp_path / "b" / "results.json").read_text())["results"]
    assert [r["dataset"] for r in a] == ["wds/vtab/digits"] and a[0]["task"] == "zeroshot"
    assert a[0]["metrics"] == b[0]["metrics"] and a[0]["metrics"]["num_samples"] == SPLIT_SIZE

    files = sorted((tmp_path / "a" / "clip_benchmark").glob("*.json"))
    assert [f.name for f in files] == [f"vtab_digits_{ckpt.replace('/', '_').strip('_')}_vlp-CLIP_en_"
                                       "zeroshot_classification.json"]
    rec = json.loads(files[0].read_text())
    assert {k: rec[k] for k in ("dataset", "model", "pretrained", "task", "language")} == {
        "dataset": "wds/vtab/digits", "model": "vlp-CLIP", "pretrained": ckpt, "task": "zeroshot_classification",
        "language": "en"}
    m = a[0]["metrics"]
    assert rec["metrics"] == {"acc1": m["top1"], "acc5": m["top5"], "mean_per_class_recall": m["mean_per_class_recall"],
                              "num_samples": m["num_samples"]}
    # CLIP_benchmark's own tool reads the files into its benchmark table
    run([sys.executable, "-m", "clip_benchmark.cli", "build", str(tmp_path / "a" / "clip_benchmark"),
         "--output", str(tmp_path / "bench.csv")])
    rows = list(csv.DictReader(open(tmp_path / "bench.csv")))
    assert len(rows) == 1 and rows[0]["model_fullname"] == f"vlp-CLIP {ckpt}"
    assert float(rows[0]["acc1"]) == pytest.approx(m["top1"]) and rows[0]["task"] == "zeroshot_classification"


def test_wds_names_are_refused_without_a_usable_root(setup, tmp_path):
    base, _ = setup
    ckpt = str(base / "run")
    proc = _eval(tmp_path, "--checkpoint", ckpt, "--datasets", "wds/vtab/digits", check=False)
    assert proc.returncode == 2 and "give --dataset-root" in proc.stderr
    proc = _eval(tmp_path, "--checkpoint", ckpt, "--datasets", "wds/cars", "--dataset-root",
                 str(base / "root" / "wds_{dataset}"), check=False)
    assert proc.returncode == 2 and "wds_cars" in proc.stderr and "not a directory" in proc.stderr
    proc = _eval(tmp_path, "--checkpoint", ckpt, "--datasets", "wds/cars", "--dataset-root",
                 "https://huggingface.co/datasets/clip-benchmark/wds_{dataset_cleaned}/tree/main", check=False)
    assert proc.returncode == 2 and "is a URL" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _eval(tmp_path, "--checkpoint", ckpt, "--datasets", "wds/a,wds/b", "--dataset-root", str(base / "root"),
                 check=False)
    assert proc.returncode == 2 and "the same directory" in proc.stderr
    proc = _eval(tmp_path, "--checkpoint", ckpt, "--datasets", "wds/a", "--dataset-root", "{split}/x", check=False)
    assert proc.returncode == 2 and "only the placeholders" in proc.stderr


def test_clip_benchmark_task_names_in_task_prefixes_and_options(setup, tmp_path):
    from vlp.eval.__main__ import _unalias, resolve_datasets

    base, ds = setup
    root = str(base / "root" / "wds_{dataset_cleaned}")
    assert resolve_datasets(["zeroshot_classification:wds/vtab/digits", "zeroshot_retrieval:digits"], root) == (
        [f"zeroshot:{ds}", "retrieval:digits"], {str(ds): "wds/vtab/digits"})
    assert _unalias("zeroshot_classification.prefix=", ".") == "zeroshot.prefix="
    _eval(tmp_path, "--checkpoint", str(base / "run"), "--tasks", "zeroshot_classification,linear_probe",
          "--datasets", "zeroshot_classification:wds/vtab/digits,linear_probe:digits", "--dataset-root", root,
          "--max-samples", "30", "--train-samples", "200")
    recs = {json.loads(f.read_text())["task"]: json.loads(f.read_text())
            for f in (tmp_path / "clip_benchmark").glob("*.json")}
    assert recs["zeroshot_classification"]["dataset"] == "wds/vtab/digits"
    assert recs["linear_probe"]["dataset"] == "digits"
    assert {"lp_acc1", "lp_mean_per_class_recall"} <= set(recs["linear_probe"]["metrics"])
    assert "top1" not in recs["linear_probe"]["metrics"]

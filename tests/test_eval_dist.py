"""Evaluation under 2 processes equals the 1-process run: every task, and the in-training evals.

References: the same evaluators run in one process (features row for row, metrics exactly),
and for training, the exported weights evaluated afterwards by the CLI in one process.
"""

import json
import sys

import pytest
import torch

from tests.helpers import ROOT, run, torchrun

pytestmark = pytest.mark.slow


def test_two_process_tasks_equal_one_process(tmp_path):
    from tests.workers.eval_tasks import run_all

    out = tmp_path / "two.pt"
    torchrun(2, str(ROOT / "tests/workers/eval_tasks.py"), str(out), timeout=300)
    two = torch.load(out, weights_only=True)
    one = run_all()
    # gathered exactly once per sample, in order: 297 test images (149 + 148), 50 texts, 401 train images
    assert two["retrieval_image_features"].shape == (297, one["retrieval_image_features"].shape[1])
    assert two["retrieval_text_features"].shape[0] == 50
    assert two["probe_train_features"].shape[0] == 401
    assert two["zeroshot_logits"].shape == (297, 10)
    for key in ("zeroshot_logits", "retrieval_image_features", "retrieval_text_features", "probe_train_features"):
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6)
    for task in ("zeroshot", "retrieval", "linear_probe"):
        assert two[task].keys() == one[task].keys()
        for k, v in one[task].items():
            assert two[task][k] == pytest.approx(v, abs=1e-9), (task, k)
    assert one["linear_probe"]["num_train"] == 401 and one["retrieval"]["num_images"] == 297


def test_in_training_evals_under_two_processes(tmp_path, digits_shards_dir):
    run_dir = tmp_path / "run"
    overrides = [
        f"run_dir={run_dir}", f"data.train_shards={digits_shards_dir}/train.json", "train.steps=6",
        "evals.digits.every_n_steps=3",
        "evals.ret.task=retrieval", "evals.ret.dataset=digits", "evals.ret.every_n_steps=3",
        "evals.ret.max_samples=101",
        "evals.probe.task=linear_probe", "evals.probe.dataset=digits", "evals.probe.every_n_steps=3",
        "evals.probe.max_samples=101", "evals.probe.options.train_samples=301",
        "evals.probe.options.k_shot=10",
    ]
    torchrun(2, "train.py", "--config", "tests/configs/digits_nano.yaml", *overrides, timeout=400)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for key in ("eval/ret/image_retrieval_recall@5", "eval/probe/top1", "eval/digits/top1"):
        steps = [r["step"] for r in rows if key in r]
        assert steps == [3, 6], (key, steps)
    assert any("loss" in r for r in rows)
    last = {k: v for r in rows if r["step"] == 6 for k, v in r.items()}
    assert last["eval/probe/num_train"] == 100  # 10-shot x 10 classes
    # the final in-training metrics equal a 1-process CLI eval of the exported weights
    out = tmp_path / "cli"
    run([sys.executable, "-m", "vlp.eval", "--checkpoint", str(run_dir), "--tasks", "retrieval,linear_probe",
         "--datasets", "digits", "--max-samples", "101", "--train-samples", "301", "--k-shot", "10",
         "--workers", "0", "--no-report", "--out", str(out)])
    res = {r["task"]: r["metrics"] for r in json.loads((out / "results.json").read_text())["results"]}
    for k, v in res["retrieval"].items():
        assert last[f"eval/ret/{k}"] == pytest.approx(v, abs=1e-6), k
    for k in ("top1", "mean_per_class_recall", "C", "num_train"):
        assert last[f"eval/probe/{k}"] == pytest.approx(res["linear_probe"][k], abs=1e-6), k


def test_cli_under_torchrun_equals_one_process(tmp_path):
    from tests.test_eval_tasks import export_nano
    from vlp.eval.__main__ import main

    ckpt = export_nano(tmp_path / "nano")
    args = ["--checkpoint", str(ckpt), "--tasks", "zeroshot,retrieval,linear_probe", "--datasets", "digits",
            "--max-samples", "151", "--train-samples", "303", "--workers", "0", "--no-report"]
    torchrun(2, "-m", "vlp.eval", *args, "--out", str(tmp_path / "two"), timeout=300)
    assert main([*args, "--no-cache", "--out", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "results.json").read_text())["results"]
    two = json.loads((tmp_path / "two" / "results.json").read_text())["results"]
    assert [r["task"] for r in two] == ["zeroshot", "retrieval", "linear_probe"]
    for a, b in zip(one, two):
        assert a["metrics"] == pytest.approx(b["metrics"], abs=1e-9), a["task"]
    assert json.loads((tmp_path / "two" / "results.json").read_text())["world_size"] == 2
    # rank 0 alone wrote the cache: the classifier, the test and the train features
    assert len(list((tmp_path / "two" / "cache").glob("*.pt"))) == 3


def test_two_process_segmentation_equals_one_process(tmp_path):
    from tests.workers.eval_segmentation import run_all

    out = tmp_path / "two.pt"
    torchrun(2, str(ROOT / "tests/workers/eval_segmentation.py"), str(out), timeout=300)
    two = torch.load(out, weights_only=True)
    one = run_all()
    for mode in ("zeroshot", "linear_probe", "denseclip"):
        cm = one[mode]["confusion_matrix"]
        assert int(cm.sum()) == 5 * 64 * 64  # every pixel of the 5 scenes counted once
        assert torch.equal(two[mode]["confusion_matrix"], cm), mode
        assert two[mode]["miou"] == one[mode]["miou"]
        assert two[mode]["examples"].shape == (4, 64, 64)
        assert torch.equal(two[mode]["examples"], one[mode]["examples"]), mode

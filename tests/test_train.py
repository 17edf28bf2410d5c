"""End-to-end training with real DeepSpeed and real processes on CPU (gloo).

Each test trains the `clip-nano` preset on digits shards (real handwritten digits) for a few
steps. Reference behaviours: an uninterrupted run (for resume), the loss at the start of the
same run (for ZeRO stages), the previous published checkpoint (for a kill during a save).
"""

import json
import math
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import ROOT, run, torchrun
from vlp.loading import load_state
from vlp.train.checkpoint import find_latest, read_meta

pytestmark = pytest.mark.slow
CONFIG = "tests/configs/digits_nano.yaml"


def overrides(run_dir, shards, **extra):
    base = {"run_dir": run_dir, "data.train_shards": f"{shards}/train.json"}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def train(run_dir, shards, nproc=1, resume=False, check=True, **extra):
    args = ["--config", CONFIG, *overrides(run_dir, shards, **extra)]
    if resume:
        args += ["--resume", "latest"]
    if nproc == 1:
        return run([sys.executable, "train.py", *args], check=check)
    return torchrun(nproc, "train.py", *args, check=check)


def weights(run_dir):
    return load_file(str(run_dir / "model.safetensors"))


def assert_same_weights(a, b, tol=1e-6):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= tol, f"max abs weight difference {worst:.3e}"


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


# the 2-process ZeRO-1 case (50 s) is extended: test_resume.py resumes 2-process runs exactly in several layouts
@pytest.mark.parametrize("nproc, zero", [(1, 0), pytest.param(2, 1, marks=pytest.mark.extended)])
def test_resume_continues_the_same_trajectory(tmp_path, digits_shards_dir, nproc, zero):
    # 1500 samples: one rank sees an epoch boundary at ~28 steps of 50, two ranks at ~14
    steps, first = (32, 11) if nproc == 1 else (18, 7)
    full, split = tmp_path / "full", tmp_path / "split"
    train(full, digits_shards_dir, nproc, **{"train.steps": steps, "train.zero_stage": zero})
    train(split, digits_shards_dir, nproc, **{"train.steps": steps, "train.zero_stage": zero,
                                               "train.stop_after_steps": first})
    assert read_meta(find_latest(split / "checkpoints"))["step"] == first
    assert not (split / "model.safetensors").exists()
    train(split, digits_shards_dir, nproc, resume=True, **{"train.steps": steps, "train.zero_stage": zero})
    assert read_meta(find_latest(split / "checkpoints"))["epoch"] >= 1  # crossed an epoch boundary
    assert_same_weights(weights(full), weights(split))
    assert losses(full) == pytest.approx(losses(split), rel=1e-6)


# stage 2 sits between 1 (optimizer state sharded) and 3 (parameters too): an extended re-check
@pytest.mark.parametrize("zero", [1, pytest.param(2, marks=pytest.mark.extended), 3])
def test_two_process_zero_stages_loss_falls(tmp_path, digits_shards_dir, zero):
    run_dir = tmp_path / f"zero{zero}"
    train(run_dir, digits_shards_dir, 2, **{"train.steps": 48, "train.zero_stage": zero})
    ls = losses(run_dir)
    assert len(ls) == 48
    start, end = sum(ls[:4]) / 4, sum(ls[-8:]) / 8
    # falls, and ends below chance (ln of the global batch of 2 x 50): the pairs are being matched
    assert end < start - 0.3 and end < math.log(100) - 0.05, ls
    # the consolidated export equals the DeepSpeed checkpoint, consolidated again from its ZeRO shards
    cfg_a, sd_a = load_state(run_dir)
    cfg_b, sd_b = load_state(find_latest(run_dir / "checkpoints"))
    assert cfg_a == cfg_b
    assert_same_weights(sd_a, sd_b, tol=0.0)


def test_kill_during_save_leaves_previous_checkpoint(tmp_path, digits_shards_dir):
    run_dir = tmp_path / "killed"
    args = [CONFIG, *overrides(run_dir, digits_shards_dir, **{
        "train.steps": 6, "train.checkpoint_every_n_steps": 2})]
    proc = run([sys.executable, str(ROOT / "tests/workers/kill_during_save.py"), *args], check=False)
    assert proc.returncode == 17, proc.stderr[-3000:]
    ckpts = run_dir / "checkpoints"
    assert (ckpts / ".tmp-step_00000004").is_dir()  # the torn write is there ...
    latest = find_latest(ckpts)
    assert latest.name == "step_00000002"  # ... and invisible
    cfg, sd = load_state(latest)
    assert sd and all(torch.isfinite(v).all() for v in sd.values())
    train(run_dir, digits_shards_dir, resume=True, **{"train.steps": 6, "train.checkpoint_every_n_steps": 2})
    assert read_meta(find_latest(ckpts))["step"] == 6
    assert not (ckpts / ".tmp-step_00000004").exists()


def test_eval_cli_on_trained_run(tmp_path, digits_shards_dir):
    run_dir = tmp_path / "evalrun"
    train(run_dir, digits_shards_dir, **{"train.steps": 30, "evals.digits.max_samples": 0})
    proc = run([sys.executable, "-m", "vlp.eval", "zeroshot", "--checkpoint", str(run_dir),
                "--dataset", "digits", "--output", str(tmp_path / "res.json")])
    res = json.loads((tmp_path / "res.json").read_text())
    assert "top-1" in proc.stdout
    assert res["num_samples"] == 297 and 0.0 <= res["top1"] <= res["top5"] <= 1.0
    # the exported weights, loaded in a new process, score exactly what the live model scored
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    live = [r for r in rows if "eval/digits/top1" in r][-1]
    assert live["eval/digits/top1"] == pytest.approx(res["top1"], abs=1e-9)
    assert live["eval/digits/top5"] == pytest.approx(res["top5"], abs=1e-9)
    # the checkpoint directory (DeepSpeed format) evaluates the same as the exported weights
    proc2 = run([sys.executable, "-m", "vlp.eval", "zeroshot", "--checkpoint",
                 str(find_latest(run_dir / "checkpoints")), "--dataset", "digits"])
    assert json.loads(proc2.stdout.strip().splitlines()[-1])["top1"] == res["top1"]


@pytest.mark.parametrize("extra, needle", [
    ({"data.train_shards": "/nonexistent/shard-{000..003}.tar"}, "/nonexistent/shard-000.tar"),
    ({"data.train_shards": ""}, "data.train_shards"),
    ({"optim.learning_rate": 0.1}, "optim.learning_rate"),
    ({"model.name": "clip-huge"}, "clip-huge"),
    ({"model.overrides": "{text: {layerz: 2}}"}, "text.layerz"),
])
def test_bad_input_fails_fast_with_named_input(tmp_path, digits_shards_dir, extra, needle):
    proc = train(tmp_path / "bad", digits_shards_dir, check=False, **extra)
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_existing_run_needs_resume_and_a_checkpoint_of_another_model_is_refused(tmp_path, digits_shards_dir):
    """One 2-step run, refused twice: started again without --resume, and resumed with another model."""
    run_dir = tmp_path / "again"
    train(run_dir, digits_shards_dir, **{"train.steps": 2})
    proc = train(run_dir, digits_shards_dir, check=False, **{"train.steps": 2})
    assert proc.returncode == 2 and "--resume latest" in proc.stderr
    proc = train(run_dir, digits_shards_dir, resume=True, check=False,
                 **{"train.steps": 4, "model.overrides": "{text: {layers: 3}}"})
    assert proc.returncode == 2
    assert "step_00000002" in proc.stderr and "clip-nano" in proc.stderr


def test_wandb_offline_logging_without_network(tmp_path, digits_shards_dir):
    run_dir = tmp_path / "wb"
    train(run_dir, digits_shards_dir, **{"train.steps": 3, "logging.wandb": True, "logging.wandb_mode": "offline"})
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline_runs, "wandb wrote no offline run"
    assert any(offline_runs[0].glob("*.wandb"))


def test_bf16_run_exports_fp32_master_weights(tmp_path, digits_shards_dir):
    run_dir = tmp_path / "bf16"
    train(run_dir, digits_shards_dir, **{"train.steps": 4, "train.precision": "bf16", "train.zero_stage": 1})
    sd = weights(run_dir)
    assert all(v.dtype == torch.float32 for v in sd.values())
    # the masters carry bits a bf16 copy of the module would have rounded away
    w = sd["image_proj.weight"]
    assert not torch.equal(w, w.bfloat16().float())


def test_corrupt_samples_are_skipped_counted_and_reported(tmp_path, digits_shards_dir):
    import tarfile

    import webdataset as wds

    bad_dir = tmp_path / "bad_shards"
    bad_dir.mkdir()
    shards = sorted(digits_shards_dir.glob("train-*.tar"))
    for i, src in enumerate(shards):  # each shard: a corrupt png and a caption-less sample up front
        with wds.TarWriter(str(bad_dir / src.name)) as out:
            out.write({"__key__": f"broken_{i}", "png": b"\x89PNG\r\n\x1a\n not really a png", "txt": "a three"})
            out.write({"__key__": f"nocaption_{i}", "png": _png()})
            with tarfile.open(src) as tf:
                members = {}
                for m in tf.getmembers():
                    key, ext = m.name.split(".", 1)
                    members.setdefault(key, {})[ext] = tf.extractfile(m).read()
            for key, fields in members.items():
                out.write({"__key__": key, **fields})
    spec = f"{bad_dir}/train-{{000000..{len(shards) - 1:06d}}}.tar"
    run_dir = tmp_path / "bad"
    proc = train(run_dir, digits_shards_dir, **{"data.train_shards": spec, "train.steps": 36})
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epoch0 = [r for r in rows if r.get("epoch_end") == 0]
    assert epoch0 and epoch0[0]["skipped_samples_epoch"] == 2 * len(shards)
    assert "epoch 0: skipped 16 samples" in proc.stdout
    assert (run_dir / "model.safetensors").is_file()


def _png() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(buf, format="png")
    return buf.getvalue()


def test_resume_on_another_world_size(tmp_path, digits_shards_dir):
    zero1 = tmp_path / "zero1"
    train(zero1, digits_shards_dir, 2, **{"train.steps": 8, "train.stop_after_steps": 4, "train.zero_stage": 1})
    # ZeRO-partitioned optimizer state cannot move to another world size or stage: refused up front
    proc = train(zero1, digits_shards_dir, 1, resume=True, check=False, **{"train.steps": 8, "train.zero_stage": 1})
    assert proc.returncode == 2 and "written by 2 ranks" in proc.stderr and "Traceback" not in proc.stderr
    proc = train(zero1, digits_shards_dir, 2, resume=True, check=False, **{"train.steps": 8})
    assert proc.returncode != 0 and "train.zero_stage=1" in proc.stderr  # torchrun reports exit 1
    # without ZeRO the full state is in one file and resumes on another world size: test_resume.py's
    # elastic resume (2 ranks -> 1 and 1 -> 2, each key once over the epoch)


def test_resume_from_checkpoint_dir_uses_its_saved_config(tmp_path, digits_shards_dir):
    run_dir = tmp_path / "saved"
    train(run_dir, digits_shards_dir, **{"train.steps": 6, "train.stop_after_steps": 3, "optim.lr": 1e-3})
    ckpt_dir = find_latest(run_dir / "checkpoints")
    run([sys.executable, "train.py", "--resume", str(ckpt_dir)])
    meta = read_meta(find_latest(run_dir / "checkpoints"))
    assert meta["step"] == 6 and meta["run_config"]["optim"]["lr"] == 1e-3
    assert (run_dir / "model.safetensors").is_file()


def test_siglip_two_process_training(tmp_path, digits_shards_dir):
    run_dir = tmp_path / "siglip"
    train(run_dir, digits_shards_dir, 2, **{"train.steps": 30, "model.name": "siglip-nano", "loss.name": "siglip",
                                             "train.zero_stage": 1})
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ls = [r["loss"] for r in rows if "loss" in r]
    assert sum(ls[-5:]) / 5 < sum(ls[:3]) / 3 - 0.5, ls
    cfg, sd = load_state(run_dir)
    assert cfg.init_logit_bias == -10.0 and "logit_bias" in sd and sd["logit_bias"].item() != -10.0
    proc = train(tmp_path / "mismatch", digits_shards_dir, check=False, **{"loss.name": "siglip"})
    assert proc.returncode == 2 and "loss.name=siglip" in proc.stderr


# siglip is an extended re-check: test_loss.py checks tiled sigmoid values and 2-process gradients
@pytest.mark.parametrize("loss", ["clip", pytest.param("siglip", marks=pytest.mark.extended)])
def test_tiled_loss_trains_the_same_weights(tmp_path, digits_shards_dir, loss):
    plain, tiled = tmp_path / "plain", tmp_path / "tiled"
    base = {"train.steps": 6} if loss == "clip" else {"train.steps": 6, "model.name": "siglip-nano", "loss.name": "siglip"}
    train(plain, digits_shards_dir, 2, **base)
    train(tiled, digits_shards_dir, 2, **base, **{"loss.tile_size": 7})
    assert_same_weights(weights(plain), weights(tiled), tol=1e-5)

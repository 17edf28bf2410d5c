"""Faults of long runs, injected into real training runs: corrupt checkpoints, failed saves.

References: checksums computed here with hashlib, the weights of an uninterrupted run, and the
checkpoint directories as they were before the fault.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

from tests.helpers import run
from tests.test_train import assert_same_weights, weights
from vlp.train.checkpoint import find_latest, read_meta

CONFIG = "tests/configs/digits_nano.yaml"


def train(run_dir: Path, shards: Path, resume: bool = False, check: bool = True, prefix: list[str] | None = None,
          **extra):
    kv = {"run_dir": run_dir, "data.train_shards": f"{shards}/train.json", "train.steps": 8,
          "train.checkpoint_every_n_steps": 4, "train.keep_last_n_checkpoints": 3, "evals": "{}", **extra}
    args = [sys.executable, "train.py", "--config", CONFIG, *[f"{k}={v}" for k, v in kv.items()]]
    return run([*(prefix or []), *args, *(["--resume", "latest"] if resume else [])], check=check)


def test_corrupt_newest_checkpoint_is_named_skipped_and_resume_is_exact(tmp_path, digits_shards_dir):
    run_dir = tmp_path / "run"
    train(run_dir, digits_shards_dir)
    ckpts = run_dir / "checkpoints"
    newest, previous = ckpts / "step_00000008", ckpts / "step_00000004"
    meta = read_meta(newest)
    # every file of the checkpoint is recorded with its size and SHA-256 (computed here independently)
    on_disk = sorted(p.relative_to(newest).as_posix() for p in newest.rglob("*") if p.is_file() and p.name != "meta.json")
    assert sorted(meta["files"]) == on_disk
    for name, rec in meta["files"].items():
        data = (newest / name).read_bytes()
        assert rec == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    reference = weights(run_dir)
    verify = [sys.executable, "-m", "vlp.checkpoint", "verify", str(run_dir)]
    assert run(verify).returncode == 0

    states = next(newest.glob("*model_states.pt"))
    with open(states, "r+b") as f:  # a full disk or an interrupted copy: the file ends early
        f.truncate(states.stat().st_size // 2)
    rng = newest / "rng_rank00000.pt"
    data = bytearray(rng.read_bytes())
    data[len(data) // 2] ^= 0x10  # one flipped bit, same size
    rng.write_bytes(bytes(data))

    out = run(verify, check=False)
    assert out.returncode == 1
    assert f"{states}: {states.stat().st_size} bytes, {meta['files'][states.name]['bytes']} recorded" in out.stdout
    assert f"{rng}: SHA-256 differs" in out.stdout
    assert f"--resume latest would use {previous}" in out.stdout

    (run_dir / "model.safetensors").unlink()
    proc = train(run_dir, digits_shards_dir, resume=True)
    log = proc.stdout + proc.stderr
    assert f"checkpoint '{newest}' is corrupt, skipped" in log and str(states) in log and str(rng) in log
    assert f"resumed from {previous} at step 4" in log
    assert_same_weights(weights(run_dir), reference, tol=1e-6)
    assert run(verify).returncode == 0  # step 8 was written anew


def test_explicit_corrupt_resume_is_refused_naming_the_file(tmp_path, digits_shards_dir):
    run_dir = tmp_path / "run"
    train(run_dir, digits_shards_dir, **{"train.steps": 4})
    ckpt = find_latest(run_dir / "checkpoints")
    meta_file = next(p for p in sorted(ckpt.iterdir()) if p.name.endswith("optim_states.pt") or
                     p.name.endswith("model_states.pt"))
    meta_file.write_bytes(meta_file.read_bytes()[:100])
    proc = run([sys.executable, "train.py", "--resume", str(ckpt)], check=False)
    assert proc.returncode == 2
    assert f"--resume '{ckpt}' is corrupt: {meta_file}: 100 bytes" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_failed_save_keeps_previous_checkpoint_and_latest(tmp_path, digits_shards_dir):
    run_dir = tmp_path / "run"
    train(run_dir, digits_shards_dir, **{"train.steps": 8, "train.stop_after_steps": 4})
    ckpts = run_dir / "checkpoints"
    before = {p.relative_to(ckpts).as_posix(): p.read_bytes() for p in ckpts.rglob("*") if p.is_file()}
    size = next((ckpts / "step_00000004").glob("*model_states.pt")).stat().st_size
    # a file size limit below one model-states file: the next save cannot complete (EFBIG, as ENOSPC would)
    limit_kb = size // 1024 // 2
    proc = train(run_dir, digits_shards_dir, resume=True, check=False,
                 prefix=["bash", "-c", f'ulimit -f {limit_kb}; exec "$@"', "bash"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr
    assert "error: checkpoint step_00000008 could not be written:" in err and "model_states.pt" in err
    assert "bytes free" in err and "(the size of step_00000004)" in err
    assert f"'{ckpts / 'step_00000004'}' and '{ckpts / 'latest'}' are unchanged" in err
    assert "Traceback" not in err
    after = {p.relative_to(ckpts).as_posix(): p.read_bytes() for p in ckpts.rglob("*") if p.is_file()}
    assert after == before  # nothing half-written is left, nothing earlier is touched
    assert (ckpts / "latest").read_text() == "step_00000004"
    # with the limit lifted the run continues from the intact checkpoint
    shutil.rmtree(run_dir / "consumed", ignore_errors=True)
    proc = train(run_dir, digits_shards_dir, resume=True)
    assert "resumed from" in proc.stdout + proc.stderr
    assert json.loads((ckpts / "step_00000008" / "meta.json").read_text())["step"] == 8

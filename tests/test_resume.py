"""Exact, elastic resume through real training runs (torchrun, gloo, DeepSpeed on CPU).

Every optimizer step's sample keys are logged (data.log_consumed_keys). Reference: the keys
stored in the tar files, each exactly once (1500 digits, batch 25: every layout used here
divides the epoch evenly, so nothing is left over), and the weights of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, free_port, run, torchrun
from tests.test_data_position import tar_keys
from tests.test_train import assert_same_weights, weights
from vlp.train.checkpoint import find_latest, read_meta

pytestmark = pytest.mark.slow
CONFIG = "tests/configs/resume_nano.yaml"


def args(run_dir: Path, shards: Path, **extra) -> list[str]:
    kv = {"run_dir": run_dir, "data.train_shards": f"{shards}/train.json", **extra}
    return ["--config", CONFIG, *[f"{k}={v}" for k, v in kv.items()]]


def train(nproc: int, run_dir: Path, shards: Path, resume: bool = False, **extra):
    a = args(run_dir, shards, **extra) + (["--resume", "latest"] if resume else [])
    if nproc == 1:
        return run([sys.executable, "train.py", *a])
    return torchrun(nproc, "train.py", *a)


def effective_steps(run_dir: Path) -> dict[tuple[int, int], list[str]]:
    """(rank, step) -> keys of the step that counts: a step redone after a restart replaces the
    record of the attempt that died before checkpointing it."""
    out: dict[tuple[int, int], list[str]] = {}
    for f in sorted((run_dir / "consumed").glob("rank*.jsonl")):
        rank = int(f.stem[4:])
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            out[(rank, rec["step"])] = rec["keys"]
    return out


def all_keys(run_dir: Path) -> list[str]:
    return sorted(k for keys in effective_steps(run_dir).values() for k in keys)


@pytest.mark.parametrize("before, after, k, total", [
    ((2, 2), (1, 3), 6, 54),  # 2 ranks x 2 workers -> 1 rank x 3 workers after 6 steps
    ((1, 2), (2, 1), 8, 34),  # 1 rank x 2 workers -> 2 ranks x 1 worker after 8 steps
])
def test_elastic_resume_consumes_every_key_once(tmp_path, digits_shards_dir, before, after, k, total):
    run_dir = tmp_path / "elastic"
    train(before[0], run_dir, digits_shards_dir, **{"data.workers": before[1], "train.steps": total,
                                                     "train.stop_after_steps": k})
    assert read_meta(find_latest(run_dir / "checkpoints"))["step"] == k
    proc = train(after[0], run_dir, digits_shards_dir, resume=True, **{"data.workers": after[1], "train.steps": total})
    if before[0] != after[0]:
        assert f"written by {before[0]} ranks, resuming on {after[0]}" in proc.stdout
    assert all_keys(run_dir) == tar_keys(digits_shards_dir)  # each key exactly once over the epoch
    assert (run_dir / "model.safetensors").is_file()


# extended: test_multinode.py kills a rank with SIGKILL under torchrun and checks the restart resumes from a
# checkpoint with the uninterrupted run's keys and weights; this adds the single-node, static-rendezvous case
@pytest.mark.extended
def test_torchrun_restarts_after_kill9_and_resumes_exactly(tmp_path, digits_shards_dir):
    """kill -9 of one rank: torchrun restarts the group, `--resume latest` picks up the newest
    checkpoint, the steps after it are redone, and the final weights equal an uninterrupted run."""
    ref = tmp_path / "ref"
    train(2, ref, digits_shards_dir, **{"train.checkpoint_every_n_steps": 4})
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=3",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "train.py",
           *args(run_dir, digits_shards_dir, **{"train.checkpoint_every_n_steps": 4}), "--resume", "latest"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = run_dir / "consumed" / "rank00001.jsonl"
    victim = None
    deadline = time.monotonic() + 300
    while victim is None and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
        lines = log.read_text().splitlines() if log.is_file() else []
        rec = json.loads(lines[-1]) if lines and lines[-1].endswith("}") else None
        if rec is not None and rec["step"] >= 10:  # past the checkpoint at step 8, before the one at 12
            victim = rec["pid"]
            os.kill(victim, signal.SIGKILL)
    out, _ = proc.communicate(timeout=600)
    assert victim is not None, f"run ended before it could be killed:\n{out[-3000:]}"
    assert proc.returncode == 0, out[-4000:]
    pids = {json.loads(line)["pid"] for line in log.read_text().splitlines()}
    assert len(pids) == 2, "expected one restart of the worker group"
    assert "resumed from" in out
    redone = [json.loads(line) for line in log.read_text().splitlines()]
    first_try = {r["step"]: r["keys"] for r in redone if r["pid"] == victim}
    second_try = {r["step"]: r["keys"] for r in redone if r["pid"] != victim}
    resumed_at = min(second_try) - 1
    assert resumed_at >= 8 and resumed_at % 4 == 0
    # steps after the checkpoint were redone with the very same samples (exact position)
    assert all(first_try[s] == second_try[s] for s in first_try if s > resumed_at)
    assert all_keys(run_dir) == all_keys(ref) == tar_keys(digits_shards_dir)
    assert_same_weights(weights(ref), weights(run_dir))


def test_a_changed_read_order_is_refused_mid_epoch(tmp_path, digits_shards_dir):
    """The data position is a cursor into the epoch's read order: changing what fixes that order
    (here data.shuffle_buffer) inside an epoch would re-read consumed samples and skip others."""
    run_dir = tmp_path / "run"
    train(1, run_dir, digits_shards_dir, **{"train.stop_after_steps": 2})
    proc = run([sys.executable, "train.py", *args(run_dir, digits_shards_dir, **{"data.shuffle_buffer": 40}),
                "--resume", "latest"], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "read with data.shuffle_buffer=100; this run has data.shuffle_buffer=40" in proc.stderr
    train(1, run_dir, digits_shards_dir, resume=True, **{"train.stop_after_steps": 1})  # unchanged: resumes

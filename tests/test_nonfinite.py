"""Non-finite gradients (issue 18, part 3): a NaN batch planted by key (VLP_FAULTS) in a real run.

References: the weights a skipped step leaves must equal, bit for bit, the checkpoint before it
(the step changed nothing); a rewound run must never train on the planted step's samples
(the audit log of consumed keys); torch's own AdamW for the fp32 guard."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.helpers import run, torchrun
from vlp.loading import load_state
from vlp.train.checkpoint import tag_for
from vlp.train.nonfinite import NonFiniteGuard, NonFiniteStop, guard_fp32_step

CONFIG = "tests/configs/digits_nano.yaml"


def _args(run_dir: Path, shards: Path, **extra) -> list[str]:
    kv = {"run_dir": run_dir, "data.train_shards": f"{shards}/train.json", "train.steps": 6,
          "train.checkpoint_every_n_steps": 2, "evals": "{}", **extra}
    return ["--config", CONFIG, *[f"{k}={v}" for k, v in kv.items()]]


def _nan(*keys: str) -> dict[str, str]:
    return {"VLP_FAULTS": json.dumps({"nan_keys": list(keys)})}


def _consumed(run_dir: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "consumed" / f"rank{rank:05d}.jsonl").read_text().splitlines()]


def _state(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_state(run_dir / "checkpoints" / tag_for(step))[1]


def _assert_equal_and_finite(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.isfinite(b[k].float()).all() for k in b)
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst == 0.0, f"a skipped step changed the weights by {worst:.3e}"


@pytest.fixture(scope="module")
def keys_by_step(digits_shards_dir, tmp_path_factory) -> dict[int, list[list[str]]]:
    """step -> [rank 0's keys, rank 1's keys] of an unfaulted 2-process run (the audit log)."""
    run_dir = tmp_path_factory.mktemp("nonfinite") / "reference"
    torchrun(2, "train.py", *_args(run_dir, digits_shards_dir, **{"data.log_consumed_keys": "true"}))
    rows = [_consumed(run_dir, r) for r in (0, 1)]
    return {row["step"]: [rows[0][i]["keys"], rows[1][i]["keys"]] for i, row in enumerate(rows[0])}


@pytest.mark.slow
def test_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path, digits_shards_dir, keys_by_step):
    planted = keys_by_step[3][1][0]  # in rank 1's batch: rank 0 learns of it only through the reduced gradient
    run_dir = tmp_path / "skip"
    proc = torchrun(2, "train.py", *_args(run_dir, digits_shards_dir, **{
        "train.checkpoint_every_n_steps": 1, "train.keep_last_n_checkpoints": 0}), env=_nan(planted))
    out = proc.stdout + proc.stderr
    assert "step 3: non-finite gradient (optimizer step not applied)" in out
    assert "skipped (1 so far)" in out and f"(all keys: {run_dir / 'nonfinite.jsonl'})" in out
    logged = [json.loads(line) for line in (run_dir / "nonfinite.jsonl").read_text().splitlines()]
    assert len(logged) == 1 and logged[0]["step"] == 3 and logged[0]["action"] == "skip"
    assert sorted(logged[0]["keys"]) == sorted(f"train/{k}" for k in keys_by_step[3][0] + keys_by_step[3][1])
    assert f"train/{planted}" in logged[0]["keys"]
    # the skipped step left the weights of step 2 exactly (bit for bit); the run then trained on
    _assert_equal_and_finite(_state(run_dir, 2), _state(run_dir, 3))
    assert not torch.equal(_state(run_dir, 3)["text_proj.weight"], _state(run_dir, 4)["text_proj.weight"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_steps"] for r in rows if "nonfinite_steps" in r] == [1]
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert all(torch.isfinite(v.float()).all() for v in _state(run_dir, 6).values())
    assert json.loads((run_dir / "checkpoints" / tag_for(6) / "meta.json").read_text())["nonfinite"]["skipped"] == 1


@pytest.mark.slow
def test_rewind_reloads_the_checkpoint_and_never_trains_on_the_step(tmp_path, digits_shards_dir, keys_by_step):
    planted = keys_by_step[3][0][0]
    bad = set(keys_by_step[3][0]) | set(keys_by_step[3][1])  # the whole global batch of the step
    run_dir = tmp_path / "rewind"
    proc = torchrun(2, "train.py", *_args(run_dir, digits_shards_dir, **{
        "train.nonfinite.policy": "rewind", "data.log_consumed_keys": "true"}), env=_nan(planted))
    out = proc.stdout + proc.stderr
    assert f"rewound from step 3 to {run_dir / 'checkpoints' / tag_for(2)} (step 2); 100 samples excluded" in out
    trained = [row for r in (0, 1) for row in _consumed(run_dir, r)]
    assert sorted({row["step"] for row in trained}) == [1, 2, 3, 4, 5, 6]
    assert not bad & {k for row in trained for k in row["keys"]}
    meta = json.loads((run_dir / "checkpoints" / tag_for(6) / "meta.json").read_text())
    assert {k for _, k in meta["nonfinite"]["excluded"]} == bad
    assert all(torch.isfinite(v.float()).all() for v in _state(run_dir, 6).values())


@pytest.fixture(scope="module")
def one_process_keys(digits_shards_dir, tmp_path_factory) -> list[list[str]]:
    """The keys of each of the first 3 steps of an unfaulted 1-process fp32 run. The data order does not
    depend on the ZeRO stage or precision; if it did, the keys planted below would miss step 3 and the
    tests' step-3 assertions would fail."""
    run_dir = tmp_path_factory.mktemp("nonfinite") / "one-process"
    run(["python", "train.py", *_args(run_dir, digits_shards_dir, **{
        "train.steps": 3, "train.checkpoint_every_n_steps": 0, "data.log_consumed_keys": "true"})])
    return [row["keys"] for row in _consumed(run_dir, 0)]


@pytest.mark.slow
@pytest.mark.parametrize("zero, precision", [(3, "fp32"), (1, "bf16")])
def test_deepspeeds_own_optimizers_skip_too(tmp_path, digits_shards_dir, zero, precision, one_process_keys):
    """ZeRO and bf16 take DeepSpeed's overflow test rather than vlp's fp32 guard (one process)."""
    first = one_process_keys[2][0]
    run_dir = tmp_path / "nan"
    proc = run(["python", "train.py", *_args(run_dir, digits_shards_dir, **{
        "train.zero_stage": zero, "train.precision": precision, "train.stop_after_steps": 3})], env=_nan(first))
    assert "step 3: non-finite gradient" in proc.stdout + proc.stderr
    _assert_equal_and_finite(_state(run_dir, 2), _state(run_dir, 3))


@pytest.mark.slow
def test_stop_policy_names_the_step_and_keys_and_publishes_nothing_nonfinite(tmp_path, digits_shards_dir,
                                                                             one_process_keys):
    planted = one_process_keys[2][7]
    run_dir = tmp_path / "stop"
    proc = run(["python", "train.py", *_args(run_dir, digits_shards_dir, **{"train.nonfinite.policy": "stop"})],
               env=_nan(planted), check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "error: step 3: non-finite gradient" in proc.stderr and f"train/{planted}" in proc.stderr
    assert "stopping (train.nonfinite.policy=stop)" in proc.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir()) == [tag_for(2)]


def test_bad_policy_and_bad_faults_are_refused_before_training(tmp_path, digits_shards_dir):
    proc = run(["python", "train.py", *_args(tmp_path / "a", digits_shards_dir, **{
        "train.nonfinite.policy": "ignore"})], check=False)
    assert proc.returncode == 2 and "train.nonfinite.policy: unknown 'ignore' (known: skip, rewind, stop)" in proc.stderr
    proc = run(["python", "train.py", *_args(tmp_path / "b", digits_shards_dir)],
               env={"VLP_FAULTS": '{"nan": 1}'}, check=False)
    assert proc.returncode == 2 and "VLP_FAULTS: unknown fault(s) ['nan']" in proc.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_guard_counts_in_a_row_and_tells_fp16_overflow_apart():
    g = NonFiniteGuard("skip", 2, loss_scaling=True)
    assert g.on_skipped(5, [("s", "k1")], loss_bad=False, can_rewind=True) == ("overflow", "")
    assert g.skipped == 0  # a loss-scale overflow is not a non-finite step
    action, msg = g.on_skipped(6, [("s", "k1")], loss_bad=True, can_rewind=True)
    assert action == "skip" and "step 6" in msg and "s/k1" in msg
    g.applied()
    g.on_skipped(8, [("s", "k2")], loss_bad=True, can_rewind=True)
    with pytest.raises(NonFiniteStop, match=r"step 9: .* s/k3.*stopping after 2 in a row"):
        g.on_skipped(9, [("s", "k3")], loss_bad=True, can_rewind=True)
    r = NonFiniteGuard("rewind", 2, loss_scaling=False)
    assert r.on_skipped(3, [("s", "a")], loss_bad=False, can_rewind=False)[0] == "skip"  # no checkpoint yet
    r.applied()
    assert r.on_skipped(4, [("s", "b")], loss_bad=False, can_rewind=True)[0] == "rewind"
    assert r.excluded == {("s", "b")}
    r.applied()
    r.on_skipped(4, [("s", "c")], loss_bad=False, can_rewind=True)
    r.applied()
    with pytest.raises(NonFiniteStop, match="rewinds to the same checkpoint"):
        r.on_skipped(4, [("s", "d")], loss_bad=False, can_rewind=True)
    fresh = NonFiniteGuard("skip", 5, False)
    fresh.load(r.state())
    assert fresh.excluded == {("s", "b"), ("s", "c")} and fresh.skipped == r.skipped


def test_fp32_guard_skips_a_nonfinite_update_and_otherwise_is_adamw():
    torch.manual_seed(0)
    w0 = torch.randn(4, 3)
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    guarded, plain = torch.optim.AdamW([a], lr=0.1), torch.optim.AdamW([b], lr=0.1)
    guard_fp32_step(guarded)
    sched = torch.optim.lr_scheduler.LambdaLR(guarded, lambda s: 1.0)  # wraps the guarded step, as the trainer's
    g = torch.randn(4, 3)
    a.grad, b.grad = g.clone(), g.clone()
    guarded.step()
    plain.step()
    sched.step()
    assert not guarded.overflow and torch.equal(a, b)
    a.grad = torch.full((4, 3), float("nan"))
    before = a.detach().clone()
    guarded.step()
    assert guarded.overflow and torch.equal(a.detach(), before)
    assert guarded.state[a]["step"] == plain.state[b]["step"]  # no optimizer state moved either

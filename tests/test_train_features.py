"""Training features for large batches and fine-tuning: exact (GradCache) accumulation, LiT
locking, EMA, gradient checkpointing, torch.compile, precision of the loss.

References: one DeepSpeed step on the k-times-larger batch and a plain-torch full-graph
computation (accumulation), the weights before training (locking), an EMA computed by hand
from the per-step checkpoints (EMA), the same model without checkpointing / compilation.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import run, torchrun

ACCUM_TOL = 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_exact_accumulation_equals_the_large_batch(tmp_path, nproc):
    out = tmp_path / "res.pt"
    if nproc == 1:
        import sys

        run([sys.executable, "tests/workers/exact_accumulation.py", str(out)])
    else:
        torchrun(2, "tests/workers/exact_accumulation.py", str(out))
    res = torch.load(out, weights_only=True)
    cases = {f"zero{z}/{m}/{c}" for z in (0, 2) for m in ("clip-nano", "siglip-nano")
             for c in ("clip0.0", "clip0.05", "dropout")}
    assert set(res) == cases
    for key, r in res.items():
        # weight deltas of one step: unclipped they are about the gradient itself
        assert r["delta_rel"] <= ACCUM_TOL, (key, r)
        if "weight_rel" in r:
            assert r["weight_rel"] <= ACCUM_TOL, (key, r)
            assert r["max_delta"] > 1e-2, (key, r)  # the step moved the weights: the check has teeth
            assert r["loss_exact"] == pytest.approx(r["loss_ref"], rel=1e-6), (key, r)

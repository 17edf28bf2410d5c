"""bench/gpu_check.sh --cpu end to end (about 3 minutes on 2 cores, so opt-in: VLP_TEST_GPU_CHECK=1).

The script itself asserts what it checks (loss falls, resume from step 4 under ZeRO 1/2/3 in bf16,
both throughput sides ran); here its exit code and summary are checked."""

from __future__ import annotations

import os

import pytest

from tests.helpers import run


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("VLP_TEST_GPU_CHECK") != "1", reason="set VLP_TEST_GPU_CHECK=1 (3 minutes)")
def test_gpu_check_cpu_mode_passes(tmp_path):
    proc = run(["bash", "bench/gpu_check.sh", "--cpu", "--out", str(tmp_path)], timeout=1200)
    summary = (tmp_path / "summary.txt").read_text()
    for stage in (1, 2, 3):
        assert f"smoke ZeRO-{stage} bf16: ok" in summary
    assert "ratio vlp / open_clip: throughput" in summary and "samples/s" in summary
    assert summary.strip().endswith("gpu_check: all passed"), proc.stdout[-3000:]

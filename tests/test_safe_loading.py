"""Checkpoints are read without running code: a planted pickle payload is refused, naming the file."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from vlp.interop.open_clip import load_open_clip_checkpoint
from vlp.loading import LoadError, consolidate_deepspeed, load_state, safe_torch_load
from vlp.models import create_model
from vlp.models.families import config_to_dict


class _Payload:
    """Unpickling this calls os.system, which would create `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(path: Path, marker: Path) -> Path:
    torch.save({"module": {"model.logit_scale": torch.zeros(1)}, "evil": _Payload(marker)}, path)
    return path


def test_plain_load_refuses_payload(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bad = _plant(tmp_path / "weights.bin", marker)
    with pytest.raises(LoadError, match="weights.bin") as err:
        safe_torch_load(bad)
    assert "refusing" in str(err.value)
    with pytest.raises(LoadError, match="weights.bin"):
        load_open_clip_checkpoint(bad, "clip-nano")
    assert not marker.exists()


def test_deepspeed_dir_with_payload_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "step_00000001"
    ckpt.mkdir()
    cfg = create_model("clip-nano").config
    (ckpt / "meta.json").write_text(json.dumps({"model_config": config_to_dict(cfg), "step": 1}))
    _plant(ckpt / "mp_rank_00_model_states.pt", marker)
    with pytest.raises(LoadError, match="mp_rank_00_model_states.pt"):
        load_state(ckpt)
    assert not marker.exists()


def test_deepspeed_optimizer_payload_refused(tmp_path: Path) -> None:
    """The DeepSpeed allowlist (inert stand-ins) does not open the door to anything else."""
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"module": {}, "param_shapes": [{"model.w": torch.Size([2])}],
                "ds_config": {"zero_optimization": {"stage": 2}}}, ckpt / "mp_rank_00_model_states.pt")
    _plant(ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    with pytest.raises(LoadError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        consolidate_deepspeed(ckpt)
    assert not marker.exists()


def test_zero2_consolidation_without_deepspeed_classes(tmp_path: Path) -> None:
    """A hand-written ZeRO-2 layout (2 ranks, padded tail) is unflattened in parameter order."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    a, b = torch.randn(3, 2), torch.randn(5)
    flat = torch.cat([a.flatten(), b, torch.zeros(1)])  # 12 values, split 6 / 6
    torch.save({"module": {}, "buffer_names": [], "param_shapes": [{"model.a": a.shape, "model.b": b.shape}],
                "ds_config": {"zero_optimization": {"stage": 2}}}, ckpt / "mp_rank_00_model_states.pt")
    for r in range(2):
        torch.save({"optimizer_state_dict": {"single_partition_of_fp32_groups": [flat[6 * r:6 * r + 6]]}},
                   ckpt / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    sd = consolidate_deepspeed(ckpt)
    assert torch.equal(sd["model.a"], a) and torch.equal(sd["model.b"], b)
    shutil.rmtree(ckpt)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors_is_named_not_a_traceback(tmp_path: Path, damage: str,
                                                      capsys: pytest.CaptureFixture) -> None:
    from vlp.eval.__main__ import main as eval_main
    from vlp.train.checkpoint import export_weights

    model = create_model("clip-nano")
    export_weights(model.state_dict(), model.config, "clip-nano", tmp_path / "good")
    data = (tmp_path / "good" / "model.safetensors").read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00\x01not a safetensors file" * 8)
    with pytest.raises(LoadError, match="bad.safetensors") as err:
        load_state(bad)
    assert "corrupt" in str(err.value)
    assert eval_main(["--checkpoint", str(bad), "--tasks", "zeroshot", "--datasets", "digits"]) == 2
    msg = capsys.readouterr().err
    assert "bad.safetensors" in msg and "Traceback" not in msg

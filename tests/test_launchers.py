"""train.py under the launchers users already have (torchrun, DeepSpeed's `deepspeed`, Hugging Face
`accelerate launch`), and `train.deepspeed`: DeepSpeed settings merged into the generated config."""

from __future__ import annotations

import json
import sys

import pytest

from tests.helpers import free_port, run, torchrun

CONFIG = "tests/configs/digits_nano.yaml"


def _args(run_dir, shards, *extra):
    return ["--config", CONFIG, f"run_dir={run_dir}", f"data.train_shards={shards}/train.json", "train.steps=3",
            "evals={}", "train.progress_bar=false", *extra]


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model.safetensors"))


def _assert_same(a, b, tol=0.0):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= tol, f"weights differ by {worst}"


@pytest.fixture(scope="module")
def torchrun_reference(tmp_path_factory, digits_shards_dir):
    out = tmp_path_factory.mktemp("torchrun") / "run"
    torchrun(2, "train.py", *_args(out, digits_shards_dir))
    return _weights(out)


@pytest.mark.slow
def test_deepspeed_launcher_equals_torchrun(tmp_path, digits_shards_dir, torchrun_reference):
    # the launcher appends --local_rank=N and sets RANK / LOCAL_RANK / WORLD_SIZE itself
    out = tmp_path / "ds"
    proc = run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
                "train.py", *_args(out, digits_shards_dir)])
    assert "--local_rank=1" in proc.stdout + proc.stderr
    _assert_same(_weights(out), torchrun_reference)


@pytest.mark.slow
def test_accelerate_launch_equals_torchrun(tmp_path, digits_shards_dir, torchrun_reference):
    out = tmp_path / "acc"
    run([sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(free_port()), "train.py", *_args(out, digits_shards_dir)])
    _assert_same(_weights(out), torchrun_reference)


@pytest.mark.slow
def test_deepspeed_settings_reach_the_engine(tmp_path, digits_shards_dir):
    ds = "train.deepspeed={zero_optimization: {offload_optimizer: {device: cpu}, reduce_bucket_size: 12345, " \
         "overlap_comm: true}}"
    run([sys.executable, "tests/workers/engine_config.py", str(tmp_path / "engine.json"), str(digits_shards_dir),
         "train.zero_stage=2", ds])
    parsed = json.loads((tmp_path / "engine.json").read_text())
    assert parsed == {"stage": 2, "reduce_bucket_size": 12345, "overlap_comm": True, "offload_optimizer": "cpu",
                      "optimizer": "DeepSpeedCPUAdam"}
    written = json.loads((tmp_path / "engine.json.run" / "deepspeed_config.json").read_text())
    assert written["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu"},
                                            "reduce_bucket_size": 12345, "overlap_comm": True}


# two more trainings (60 s); the engine test above builds the offloaded optimizer, test_train.py trains ZeRO stages
@pytest.mark.extended
def test_zero_offload_trains_like_zero2(tmp_path, digits_shards_dir):
    """ZeRO-Offload steps DeepSpeed's CPU AdamW: the same trajectory as torch's AdamW on the device."""
    ds = "train.deepspeed={zero_optimization: {offload_optimizer: {device: cpu}}}"
    run([sys.executable, "train.py", *_args(tmp_path / "offload", digits_shards_dir, "train.zero_stage=2", ds)])
    run([sys.executable, "train.py", *_args(tmp_path / "plain", digits_shards_dir, "train.zero_stage=2")])
    _assert_same(_weights(tmp_path / "offload"), _weights(tmp_path / "plain"), tol=1e-5)


@pytest.mark.parametrize("setting, message", [
    ("{zero_optimisation: {overlap_comm: true}}", "train.deepspeed.zero_optimisation is not a DeepSpeed config key "
                                                  "(did you mean 'zero_optimization'?)"),
    ("{zero_optimization: {reduce_bucket_sise: 5}}", "reduce_bucket_sise"),
    ("{zero_optimization: {reduce_bucket_size: lots}}", "reduce_bucket_size"),
    ("{gradient_clipping: 2.0}", "train.deepspeed.gradient_clipping is set by vlp from optim.grad_clip"),
    ("{zero_optimization: {stage: 3}}", "set by vlp from train.zero_stage"),
    ("{optimizer: {type: Adam}}", "train.deepspeed.optimizer is set by vlp"),
    ("{bfloat16: {enabled: true}}", "set by vlp from train.precision"),
    ("{zero_optimization: true}", "train.deepspeed.zero_optimization must be a mapping"),
    ("{zero_optimization: {offload_optimizer: {device: cpu}}}", "needs train.zero_stage >= 1 (it is 0)"),
    ("{zero_optimization: {offload_param: {device: cpu}}}", "needs train.zero_stage >= 3"),
])
def test_bad_deepspeed_settings_are_refused_naming_the_key(setting, message):
    from vlp.config import load_config
    from vlp.train.engine import check_deepspeed_overrides

    cfg = load_config(CONFIG, [f"train.deepspeed={setting}"])
    why = check_deepspeed_overrides(cfg)
    assert why is not None and message in why


def test_train_refuses_a_bad_deepspeed_key_before_starting(tmp_path, digits_shards_dir):
    proc = run([sys.executable, "train.py", *_args(tmp_path / "bad", digits_shards_dir,
                                                   "train.deepspeed.zero_optimization.overlap_com=true")], check=False)
    assert proc.returncode == 2
    assert "overlap_com" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "bad").exists()


def test_empty_deepspeed_mapping_changes_nothing():
    from vlp.config import load_config
    from vlp.train.engine import check_deepspeed_overrides, deepspeed_config

    plain = load_config(CONFIG)
    assert check_deepspeed_overrides(plain) is None
    merged = deepspeed_config(load_config(CONFIG, ["train.deepspeed={zero_optimization: {overlap_comm: true}}"]))
    assert merged == {**deepspeed_config(plain), "zero_optimization": {"stage": 0, "overlap_comm": True}}

"""Config tree: YAML presets, dotted overrides, and refusal of unknown keys / wrong types by name."""

from pathlib import Path

import pytest

from vlp.config import ConfigError, from_container, load_config, to_container
from vlp.models.registry import get_model_config
from vlp.train.engine import cosine_with_warmup, deepspeed_config, param_groups

ROOT = Path(__file__).resolve().parents[1]

PRESETS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*.yaml"))


def test_every_shipped_config_is_listed():
    assert {"configs/demo.yaml", "configs/clip_vit_b16.yaml", "configs/prefix_clipart.yaml"} <= set(PRESETS)


@pytest.mark.parametrize("path", PRESETS)
def test_presets_load(path):
    """Every shipped config passes the key and type checks, and its model overrides apply to the preset."""
    cfg = load_config(str(ROOT / path))
    assert cfg.model.name
    assert cfg.data.batch_size > 0
    model_cfg = get_model_config(cfg.model.name, **to_container(cfg.model.overrides))
    assert model_cfg.embed_dim > 0


def test_prefix_clipart_label_source_names_the_clipart_classes_in_order():
    """The label source turns `cls` (an index into vlp.data.clipart.CLASSNAMES) into text by position,
    so the config's hand-written list must be that list in that order."""
    from vlp.data.clipart import CLASSNAMES

    cfg = load_config(str(ROOT / "configs/prefix_clipart.yaml"))
    label = [s for s in cfg.data.sources if s.kind == "label"]
    assert [list(s.classnames) for s in label] == [CLASSNAMES]


def test_dotted_overrides_apply_with_types():
    cfg = load_config("configs/demo.yaml", ["optim.lr=0.01", "data.train_shards=a/{0..3}.tar", "train.zero_stage=2",
                                             "model.overrides={text: {layers: 1}}"])
    assert cfg.optim.lr == 0.01 and isinstance(cfg.optim.lr, float)
    assert cfg.data.train_shards == "a/{0..3}.tar"
    assert cfg.train.zero_stage == 2
    assert cfg.model.overrides["text"]["layers"] == 1


@pytest.mark.parametrize("override, key", [
    ("optim.lrr=0.1", "optim.lrr"),
    ("nonsense=1", "nonsense"),
    ("data.batch_size=many", "data.batch_size"),
    ("train.zero_stage=5", "train.zero_stage"),
    ("train.precision=fp8", "train.precision"),
    ("evals.x.task=captioning", "evals.x.task"),
    ("train.precision=bf16", "train.precision"),  # at ZeRO stage 0
])
def test_bad_override_names_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config("configs/demo.yaml", [override])
    assert key in str(e.value)


def test_unknown_key_in_yaml_names_key_and_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "learning_rate" in str(e.value) and str(p) in str(e.value)


def test_missing_file_and_malformed_override():
    with pytest.raises(ConfigError, match="does-not-exist.yaml"):
        load_config("does-not-exist.yaml")
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(None, ["optim.lr"])


def test_round_trip_through_container():
    cfg = load_config("configs/demo.yaml", ["train.steps=7"])
    again = from_container(to_container(cfg))
    assert to_container(again) == to_container(cfg)


def test_deepspeed_config_follows_run_config():
    cfg = load_config("configs/demo.yaml", ["train.zero_stage=3", "train.precision=bf16", "optim.grad_clip=0.5",
                                             "train.gradient_accumulation_steps=4", "data.batch_size=32"])
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["bf16"]["enabled"] is True
    assert ds["gradient_clipping"] == 0.5
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_micro_batch_size_per_gpu"] == 32


def test_schedule_warmup_then_cosine():
    total, warm = 100, 10
    lrs = [cosine_with_warmup(s, warm, total, 0.1) for s in range(total + 1)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1)
    mid = warm + (total - warm) // 2
    assert lrs[mid] == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-6)


def test_param_groups_exclude_norms_biases_embeddings():
    import torch

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.norm = torch.nn.LayerNorm(4)
            self.emb = torch.nn.Embedding(10, 4)

    m = M()
    decay, plain = param_groups(m, 0.2, {"emb.weight"})
    assert decay["weight_decay"] == 0.2 and plain["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(m.lin.weight)}
    assert {id(p) for p in plain["params"]} == {id(m.lin.bias), id(m.norm.weight), id(m.norm.bias), id(m.emb.weight)}


def test_crop_default_is_one_pair() -> None:
    """data.crop_scale's default and the transforms' default are the same (open_clip_train's 0.9-1.0)."""
    from vlp.data.transforms import DEFAULT_CROP_SCALE

    assert tuple(load_config(None, []).data.crop_scale) == DEFAULT_CROP_SCALE == (0.9, 1.0)

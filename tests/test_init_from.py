"""`model.init_from`: a run started from another run's weights, in every format vlp reads, starts from
exactly those tensors (compared one by one with the source run's own weights file), for full and
partial starts, under ZeRO 0 and ZeRO 3 on two ranks; LiT from a pretrained image trunk keeps it
bit-identical; a resumed run never re-initialises; bad sources are refused with the keys named.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import run, torchrun
from tests.test_export import CLS_NANO, _perturbed
from tests.test_train_features import initial_weights, train

CLS = "model.overrides.vision.timm_kwargs={global_pool: token, class_token: true}"
QUICK = ["model.overrides.text.act=quick_gelu", "model.overrides.vision.timm_kwargs.act_layer=quick_gelu"]
@pytest.fixture(scope="module")
def sources(tmp_path_factory, digits_shards_dir):
    """A trained vlp run (with EMA and a DeepSpeed checkpoint), its hf / open_clip / timm exports, an
    OpenAI-layout state dict of a QuickGELU model and a SigLIP model's transformers folder."""
    from vlp.export import export
    from vlp.interop.hf import export_hf
    from vlp.interop.open_clip import vlp_to_open_clip_state_dict
    from vlp.models import create_model

    root = tmp_path_factory.mktemp("init_sources")
    train(root / "run", digits_shards_dir, **{"train.steps": 3, "ema.enabled": "true", "ema.decay": 0.5,
                                              "evals": "{}", "train.checkpoint_every_n_steps": 3},
          **dict([CLS.split("=", 1)]))
    for to in ("hf", "open_clip", "timm"):
        export(root / "run", to, root / to)
    quick = _perturbed(create_model("clip-nano", vision={"timm_kwargs": {**CLS_NANO["vision"]["timm_kwargs"],
                                                                        "act_layer": "quick_gelu"}},
                                    text={"act": "quick_gelu"}), 1)
    openai = vlp_to_open_clip_state_dict(quick.state_dict())
    openai["logit_scale"] = openai["logit_scale"].reshape(())
    openai.update(input_resolution=torch.tensor(64), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    torch.save(openai, root / "openai.pt")
    siglip = _perturbed(create_model("siglip-map-nano"), 2)
    export_hf(siglip.config, siglip.state_dict(), root / "siglip_hf")
    return {"root": root, "run": load_file(str(root / "run" / "model.safetensors")),
            "ema": load_file(str(root / "run" / "model_ema.safetensors")),
            "openai": quick.state_dict(), "siglip": siglip.state_dict()}


def _cases(root: Path) -> dict[str, list[str]]:
    r = str(root)
    return {
        "vlp_run": [CLS, f"model.init_from.path={r}/run"],
        "vlp_ema": [CLS, f"model.init_from.path={r}/run", "model.init_from.ema=true"],
        "vlp_ckpt": [CLS, f"model.init_from.path={r}/run/checkpoints/step_00000003"],
        "open_clip": [CLS, f"model.init_from.path={r}/open_clip"],
        "open_clip_file": [CLS, f"model.init_from.path={r}/open_clip/open_clip_model.safetensors"],
        "hf": [CLS, f"model.init_from.path={r}/hf"],
        "text_only": [CLS, f"model.init_from.path={r}/hf", "model.init_from.parts=[text]"],
        "timm_lit": [CLS, f"model.init_from.path={r}/timm", "lock.image=true"],
        "openai": [CLS, *QUICK, f"model.init_from.path={r}/openai.pt"],
        "siglip_hf": ["model.name=siglip-map-nano", "loss.name=siglip", f"model.init_from.path={r}/siglip_hf"],
    }


def _expected(name: str, src: dict) -> tuple[dict, set[str]]:
    """(source tensors, keys that must equal them); the rest must equal the fresh init."""
    if name == "vlp_ema":
        return src["ema"], set(src["ema"])
    if name == "openai":
        return src["openai"], set(src["openai"])
    if name == "siglip_hf":
        return src["siglip"], set(src["siglip"])
    run_sd = src["run"]
    if name == "text_only":
        return run_sd, {k for k in run_sd if k.startswith(("text.", "text_proj."))}
    if name == "timm_lit":
        return run_sd, {k for k in run_sd if k.startswith("visual.trunk.")}
    return run_sd, set(run_sd)


def _check(results: dict, src: dict, names) -> None:
    base = initial_weights(**CLS_NANO)
    for name in names:
        got = results[name]
        want, from_source = _expected(name, src)
        assert from_source, name
        for k, v in got.items():
            ref = want[k] if k in from_source else base[k]
            assert torch.equal(v, ref), (name, k, k in from_source)
        if name in ("text_only", "timm_lit"):  # the partial start really left the rest fresh
            assert any(not torch.equal(base[k], want[k]) for k in got if k not in from_source), name


def _run_cases(tmp_path, src, names, digits_shards_dir, stage, nproc):
    cases = {n: c for n, c in _cases(src["root"]).items() if n in names}
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    args = [str(tmp_path / "res.pt"), str(tmp_path / "cases.json"), str(digits_shards_dir), str(stage)]
    if nproc == 1:
        run([sys.executable, "tests/workers/init_from.py", *args])
    else:
        torchrun(nproc, "tests/workers/init_from.py", *args)
    return torch.load(tmp_path / "res.pt", weights_only=True)


@pytest.mark.slow
def test_every_format_starts_from_exactly_its_weights_zero0(tmp_path, sources, digits_shards_dir):
    names = list(_cases(sources["root"]))
    results = _run_cases(tmp_path, sources, names, digits_shards_dir, stage=0, nproc=1)
    assert set(results) == set(names)
    _check(results, sources, names)
    report = json.loads((tmp_path / "res.pt.runs" / "timm_lit" / "init_report.json").read_text())
    assert report["format"] == "timm" and report["parts"] == ["image"]
    assert "image_proj.weight" in report["missing"] and report["loaded"]["image"] > 0
    assert json.loads((tmp_path / "res.pt.runs" / "openai" / "init_report.json").read_text())["format"] == "openai"


@pytest.mark.slow
def test_full_and_partial_starts_under_zero3_on_two_ranks(tmp_path, sources, digits_shards_dir):
    names = ["vlp_run", "hf", "text_only", "timm_lit"]
    results = _run_cases(tmp_path, sources, names, digits_shards_dir, stage=3, nproc=2)
    _check(results, sources, names)


@pytest.mark.slow
def test_lit_from_a_timm_trunk_keeps_it_and_a_resumed_run_never_reinitialises(tmp_path, sources, digits_shards_dir):
    """LiT from the timm export: the trunk stays bit-identical while the text tower trains. The split run
    resumes after its init source was deleted (a re-init would fail) and ends where the full run ends."""
    timm_dir = tmp_path / "timm"
    shutil.copytree(sources["root"] / "timm", timm_dir)
    opts = {"train.steps": 4, "lock.image": "true", "evals": "{}", "model.init_from.path": str(timm_dir),
            "model.init_from.parts": "[image]", **dict([CLS.split("=", 1)])}
    train(tmp_path / "full", digits_shards_dir, **opts)
    train(tmp_path / "split", digits_shards_dir, **opts, **{"train.stop_after_steps": 2})
    shutil.rmtree(timm_dir)
    proc = train(tmp_path / "split", digits_shards_dir, resume=True, **opts)
    assert "model.init_from ignored" in proc.stdout + proc.stderr
    full = load_file(str(tmp_path / "full" / "model.safetensors"))
    split = load_file(str(tmp_path / "split" / "model.safetensors"))
    trunk = [k for k in full if k.startswith("visual.trunk.")]
    assert trunk and all(torch.equal(full[k], sources["run"][k]) for k in trunk)
    base = initial_weights(**CLS_NANO)
    assert any(not torch.equal(full[k], base[k]) for k in full if k.startswith("text.blocks."))
    assert max((full[k] - split[k]).abs().max().item() for k in full) <= 1e-6


# ---------------------------------------------------------------- refusals (no training)


def test_refusals_name_the_keys_and_the_source(tmp_path):
    from vlp.interop.pretrained import InitError, Pretrained, init_from, init_model
    from vlp.loading import LoadError
    from vlp.models import create_model
    from vlp.train.checkpoint import export_weights

    tiny = create_model("clip-tiny")
    export_weights(tiny.state_dict(), tiny.config, "clip-tiny", tmp_path / "tiny")
    nano = create_model("clip-nano")
    with pytest.raises(InitError, match=r"58 tensors differ in shape.*image_proj\.weight: source \(128, 192\) vs model \(64, 64\)"):
        init_model(nano, tmp_path / "tiny")
    before = {k: v.clone() for k, v in nano.state_dict().items()}
    extra = dict(nano.state_dict(), **{"text.blocks.9.norm1.weight": torch.ones(1)})
    with pytest.raises(InitError, match=r"text\.blocks\.9\.norm1\.weight.*strict=false"):
        init_from(nano, Pretrained("extra.pt", "vlp", extra))
    report = init_from(nano, Pretrained("extra.pt", "vlp", extra), strict=False)
    assert report.unexpected == ["text.blocks.9.norm1.weight"] and not report.missing
    with pytest.raises(InitError, match=r"parts: \['decoder'\] are not parts"):
        init_from(nano, Pretrained("x", "vlp", extra), parts=["decoder"])
    only_text = {k: v for k, v in before.items() if k.startswith("text.")}
    with pytest.raises(InitError, match=r"no weights for parts \['image'\]"):
        init_from(nano, Pretrained("t.pt", "vlp", only_text), parts=["image"])
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(LoadError, match="bad.safetensors"):
        init_model(nano, tmp_path / "bad.safetensors")
    with pytest.raises(InitError, match="only vlp runs keep EMA"):
        init_model(nano, tmp_path / "tiny" / "model.safetensors", fmt="timm", ema=True)
    # QuickGELU weights into a GELU model compute something else: refused
    with pytest.raises(InitError, match="QuickGELU"):
        init_from(nano, Pretrained("openai.pt", "openai", dict(before), quick_gelu=True))


def test_every_preset_key_belongs_to_one_part():
    from vlp.interop.pretrained import part_of
    from vlp.models import create_model, list_models

    for name in list_models():
        if not name.endswith(("nano", "tiny")):
            continue
        model = create_model(name)
        orphans = [k for k in model.state_dict() if part_of(model, k) is None]
        assert not orphans, (name, orphans)


def test_hf_state_dicts_convert_back_exactly():
    from vlp.interop.hf import hf_to_vlp_state_dict, vlp_to_hf_siglip_state_dict, vlp_to_hf_state_dict
    from vlp.models import create_model

    for name, forward in (("clip-nano", vlp_to_hf_state_dict), ("siglip-map-nano", vlp_to_hf_siglip_state_dict)):
        model = _perturbed(create_model(name, **(CLS_NANO if name == "clip-nano" else {})), 3)
        sd = model.state_dict()
        back, rest = hf_to_vlp_state_dict(forward(dict(sd)))
        assert not rest and set(back) == set(sd)
        assert all(torch.equal(back[k], sd[k]) for k in sd), name


def test_init_from_config_is_checked_before_work(tmp_path):
    from vlp.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="model.init_from.format"):
        load_config(None, ["model.init_from.path=x", "model.init_from.format=keras"])
    with pytest.raises(ConfigError, match="model.init_from.path"):
        load_config(None, ["model.init_from.parts=[image]"])
    proc = run([sys.executable, "train.py", "--config", "tests/configs/digits_nano.yaml", f"run_dir={tmp_path}/r",
                "data.train_shards=tests/configs/digits_nano.yaml", f"model.init_from.path={tmp_path}/nothing"],
               check=False)
    assert proc.returncode == 2 and "nothing' does not exist" in proc.stderr, proc.stderr[-2000:]

"""Optional packages (vlp/extras.py): every import is declared, a feature whose extra is missing says
which extra to install; and the top-level vlp.get_tokenizer / vlp.get_transform."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# imported only inside `try: ... except ImportError` as a second choice, with a message of its own
FALLBACKS = {"cairosvg"}  # vlp.data.clipart: SVG rasterizer when Debian's rsvg-convert is absent


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(reqs):
        return {re.split(r"[<>=\[ ;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}

    extras = {k: names(v) for k, v in project["optional-dependencies"].items()}
    extras["all[]"] = set(re.fullmatch(r"vlp\[(.*)\]", project["optional-dependencies"]["all"][0])[1].split(","))
    return names(project["dependencies"]), extras


def _third_party_imports() -> set[str]:
    mods = set()
    for f in (ROOT / "vlp").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                mods |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods.add(node.module.split(".")[0])
    return {m for m in mods if m != "vlp" and m not in sys.stdlib_module_names and m != "__future__"} - FALLBACKS


def test_every_imported_package_is_declared_and_extras_are_not_hard_dependencies():
    from vlp.extras import EXTRAS

    required, extras = _declared()
    dists = importlib.metadata.packages_distributions()
    for mod in _third_party_imports():
        assert mod in dists, f"vlp imports '{mod}', which no installed distribution provides"
        names = {d.lower().replace("_", "-") for d in dists[mod]}
        extra = EXTRAS.get(mod, (None,))[0]
        if extra is not None:  # a one-feature package: in its extra, not in the dependencies
            assert names & extras[extra] and not names & required, mod
        else:
            assert names & required, f"vlp imports '{mod}' ({names}) but pyproject.toml does not declare it"
    assert set(EXTRAS.values()) <= {(e, d) for e in extras for d in extras[e]}
    assert {e for e, _ in EXTRAS.values()} == extras["all[]"]
    assert extras["all"] == {"vlp"} and extras["all[]"] == set(extras) - {"all", "all[]", "dev"}  # every extra
    assert "vlp" in extras["dev"]


@pytest.fixture
def hidden(monkeypatch):
    """hidden(name): make `import name` fail as if the package were not installed."""
    def hide(name):
        for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            monkeypatch.delitem(sys.modules, mod)
        monkeypatch.setitem(sys.modules, name, None)
    return hide


@pytest.mark.parametrize("module, extra", [("transformers", "hf"), ("wandb", "wandb"), ("matplotlib", "report"),
                                           ("skimage", "clipart"), ("pyarrow", "parquet")])
def test_require_names_the_extra(hidden, module, extra):
    from vlp.extras import MissingExtraError, is_installed, require

    assert is_installed(module)
    hidden(module)
    assert not is_installed(module)
    with pytest.raises(MissingExtraError, match=re.escape(f"pip install 'vlp[{extra}]'")):
        require(module, "some feature")


def test_features_without_their_extra_name_it(hidden, tmp_path):
    from vlp.config import ConfigError, load_config
    from vlp.data.clipart import load_backgrounds
    from vlp.data.convert import read_captions_table
    from vlp.eval.report import figure_png
    from vlp.eval.tasks import Figure
    from vlp.extras import MissingExtraError
    from vlp.interop.hf import export_hf
    from vlp.models import create_model

    for name in ("transformers", "wandb", "matplotlib", "skimage", "pyarrow"):
        hidden(name)
    with pytest.raises(ConfigError, match=r"logging.wandb.*vlp\[wandb\]"):
        load_config("tests/configs/digits_nano.yaml", ["logging.wandb=true"])
    model = create_model("clip-nano")
    with pytest.raises(MissingExtraError, match=r"export to transformers.*vlp\[hf\]"):
        export_hf(model.config, model.state_dict(), tmp_path / "hf")
    with pytest.raises(MissingExtraError, match=r"--no-report.*vlp\[report\]"):
        figure_png(Figure("t", lambda: None))
    with pytest.raises(MissingExtraError, match=r"vlp\[clipart\]"):
        load_backgrounds()
    (tmp_path / "c.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match=r"c.parquet.*vlp\[parquet\]"):
        read_captions_table(tmp_path / "c.parquet")


def test_get_tokenizer_and_transform_match_load_model(tmp_path):
    import vlp
    from vlp.data.transforms import eval_transform
    from vlp.train.checkpoint import export_weights

    model = vlp.create_model("clip-nano", preprocess={"image_size": 32, "mean": [0.1, 0.2, 0.3]})
    export_weights(model.state_dict(), model.config, "clip-nano", tmp_path)
    loaded, pre, tokenizer = vlp.load_model(tmp_path)
    texts = ["a photo of a mouse.", "two cats"]
    img = Image.fromarray(np.random.RandomState(0).randint(0, 255, (45, 60, 3), dtype=np.uint8))
    reference = eval_transform(pre)(img)
    assert reference.shape == (3, 32, 32)
    for source in (tmp_path, tmp_path / "model.safetensors", str(tmp_path), loaded):
        assert torch.equal(vlp.get_tokenizer(source)(texts), tokenizer(texts))
        assert torch.equal(vlp.get_transform(source)(img), reference)
    assert torch.equal(vlp.get_transform(pre)(img), reference)
    preset = vlp.get_model_config("clip-nano")
    assert torch.equal(vlp.get_transform("clip-nano")(img), eval_transform(preset.preprocess)(img))
    assert vlp.get_tokenizer("clip-nano")(texts).shape == (2, preset.text.context_length)
    with pytest.raises(Exception, match="does not exist"):
        vlp.get_tokenizer(tmp_path / "nowhere")

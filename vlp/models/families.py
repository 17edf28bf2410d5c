"""Model families: which config class builds which model class, and what that kind of model can do.

A family is saved in every model config vlp writes (`config_to_dict` adds `"family"`) and looked up
when the config is read back (`config_from_dict`), so a checkpoint says what it is; nothing is
guessed from which keys a config happens to have (apart from checkpoints written before families
were saved, read the old way, see `_LEGACY`). Consumers ask for a capability (`family_of(x).can(...)`,
`require(...)`) instead of probing attributes: the exporters, `load_backbone`, `vlp.generate`.

Adding a family: its config dataclass in `vlp/models/config.py`, its model module, and one
`register_family(...)` line below.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from vlp.models.clip import CLIP
from vlp.models.coca import CoCa
from vlp.models.config import CLIPConfig, CoCaConfig, TIPSConfig, apply_overrides
from vlp.models.tips import TIPS

CAPABILITIES: dict[str, str] = {
    "contrastive": "embeds images and texts into one space (encode_image / encode_text)",
    "captioning": "generates captions with a text decoder (vlp.generate, python -m vlp.caption)",
    "text_streams": "embeds several text streams per image (data.text_streams)",
    "backbone": "gives its image embedding as the trunk's pooled features through image_proj (vlp.load_backbone)",
    "export:hf": "exports to a transformers folder (python -m vlp.export --to hf)",
    "export:open_clip": "exports to an open_clip folder (python -m vlp.export --to open_clip)",
    "export:timm": "exports its image tower to a timm folder (python -m vlp.export --to timm)",
}


class FamilyError(ValueError):
    """A model asked for something its family does not do; the message names the family and what it does."""


@dataclass(frozen=True)
class Family:
    name: str  # saved as the model config's "family"
    title: str  # in messages: "a CoCa model"
    config: type[CLIPConfig]
    model: type[nn.Module]
    capabilities: frozenset[str]

    def __post_init__(self) -> None:
        unknown = sorted(set(self.capabilities) - set(CAPABILITIES))
        if unknown:
            raise ValueError(f"family '{self.name}': unknown capabilities {unknown} (known: {', '.join(CAPABILITIES)})")

    def can(self, capability: str) -> bool:
        if capability not in CAPABILITIES:
            raise ValueError(f"unknown capability '{capability}' (known: {', '.join(CAPABILITIES)})")
        return capability in self.capabilities


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    for other in _FAMILIES.values():
        if other.name != family.name and family.config is other.config:
            raise ValueError(f"config class {family.config.__name__} already belongs to family '{other.name}'")
    if family.name in _FAMILIES and _FAMILIES[family.name] != family:
        raise ValueError(f"model family '{family.name}' is already registered")
    _FAMILIES[family.name] = family
    return family


def families() -> list[Family]:
    return [_FAMILIES[n] for n in sorted(_FAMILIES)]


def get_family(name: str) -> Family:
    if name not in _FAMILIES:
        raise FamilyError(f"unknown model family '{name}' (known: {', '.join(sorted(_FAMILIES))})")
    return _FAMILIES[name]


def family_of(x: Any) -> Family:
    """The family of a model config or of a model built from one (exact class, not a guess)."""
    cls = type(x)
    for f in _FAMILIES.values():
        if cls is f.config or cls is f.model:
            return f
    raise FamilyError(f"{cls.__name__} belongs to no registered model family (known: {', '.join(sorted(_FAMILIES))})")


def require(x: Any, capability: str, action: str) -> Family:
    """The family of `x` if it has `capability`; else a FamilyError saying what `action` needs and what
    the family does instead."""
    f = family_of(x)
    if not f.can(capability):
        does = "; ".join(c for c in sorted(f.capabilities))
        raise FamilyError(f"{action} needs a model that {CAPABILITIES[capability]}; this is a {f.title} model "
                          f"(family '{f.name}'), which supports: {does}")
    return f


def build_model(cfg: CLIPConfig) -> nn.Module:
    """The model class of the config's family, built from it."""
    return family_of(cfg).model(cfg)


def config_to_dict(cfg: CLIPConfig) -> dict[str, Any]:
    """JSON-able model config with its family, the form saved in checkpoints and weight files."""
    return {"family": family_of(cfg).name, **json.loads(json.dumps(asdict(cfg)))}


# before families were saved (runs of earlier versions): a CoCa config was recognised by its decoder
# section, a TIPS config by its num_streams; read such configs that way, and only those
_LEGACY = (("decoder", "coca"), ("num_streams", "tips"))


def config_from_dict(d: dict[str, Any]) -> CLIPConfig:
    """Inverse of `config_to_dict`; unknown keys are refused by `apply_overrides`, naming them."""
    d = dict(d)
    name = d.pop("family", None)
    if name is None:
        name = next((fam for key, fam in _LEGACY if key in d), "clip")
    return apply_overrides(get_family(name).config(), d)


register_family(Family("clip", "CLIP", CLIPConfig, CLIP, frozenset(
    {"contrastive", "backbone", "export:hf", "export:open_clip", "export:timm"})))
register_family(Family("coca", "CoCa", CoCaConfig, CoCa, frozenset(
    {"contrastive", "captioning", "export:open_clip", "export:timm"})))
register_family(Family("tips", "TIPS", TIPSConfig, TIPS, frozenset(
    {"contrastive", "text_streams", "backbone", "export:timm"})))

"""CLIP models: presets, towers and the dual-encoder module."""

from vlp.models.clip import CLIP
from vlp.models.coca import CoCa
from vlp.models.config import (
    CLIPConfig,
    CoCaConfig,
    DecoderConfig,
    PreprocessConfig,
    TextTowerConfig,
    VisionTowerConfig,
)
from vlp.models.families import Family, FamilyError, family_of, register_family, require
from vlp.models.registry import build_model, create_model, get_model_config, list_models, register_model
from vlp.models.text import TextTower
from vlp.models.tips import TIPS, TIPSConfig
from vlp.models.vision import VisionTower

__all__ = [
    "CLIP",
    "CLIPConfig",
    "CoCa",
    "CoCaConfig",
    "DecoderConfig",
    "Family",
    "FamilyError",
    "PreprocessConfig",
    "TIPS",
    "TIPSConfig",
    "TextTower",
    "TextTowerConfig",
    "VisionTower",
    "VisionTowerConfig",
    "build_model",
    "create_model",
    "family_of",
    "get_model_config",
    "list_models",
    "register_family",
    "register_model",
    "require",
]

"""CLIP models: presets, towers and the dual-encoder module."""

from vlp.models.clip import CLIP
from vlp.models.config import CLIPConfig, PreprocessConfig, TextTowerConfig, VisionTowerConfig
from vlp.models.registry import create_model, get_model_config, list_models, register_model
from vlp.models.text import TextTower
from vlp.models.vision import VisionTower

__all__ = [
    "CLIP",
    "CLIPConfig",
    "PreprocessConfig",
    "TextTower",
    "TextTowerConfig",
    "VisionTower",
    "VisionTowerConfig",
    "create_model",
    "get_model_config",
    "list_models",
    "register_model",
]

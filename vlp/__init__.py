"""vlp: contrastive vision-language pretraining (CLIP and friends) with webdataset and DeepSpeed."""

from vlp.generate import generate
from vlp.models import create_model, get_model_config, list_models

__version__ = "0.1.0"


def load_model(path, device="cpu", ema=False):
    """(model, preprocess config, tokenizer) from a run dir, .safetensors file or checkpoint dir;
    `ema=True`: the run's EMA weights (a run trained with ema.enabled)."""
    from vlp.loading import load_model as _load

    return _load(path, device=device, ema=ema)


def load_backbone(path, **kwargs):
    """Image tower of a checkpoint as a timm-style backbone (see `vlp.backbone.load_backbone`)."""
    from vlp.backbone import load_backbone as _load

    return _load(path, **kwargs)


__all__ = ["create_model", "generate", "load_backbone", "get_model_config", "list_models", "load_model"]

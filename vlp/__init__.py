"""vlp: contrastive vision-language pretraining (CLIP and friends) with webdataset and DeepSpeed."""

from vlp.generate import generate
from vlp.models import create_model, get_model_config, list_models

__version__ = "0.1.0"


def load_model(path, device="cpu", ema=False):
    """(model, preprocess config, tokenizer) from a run dir, .safetensors file or checkpoint dir;
    `ema=True`: the run's EMA weights (a run trained with ema.enabled)."""
    from vlp.loading import load_model as _load

    return _load(path, device=device, ema=ema)


def get_tokenizer(model):
    """The tokenizer of a model: a registered model name (`vlp.list_models()`), a checkpoint path
    (run dir, .safetensors, checkpoint dir; only its config is read) or a model. Call it on a list
    of texts: `get_tokenizer("clip-tiny")(["a photo of a cat"])` -> token ids [N, context_length]."""
    from vlp.data.tokenizer import get_tokenizer as _tokenizer

    return _tokenizer(_model_config(model).text)


def get_transform(source):
    """The eval image transform (PIL image -> normalized tensor [3, S, S], the preprocessing the
    model was trained and is evaluated with): of a checkpoint path, a registered model name, a model,
    or the preprocessing config `load_model` returns."""
    from vlp.data.preprocess import PreprocessConfig
    from vlp.data.transforms import eval_transform

    pre = source if isinstance(source, PreprocessConfig) else _model_config(source).preprocess
    return eval_transform(pre)


def _model_config(model):
    import os

    from vlp.loading import load_model_config

    if isinstance(model, (str, os.PathLike)):
        if isinstance(model, str) and model in list_models():
            return get_model_config(model)
        return load_model_config(model)
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise TypeError(f"expected a model name, a checkpoint path or a vlp model, got {type(model).__name__}")
    return cfg


def load_backbone(path, **kwargs):
    """Image tower of a checkpoint as a timm-style backbone (see `vlp.backbone.load_backbone`)."""
    from vlp.backbone import load_backbone as _load

    return _load(path, **kwargs)


__all__ = ["create_model", "generate", "get_model_config", "get_tokenizer", "get_transform", "list_models",
           "load_backbone", "load_model"]

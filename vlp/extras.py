"""Optional dependencies: packages that serve one feature each are extras (`pip install 'vlp[hf]'`),
imported only when that feature runs, and a missing one is an error naming the extra to install.

    hf       transformers   export to / pipelines of Hugging Face transformers
    wandb    wandb          logging.wandb=true
    report   matplotlib     the figures of the eval HTML report (`python -m vlp.eval` without --no-report)
    clipart  scikit-image   the clipart scenes' photographic backgrounds (vlp.data.build clipart)
    parquet  pyarrow        Parquet caption tables (vlp.data.build / convert), curation scores and selections (vlp.curate)
    curate   faiss-cpu      SemDeDup's k-means (python -m vlp.curate select --dedup-eps); with pyarrow

`pip install 'vlp[all]'` installs every extra.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

# import name -> (extra, distribution)
EXTRAS: dict[str, tuple[str, str]] = {
    "transformers": ("hf", "transformers"),
    "wandb": ("wandb", "wandb"),
    "matplotlib": ("report", "matplotlib"),
    "skimage": ("clipart", "scikit-image"),
    "pyarrow": ("parquet", "pyarrow"),
    "faiss": ("curate", "faiss-cpu"),
}


class MissingExtraError(ImportError):
    """A feature's optional package is not installed; the message names the extra."""


def missing_message(module: str, feature: str) -> str:
    extra, dist = EXTRAS[module.split(".")[0]]
    return (f"{feature} needs the optional package '{dist}', which is not installed: "
            f"pip install 'vlp[{extra}]' (or pip install {dist})")


def is_installed(module: str) -> bool:
    """Whether `module` can be imported (found, not imported: a config check stays cheap)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package, or a None entry in sys.modules
        return False


def require(module: str, feature: str) -> ModuleType:
    """import `module` (e.g. "pyarrow.parquet"), or raise MissingExtraError naming `feature` and the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        if top not in EXTRAS or (e.name or top).split(".")[0] != top:  # a broken install, not a missing one
            raise
        raise MissingExtraError(missing_message(module, feature)) from e

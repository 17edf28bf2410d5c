"""The objective registry: name -> `Objective`. Built-in objectives are imported on first lookup."""

from __future__ import annotations

import importlib

from vlp.objectives.base import Objective

# one line per built-in objective: the module registers it when imported
_BUILTIN: tuple[str, ...] = (
    "vlp.objectives.clip",
    "vlp.objectives.siglip",
    "vlp.objectives.coca",
    "vlp.objectives.tips",
    "vlp.objectives.soft_clip",
    "vlp.objectives.small_loss",
)
_REGISTRY: dict[str, Objective] = {}
_loaded = False


class UnknownObjectiveError(ValueError):
    pass


def _load_builtin() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _BUILTIN:
            importlib.import_module(module)


def register_objective(objective: Objective) -> Objective:
    """Make `objective` available as `loss.name=<objective.name>`; a second one of that name is refused."""
    if not isinstance(objective, Objective):
        raise TypeError(f"register_objective takes an Objective instance, got {type(objective).__name__}")
    name = objective.name
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"objective name must be a non-empty identifier, got {name!r}")
    old = _REGISTRY.get(name)
    if old is not None and type(old) is not type(objective):
        raise ValueError(f"objective '{name}' is already registered (by {type(old).__module__})")
    _REGISTRY[name] = objective
    return objective


def objectives() -> list[Objective]:
    _load_builtin()
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]


def objective_names() -> list[str]:
    return [o.name for o in objectives()]


def get_objective(name: str) -> Objective:
    """The registered objective called `name`; an unknown name raises, listing the known ones."""
    _load_builtin()
    if name not in _REGISTRY:
        raise UnknownObjectiveError(f"unknown objective '{name}' (known: {', '.join(objective_names())})")
    return _REGISTRY[name]

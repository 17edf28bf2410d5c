"""Training objectives, one module each, looked up by `loss.name`.

An objective (`vlp.objectives.base.Objective`) declares its name, its typed options (a dataclass that
becomes the run config's section of the same name, e.g. `tips:`), what it supports (exact contrastive
accumulation, ZeRO stages, precisions, several texts per image), the checks it needs against the run
config and the model, and how it builds the module handed to DeepSpeed (model + loss). The config, the
trainer and the loss wiring consult this registry and hold no objective names.

Adding an objective is one new module that calls `register_objective(...)` at import, plus its line
in `_BUILTIN` below (or, from outside vlp, a module listed in the run config's `plugins:`).
"""

from vlp.objectives.base import Objective, ObjectiveError, ObjectiveModule, Supports
from vlp.objectives.registry import (
    UnknownObjectiveError,
    get_objective,
    objective_names,
    objectives,
    register_objective,
)

__all__ = ["Objective", "ObjectiveError", "ObjectiveModule", "Supports", "UnknownObjectiveError",
           "get_objective", "objective_names", "objectives", "register_objective"]

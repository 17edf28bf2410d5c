"""The evaluator interface and the task registry behind `python -m vlp.eval` and `evals:`.

An evaluator is a plain function

    evaluate(model, tokenizer, preprocess, spec: DatasetSpec, ctx: EvalContext) -> TaskResult

* `model` is a vlp CLIP (or anything with `encode_image` / `encode_text`), already on
  `ctx.device` and in eval mode; `tokenizer` maps a list of strings to token ids;
  `preprocess` is the checkpoint's PreprocessConfig (image size, mean, std, interpolation).
* `spec` names the dataset and its knobs (split, max_samples, batch_size, options). A task
  declares its options as a dataclass (`ZeroShotOptions`, `RetrievalOptions`,
  `LinearProbeOptions`, `SegmentationOptions`: fields, types, defaults); `run_task` turns the
  mapping a caller gives (`DatasetSpec.options`, `evals.NAME.options`, `--option TASK.KEY=VALUE`)
  into that dataclass with `parse_options`, so the evaluator reads `spec.options.k_shot`, never a
  dict. Unknown keys and values of the wrong type raise `EvalOptionError` naming the task and the
  key; `check_options` runs the same checks without running anything (run-config validation).
  Strings are coerced to the declared type ("10" -> 10, "1e-3" -> 0.001, "true" -> True,
  "a,b" or "[a, b]" -> a list / tuple, "{k: v}" -> a mapping), so CLI text is accepted as is.
  An evaluator called directly with a mapping parses it itself (`typed_options`).
* `ctx` says where it runs: device, rank and world size (every rank calls the evaluator; split
  the data with `vlp.eval.common.shard` and gather with `gather_rows` so each sample is scored
  exactly once), loader workers, an optional cache directory and checkpoint fingerprint, and
  whether figures are wanted (False inside training).
* It returns `TaskResult(metrics, figures, details)`: metrics are flat `{name: float | int}`
  (the same on every rank; shown in tables and logged in training); details are any JSON-able
  extras (per-class scores) written to results.json only; figures are `Figure(title, draw, caption)` whose `draw()` returns a
  matplotlib Figure. Drawing is deferred, so figures cost nothing unless a report is written.

Registering a task is one line in `_BUILTIN` (`"module:function"` and the name of its options
dataclass in that module, imported on first use), or `register_task("name", fn, options=Cls)` at
run time. A task registered without `options` declares none: it accepts any mapping, unchecked,
and receives it as given (the behaviour before options were typed).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch


@dataclass
class DatasetSpec:
    """Which data an evaluator reads: a built-in name or a local path, plus per-run knobs."""

    name: str
    split: str = "test"
    max_samples: int = 0  # 0: the whole split
    batch_size: int = 256
    # task-specific: a mapping (e.g. {"k_shot": 10}) or the task's options dataclass; run_task
    # hands the evaluator the dataclass (see parse_options)
    options: Any = field(default_factory=dict)


@dataclass
class EvalContext:
    """Where and how an evaluator runs (same object on every rank apart from `rank`)."""

    device: torch.device | str = "cpu"
    rank: int = 0
    world_size: int = 1
    workers: int = 0
    cache_dir: Path | None = None  # where reusable artefacts (zero-shot classifiers) may be stored
    checkpoint_id: str | None = None  # fingerprint of the weights; None disables caching
    figures: bool = True
    seed: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class Figure:
    """A picture for the report; `draw()` builds and returns a matplotlib Figure on demand."""

    title: str
    draw: Callable[[], Any]
    caption: str = ""


@dataclass
class TaskResult:
    """Scalar `metrics` (tables, training logs), `figures` (the report) and JSON-able `details`
    (per-class numbers, confusion matrices: written to results.json only)."""

    metrics: dict[str, float | int]
    figures: list[Figure] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


Evaluator = Callable[[Any, Any, Any, DatasetSpec, EvalContext], TaskResult]

# task name -> ("module:function", the options dataclass's name in that module); one line per task
_BUILTIN: dict[str, tuple[str, str]] = {
    "zeroshot": ("vlp.eval.zeroshot:evaluate", "ZeroShotOptions"),
    "retrieval": ("vlp.eval.retrieval:evaluate", "RetrievalOptions"),
    "linear_probe": ("vlp.eval.linear_probe:evaluate", "LinearProbeOptions"),
    # adapter over vlp/eval/segmentation.py
    "segmentation": ("vlp.eval.segmentation_task:evaluate", "SegmentationOptions"),
}
_REGISTERED: dict[str, tuple[Evaluator, type | None]] = {}

T = TypeVar("T")


class UnknownTaskError(ValueError):
    pass


class EvalOptionError(ValueError):
    """An eval task option that is unknown, of the wrong type or out of its allowed values."""


def register_task(name: str, fn: Evaluator, options: type | None = None) -> None:
    """Add (or replace) a task. `options`: its options dataclass, checked like a built-in task's;
    None: the task declares no options and gets its options mapping as given, unchecked."""
    if options is not None and not (isinstance(options, type) and dataclasses.is_dataclass(options)):
        raise TypeError(f"register_task('{name}'): options must be a dataclass type, got {options!r}")
    _REGISTERED[name] = (fn, options)


def task_names() -> list[str]:
    return sorted(set(_BUILTIN) | set(_REGISTERED))


def _builtin_module(name: str) -> Any:
    module = _BUILTIN[name][0].split(":")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("vlp."):
            raise
        raise UnknownTaskError(f"eval task '{name}' is not available in this install ({e.name} is missing)") from None


def _unknown(name: str) -> UnknownTaskError:
    return UnknownTaskError(f"unknown eval task '{name}' (known: {', '.join(task_names())})")


def get_task(name: str) -> Evaluator:
    """The evaluator for a task name; an unknown or unavailable task raises, naming it."""
    if name in _REGISTERED:
        return _REGISTERED[name][0]
    if name not in _BUILTIN:
        raise _unknown(name)
    return getattr(_builtin_module(name), _BUILTIN[name][0].split(":")[1])


def options_class(name: str) -> type | None:
    """The options dataclass a task declares (None: a registered task that declares none)."""
    if name in _REGISTERED:
        return _REGISTERED[name][1]
    if name not in _BUILTIN:
        raise _unknown(name)
    return getattr(_builtin_module(name), _BUILTIN[name][1])


# ---- typed options --------------------------------------------------------------------------------

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
_NONE = ("null", "none", "~")


class _Mismatch(Exception):
    pass


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return "any value"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if tp is type(None):
        return "None"
    if origin in (list, tuple, Sequence):
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin in (dict, Mapping):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _plain(value: Any) -> Any:
    """Mappings and sequences (OmegaConf DictConfig / ListConfig included) as dicts and lists."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    return value


def _coerce(value: Any, tp: Any) -> Any:
    """`value` as type `tp` (int, float, bool, str, X | None, list[X], tuple[X, ...], dict[str, X],
    Any); strings are parsed; raises _Mismatch."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return _plain(value)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, typing.get_args(tp))
    if tp in _SCALARS:
        return _SCALARS[tp](value)
    if origin in (list, tuple, Sequence):
        return _coerce_sequence(value, tp)
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        return _coerce_mapping(value, tp)
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _Mismatch
    raise TypeError(f"unsupported option type {tp!r}")


def _coerce_union(value: Any, args: tuple) -> Any:
    if value is None or (type(None) in args and isinstance(value, str) and value.strip().lower() in _NONE):
        if type(None) in args:
            return None
        raise _Mismatch
    for a in args:
        if a is not type(None):
            try:
                return _coerce(value, a)
            except _Mismatch:
                pass
    raise _Mismatch


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise _Mismatch


def _to_int(value: Any) -> int:
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        try:
            return int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise _Mismatch from None
    if isinstance(value, bool):
        raise _Mismatch
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise _Mismatch


def _to_float(value: Any) -> float:
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            raise _Mismatch from None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise _Mismatch


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise _Mismatch


_SCALARS: dict[Any, Callable[[Any], Any]] = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _coerce_sequence(value: Any, tp: Any) -> list | tuple:
    import yaml

    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError:
                raise _Mismatch from None
        else:
            value = [x.strip() for x in text.split(",") if x.strip()]
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        raise _Mismatch
    args = typing.get_args(tp)
    items = [_coerce(v, args[0] if args else Any) for v in value]
    return tuple(items) if typing.get_origin(tp) is tuple else items


def _coerce_mapping(value: Any, tp: Any) -> dict:
    import yaml

    if isinstance(value, str):
        try:
            value = yaml.safe_load(value) if value.strip() else {}
        except yaml.YAMLError:
            raise _Mismatch from None
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise _Mismatch
    args = typing.get_args(tp)
    return {k: _coerce(v, args[1] if len(args) == 2 else Any) for k, v in value.items()}


def coerce_option(task_name: str, key: str, value: Any, tp: Any) -> Any:
    """One option value as type `tp` (strings parsed, see the module docstring); a mismatch raises
    EvalOptionError naming the task, the key and the expected type."""
    try:
        return _coerce(value, tp)
    except _Mismatch:
        raise EvalOptionError(f"eval task '{task_name}': option '{key}' must be {_type_name(tp)}, "
                              f"got {value!r} ({type(value).__name__})") from None


def check_keys(task_name: str, given: Any, known: Any, what: str = "option") -> None:
    """Refuse keys of `given` not in `known`, naming them, the known ones and close matches."""
    known = sorted(known)
    unknown = sorted(str(k) for k in given if k not in known)
    if not unknown:
        return
    close = {u: difflib.get_close_matches(u, known, n=1) for u in unknown}
    hint = "; ".join(f"'{u}': did you mean '{m[0]}'?" for u, m in close.items() if m)
    raise EvalOptionError(f"eval task '{task_name}': unknown {what}(s) {', '.join(repr(u) for u in unknown)} "
                          f"(known: {', '.join(known) or 'none'})" + (f"; {hint}" if hint else ""))


def typed_options(task_name: str, cls: type[T], options: Any) -> T:
    """`options` (a mapping, None, or already a `cls`) as an instance of the dataclass `cls`."""
    if isinstance(options, cls):
        return options
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise EvalOptionError(f"eval task '{task_name}': options must be a mapping of option names to values, "
                              f"got {options!r} ({type(options).__name__})")
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    check_keys(task_name, options, names)
    hints = typing.get_type_hints(cls)
    return cls(**{k: coerce_option(task_name, k, v, hints[k]) for k, v in options.items()})


def parse_options(task_name: str, options: Mapping[str, Any] | None) -> Any:
    """A task's options mapping as its options dataclass, checked: unknown keys, values of the wrong
    type (strings are coerced, see the module docstring) and values the dataclass refuses raise
    EvalOptionError naming the task and the key. A task registered without options gets a plain
    dict copy, unchecked; an unknown task raises UnknownTaskError."""
    cls = options_class(task_name)
    if cls is None:
        if options is not None and not isinstance(options, Mapping):
            raise EvalOptionError(f"eval task '{task_name}': options must be a mapping, got {options!r}")
        return dict(options or {})
    return typed_options(task_name, cls, options)


def check_options(task_name: str, options: Mapping[str, Any] | None) -> None:
    """parse_options without keeping the result: cheap (no data, no model), for config validation."""
    parse_options(task_name, options)


def run_task(name: str, model: Any, tokenizer: Any, preprocess: Any, spec: DatasetSpec,
             ctx: EvalContext) -> TaskResult:
    """Run one task on one dataset with the model in eval mode (restored afterwards).

    `spec.options` reaches the evaluator as the task's options dataclass (parse_options; a task
    without declared options gets it unchanged). Gradients are not switched off here: an evaluator
    that fits a head (linear probe, segmentation probe) needs them; forward passes of the model use
    `torch.inference_mode`.
    """
    fn = get_task(name)
    if options_class(name) is not None:
        spec = dataclasses.replace(spec, options=parse_options(name, spec.options))
    was_training = model.training
    model.eval()
    try:
        return fn(model, tokenizer, preprocess, spec, ctx)
    finally:
        model.train(was_training)

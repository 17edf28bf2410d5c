"""The filter registry: name -> `Filter`, in the order `select` applies them. Built-ins load on first use."""

from __future__ import annotations

import functools
import importlib

from vlp.curate.filters.base import Filter

# one line per built-in filter: the module registers it when imported
_BUILTIN: tuple[str, ...] = (
    "vlp.curate.filters.caption_words",
    "vlp.curate.filters.balance",
    "vlp.curate.filters.semdedup",
    "vlp.curate.filters.decontaminate",
)
_REGISTRY: dict[str, Filter] = {}


@functools.cache
def _load_builtin() -> None:
    """Import each built-in filter's module once (each registers itself)."""
    for module in _BUILTIN:
        importlib.import_module(module)


def register_filter(f: Filter) -> Filter:
    """Make `f` a rule of `vlp.curate select`; a second filter of that name, or an option another filter
    already has, is refused."""
    if not isinstance(f, Filter) or not f.name.isidentifier():
        raise ValueError(f"register_filter takes a Filter with an identifier name, got {f!r}")
    old = _REGISTRY.get(f.name)
    if old is not None and type(old) is not type(f):
        raise ValueError(f"selection filter '{f.name}' is already registered (by {type(old).__module__})")
    taken = {o.name: g.name for g in _REGISTRY.values() if g.name != f.name for o in g.options}
    clash = [o.name for o in f.options if o.name in taken]
    if clash:
        raise ValueError(f"selection filter '{f.name}': option {clash[0]} belongs to filter '{taken[clash[0]]}'")
    _REGISTRY[f.name] = f
    return f


def filters() -> list[Filter]:
    _load_builtin()
    return list(_REGISTRY.values())


def filter_defaults() -> dict[str, object]:
    """option name -> default, over every registered filter."""
    return {o.name: o.default for f in filters() for o in f.options}

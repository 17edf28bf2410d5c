"""Selection filters of `vlp.curate select` (see vlp/curate/filters/base.py)."""

from vlp.curate.filters.base import Context, Filter, Option
from vlp.curate.filters.registry import filter_defaults, filters, register_filter

__all__ = ["Context", "Filter", "Option", "filter_defaults", "filters", "register_filter"]

"""Tag-length x learning-rate search, Ray-free: settings, plans, results, publishing (docs/tune.md).

The Ray executor is :mod:`tagray.ray.tune` (``run_search``); the CLI runs :func:`prerequisites` through the
pipeline first, then the search.
"""

from .plan import Search, plan_searches, prerequisites
from .report import TrialRecord, format_table, interrupted, save_table
from .settings import TuneSettings, load_tune, parse_tune

__all__ = [
    "Search",
    "TrialRecord",
    "TuneSettings",
    "format_table",
    "interrupted",
    "load_tune",
    "parse_tune",
    "plan_searches",
    "prerequisites",
    "save_table",
]

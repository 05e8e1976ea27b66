"""Scorers: one file a scorer, one registry (`SCORERS`).

Every module of this package is imported here, so a new scorer is one new file with `@register` on its class;
scorers in other packages register through the `prefsift.scorers` entry-point group. `check_scorer` runs the
conformance checks a scorer passes (`prefsift.scorers.check`).
"""

import importlib
import pkgutil
from importlib.metadata import entry_points

from prefsift.scorers.base import (
    SCORERS,
    BandParams,
    Scorer,
    ScorerParams,
    get_scorer,
    parse_method,
    parse_methods,
    register,
)
from prefsift.scorers.check import check_scorer

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
for _entry in entry_points(group="prefsift.scorers"):
    _entry.load()

__all__ = ["SCORERS", "BandParams", "Scorer", "ScorerParams", "check_scorer", "get_scorer", "parse_method",
           "parse_methods", "register"]

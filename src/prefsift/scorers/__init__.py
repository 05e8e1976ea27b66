"""Scorers: one file a scorer, one registry (`SCORERS`). Importing this package registers them all."""

from prefsift.scorers import irm, lossdiff, lossdiff_irm, margin, random  # noqa: F401  (registration)
from prefsift.scorers.base import SCORERS, Scorer, ScoringContext, get_scorer, register

__all__ = ["SCORERS", "Scorer", "ScoringContext", "get_scorer", "register"]

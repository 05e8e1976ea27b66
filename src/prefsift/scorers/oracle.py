"""Oracle: selection by a hidden label column, the ceiling a selector could reach. Only a benchmark has one (the
demo's `is_flipped`: the pairs whose label the task corrupted); a row it produces is marked as the ceiling, never
as a method."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prefsift.errors import PrefsiftError
from prefsift.scorers.base import Scorer, ScorerParams, register
from prefsift.settings import option


@dataclass
class OracleParams(ScorerParams):
    column: str = option("is_flipped", "Hidden column flagging the bad pairs (true = bad): the clean ones come first.")


@register
class OracleScorer(Scorer):
    name = "oracle"
    columns = ("oracle",)
    Params = OracleParams
    ceiling = True

    def requirements(self) -> str:
        return f"the data's hidden label column {self.params.column} (--param column=...; a benchmark's, real data " \
               "has none)"

    def score(self, resources) -> dict[str, np.ndarray]:
        raw = resources.pairs.raw
        if raw is None or self.params.column not in raw.column_names:
            raise PrefsiftError(f"method 'oracle' needs the hidden column {self.params.column!r} in the data "
                                "(a benchmark's labels; real data has none)")
        return {"oracle": 1.0 - np.asarray(raw[self.params.column], dtype=float)}

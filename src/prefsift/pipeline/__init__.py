"""`prefsift run`: the TIF paper's pipeline from one config, each step a named function over the stages.

- `splits`: train, validation and test rows by a seeded hash of the prompt;
- `accounting`: what each row cost, all of it, in pair passes;
- `run`: warm-up, validation model, scoring, budgets, each subset's training and evaluation, over every seed.
"""

from prefsift.config import RunConfig
from prefsift.pipeline.accounting import compute_units
from prefsift.pipeline.run import load_run_config, name_final_paths, run_pipeline, run_seed, run_staged
from prefsift.pipeline.splits import Splits, make_splits, split_pairs, subset

__all__ = ["RunConfig", "Splits", "compute_units", "load_run_config", "make_splits", "name_final_paths",
           "run_pipeline", "run_seed", "run_staged", "split_pairs", "subset"]

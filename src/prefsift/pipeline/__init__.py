"""`prefsift run`: the TIF paper's pipeline from one config, each step a named function over the stages.

- `splits`: train, validation and test rows by a seeded hash of the prompt;
- `accounting`: what each row cost, all of it: measured seconds by part, and the nominal pair passes beside;
- `run`: warm-up, validation model, scoring, budgets, each subset's training and evaluation, over every seed.
"""

from prefsift.config import RunConfig
from prefsift.pipeline.accounting import Arm, Measured, measured_compute, pair_passes
from prefsift.pipeline.run import load_run_config, name_final_paths, run_pipeline, run_seed, run_staged
from prefsift.pipeline.splits import Splits, make_splits, split_pairs, subset

__all__ = ["Arm", "Measured", "RunConfig", "Splits", "load_run_config", "make_splits", "measured_compute",
           "name_final_paths", "pair_passes", "run_pipeline", "run_seed", "run_staged", "split_pairs", "subset"]

"""Load, normalize and validate preference data: any supported source → the pairs table keyed by `pair_id`."""

from prefsift.data.load import InvalidRow, LoadedPairs, load_pairs
from prefsift.data.normalize import data_hash_of, pair_id_of, split_implicit_prompt

__all__ = ["InvalidRow", "LoadedPairs", "data_hash_of", "load_pairs", "pair_id_of", "split_implicit_prompt"]

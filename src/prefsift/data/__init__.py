"""Load, normalize and validate preference data: any supported source → the pairs table keyed by `pair_id`."""

from prefsift.data.load import InvalidRow, LoadedPairs, check_chat_template, load_pairs, with_chat_template
from prefsift.data.normalize import data_hash_of, pair_id_of, split_implicit_prompt, transcript_messages

__all__ = ["InvalidRow", "LoadedPairs", "check_chat_template", "data_hash_of", "load_pairs", "pair_id_of",
           "split_implicit_prompt", "transcript_messages", "with_chat_template"]

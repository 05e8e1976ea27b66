"""check_scorer over every registered scorer: the static checks, and the dynamic ones on a tiny provider that can
supply every role (tiny Llamas as policy, reference and validation model, a one-layer reward model, validation pairs,
an embedder, rating columns and a hidden label). check_scorer itself fails on deliberately broken scorers, and the
scorer registry is restored after every test."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from datasets import Dataset
from helpers import make_pairs, make_tiny_llama, registry_restored, tiny_reward_model

from prefsift.config import EngineConfig
from prefsift.data import load_pairs
from prefsift.engine.embeddings import CausalEmbedder
from prefsift.models import LoadedModel
from prefsift.resources import ROLES, Resources
from prefsift.scorers import SCORERS, BandParams, Scorer, ScorerParams, get_scorer, register
from prefsift.scorers.check import CHECKS, check_dynamic, check_scorer, check_static
from prefsift.settings import option

NAMES = sorted(SCORERS)  # every registered scorer (a test's own registrations never outlive it)
# The smallest parameters of the scorers that train or take gradients: selective trains `folds` x `seeds` models
SMALL = {"selective": {"seeds": 1, "batch_size": 8, "learning_rate": 1e-3},
         "if": {"scope": "last_k", "last_k": 1}, "tif": {"scope": "last_k", "last_k": 1},
         "density": {"rows": 32}}
N_PAIRS = 16


def rated_rows(n: int, seed: int) -> list[dict]:
    """Pairs with the columns rating- and label-based scorers read: score_chosen / score_rejected (a dataset's own
    ratings) and is_flipped (a benchmark's hidden label, the oracle's)."""
    rng = np.random.default_rng(seed)
    return [{**row, "score_chosen": float(rng.integers(1, 11)), "score_rejected": float(rng.integers(1, 11)),
             "is_flipped": bool(rng.random() < 0.3)} for row in make_pairs(n, seed=seed)]


@pytest.fixture(scope="module")
def sources(bpe_tokenizer):
    """One object per role, shared by the providers below."""
    policy, reference, validation = (LoadedModel(make_tiny_llama(bpe_tokenizer, seed=s), bpe_tokenizer, role, role)
                                     for role, s in (("policy", 31), ("reference", 32), ("validation", 33)))
    return {"policy": policy, "reference": reference, "validation": validation,
            "reward_model": LoadedModel(tiny_reward_model(bpe_tokenizer), bpe_tokenizer, "rm", "rm"),
            "validation_pairs": load_pairs(Dataset.from_list(make_pairs(8, seed=34))),
            "embedder": CausalEmbedder.of(LoadedModel(make_tiny_llama(bpe_tokenizer, seed=35), bpe_tokenizer,
                                                      "embedder", "embedder"), max_length=64)}


@pytest.fixture(scope="module")
def data():
    return load_pairs(Dataset.from_list(rated_rows(N_PAIRS, seed=30)))


ENGINE = EngineConfig(beta=0.1, max_length=64, dtype="float32", device="cpu", threads=1)


def full_provider(data, sources, **drop) -> Resources:
    return Resources(data, ENGINE, {r: s for r, s in sources.items() if r not in drop}, seed=3)


def test_the_provider_supplies_every_role(data, sources):
    assert set(sources) == set(ROLES)
    assert {"score_chosen", "score_rejected", "is_flipped"} <= set(data.raw.column_names)
    assert {"margin", "reward-margin", "alignment-potential"} <= set(RATING_SCORERS)


@pytest.mark.parametrize("name", NAMES)
def test_static_checks(name):
    check_static(name)


@pytest.mark.parametrize("name", NAMES)
def test_dynamic_checks(name, data, sources, one_thread):
    scorer = get_scorer(name, **SMALL.get(name, {}))
    check_dynamic(scorer, full_provider(data, sources))


RATING_SCORERS = [n for n in NAMES if SCORERS[n]().missing_input(False, []) is not None
                  and SCORERS[n]().missing_input(False, ["score_chosen", "score_rejected"]) is None]


@pytest.mark.parametrize("name", RATING_SCORERS)
def test_dynamic_checks_from_the_rating_columns(name, data, sources, one_thread):
    """The scorers that read a reward model or, without one, the data's ratings: the second way too."""
    check_dynamic(get_scorer(name), full_provider(data, sources, reward_model=True))


def test_resources_that_cannot_feed_a_scorer_are_refused(data, sources):
    with pytest.raises(ValueError, match=r"cannot feed scorer 'lossdiff': .*--validation"):
        check_dynamic("lossdiff", full_provider(data, sources, validation=True))
    bare = load_pairs(Dataset.from_list(make_pairs(4, seed=1)))
    with pytest.raises(ValueError, match=r"cannot feed scorer 'margin': .*--reward-model or the columns"):
        check_dynamic("margin", Resources(bare, ENGINE, {}))


# --- check_scorer fails on broken scorers --------------------------------------------------------------------------
def pairs_only(n: int = 6) -> Resources:
    return Resources(load_pairs(Dataset.from_list(make_pairs(n, seed=2))), ENGINE, seed=1)


class Lengths(Scorer):
    """A well-formed scorer the broken ones below change one thing of."""

    name = "broken-lengths"
    columns = ("broken_lengths",)

    def score(self, resources) -> dict[str, np.ndarray]:
        return {"broken_lengths": np.asarray([len(c) for c in resources.pairs.pairs["chosen"]], dtype=float)}


@dataclasses.dataclass
class NoHelpParams(ScorerParams):
    width: int = 3  # a plain dataclass field: no help text, no range


@dataclasses.dataclass
class UncheckedParams(ScorerParams):
    width: int = option(3, "Declares a range its check() skips.", low=1)

    def __post_init__(self) -> None:  # not Checked's: the declared range is never enforced
        pass


class ShortColumn(Lengths):
    def score(self, resources):
        return {"broken_lengths": super().score(resources)["broken_lengths"][:-1]}


class ListColumn(Lengths):
    def score(self, resources):
        return {"broken_lengths": list(super().score(resources)["broken_lengths"])}


class ExtraColumn(Lengths):
    def score(self, resources):
        return {**super().score(resources), "undeclared": np.zeros(len(resources.pairs.pairs))}


class IntegerColumn(Lengths):
    def score(self, resources):
        return {"broken_lengths": super().score(resources)["broken_lengths"].astype(int)}


class Unseeded(Lengths):
    def score(self, resources):  # a fresh, unseeded draw every call: not a function of the seed
        return {"broken_lengths": np.random.default_rng().random(len(resources.pairs.pairs))}


class NoHelp(Lengths):
    Params = NoHelpParams


class Unchecked(Lengths):
    Params = UncheckedParams


class UnknownRole(Lengths):
    needs = ("policy", "critic")


class RuleOnAnotherColumn(Lengths):
    def selection_rule(self):
        return {"rule": "top", "column": "irm"}


class UnknownRule(Lengths):
    def selection_rule(self):
        return {"rule": "middle", "column": "broken_lengths"}


class ReservedColumn(Lengths):
    columns = ("chosen_logps",)

    def score(self, resources):
        return {"chosen_logps": super().score(resources)["broken_lengths"]}


class NotJson(Lengths):
    def describe(self):
        return {**super().describe(), "fitted": np.zeros(2)}


class NegativePasses(Lengths):
    def compute_passes(self, n_pairs, n_validation):
        return -1.0 * n_pairs


class CommaName(Lengths):
    name = "broken,lengths"


@pytest.mark.parametrize(("cls", "check", "message"), [
    (ShortColumn, "score", r"column 'broken_lengths' has shape \(5,\), not \(6,\): one value a pair"),
    (ListColumn, "score", "column 'broken_lengths' is a list, not a numpy array"),
    (ExtraColumn, "score", r"returns the columns \['broken_lengths', 'undeclared'\], declared \['broken_lengths'\]"),
    (IntegerColumn, "score", "column 'broken_lengths' is int64, not a float array"),
    (Unseeded, "determinism", "column 'broken_lengths' differs between two scorings under the same seed 1"),
    (NoHelp, "params", "NoHelpParams.width has no help text"),
    (Unchecked, "ranges", r"width=0, outside its declared low=1, is accepted"),
    (UnknownRole, "needs", "unknown role"),
    (RuleOnAnotherColumn, "selection_rule", r"reads irm, which is not among the columns \['broken_lengths'\]"),
    (UnknownRule, "selection_rule", "rule 'middle' is not one of prefsift.select.RULES"),
    (ReservedColumn, "columns", "chosen_logps: the score file's own column name"),
    (NotJson, "describe", "not JSON-serialisable"),
    (NegativePasses, "compute_passes", r"compute_passes\(1, 0\) = -1.0: must be finite and >= 0"),
    (CommaName, "name", "no spaces or commas"),
])
def test_check_scorer_fails_on_a_broken_scorer(cls, check, message):
    register(cls)  # for this test only: the registry is restored after it
    with pytest.raises(AssertionError, match=rf"^scorer '{cls.name}': {check}: .*{message}"):
        check_scorer(cls, pairs_only())


def test_the_well_formed_one_passes_and_an_unregistered_one_does_not():
    with registry_restored():
        register(Lengths)
        check_scorer(Lengths, pairs_only())
    with pytest.raises(AssertionError, match="^scorer 'broken-lengths': registered: not in prefsift.scorers.SCORERS"):
        check_scorer(Lengths)
    with pytest.raises(AssertionError, match="^scorer 'no-such-scorer': registered: no scorer is registered"):
        check_scorer("no-such-scorer")


def test_expected_failed_checks_are_strict():
    register(Lengths)
    with pytest.raises(AssertionError, match="broken-lengths': describe: expected to fail .* but passes"):
        check_scorer(Lengths, expected_failed_checks={"describe": "it does not"})
    with pytest.raises(ValueError, match="unknown check"):
        check_scorer(Lengths, expected_failed_checks={"describ": "a typo"})
    assert {"score", "determinism", "another_seed", "labelled", "ranges"} <= set(CHECKS)


def test_a_labelled_copy_selects_on_its_own_renamed_column():
    """`methods: [{name: irm, label: irm-narrow}]`: the copy writes irm_narrow and its rule reads irm_narrow (it read
    irm_narrow_narrow, a column it never writes, for every scorer keeping the base class's rule)."""
    from prefsift.scorers.base import labelled

    copy = labelled(get_scorer("irm"), "irm-narrow")
    assert copy.columns == ("irm_narrow",) and copy.selection_rule()["column"] == "irm_narrow"
    register(Lengths)
    check_static(Lengths)  # the labelled check passes for a base-rule scorer

    class NameRule(Lengths):  # a rule built from the scorer's own attributes is renamed once too
        name = "name-rule"
        columns = ("name_rule",)

        def selection_rule(self):
            return {"rule": "top", "column": self.columns[0]}

    register(NameRule)
    check_static(NameRule)
    assert labelled(NameRule(), "narrow").selection_rule()["column"] == "narrow"


# --- the registry is restored after every test ---------------------------------------------------------------------
class Temporary(Lengths):
    name = "registered-for-one-test"
    Params = BandParams


RAN: list[str] = []


def test_a_scorer_registered_in_a_test_is_there_for_that_test():
    register(Temporary)
    assert SCORERS["registered-for-one-test"] is Temporary and get_scorer("registered-for-one-test")
    RAN.append("registered")


def test_and_gone_in_the_next():
    assert RAN == ["registered"]  # the test above ran first (file order) and registered it
    assert "registered-for-one-test" not in SCORERS
    assert "length-ratio" not in SCORERS  # test_add_scorer's example, registered by its own tests only
    assert sorted(SCORERS) == NAMES


def test_registry_restored_undoes_additions_and_removals_in_place():
    before = dict(SCORERS)
    with registry_restored() as registry:
        assert registry is SCORERS
        register(Temporary)
        del SCORERS["random"]
    assert SCORERS == before and SCORERS["random"] is before["random"]

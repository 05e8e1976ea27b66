"""ISA, information sampling for alignment (Khera, Ghosh, Dutta 2024; METHODS.md section 1).

Embed every item, fit a 2-component Gaussian mixture to all of them, take each item's log-likelihood l, min-max
scale it over the dataset to l' ∈ [0, 1], p = exp(l') ∈ [1, e], and score the item by its entropy change
Δ = −p log p = −l'·exp(l') ∈ [−e, 0]. Δ falls as l' rises, so the paper's "top k by Δ" (descending) keeps the
least likely, atypical items; reading "largest change" as |Δ| (ascending Δ) keeps the most typical ones.

Columns: `isa` is a pair's Δ; with completion items (the paper: prompt + one response, each side its own item,
as KTO trains them) also `isa_chosen` and `isa_rejected`, and `isa` combines them (mean by default: a DPO step
trains on both sides, and the mean is the same rule under both orders, where max under one is min under the
other). The columns always hold Δ itself; the order decides the rule: top of `isa` (descending-delta) or its
bottom (ascending-delta).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prefsift.engine.embeddings import ITEMS, embed_items
from prefsift.errors import ConfigError
from prefsift.scorers.base import Scorer, ScorerParams, register
from prefsift.settings import option

COVARIANCE_TYPES = ("auto", "full", "tied", "diag", "spherical")
# auto: one shared full covariance (tied) once there are this many items per dimension, else diagonal. Measured on
# MiniLM (384-d) completion items of HH-RLHF (bench/results/isa-minilm-all.txt), held-out log-likelihood per item,
# tied vs diag: fitted on 0.5 x dim items -77781 vs 655, 1 x dim -2518 vs 657, 2 x dim 684 vs 658, 3 x dim 770 vs
# 659; on 2,308 items (6 x dim) tied 810, full 789, diag 660. Full covariances (one per component) need more items
# than tied: fitted on 800 (2 x dim) they scored -1557 held out against 1069 on the fitted items.
TIED_ITEMS_PER_DIM = 2
ORDERS = ("descending-delta", "ascending-delta", "atypical", "typical")  # the last two name the first two
COMBINE = ("mean", "max", "min")


@dataclass
class ISAParams(ScorerParams):
    covariance_type: str = option("auto", "Mixture covariance (scikit-learn's full, tied, diag, spherical); auto: "
                                          "tied with at least 2 items per dimension, else diag.",
                                  choices=COVARIANCE_TYPES)
    n_components: int = option(2, "Mixture components (the paper: 2).", low=1)
    order: str = option("descending-delta", "descending-delta (the paper's literal reading: atypical items) or "
                                            "ascending-delta (typical items); aliases atypical / typical.",
                        choices=ORDERS)
    item: str = option("completion", "What one embedding is: completion (prompt + one response, the paper) or "
                                     "pair (prompt + both responses).", choices=ITEMS)
    combine: str = option("mean", "How a pair's score combines its completions' Δ (completion items).",
                          choices=COMBINE)
    pca_dim: int | None = option(None, "Reduce the embeddings to this many PCA components first (None: no).", low=1)
    reg_covar: float = option(1e-6, "Added to the covariances' diagonal (scikit-learn's reg_covar).", low=0.0)
    n_init: int = option(1, "Mixture fits from different starts; the best likelihood is kept.", low=1)
    batch_size: int = option(32, "Items per embedding batch.", low=1)
    train_with: str = option("dpo", "How `run`, `compare` and `demo` train its subsets: dpo on the selected pairs, or "
                                    "kto on the selected completions (the paper's protocol; needs item=completion).",
                             choices=("dpo", "kto"))

    def check(self) -> None:
        if self.train_with == "kto" and self.item != "completion":
            raise ConfigError("isa: train_with=kto selects completions; it needs item=completion")

    def descending(self) -> bool:
        return self.order in ("descending-delta", "atypical")


@dataclass
class MixtureScores:
    """Per item: log-likelihood under the mixture, its min-max scaled value, and the entropy change Δ."""

    loglik: np.ndarray
    scaled: np.ndarray
    delta: np.ndarray
    mixture: object  # the fitted sklearn GaussianMixture


def entropy_change(loglik: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(l', Δ): l min-max scaled over the items to [0, 1], p = exp(l'), Δ = −p log p. All-equal l gives l' = 0."""
    loglik = np.asarray(loglik, dtype=np.float64)
    low, span = loglik.min(), np.ptp(loglik)
    scaled = (loglik - low) / span if span > 0 else np.zeros_like(loglik)
    p = np.exp(scaled)
    return scaled, -p * np.log(p)


def resolve_covariance(covariance_type: str, n_items: int, dim: int) -> str:
    if covariance_type != "auto":
        return covariance_type
    return "tied" if n_items >= TIED_ITEMS_PER_DIM * dim else "diag"


def mixture_scores(vectors: np.ndarray, *, n_components: int = 2, covariance_type: str = "auto", seed: int = 0,
                   reg_covar: float = 1e-6, n_init: int = 1) -> MixtureScores:
    """Fit the mixture to all `vectors` (n, d) and score each row (the paper's steps 2-4)."""
    from sklearn.mixture import GaussianMixture

    vectors = np.asarray(vectors, dtype=np.float64)
    if len(vectors) < max(2, n_components):
        raise ConfigError(f"isa needs at least {max(2, n_components)} items to fit a {n_components}-component "
                          f"mixture (got {len(vectors)})")
    kind = resolve_covariance(covariance_type, *vectors.shape)
    mixture = GaussianMixture(n_components=n_components, covariance_type=kind, random_state=seed,
                              reg_covar=reg_covar, n_init=n_init)
    mixture.fit(vectors)
    loglik = mixture.score_samples(vectors)
    scaled, delta = entropy_change(loglik)
    return MixtureScores(loglik, scaled, delta, mixture)


def combine(chosen: np.ndarray, rejected: np.ndarray, how: str) -> np.ndarray:
    stacked = np.stack([chosen, rejected])
    return {"mean": stacked.mean(0), "max": stacked.max(0), "min": stacked.min(0)}[how]


@register
class ISAScorer(Scorer):
    name = "isa"
    needs = ("embedder",)
    columns = ("isa", "isa_chosen", "isa_rejected")
    Params = ISAParams

    def __init__(self, params: ISAParams | None = None) -> None:
        super().__init__(params)
        if self.params.item == "pair":
            self.columns = ("isa",)  # type: ignore[misc]

    def compute_passes(self, n_pairs: int, n_validation: int) -> float:
        # the embedding pass: two items a pair (each prompt + one response) or one (prompt + both)
        return (2.0 if self.params.item == "completion" else 1.0) * n_pairs

    def selection_rule(self) -> dict:
        return {"rule": "top" if self.params.descending() else "bottom", "column": "isa"}

    def completion_columns(self) -> tuple[str, str] | None:
        return ("isa_chosen", "isa_rejected") if self.params.train_with == "kto" else None

    def score(self, resources) -> dict[str, np.ndarray]:
        p = self.params
        sides = embed_items(resources, p.item, pca_dim=p.pca_dim, batch_size=p.batch_size)
        names = list(sides)
        fitted = mixture_scores(np.concatenate([sides[s] for s in names]), n_components=p.n_components,
                                covariance_type=p.covariance_type, seed=resources.seed, reg_covar=p.reg_covar,
                                n_init=p.n_init)
        deltas = dict(zip(names, np.split(fitted.delta, len(names)), strict=True))
        if p.item == "pair":
            return {"isa": deltas["pair"]}
        return {"isa": combine(deltas["chosen"], deltas["rejected"], p.combine), "isa_chosen": deltas["chosen"],
                "isa_rejected": deltas["rejected"]}

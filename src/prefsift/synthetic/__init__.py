"""The embedded benchmark: a synthetic preference task with a hidden oracle, and the tiny model playing it."""

from prefsift.synthetic.task import (
    HIDDEN_COLUMNS,
    BenchmarkTask,
    OracleJudge,
    TaskConfig,
    make_task,
    oracle_reward,
)
from prefsift.synthetic.tiny import (
    build_char_tokenizer,
    build_tiny_llama,
    greedy_answers,
    sft_model,
    sft_train,
    torch_threads,
)

__all__ = [
    "HIDDEN_COLUMNS",
    "BenchmarkTask",
    "OracleJudge",
    "TaskConfig",
    "build_char_tokenizer",
    "build_tiny_llama",
    "greedy_answers",
    "make_task",
    "oracle_reward",
    "sft_model",
    "sft_train",
    "torch_threads",
]

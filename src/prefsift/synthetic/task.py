"""The synthetic preference task behind `prefsift demo`: string puzzles with a hidden oracle reward.

(Over 400 lines: one generator, its task families, response grades, noise regimes and oracle, which only make sense
read together.)

A prompt asks for a transform of a short letter string, e.g. "rev:cabd=" (answer "dbac"). Responses come in
graded quality: the exact answer, answers with character substitutions, a "lazy" echo of the input, answers
that are too short or too long. The oracle scores a response by its edit distance to the answer, with a
penalty for a wrong length. Training pairs are labelled by the oracle and then corrupted on purpose (flipped
labels, near-ties, near-duplicate prompts) at the rates of `TaskConfig`, and every row keeps hidden columns
that say what was done to it, so a selection method can be graded against the truth.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from prefsift.errors import ConfigError

LETTERS = "abcdefgh"
# The shift family maps a..h to b..i, so responses may use one letter more than inputs.
RESPONSE_LETTERS = "abcdefghi"

FAMILIES: dict[str, Callable[[str], str]] = {
    "rev": lambda s: s[::-1],
    "srt": lambda s: "".join(sorted(s)),
    "nxt": lambda s: "".join(chr(ord(c) + 1) for c in s),
}

# Columns of a pair row that only the benchmark knows; strip them before handing rows to a trainer or scorer.
HIDDEN_COLUMNS = ("oracle_margin", "is_flipped", "is_near_tie", "is_near_duplicate", "family")

# A response kind: ("exact", 0), ("sub", k substitutions), ("lazy", 0), ("short", k cut), ("long", k added).
Kind = tuple[str, int]


@dataclass
class TaskConfig:
    """Sizes and corruption rates of the synthetic preference task (the demo's defaults fit 2 CPU cores)."""

    seed: int = field(
        default=0, metadata={"help": "Seed of every random choice; same config gives the same task."}
    )
    n_train: int = field(default=2000, metadata={"help": "Number of (noisy) training pairs."})
    n_validation: int = field(
        default=200, metadata={"help": "Number of validation pairs (the trusted set LossDiff trains θ_val on)."}
    )
    n_test: int = field(
        default=500, metadata={"help": "Number of clean test pairs (held-out preference accuracy)."}
    )
    n_eval_prompts: int = field(
        default=500, metadata={"help": "Number of held-out prompts for the win rate."}
    )
    n_sft: int = field(default=4000, metadata={"help": "Number of mixed-quality SFT demonstrations."})
    min_len: int = field(default=3, metadata={"help": "Shortest input string."})
    max_len: int = field(default=6, metadata={"help": "Longest input string."})
    max_errors: int = field(
        default=2, metadata={"help": "Most character substitutions in a corrupted response."}
    )
    length_penalty: float = field(
        default=0.1,
        metadata={"help": "Oracle penalty for a response whose length differs from the answer's."},
    )
    flip_rate: float = field(
        default=0.3,
        metadata={"help": "Share of training pairs whose chosen/rejected are swapped (label noise)."},
    )
    validation_flip_rate: float = field(
        default=0.05,
        metadata={"help": "Share of validation pairs flipped: a trusted set is mostly, not perfectly, clean."},
    )
    near_tie_rate: float = field(
        default=0.1, metadata={"help": "Share of training pairs whose two responses differ by < tie_epsilon."}
    )
    near_duplicate_rate: float = field(
        default=0.05,
        metadata={
            "help": "Share of training pairs whose prompt differs from another pair's by one character."
        },
    )
    flip_lazy_share: float = field(
        default=0.5,
        metadata={
            "help": "Share of the flips aimed at pairs with the lazy echo on one side (a biased annotator); "
            "the rest hit non-tie pairs uniformly."
        },
    )
    tie_epsilon: float = field(
        default=0.05,
        metadata={"help": "Oracle margin below which a pair is a near-tie (other pairs are above)."},
    )
    rating_noise: float = field(
        default=0.25,
        metadata={"help": "Std of the Gaussian noise on the training pairs' visible score_chosen/score_rejected "
                          "ratings (the oracle reward plus noise: an external rater, as UltraFeedback's ratings)."},
    )
    sft_lazy_rate: float = field(
        default=0.45, metadata={"help": "Share of SFT demonstrations that lazily echo the input."}
    )
    sft_exact_rate: float = field(
        default=0.35,
        metadata={"help": "Share of SFT demonstrations that are exact; the rest are flawed answers."},
    )

    def __post_init__(self) -> None:
        for name in ("n_train", "n_validation", "n_test", "n_eval_prompts", "n_sft"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 2 <= self.min_len <= self.max_len:
            raise ConfigError(f"need 2 <= min_len <= max_len, got {self.min_len}, {self.max_len}")
        rates = ("flip_rate", "flip_lazy_share", "near_tie_rate", "near_duplicate_rate", "validation_flip_rate")
        for name in (*rates, "sft_lazy_rate", "sft_exact_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        # Flips and near-duplicates are drawn among the pairs that are not near-ties.
        if self.near_tie_rate + max(self.flip_rate, self.near_duplicate_rate) > 1.0:
            raise ConfigError("near_tie_rate + max(flip_rate, near_duplicate_rate) must be <= 1")
        if self.sft_lazy_rate + self.sft_exact_rate > 1.0:
            raise ConfigError("sft_lazy_rate + sft_exact_rate must be <= 1")
        if not (0.0 <= self.rating_noise < float("inf")):
            raise ConfigError(f"rating_noise must be a finite number >= 0, got {self.rating_noise}")
        if not 0.0 < self.tie_epsilon < 1.0 or not 0.0 <= self.length_penalty < 1.0:
            raise ConfigError("tie_epsilon must be in (0, 1) and length_penalty in [0, 1)")


def make_prompt(family: str, text: str) -> str:
    return f"{family}:{text}="


def parse_prompt(prompt: str) -> tuple[str, str]:
    """(family, input string) of a task prompt; ValueError for anything else."""
    family, sep, rest = prompt.partition(":")
    if not sep or family not in FAMILIES or not rest.endswith("="):
        raise ValueError(f"not a benchmark prompt: {prompt!r}")
    return family, rest[:-1]


def answer(prompt: str) -> str:
    family, text = parse_prompt(prompt)
    return FAMILIES[family](text)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (unit costs); the strings here are a few characters long."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def oracle_reward(prompt: str, response: str, *, length_penalty: float = 0.1) -> float:
    """Quality in [0, 1]: 1 - edit_distance/len(answer), minus `length_penalty` if the length is wrong."""
    target = answer(prompt)
    score = 1.0 - edit_distance(response, target) / len(target)
    if len(response) != len(target):
        score -= length_penalty
    return max(0.0, score)


def make_response(rng: random.Random, prompt: str, kind: Kind) -> str:
    """A response of the given quality kind; the randomness (which characters go wrong) comes from `rng`."""
    family, text = parse_prompt(prompt)
    target = FAMILIES[family](text)
    name, k = kind
    if name == "exact":
        return target
    if name == "lazy":
        return text  # echo the input: the systematic shortcut the SFT model is taught and DPO should unlearn
    if name == "short":
        return target[: len(target) - k]
    if name == "long":
        return target + "".join(rng.choice(RESPONSE_LETTERS) for _ in range(k))
    if name == "sub":
        chars = list(target)
        for i in rng.sample(range(len(chars)), min(k, len(chars))):
            chars[i] = rng.choice([c for c in RESPONSE_LETTERS if c != chars[i]])
        return "".join(chars)
    raise ValueError(f"unknown response kind {kind}")


@dataclass
class BenchmarkTask:
    """A generated task: noisy train pairs, clean validation/test pairs, eval prompts, SFT demonstrations."""

    config: TaskConfig
    train: list[dict]
    validation: list[dict]
    test: list[dict]
    eval_prompts: list[str]
    sft_examples: list[tuple[str, str]]

    def oracle_reward(self, prompt: str, response: str) -> float:
        return oracle_reward(prompt, response, length_penalty=self.config.length_penalty)

    def answer(self, prompt: str) -> str:
        return answer(prompt)

    @property
    def max_response_chars(self) -> int:
        """Longest response of any kind (the "long" kind adds one character); add one token for the EOS."""
        return self.config.max_len + 1


class OracleJudge:
    """The judge the evaluator calls: the hidden oracle reward (higher is better)."""

    name = "oracle"

    def __init__(self, task: BenchmarkTask) -> None:
        self.task = task

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return [self.task.oracle_reward(p, r) for p, r in zip(prompts, responses, strict=True)]


class _PromptPool:
    """Draws prompts that no other split has used, so splits never share a prompt."""

    def __init__(self, config: TaskConfig) -> None:
        self.config = config
        self.used: set[str] = set()

    def draw(self, rng: random.Random) -> str:
        while True:
            family = rng.choice(sorted(FAMILIES))
            length = rng.randint(self.config.min_len, self.config.max_len)
            prompt = make_prompt(family, "".join(rng.choice(LETTERS) for _ in range(length)))
            if prompt not in self.used:
                self.used.add(prompt)
                return prompt

    def neighbour(self, rng: random.Random, prompt: str) -> str | None:
        """An unused prompt one character away from `prompt` (None if all neighbours are taken)."""
        family, text = parse_prompt(prompt)
        options = [
            make_prompt(family, text[:i] + c + text[i + 1 :])
            for i in range(len(text))
            for c in LETTERS
            if c != text[i]
        ]
        options = [p for p in options if p not in self.used]
        if not options:
            return None
        choice = rng.choice(options)
        self.used.add(choice)
        return choice


# Quality kinds a pair's two responses are drawn from, with weights: the lazy echo is common so that clean
# pairs teach the policy to leave it, and flipped pairs teach the opposite.
_PAIR_KINDS: list[tuple[Kind, float]] = [
    (("exact", 0), 0.30),
    (("sub", 1), 0.15),
    (("sub", 2), 0.10),
    (("lazy", 0), 0.25),
    (("short", 1), 0.10),
    (("long", 1), 0.10),
]


def _draw_kind(rng: random.Random, max_errors: int) -> Kind:
    kinds = [(k, w) for k, w in _PAIR_KINDS if k[0] != "sub" or k[1] <= max_errors]
    return rng.choices([k for k, _ in kinds], weights=[w for _, w in kinds])[0]


def _make_pair(
    rng: random.Random,
    task_config: TaskConfig,
    prompt: str,
    *,
    near_tie: bool,
    kinds: tuple[Kind, Kind] | None = None,
) -> tuple[dict, tuple[Kind, Kind]] | None:
    """A pair labelled by the oracle (chosen has the higher reward), or None if no valid pair came out."""
    for _ in range(50):
        if kinds is not None:
            kind_a, kind_b = kinds
        elif near_tie:
            # Two different flawed answers of the same kind: same edit distance, so (near-)equal rewards.
            kind_a = kind_b = rng.choice(
                [("sub", k) for k in range(1, task_config.max_errors + 1)] + [("long", 1)]
            )
        else:
            kind_a, kind_b = _draw_kind(rng, task_config.max_errors), _draw_kind(rng, task_config.max_errors)
        response_a, response_b = make_response(rng, prompt, kind_a), make_response(rng, prompt, kind_b)
        if response_a == response_b:
            continue
        reward_a = oracle_reward(prompt, response_a, length_penalty=task_config.length_penalty)
        reward_b = oracle_reward(prompt, response_b, length_penalty=task_config.length_penalty)
        if (abs(reward_a - reward_b) < task_config.tie_epsilon) != near_tie:
            continue
        if reward_b > reward_a:
            response_a, response_b, reward_a, reward_b, kind_a, kind_b = (
                response_b, response_a, reward_b, reward_a, kind_b, kind_a,
            )  # fmt: skip
        row = {
            "prompt": prompt,
            "chosen": response_a,
            "rejected": response_b,
            "oracle_margin": reward_a - reward_b,
            "is_flipped": False,
            "is_near_tie": near_tie,
            "is_near_duplicate": False,
            "family": parse_prompt(prompt)[0],
        }
        return row, (kind_a, kind_b)
    return None


def _clean_pairs(rng: random.Random, pool: _PromptPool, config: TaskConfig, n: int) -> list[dict]:
    rows = []
    while len(rows) < n:
        made = _make_pair(rng, config, pool.draw(rng), near_tie=False)
        if made is not None:
            rows.append(made[0])
    return rows


def _train_pairs(rng: random.Random, pool: _PromptPool, config: TaskConfig) -> list[dict]:
    n = config.n_train
    n_tie = round(config.near_tie_rate * n)
    n_dup = round(config.near_duplicate_rate * n)
    n_flip = round(config.flip_rate * n)
    rows: list[dict] = []
    kinds: list[tuple[Kind, Kind]] = []
    while len(rows) < n - n_dup:
        made = _make_pair(rng, config, pool.draw(rng), near_tie=len(rows) < n_tie)
        if made is not None:
            rows.append(made[0])
            kinds.append(made[1])
    # Near-duplicates copy a non-tie pair onto a prompt one character away, with responses of the same kinds:
    # nearly the same training signal twice, which a diversity-aware selection should notice.
    sources = list(range(n_tie, len(rows)))
    while len(rows) < n:
        source = rng.choice(sources)
        prompt = pool.neighbour(rng, rows[source]["prompt"])
        made = (
            None if prompt is None else _make_pair(rng, config, prompt, near_tie=False, kinds=kinds[source])
        )
        if made is not None:
            made[0]["is_near_duplicate"] = True
            rows.append(made[0])
            kinds.append(made[1])
    # Label noise: swap chosen and rejected on pairs with a real margin (a flipped near-tie has no signal).
    # Uniform noise barely hurts DPO here (the majority label still wins on every kind of pair); an annotator
    # biased toward the lazy echo cancels the signal that moves the SFT model off its shortcut, and that is
    # the noise that makes selecting pairs matter.
    candidates = [i for i, row in enumerate(rows) if not row["is_near_tie"]]
    lazy = [i for i in candidates if ("lazy", 0) in kinds[i]]
    targeted = rng.sample(lazy, min(len(lazy), round(config.flip_lazy_share * n_flip)))
    chosen_set = set(targeted)
    rest = [i for i in candidates if i not in chosen_set]
    for i in targeted + rng.sample(rest, n_flip - len(targeted)):
        row = rows[i]
        row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
        row["oracle_margin"] = -row["oracle_margin"]
        row["is_flipped"] = True
    rng.shuffle(rows)
    return rows


def _sft_examples(rng: random.Random, pool: _PromptPool, config: TaskConfig) -> list[tuple[str, str]]:
    flawed_rate = 1.0 - config.sft_lazy_rate - config.sft_exact_rate
    flawed: list[Kind] = [("sub", k) for k in range(1, config.max_errors + 1)] + [("short", 1), ("long", 1)]
    kinds: list[Kind] = [("lazy", 0), ("exact", 0), *flawed]
    weights = [config.sft_lazy_rate, config.sft_exact_rate] + [flawed_rate / len(flawed)] * len(flawed)
    examples = []
    for _ in range(config.n_sft):
        prompt = pool.draw(rng)
        examples.append((prompt, make_response(rng, prompt, rng.choices(kinds, weights=weights)[0])))
    return examples


def make_task(config: TaskConfig) -> BenchmarkTask:
    """Generate the task. Same config, same task. Each split has its own random stream, so changing a split's
    size leaves the splits drawn before it unchanged (order: eval prompts, test, validation, SFT, train)."""
    needed = config.n_eval_prompts + config.n_test + config.n_validation + config.n_sft + config.n_train
    available = len(FAMILIES) * sum(len(LETTERS) ** n for n in range(config.min_len, config.max_len + 1))
    if needed > available // 2:  # every split draws unused prompts by rejection: keep most of the space free
        raise ConfigError(f"{needed} prompts asked for but only {available} exist; raise max_len")
    pool = _PromptPool(config)

    def stream(name: str) -> random.Random:
        return random.Random(f"prefsift-bench:{config.seed}:{name}")  # str seeds hash with sha512: stable

    eval_rng = stream("eval")
    eval_prompts = [pool.draw(eval_rng) for _ in range(config.n_eval_prompts)]
    test = _clean_pairs(stream("test"), pool, config, config.n_test)
    validation = _clean_pairs(stream("validation"), pool, config, config.n_validation)
    noise = stream("validation-noise")  # its own stream: the rate leaves the validation pairs drawn unchanged
    for row in noise.sample(validation, round(config.validation_flip_rate * len(validation))):
        row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
        row["oracle_margin"], row["is_flipped"] = -row["oracle_margin"], True
    sft_examples = _sft_examples(stream("sft"), pool, config)
    train = _train_pairs(stream("train"), pool, config)
    # An external rater's scores, visible like UltraFeedback's: the oracle reward plus noise, rated per response, so
    # they disagree with a flipped label only as often as the noise makes them (their own stream: nothing else moves).
    ratings = stream("ratings")
    for row in train:
        for side in ("chosen", "rejected"):
            noisy = oracle_reward(row["prompt"], row[side], length_penalty=config.length_penalty) \
                + ratings.gauss(0.0, config.rating_noise)
            row[f"score_{side}"] = round(noisy, 3)
    return BenchmarkTask(
        config=config,
        train=train,
        validation=validation,
        test=test,
        eval_prompts=eval_prompts,
        sft_examples=sft_examples,
    )

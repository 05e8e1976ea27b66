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

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from prefsift.errors import ConfigError
from prefsift.settings import Checked, option

MAX_SEED = 2**32 - 1  # numpy's legacy seeding and torch's take no larger seed

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


# How the training labels are corrupted (`TaskConfig.label_noise`).
LABEL_NOISE = ("bradley-terry", "lazy-biased")
# Where the visible score_chosen/score_rejected ratings come from (`TaskConfig.ratings`).
RATINGS = ("label-derived", "independent")
# How the validation pairs' distribution differs from the test pairs' (`TaskConfig.validation_shift`).
VALIDATION_SHIFTS = ("none", "family")

_EULER_GAMMA = 0.5772156649015329  # the mean of a standard Gumbel variable


@dataclass
class TaskConfig(Checked):
    """Sizes, corruption rates and noise regimes of the synthetic preference task (the demo's defaults fit 2 CPU
    cores). The defaults are the regime of real annotation data: flips concentrated near ties (Bradley-Terry) and
    ratings from which the labels were derived (UltraFeedback's chosen is its higher-rated response)."""

    seed: int = option(0, "Seed of every random choice; same config gives the same task.", low=0, high=MAX_SEED)
    n_train: int = option(2000, "Number of (noisy) training pairs.", low=0)
    n_validation: int = option(200, "Number of validation pairs (the trusted set LossDiff trains θ_val on).", low=0)
    n_test: int = option(500, "Number of clean test pairs (held-out preference accuracy).", low=0)
    n_eval_prompts: int = option(500, "Number of held-out prompts for the win rate.", low=0)
    n_sft: int = option(4000, "Number of mixed-quality SFT demonstrations.", low=0)
    min_len: int = option(3, "Shortest input string.", low=2)
    max_len: int = option(6, "Longest input string.", low=2)
    max_errors: int = option(2, "Most character substitutions in a corrupted response.", low=1)
    length_penalty: float = option(0.1, "Oracle penalty for a response whose length differs from the answer's.",
                                   low=0.0, high=1.0, high_open=True)
    label_noise: str = option(
        "bradley-terry", "How training labels are flipped. bradley-terry: each pair independently with probability "
        "σ(−margin/τ) of its oracle margin, τ set so that the expected share is flip_rate (an annotator whose "
        "noisy utilities are the oracle reward plus Gumbel noise: flips fall near ties, as real annotator noise "
        "does). lazy-biased: exactly flip_rate of the pairs with a real margin, flip_lazy_share of them on pairs "
        "with the lazy echo on one side and the rest uniformly, whatever their margin (the task before issue 20).",
        choices=LABEL_NOISE)
    flip_rate: float = option(0.3, "Share of training pairs whose chosen/rejected are swapped (label noise): "
                                   "exact under lazy-biased, the expectation under bradley-terry.", low=0.0, high=1.0)
    flip_lazy_share: float = option(
        0.5, "lazy-biased only: share of the flips aimed at pairs with the lazy echo on one side (a biased "
        "annotator); the rest hit non-tie pairs uniformly.", low=0.0, high=1.0)
    validation_flip_rate: float = option(
        0.05, "Share of validation pairs flipped, under the same label_noise: a trusted set is mostly, not "
        "perfectly, clean.", low=0.0, high=1.0)
    near_tie_rate: float = option(0.1, "Share of training pairs whose two responses differ by < tie_epsilon.",
                                  low=0.0, high=1.0)
    near_duplicate_rate: float = option(
        0.05, "Share of training pairs whose prompt differs from another pair's by one character.", low=0.0, high=1.0)
    tie_epsilon: float = option(0.05, "Oracle margin below which a pair is a near-tie (other pairs are above).",
                                low=0.0, high=1.0, low_open=True, high_open=True)
    ratings: str = option(
        "label-derived", "The training pairs' visible score_chosen/score_rejected. label-derived: the ratings the "
        "labels came from, chosen = the higher rated (UltraFeedback); under bradley-terry they are the annotator's "
        "noisy utilities (oracle reward + centred Gumbel noise of scale τ), under lazy-biased the oracle reward + "
        "Gaussian noise of rating_noise, sorted to agree with the label. independent: an external rater, the oracle "
        "reward + Gaussian noise of rating_noise drawn apart from the labels, so it contradicts a flipped label "
        "about as often as it agrees with a clean one.", choices=RATINGS)
    rating_noise: float = option(0.25, "Std of the Gaussian noise of independent ratings (and of label-derived "
                                       "ones under lazy-biased).", low=0.0)
    validation_shift: str = option(
        "none", "How the validation pairs differ from the test pairs. none: the same generator. family: every "
        "validation prompt is of shift_family while train and test mix all families (an unrepresentative trusted "
        "set, the case the TIF paper's truncation argues for).", choices=VALIDATION_SHIFTS)
    shift_family: str = option("rev", "The one task family of the validation prompts under validation_shift: "
                                      "family.", choices=tuple(sorted(FAMILIES)))
    sft_lazy_rate: float = option(0.45, "Share of SFT demonstrations that lazily echo the input.", low=0.0, high=1.0)
    sft_exact_rate: float = option(0.35, "Share of SFT demonstrations that are exact; the rest are flawed answers.",
                                   low=0.0, high=1.0)

    def check(self) -> None:
        if self.min_len > self.max_len:
            raise ConfigError(f"need min_len <= max_len, got {self.min_len}, {self.max_len}")
        # lazy-biased draws its flips and near-duplicates among the pairs that are not near-ties
        if self.near_tie_rate + max(self.flip_rate, self.near_duplicate_rate) > 1.0:
            raise ConfigError("near_tie_rate + max(flip_rate, near_duplicate_rate) must be <= 1")
        # a Bradley-Terry flip has probability < 1/2 and near-ties (equal rewards) are never flipped, only shuffled
        if self.label_noise == "bradley-terry" and self.flip_rate >= 0.5 * (1.0 - self.near_tie_rate):
            raise ConfigError(f"label_noise bradley-terry flips each pair with probability < 0.5: flip_rate must be "
                              f"< 0.5 × (1 − near_tie_rate) = {0.5 * (1 - self.near_tie_rate):g}, got {self.flip_rate}")
        if self.label_noise == "bradley-terry" and self.validation_flip_rate >= 0.5:
            raise ConfigError(f"label_noise bradley-terry: validation_flip_rate must be < 0.5, got "
                              f"{self.validation_flip_rate}")
        if self.sft_lazy_rate + self.sft_exact_rate > 1.0:
            raise ConfigError("sft_lazy_rate + sft_exact_rate must be <= 1")


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
    flip_temperatures: dict[str, float] = field(default_factory=dict)  # τ of each Bradley-Terry split

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

    def draw(self, rng: random.Random, families: tuple[str, ...] | None = None) -> str:
        while True:
            family = rng.choice(sorted(families or FAMILIES))
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


def _clean_pairs(rng: random.Random, pool: _PromptPool, config: TaskConfig, n: int,
                 families: tuple[str, ...] | None = None) -> list[dict]:
    rows = []
    while len(rows) < n:
        made = _make_pair(rng, config, pool.draw(rng, families), near_tie=False)
        if made is not None:
            rows.append(made[0])
    return rows


def _train_pairs(rng: random.Random, pool: _PromptPool, config: TaskConfig) -> list[dict]:
    n = config.n_train
    n_tie = round(config.near_tie_rate * n)
    n_dup = round(config.near_duplicate_rate * n)
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
    if config.label_noise == "lazy-biased":
        _lazy_biased_flips(rng, rows, kinds, config)
    rng.shuffle(rows)
    return rows


def _swap(row: dict) -> None:
    row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
    row["oracle_margin"] = 0.0 - row["oracle_margin"]  # a tie stays +0.0
    row["is_flipped"] = row["oracle_margin"] < 0  # a tie swapped is no wrong label


def _lazy_biased_flips(rng: random.Random, rows: list[dict], kinds: list[tuple[Kind, Kind]], config: TaskConfig
                       ) -> None:
    """Swap chosen and rejected on exactly flip_rate of the pairs with a real margin, whatever the margin. Uniform
    noise barely hurts DPO here (the majority label still wins on every kind of pair); an annotator biased toward the
    lazy echo cancels the signal that moves the SFT model off its shortcut. Its flips have larger oracle margins
    than its clean pairs, the opposite of real annotator noise: the reason it is no longer the default."""
    n_flip = round(config.flip_rate * len(rows))
    candidates = [i for i, row in enumerate(rows) if not row["is_near_tie"]]
    lazy = [i for i in candidates if ("lazy", 0) in kinds[i]]
    targeted = rng.sample(lazy, min(len(lazy), round(config.flip_lazy_share * n_flip)))
    chosen_set = set(targeted)
    rest = [i for i in candidates if i not in chosen_set]
    for i in targeted + rng.sample(rest, n_flip - len(targeted)):
        _swap(rows[i])


def flip_probability(margin: float, temperature: float) -> float:
    """Bradley-Terry: the chance that an annotator prefers the worse response of a pair whose oracle margin is
    `margin` >= 0, σ(−margin/τ); a tie is a coin toss."""
    if temperature == 0.0:
        return 0.5 if margin == 0.0 else 0.0
    z = math.exp(-margin / temperature)  # margin >= 0: no overflow
    return z / (1.0 + z)


def bradley_terry_temperature(margins: list[float], rate: float, what: str) -> float:
    """The τ at which the expected share of flipped pairs (ties aside: swapping equal responses is no flip) is
    `rate`: Σ σ(−m/τ)·[m > 0] / n, which grows with τ from 0 to half the pairs with a margin."""
    real = [m for m in margins if m > 0.0]
    if rate == 0.0 or not real:
        return 0.0
    most = 0.5 * len(real) / len(margins)
    if rate >= most:
        raise ConfigError(f"{what}: a Bradley-Terry flip has probability < 0.5, so at most {most:.3f} of these pairs "
                          f"can be flipped in expectation; got {rate}")
    low, high = math.log(1e-6), math.log(1e6)
    for _ in range(200):  # bisection on log τ: the share is monotone in τ
        middle = 0.5 * (low + high)
        share = sum(flip_probability(m, math.exp(middle)) for m in real) / len(margins)
        low, high = (middle, high) if share < rate else (low, middle)
    return math.exp(0.5 * (low + high))


def _gumbel(rng: random.Random, scale: float) -> float:
    """Centred Gumbel noise of `scale`: the difference of two is logistic, which makes the choice Bradley-Terry."""
    u = rng.random()
    while u == 0.0:
        u = rng.random()
    return scale * (-math.log(-math.log(u)) - _EULER_GAMMA)


def _bradley_terry_labels(rng: random.Random, rows: list[dict], temperature: float, length_penalty: float
                          ) -> list[tuple[float, float]]:
    """Relabel each oracle-ordered pair as an annotator with utilities oracle reward + Gumbel(τ) would: chosen is the
    response of higher utility, so a pair of margin m is flipped with probability σ(−m/τ) (exactly Bradley-Terry).
    Returns each row's (chosen, rejected) utilities after the relabelling: ratings the labels are derived from."""
    utilities = []
    for row in rows:
        oracle = [oracle_reward(row["prompt"], row[side], length_penalty=length_penalty)
                  for side in ("chosen", "rejected")]
        noisy = [r + _gumbel(rng, temperature) for r in oracle]
        if noisy[1] > noisy[0]:
            _swap(row)
            noisy.reverse()
        utilities.append((noisy[0], noisy[1]))
    return utilities


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
    shifted = (config.shift_family,) if config.validation_shift == "family" else None
    validation = _clean_pairs(stream("validation"), pool, config, config.n_validation, shifted)
    noise = stream("validation-noise")  # its own stream: the rate leaves the validation pairs drawn unchanged
    temperatures = {}
    if config.label_noise == "lazy-biased":
        for row in noise.sample(validation, round(config.validation_flip_rate * len(validation))):
            _swap(row)
    else:
        temperatures["validation"] = bradley_terry_temperature(
            [r["oracle_margin"] for r in validation], config.validation_flip_rate, "validation_flip_rate")
        _bradley_terry_labels(noise, validation, temperatures["validation"], config.length_penalty)
    sft_examples = _sft_examples(stream("sft"), pool, config)
    train = _train_pairs(stream("train"), pool, config)
    utilities = None
    if config.label_noise == "bradley-terry":  # its own stream: the pairs drawn stay those of the other regime
        temperatures["train"] = bradley_terry_temperature(
            [r["oracle_margin"] for r in train], config.flip_rate, "flip_rate")
        utilities = _bradley_terry_labels(stream("labels"), train, temperatures["train"], config.length_penalty)
    # The visible ratings (their own stream: nothing else moves). Independent: an external rater, the oracle reward
    # plus noise rated per response, which disagrees with a flipped label only as often as the noise makes it.
    # Label-derived: the ratings the label was read from, so chosen is never rated below rejected.
    ratings = stream("ratings")
    for k, row in enumerate(train):
        if config.ratings == "label-derived" and utilities is not None:
            rated = list(utilities[k])
        else:
            rated = [oracle_reward(row["prompt"], row[side], length_penalty=config.length_penalty)
                     + ratings.gauss(0.0, config.rating_noise) for side in ("chosen", "rejected")]
            if config.ratings == "label-derived":
                rated.sort(reverse=True)
        row["score_chosen"], row["score_rejected"] = round(rated[0], 3), round(rated[1], 3)
    return BenchmarkTask(
        config=config,
        train=train,
        validation=validation,
        test=test,
        eval_prompts=eval_prompts,
        sft_examples=sft_examples,
        flip_temperatures=temperatures,
    )

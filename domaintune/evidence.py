"""Statistical evidence for promotion and health figures: bootstrap intervals of a metric and
paired tests between a champion and a challenger scored on the same examples.

Every metric a task type can resample is written as per-example *sufficient statistics*
(:class:`ExampleStats`): one row of numbers per example whose column sums determine the
metric through a ``combine`` function (accuracy: [correct, 1]; macro F1: per class tp, fp,
fn; corpus BLEU: n-gram matches and totals; perplexity: [nll, tokens]). Resampling examples
is then a weighted sum of rows: a bootstrap draws how often each example is taken
(``counts``, one row per resample) and evaluates ``combine(counts @ values)``; corpus-level
metrics (BLEU, chrF, entity F1, perplexity) are resampled exactly as the metric is defined,
not as a mean of per-example scores. A task type builds its statistics from its predictions
frame (``TaskType.example_statistics``); this module knows no task type.

Pure NumPy (SciPy for McNemar's exact binomial test, imported when it runs: importing
``scipy.stats`` costs start-up time every CLI call would pay). Deterministic for a seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

#: Bytes budgeted for one chunk of resamples (24 per example and resample; two 8-byte arrays
#: of that shape exist at once): 50,000 examples are resampled ~40 at a time, in ~32 MB.
CHUNK_BYTES = 48 * 1024 * 1024
#: Keys that name an example in a predictions frame (``align``), in the order compared.
ALIGN_KEYS = ("_source", "_row", "_example")

Test = Literal["paired_bootstrap", "mcnemar"]


@dataclass(frozen=True, eq=False)
class ExampleStats:
    """Per-example sufficient statistics of one metric.

    ``values``: n x k float64, one row per example in the predictions' row order;
    ``combine``: summed statistics of shape (..., k) -> the metric, shape (...). Summing all
    rows and combining gives the metric the task type reports for the split."""

    values: np.ndarray
    combine: Callable[[np.ndarray], np.ndarray]

    def __post_init__(self) -> None:
        values = np.asarray(self.values, dtype=np.float64)
        if values.ndim != 2:
            raise ValueError(f"ExampleStats.values: 2-D (examples x k) wanted, got {values.shape}")
        object.__setattr__(self, "values", values)

    @property
    def n(self) -> int:
        """The number of examples."""
        return int(self.values.shape[0])

    def metric(self) -> float:
        """The metric on all examples (the point estimate)."""
        return float(self.combine(self.values.sum(axis=0)))

    def take(self, rows: Sequence[int] | np.ndarray) -> ExampleStats:
        """The statistics of the examples at positions ``rows`` (in that order)."""
        return ExampleStats(self.values[np.asarray(rows, dtype=np.int64)], self.combine)


def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` elementwise, 0 where ``den`` is 0 (the metrics' zero-division rule)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)


def ratio_of_sums(sums: np.ndarray) -> np.ndarray:
    """``combine`` of [numerator, denominator] statistics: accuracy ([correct, 1]), a mean
    of per-example scores ([score, 1]), token accuracy ([correct, tokens]); 0 when empty."""
    return ratio(sums[..., 0], sums[..., 1])


def mean_stats(scores: Sequence[float] | np.ndarray) -> ExampleStats:
    """Statistics of a metric that is the mean of per-example scores: [score, 1]."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    return ExampleStats(np.column_stack([scores, np.ones_like(scores)]), ratio_of_sums)


def rowwise(fn: Callable[[np.ndarray], float]) -> Callable[[np.ndarray], np.ndarray]:
    """A ``combine`` of shape (..., k) -> (...) from a function of one vector of summed
    statistics (for metrics computed by a library's own scalar code, such as sacrebleu's)."""

    def combine(sums: np.ndarray) -> np.ndarray:
        sums = np.asarray(sums, dtype=np.float64)
        flat = sums.reshape(-1, sums.shape[-1])
        out = np.fromiter((fn(row) for row in flat), dtype=np.float64, count=len(flat))
        return out.reshape(sums.shape[:-1])

    return combine


class Interval(BaseModel):
    """A metric's point estimate and its percentile bootstrap interval over ``n`` examples."""

    model_config = ConfigDict(frozen=True)

    point: float
    low: float
    high: float
    n: int
    confidence: float = 0.95

    def describe(self) -> str:
        """``"0.843 [0.812, 0.871]"``."""
        return f"{self.point:.3f} [{self.low:.3f}, {self.high:.3f}]"


class Comparison(BaseModel):
    """The result of a paired test of a challenger against a champion on the same examples
    (what a registry version records as its promotion evidence).

    ``difference`` and ``interval`` are challenger - champion, sign-adjusted so that a
    positive value means the challenger is better (for a lower-is-better metric such as
    perplexity, champion - challenger). ``p_value``: one-sided, of "the challenger is not
    better". ``interval``: the paired bootstrap's percentile interval of the difference, for
    McNemar's test too. ``discordant``: McNemar's (challenger right and champion wrong,
    champion right and challenger wrong) counts; None for the bootstrap."""

    test: Test
    metric: str
    n: int
    champion: float
    challenger: float
    difference: float
    interval: tuple[float, float]
    p_value: float
    confidence: float
    higher_is_better: bool = True
    resamples: int = 0
    discordant: tuple[int, int] | None = None

    def describe(self) -> str:
        """One line: ``"paired bootstrap on 178 examples: macro_f1 +0.021 [−0.004, +0.046],
        p = 0.07"``. A lower-is-better metric shows the change as measured (challenger -
        champion: negative is better) and says so."""
        name = "McNemar's exact test" if self.test == "mcnemar" else "paired bootstrap"
        sign = 1.0 if self.higher_is_better else -1.0
        low, high = sorted((sign * self.interval[0], sign * self.interval[1]))
        change = f"{_signed(sign * self.difference)} [{_signed(low)}, {_signed(high)}]"
        if not self.higher_is_better:
            change += " (lower is better)"
        extra = ""
        if self.discordant is not None:
            extra = f" ({self.discordant[0]} vs {self.discordant[1]} discordant)"
        return f"{name} on {self.n} examples: {self.metric} {change}, p {_p(self.p_value)}{extra}"


def _signed(x: float) -> str:
    """``+0.021`` / ``−0.004`` (a real minus sign)."""
    return f"{x:+.3f}".replace("-", "\u2212")


def _p(p: float) -> str:
    return f"= {p:.2g}" if p >= 0.001 else "< 0.001"


def _chunk_size(n: int) -> int:
    """Resamples drawn at once so that their counts stay within ``CHUNK_BYTES``."""
    return max(1, CHUNK_BYTES // (24 * max(n, 1)))


def _counts(rng: np.random.Generator, n: int, rows: int) -> np.ndarray:
    """``rows`` bootstrap resamples of ``n`` examples as counts, shape (rows, n): how often
    each example is drawn in ``n`` draws with replacement. At most two arrays of that shape
    exist at once (the draws, then the counts as integers and as floats)."""
    draws = rng.integers(0, n, size=(rows, n), dtype=np.int64)
    draws += np.arange(rows, dtype=np.int64)[:, None] * n  # row r counts into bins r*n...
    flat = np.bincount(draws.ravel(), minlength=rows * n)
    del draws
    return flat.reshape(rows, n).astype(np.float64)


def _resampled(stats: Sequence[ExampleStats], resamples: int, seed: int) -> list[np.ndarray]:
    """The metric of each of ``stats`` on the same ``resamples`` bootstrap resamples of their
    examples, drawn in chunks (``_chunk_size``). Deterministic for (n, resamples, seed)."""
    n = stats[0].n
    rng = np.random.default_rng(seed)
    size = _chunk_size(n)
    out: list[list[np.ndarray]] = [[] for _ in stats]
    done = 0
    while done < resamples:
        rows = min(size, resamples - done)
        counts = _counts(rng, n, rows)
        for i, s in enumerate(stats):
            out[i].append(np.asarray(s.combine(counts @ s.values), dtype=np.float64))
        del counts  # before the next chunk's draws
        done += rows
    return [np.concatenate(parts) for parts in out]


def _percentiles(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(samples, [tail, 1.0 - tail])
    return float(low), float(high)


def _check(confidence: float, resamples: int) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence: {confidence} is not between 0 and 1")
    if resamples < 1:
        raise ValueError(f"resamples: {resamples} is not a positive number")


def bootstrap_interval(
    stats: ExampleStats, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> Interval:
    """The metric with its percentile bootstrap interval: examples resampled with replacement
    ``resamples`` times (seeded), the metric recomputed from each resample's summed
    statistics. No examples: the point, as the interval's both ends."""
    _check(confidence, resamples)
    point = stats.metric()
    if stats.n == 0:
        return Interval(point=point, low=point, high=point, n=0, confidence=confidence)
    (samples,) = _resampled([stats], resamples, seed)
    low, high = _percentiles(samples, confidence)
    return Interval(point=point, low=low, high=high, n=stats.n, confidence=confidence)


def is_correct_indicator(stats: ExampleStats) -> bool:
    """Whether ``stats`` are [correct, 1] per example (accuracy: McNemar applies)."""
    v = stats.values
    return (
        v.shape[1] == 2
        and bool(np.all(v[:, 1] == 1.0))
        and bool(np.all((v[:, 0] == 0.0) | (v[:, 0] == 1.0)))
    )


def mcnemar_p_value(challenger_only: int, champion_only: int) -> float:
    """McNemar's exact one-sided test: the probability, were both equally good, of the
    challenger being right where the champion is wrong at least ``challenger_only`` times
    out of the ``challenger_only + champion_only`` discordant examples (a binomial with
    p = 0.5). No discordant example: 1.0."""
    from scipy.stats import binomtest

    discordant = challenger_only + champion_only
    if discordant == 0:
        return 1.0
    return float(binomtest(challenger_only, discordant, 0.5, alternative="greater").pvalue)


def paired_comparison(
    champion: ExampleStats,
    challenger: ExampleStats,
    higher_is_better: bool = True,
    test: Literal["auto", "paired_bootstrap", "mcnemar"] = "auto",
    metric_name: str = "accuracy",
    resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> Comparison:
    """Whether ``challenger`` beats ``champion`` on the same examples (same order: see
    :func:`align`).

    paired_bootstrap: both metrics on the same resamples; the one-sided p-value is
    (1 + #{difference <= 0}) / (resamples + 1). mcnemar (accuracy only: [correct, 1]
    statistics): McNemar's exact test on the discordant examples. auto: McNemar when
    ``metric_name`` is accuracy and both statistics are [correct, 1], else the bootstrap.
    The interval of the difference is the paired bootstrap's either way."""
    _check(confidence, resamples)
    if champion.n != challenger.n:
        raise ValueError(
            f"paired_comparison: {champion.n} champion examples but {challenger.n} challenger "
            "examples; rule: both scored on the same examples (align the predictions first)"
        )
    indicators = is_correct_indicator(champion) and is_correct_indicator(challenger)
    chosen: Test
    if test == "auto":
        chosen = "mcnemar" if metric_name == "accuracy" and indicators else "paired_bootstrap"
    else:
        chosen = test
    if chosen == "mcnemar" and not (indicators and higher_is_better):
        raise ValueError(
            f"test: mcnemar needs [correct, 1] statistics of a higher-is-better metric "
            f"(accuracy); {metric_name} has other: use paired_bootstrap"
        )
    sign = 1.0 if higher_is_better else -1.0
    point_champion, point_challenger = champion.metric(), challenger.metric()
    difference = sign * (point_challenger - point_champion)
    n = champion.n
    if n == 0:
        diffs = np.zeros(0)
        interval = (difference, difference)
    else:
        boot_champion, boot_challenger = _resampled([champion, challenger], resamples, seed)
        diffs = sign * (boot_challenger - boot_champion)
        interval = _percentiles(diffs, confidence)
    discordant: tuple[int, int] | None = None
    if chosen == "mcnemar":
        right_new = challenger.values[:, 0] == 1.0
        right_old = champion.values[:, 0] == 1.0
        discordant = (int(np.sum(right_new & ~right_old)), int(np.sum(right_old & ~right_new)))
        p_value = mcnemar_p_value(*discordant)
    elif n == 0:
        p_value = 1.0
    else:
        p_value = float((1 + np.count_nonzero(diffs <= 0)) / (resamples + 1))
    return Comparison(
        test=chosen,
        metric=metric_name,
        n=n,
        champion=point_champion,
        challenger=point_challenger,
        difference=difference,
        interval=interval,
        p_value=p_value,
        confidence=confidence,
        higher_is_better=higher_is_better,
        resamples=resamples,
        discordant=discordant,
    )


def align(
    a: pd.DataFrame, b: pd.DataFrame, keys: Sequence[str] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two predictions frames cut to the examples both hold and paired row by row, in
    ``a``'s order (indexes reset), so that their statistics can be compared.

    Examples are matched by ``keys``; by default those of ``_source``, ``_row`` and
    ``_example`` that both frames have (the raw file, its row and the split's example
    number). A key that names two rows of one frame is an error (the pairing would be
    ambiguous)."""
    if keys is None:
        keys = [k for k in ALIGN_KEYS if k in a.columns and k in b.columns]
    keys = list(keys)
    if not keys:
        raise ValueError(
            f"align: the frames share none of the keys {', '.join(ALIGN_KEYS)}; "
            f"columns: {', '.join(map(str, a.columns))} / {', '.join(map(str, b.columns))}"
        )
    index_a = pd.MultiIndex.from_frame(a[keys])
    index_b = pd.MultiIndex.from_frame(b[keys])
    for name, index in (("first", index_a), ("second", index_b)):
        if not index.is_unique:
            twice = index[index.duplicated()][0]
            raise ValueError(
                f"align: the {name} frame has more than one row with {dict(zip(keys, twice, strict=True))}"
            )
    position = index_b.get_indexer(index_a)
    kept = position >= 0
    return (
        a.iloc[np.flatnonzero(kept)].reset_index(drop=True),
        b.iloc[position[kept]].reset_index(drop=True),
    )

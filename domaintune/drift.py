"""Data drift: does new data still look like the data a model was trained on?

Five tests compare a *reference* sample (the model's training data) with a *current* one (new
data to score or train on), each a statistical test plus an effect size, because with many rows
a negligible difference is "significant" and with few rows a large one is not. A test reports
drift only when both hold: p < significance *and* the effect reaches its threshold.

- ``labels``: chi-square test of homogeneity on the 2 x K table of label counts, plus the
  population stability index (PSI >= 0.1: a shift worth a look, the usual rule of thumb);
- ``length``: two-sample Kolmogorov-Smirnov test on token lengths, KS distance D >= 0.1;
- ``unknown_tokens``: the share of tokens equal to the tokenizer's unknown id (vocabulary the
  tokenizer does not cover), one-sided test for an increase of at least one percentage point;
- ``truncation``: the share of rows whose length reaches ``max_length`` (text cut off), the same;
- ``embeddings``: maximum mean discrepancy (unbiased MMD^2, RBF kernel, median-heuristic
  bandwidth) between mean-pooled hidden states, p-value by a permutation test.

Why not Evidently or alibi-detect: Evidently 0.7 and alibi-detect 0.13 pull large dependency
trees into an environment pinned to torch 2.13.0 (CPU), and alibi-detect pins its own torch and
TensorFlow ranges. SciPy, already installed, gives the chi-square and KS tests, and MMD with a
permutation test is about thirty lines of numpy (below), so both would add weight and version
conflicts for little. Every function here is pure (numpy, SciPy, pandas); torch is imported only
inside :func:`embed`, which runs a model.

The results are pydantic models holding small summaries (label shares, length percentiles and
histograms, never raw arrays), so a :class:`DriftReport` goes into a JSON manifest as it is and
its charts can be redrawn from it. With five tests at significance 0.01 each, the chance of one
false alarm on unchanged data is at most about 5 %; the effect thresholds make it smaller still.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any, TypedDict

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field
from scipy import stats

#: Each side needs this many rows for the KS and MMD tests (fewer: the test is skipped).
MIN_ROWS = 5
#: Rows per side the MMD test uses at most: its kernel matrix grows with the square.
MMD_MAX_ROWS = 500
#: Pseudo-count added to every label's count on both sides for PSI, so that a label absent on
#: one side gives a finite, large term instead of an infinite one.
PSI_PSEUDO_COUNT = 0.5
#: Length histogram bins at most (shared by both sides, stored in the report for its chart).
LENGTH_BINS = 30


class DriftTest(BaseModel):
    """One test's outcome, with small summaries of both sides (JSON-serialisable)."""

    name: str = Field(description='"labels", "length", "unknown_tokens", "truncation", ...')
    statistic: float = Field(description="chi-square, KS D, difference of shares or MMD^2")
    p_value: float | None = Field(description="None when the test was skipped")
    effect: float | None = Field(description="PSI, KS D, difference of shares or MMD^2")
    threshold: str = Field(description="the rule in words, or why the test was skipped")
    drifted: bool
    reference: dict[str, Any] = Field(default_factory=dict)
    current: dict[str, Any] = Field(default_factory=dict)

    @property
    def skipped(self) -> bool:
        return self.p_value is None

    def effect_text(self) -> str:
        """The effect with its name: "PSI 0.31", "KS 0.22", "+0.034", "MMD^2 0.012"."""
        if self.effect is None:
            return "-"
        if self.name == "labels":
            return f"PSI {self.effect:.3g}"
        if self.name == "length":
            return f"KS {self.effect:.3g}"
        if self.name == "embeddings":
            return f"MMD^2 {self.effect:.3g}"
        return f"share {self.effect:+.3g}"

    def describe(self) -> str:
        """One line, e.g. ``labels: PSI 0.31, chi-square p = 1e-06: drifted``."""
        if self.skipped:
            return f"{self.name}: {self.threshold}"
        test = {"labels": "chi-square", "length": "KS", "embeddings": "permutation"}.get(
            self.name, "one-sided"
        )
        verdict = "drifted" if self.drifted else "no drift"
        return f"{self.name}: {self.effect_text()}, {test} p = {self.p_value:.2g}: {verdict}"


class DriftReport(BaseModel):
    """All tests of one comparison; :meth:`markdown` renders it as a report section."""

    reference_rows: int
    current_rows: int
    significance: float = 0.01
    tests: list[DriftTest] = Field(default_factory=list)

    @property
    def drifted(self) -> bool:
        return any(t.drifted for t in self.tests)

    def test(self, name: str) -> DriftTest | None:
        return next((t for t in self.tests if t.name == name), None)

    def describe(self) -> str:
        """One line: ``drift in labels (PSI 0.31), length (KS 0.22)`` or ``no drift (5 tests)``."""
        drifted = [t for t in self.tests if t.drifted]
        if drifted:
            return "drift in " + ", ".join(f"{t.name} ({t.effect_text()})" for t in drifted)
        ran = sum(not t.skipped for t in self.tests)
        skipped = len(self.tests) - ran
        return f"no drift ({ran} test{'s' * (ran != 1)}" + (
            f", {skipped} skipped)" if skipped else ")"
        )

    def chart_svg(self) -> str | None:
        """Label shares and length histograms, reference against current (None: no data)."""
        from domaintune.reporting.charts import drift_svg

        labels, length = self.test("labels"), self.test("length")
        ref_shares = labels.reference.get("shares") if labels else None
        cur_shares = labels.current.get("shares") if labels else None
        bins = length.reference.get("bins") if length else None
        if not (ref_shares and cur_shares) and not bins:
            return None
        return drift_svg(
            ref_shares if ref_shares and cur_shares else None,
            cur_shares if ref_shares and cur_shares else None,
            bins,
            length.reference.get("histogram") if bins else None,
            length.current.get("histogram") if bins else None,
        )

    def markdown(self, charts: bool = True, title: str = "Data drift") -> str:
        """A report section: the verdict, a table of the tests and (``charts``) one chart of
        label shares and token lengths embedded as an SVG data URI."""
        from domaintune.reporting.charts import data_uri

        lines = [
            f"## {title}",
            "",
            f"Reference: {self.reference_rows} rows; current: {self.current_rows} rows; "
            f"significance {self.significance:g}. **{self.describe()}**.",
            "",
            "| test | statistic | p-value | effect | rule | reference | current | drifted |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for t in self.tests:
            p = "-" if t.p_value is None else f"{t.p_value:.2g}"
            stat = "-" if t.skipped else f"{t.statistic:.4g}"
            lines.append(
                f"| {t.name} | {stat} | {p} | {t.effect_text()} | {_cell(t.threshold)} | "
                f"{_summary(t.reference)} | {_summary(t.current)} | "
                f"{'**yes**' if t.drifted else 'no'} |"
            )
        svg = self.chart_svg() if charts else None
        if svg:
            lines += ["", f"![label shares and token lengths]({data_uri(svg)})"]
        return "\n".join(lines) + "\n"


def _cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _summary(side: dict[str, Any]) -> str:
    """A side's scalars for a table cell (shares and histograms are left to the chart)."""
    parts = []
    for k, v in side.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        parts.append(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v:.4g}")
    return _cell(", ".join(parts)) or "-"


def _skipped(name: str, reason: str, reference: dict[str, Any], current: dict[str, Any]):
    return DriftTest(
        name=name,
        statistic=0.0,
        p_value=None,
        effect=None,
        threshold=f"skipped: {reason}",
        drifted=False,
        reference=reference,
        current=current,
    )


# ----------------------------------------------------------------------------- labels


def _label_counts(labels: Sequence[str]) -> Counter[str]:
    return Counter(str(x) for x in labels)


def population_stability_index(
    reference_counts: dict[str, int], current_counts: dict[str, int]
) -> float:
    """PSI = sum over labels of (c - r) * ln(c / r), with r and c the shares after adding
    :data:`PSI_PSEUDO_COUNT` (0.5) to every label's count on both sides (a label unseen on
    one side would otherwise make the sum infinite)."""
    keys = sorted(set(reference_counts) | set(current_counts))
    if not keys:
        return 0.0
    r = np.array([reference_counts.get(k, 0) for k in keys], dtype=float) + PSI_PSEUDO_COUNT
    c = np.array([current_counts.get(k, 0) for k in keys], dtype=float) + PSI_PSEUDO_COUNT
    r, c = r / r.sum(), c / c.sum()
    return float(np.sum((c - r) * np.log(c / r)))


def label_drift(
    reference: Sequence[str], current: Sequence[str], significance: float = 0.01
) -> DriftTest:
    """Has the label mix changed? Chi-square test of homogeneity on the 2 x K table of counts
    (a label unseen on one side counts 0 there; Pearson's statistic, no continuity correction),
    drifted when p < ``significance`` and PSI >= 0.1. A single label in all: p = 1."""
    ref, cur = _label_counts(reference), _label_counts(current)
    keys = sorted(set(ref) | set(cur))
    summary = [
        {
            "rows": sum(side.values()),
            "labels": len(side),
            "shares": {k: side.get(k, 0) / max(sum(side.values()), 1) for k in keys},
        }
        for side in (ref, cur)
    ]
    if not ref or not cur:
        return _skipped("labels", "no labelled rows on a side", *summary)
    psi = population_stability_index(ref, cur)
    if len(keys) < 2:
        chi2, p = 0.0, 1.0
    else:
        table = np.array([[ref.get(k, 0) for k in keys], [cur.get(k, 0) for k in keys]])
        result = stats.chi2_contingency(table, correction=False)
        chi2, p = float(result.statistic), float(result.pvalue)
    return DriftTest(
        name="labels",
        statistic=chi2,
        p_value=p,
        effect=psi,
        threshold=f"chi-square p < {significance:g} and PSI >= 0.1",
        drifted=bool(p < significance and psi >= 0.1),
        reference=summary[0],
        current=summary[1],
    )


# ----------------------------------------------------------------------------- lengths


def _length_summary(lengths: np.ndarray) -> dict[str, Any]:
    if len(lengths) == 0:
        return {"rows": 0}
    return {
        "rows": len(lengths),
        "mean": float(np.mean(lengths)),
        "p50": float(np.percentile(lengths, 50)),
        "p95": float(np.percentile(lengths, 95)),
        "max": float(np.max(lengths)),
    }


def _shared_bins(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """At most :data:`LENGTH_BINS` bins over both samples, each a whole number of tokens wide
    (lengths are integers: fractional widths would give some bins one length more than their
    neighbours and a comb-like histogram); a length of 12 in a 1-wide bin falls in [12, 13)."""
    lo = math.floor(float(min(a.min(), b.min())))
    hi = math.floor(float(max(a.max(), b.max()))) + 1
    width = math.ceil((hi - lo) / LENGTH_BINS)
    return lo + width * np.arange(math.ceil((hi - lo) / width) + 1, dtype=float)


def length_drift(
    reference_lengths: Sequence[float] | np.ndarray,
    current_lengths: Sequence[float] | np.ndarray,
    significance: float = 0.01,
) -> DriftTest:
    """Have texts grown or shrunk? Two-sample KS test on token lengths, drifted when
    p < ``significance`` and D >= 0.1. Both sides also get p50, p95 and a histogram on shared
    bins (``bins``, ``histogram``) for the report's chart."""
    ref = np.asarray(reference_lengths, dtype=float).ravel()
    cur = np.asarray(current_lengths, dtype=float).ravel()
    rs, cs = _length_summary(ref), _length_summary(cur)
    if len(ref) < MIN_ROWS or len(cur) < MIN_ROWS:
        reason = f"fewer than {MIN_ROWS} rows on a side ({len(ref)} reference, {len(cur)} current)"
        return _skipped("length", reason, rs, cs)
    result = stats.ks_2samp(ref, cur)
    d, p = float(result.statistic), float(result.pvalue)
    bins = _shared_bins(ref, cur)
    for side, values in ((rs, ref), (cs, cur)):
        side["bins"] = [float(x) for x in bins]
        side["histogram"] = [int(x) for x in np.histogram(values, bins=bins)[0]]
    return DriftTest(
        name="length",
        statistic=d,
        p_value=p,
        effect=d,
        threshold=f"KS p < {significance:g} and D >= 0.1",
        drifted=bool(p < significance and d >= 0.1),
        reference=rs,
        current=cs,
    )


# ----------------------------------------------------------------------------- shares


def share_drift(
    name: str,
    ref_hits: int,
    ref_total: int,
    cur_hits: int,
    cur_total: int,
    significance: float = 0.01,
    min_difference: float = 0.01,
) -> DriftTest:
    """Has a share (unknown tokens over tokens, truncated rows over rows) gone *up*? A
    one-sided test for an increase: the two-proportion z-test, or Fisher's exact test when an
    expected count is below 5 (where the normal approximation is poor). Drifted when
    p < ``significance`` and the share rose by at least ``min_difference``; a fall is no drift."""
    rs = {"hits": int(ref_hits), "total": int(ref_total)}
    cs = {"hits": int(cur_hits), "total": int(cur_total)}
    for side, hits, total in ((rs, ref_hits, ref_total), (cs, cur_hits, cur_total)):
        if not 0 <= hits <= total:
            raise ValueError(f"{name}: hits must lie between 0 and the total, got {hits}/{total}")
        if total:
            side["share"] = hits / total
    if not ref_total or not cur_total:
        return _skipped(name, "nothing to count on a side", rs, cs)
    diff = cur_hits / cur_total - ref_hits / ref_total
    pooled = (ref_hits + cur_hits) / (ref_total + cur_total)
    expected = [n * q for n in (ref_total, cur_total) for q in (pooled, 1 - pooled)]
    if pooled in (0.0, 1.0):
        p = 1.0  # no variation at all: nothing to test
    elif min(expected) < 5:
        table = [[cur_hits, cur_total - cur_hits], [ref_hits, ref_total - ref_hits]]
        p = float(stats.fisher_exact(table, alternative="greater").pvalue)
    else:
        se = math.sqrt(pooled * (1 - pooled) * (1 / ref_total + 1 / cur_total))
        p = float(stats.norm.sf(diff / se))
    return DriftTest(
        name=name,
        statistic=diff,
        p_value=p,
        effect=diff,
        threshold=f"one-sided p < {significance:g} and increase >= {min_difference:g}",
        drifted=bool(p < significance and diff >= min_difference),
        reference=rs,
        current=cs,
    )


# ----------------------------------------------------------------------------- embeddings


def _sample_rows(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if len(x) <= MMD_MAX_ROWS:
        return x
    return x[np.sort(rng.choice(len(x), MMD_MAX_ROWS, replace=False))]


def mmd_drift(
    reference_emb: np.ndarray,
    current_emb: np.ndarray,
    significance: float = 0.01,
    permutations: int = 500,
    seed: int = 0,
) -> DriftTest:
    """Do the model's representations of the two samples differ? Unbiased MMD^2 with an RBF
    kernel whose bandwidth is the median pairwise distance of the pooled sample (the median
    heuristic), p-value by a permutation test: the pooled kernel matrix is computed once and
    every permutation only re-assigns rows to sides (one matrix product for all of them).
    p = (1 + permutations with MMD^2 >= observed) / (1 + permutations), deterministic for a
    ``seed``. Each side is capped at :data:`MMD_MAX_ROWS` rows by a seeded sample (``rows``
    and ``rows_used`` in the summaries). Drifted when p < ``significance``."""
    x = np.asarray(reference_emb, dtype=np.float64)
    y = np.asarray(current_emb, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"embeddings: need two 2-D arrays of one width, got {x.shape} and {y.shape}"
        )
    rng = np.random.default_rng(seed)
    xs, ys = _sample_rows(x, rng), _sample_rows(y, rng)
    rs = {"rows": len(x), "rows_used": len(xs), "dimensions": int(x.shape[1])}
    cs = {"rows": len(y), "rows_used": len(ys), "dimensions": int(y.shape[1])}
    if len(x) < MIN_ROWS or len(y) < MIN_ROWS:
        reason = f"fewer than {MIN_ROWS} rows on a side ({len(x)} reference, {len(y)} current)"
        return _skipped("embeddings", reason, rs, cs)
    if not (np.isfinite(xs).all() and np.isfinite(ys).all()):
        raise ValueError("embeddings: not all values are finite")

    z = np.concatenate([xs, ys])
    sq = np.sum(z * z, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (z @ z.T), 0.0)
    off_diagonal = d2[np.triu_indices(len(z), k=1)]
    median = float(np.median(np.sqrt(off_diagonal)))
    bandwidth = median if median > 0 else 1.0
    k = np.exp(-d2 / (2.0 * bandwidth**2))
    np.fill_diagonal(k, 0.0)  # the unbiased estimate leaves out i == j

    n, m = len(xs), len(ys)
    sides = np.zeros((permutations + 1, n + m))
    sides[0, :n] = 1.0  # row 0: the observed split
    for i in range(1, permutations + 1):
        sides[i, rng.permutation(n + m)[:n]] = 1.0
    ka = sides @ k  # row p: for every point, its kernel sum over the reference side of split p
    kxx = np.sum(ka * sides, axis=1)
    kxy = np.sum(ka * (1.0 - sides), axis=1)
    kyy = k.sum() - kxx - 2.0 * kxy
    mmd2 = kxx / (n * (n - 1)) + kyy / (m * (m - 1)) - 2.0 * kxy / (n * m)
    observed = float(mmd2[0])
    p = float((1 + np.sum(mmd2[1:] >= observed - 1e-12)) / (1 + permutations))
    rs["bandwidth"] = bandwidth
    return DriftTest(
        name="embeddings",
        statistic=observed,
        p_value=p,
        effect=observed,
        threshold=f"permutation p ({permutations}) < {significance:g}",
        drifted=bool(p < significance),
        reference=rs,
        current=cs,
    )


def embed(
    model: Any, tokenizer: Any, input_ids: list[list[int]], batch_size: int = 32
) -> np.ndarray:
    """Mean-pooled last hidden states, one row per sequence of token ids (float32, shape
    ``(rows, hidden size)``). Works with any Hugging Face model that returns hidden states
    (a base model, a sequence or token classifier, a causal LM; an encoder-decoder model's
    encoder). Sequences are batched by length, right-padded with the tokenizer's pad id
    (fallback 0) and masked, so padding changes no row. Runs in eval mode under
    ``torch.inference_mode()`` and restores the model's training mode afterwards."""
    import torch

    pad = getattr(tokenizer, "pad_token_id", None)
    pad = 0 if pad is None else int(pad)
    config = getattr(model, "config", None)
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    net = model.get_encoder() if encoder_decoder else model
    device = next(model.parameters()).device
    order = sorted(range(len(input_ids)), key=lambda i: len(input_ids[i]))
    rows: list[np.ndarray | None] = [None] * len(input_ids)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                batch = [list(input_ids[i]) for i in order[start : start + batch_size]]
                width = max(1, max(len(s) for s in batch))
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for r, seq in enumerate(batch):
                    ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                    mask[r, : len(seq)] = 1
                ids, mask = ids.to(device), mask.to(device)
                out = net(input_ids=ids, attention_mask=mask, output_hidden_states=True)
                hidden = out.hidden_states[-1].float()
                weights = mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
                for r, vec in enumerate(pooled.cpu().numpy()):
                    rows[order[start + r]] = vec
    finally:
        model.train(was_training)
    if not rows:
        width = int(getattr(config, "hidden_size", 0) or 0)
        return np.zeros((0, width), dtype=np.float32)
    return np.stack(rows).astype(np.float32)


# ----------------------------------------------------------------------------- the report


class TokenStatistics(TypedDict):
    lengths: np.ndarray  # tokens per row
    unknown_hits: int  # tokens equal to the unknown id (0 when there is none)
    unknown_total: int  # tokens in all
    truncated_hits: int  # rows whose length reaches max_length
    rows: int


def token_statistics(
    input_ids: Sequence[Sequence[int]], unk_id: int | None, max_length: int
) -> TokenStatistics:
    """Lengths, unknown-token counts and truncated rows of tokenised data. A row as long as
    ``max_length`` counts as truncated: the tokenizer cut it there, or it fits exactly (which
    cannot be told apart afterwards)."""
    lengths = np.array([len(seq) for seq in input_ids], dtype=np.int64)
    unknown = 0 if unk_id is None else sum(int(np.sum(np.asarray(s) == unk_id)) for s in input_ids)
    return {
        "lengths": lengths,
        "unknown_hits": unknown,
        "unknown_total": int(lengths.sum()),
        "truncated_hits": int(np.sum(lengths >= max_length)),
        "rows": len(lengths),
    }


def _labels(frame: pd.DataFrame, column: str, side: str) -> list[str]:
    if column not in frame.columns:
        raise ValueError(
            f"drift: the {side} data has no label column {column!r} "
            f"(columns: {', '.join(map(str, frame.columns))})"
        )
    return [str(x) for x in frame[column].dropna()]


def drift_report(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    *,
    label_column: str | None,
    unk_id: int | None,
    max_length: int,
    significance: float = 0.01,
    reference_emb: np.ndarray | None = None,
    current_emb: np.ndarray | None = None,
    permutations: int = 500,
    seed: int = 0,
) -> DriftReport:
    """Every drift test of ``current`` against ``reference``, frames with an ``input_ids``
    column (lists of token ids) and, for classification, a label column. Tests that do not
    apply are left out (labels without ``label_column``, embeddings without both arrays); a
    test without enough data, or the unknown-token test for a tokenizer without an unknown
    token, is reported as skipped (``p_value`` None, the reason in ``threshold``)."""
    for side, frame in (("reference", reference), ("current", current)):
        if "input_ids" not in frame.columns:
            raise ValueError(f"drift: the {side} data has no input_ids column")
    ref = token_statistics(reference["input_ids"].tolist(), unk_id, max_length)
    cur = token_statistics(current["input_ids"].tolist(), unk_id, max_length)
    tests = []
    if label_column is not None:
        tests.append(
            label_drift(
                _labels(reference, label_column, "reference"),
                _labels(current, label_column, "current"),
                significance,
            )
        )
    tests.append(length_drift(ref["lengths"], cur["lengths"], significance))
    if unk_id is None:
        tests.append(_skipped("unknown_tokens", "the tokenizer has no unknown token", {}, {}))
    else:
        tests.append(
            share_drift(
                "unknown_tokens",
                ref["unknown_hits"],
                ref["unknown_total"],
                cur["unknown_hits"],
                cur["unknown_total"],
                significance,
            )
        )
    truncation = share_drift(
        "truncation",
        ref["truncated_hits"],
        ref["rows"],
        cur["truncated_hits"],
        cur["rows"],
        significance,
    )
    truncation.reference["max_length"] = truncation.current["max_length"] = max_length
    tests.append(truncation)
    if (reference_emb is None) != (current_emb is None):
        raise ValueError("drift: give embeddings for both sides or for neither")
    if reference_emb is not None and current_emb is not None:
        tests.append(
            mmd_drift(
                reference_emb, current_emb, significance, permutations=permutations, seed=seed
            )
        )
    return DriftReport(
        reference_rows=len(reference),
        current_rows=len(current),
        significance=significance,
        tests=tests,
    )

"""monitor: the champion on newly landed labelled files, drift, and whether to retrain.

Runs after preprocess, before anything trains. "New" files are the raw snapshot's files the
production version was not trained on (by path and sha256, from its lineage). On their rows
(every split: the champion has seen none of them; at most ``retrain.max_rows``, a seeded
sample of whole examples) it scores the champion: the primary metric with a bootstrap
interval (domaintune.evidence) and the per-class figures, against the champion's registered
test figure. It compares the new rows with the champion's training rows (the train split's
rows from its own files): labels, token lengths, unknown-token and truncation shares, and the
champion's own embeddings (domaintune.drift). Then ``retrain.when`` decides
(domaintune.monitoring.decide). The measurement is appended to the use case's health history
in the store, and a significantly degraded champion emits ``domaintune.model.degraded``.

The entry is keyed by the champion, the splits, the new files and the policy: a run again on
the same data reuses the decision (Cached) and appends no second record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

from domaintune.config import RetrainConfig
from domaintune.fingerprint import hash_obj
from domaintune.monitoring import HealthLog, decide, emit_degraded, history_table
from domaintune.redaction import redact, redact_obj
from domaintune.registry import Registry
from domaintune.scoring import not_comparable, score_model, scored_as
from domaintune.storage.manifests import HealthReport, RawSnapshot, SplitManifest
from domaintune.storage.store import Store
from domaintune.tasktypes import get_task_type
from domaintune.tasktypes.base import TokenizeSettings
from domaintune.training.launch import inference_precision

log = logging.getLogger(__name__)

STAGE = "monitor"
VERSION = "1"
#: rows per side for the embedding drift test (the model runs on each)
EMBED_ROWS = 200


def new_files(raw: RawSnapshot, champion: dict[str, Any]) -> list[str]:
    """The snapshot's files the champion was not trained on (path and content)."""
    known = {(s.get("path"), s.get("sha256")) for s in champion.get("sources", [])}
    return [s.path for s in raw.sources if (s.path, s.sha256) not in known]


def plan(
    config: RetrainConfig, raw: RawSnapshot, splits: SplitManifest, champion: dict | None
) -> tuple[str, list[str]]:
    files = new_files(raw, champion) if champion else []
    key = hash_obj(
        STAGE,
        VERSION,
        champion["fingerprint"] if champion else None,
        splits.fingerprint,
        files,
        config.retrain.model_dump(mode="json", exclude={"start_from", "replay_share"}),
        config.evaluation.primary_metric,
        config.promotion.bootstrap_resamples,
        scored_as(config, splits),
        inference_precision(config.training)[0],
    )
    return key, files


def monitor(
    config: RetrainConfig, raw: RawSnapshot, splits: SplitManifest, store: Store
) -> HealthReport:
    champion = Registry(store, config.name).champion()
    if champion is not None and champion.get("raw_fingerprint") == raw.fingerprint:
        # the champion was trained on this very snapshot: nothing new to measure it on, and
        # the run again is the run that made it (every stage Cached, as before it existed)
        champion = None
    key, files = plan(config, raw, splits, champion)
    return store.compute_once(
        STAGE, key, HealthReport, lambda: _run(config, splits, store, key, champion, files)
    )


def _example_ids(df: pd.DataFrame, split: str) -> pd.Series:
    """One id per example of a split (a long example's windows share it)."""
    ex = df["_example"] if "_example" in df.columns else pd.Series(range(len(df)), index=df.index)
    return split + ":" + ex.astype(str)


def rows_of(splits: SplitManifest, names: tuple[str, ...], sources: set[str]) -> pd.DataFrame:
    """The tokenized rows of ``names`` splits that came from ``sources``, with ``_example``
    renumbered across splits (windows of one example keep one number)."""
    parts = []
    for name in names:
        df = pd.read_parquet(splits.splits[name].path)
        df = df[df["_source"].isin(sources)]
        if not df.empty:
            parts.append(df.assign(_group=_example_ids(df, name)))
    if not parts:
        return pd.DataFrame()
    out = pd.concat(parts, ignore_index=True)
    out["_example"] = pd.factorize(out["_group"])[0]
    return out


def sample_examples(df: pd.DataFrame, limit: int, seed: int) -> pd.DataFrame:
    """At most ``limit`` whole examples, the same ones every run (by a seeded hash)."""
    groups = df["_group"].drop_duplicates()
    if len(groups) <= limit:
        return df
    order = groups.map(lambda g: hashlib.sha256(f"{seed}\x1fmonitor\x1f{g}".encode()).hexdigest())
    keep = set(groups.loc[order.sort_values(kind="stable").index[:limit]])
    out = df[df["_group"].isin(keep)].copy()
    out["_example"] = pd.factorize(out["_group"])[0]
    return out


def _run(
    config: RetrainConfig,
    splits: SplitManifest,
    store: Store,
    key: str,
    champion: dict[str, Any] | None,
    files: list[str],
) -> HealthReport:
    policy = config.retrain
    metric = config.evaluation.primary_metric
    out: dict[str, Any] = {"primary_metric": metric, "new_files": files}
    entry = store.entry_path(STAGE, key)
    with store.writer(STAGE, key) as w:
        if champion is None:
            out["message"] = "no champion trained on other data than this"
        elif not files:
            out["version"] = champion["version"]
            out["message"] = f"no file landed since champion {champion['version']} was trained"
            out["degraded"] = out["drifted"] = False  # nothing new: nothing to retrain for
        elif why := not_comparable(champion, splits):
            out["version"] = champion["version"]
            out["message"] = f"champion {champion['version']} not scored on the new files: {why}"
        else:
            out.update(_measure(config, splits, champion, files, w.path))
        train, rule = decide(policy.when, out.get("degraded"), out.get("drifted"))
        out["train"] = train
        out["message"] = f"{'train' if train else 'skipped'} ({rule}): {out['message']}"
        records = []
        history = HealthLog(store, config.name)
        past = history.records()
        seen = {(r.get("version"), tuple(r.get("files", []))) for r in past}
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        for part in out.get("per_file", []):  # one record per file and champion version
            these = part["file"].split(", ")
            if (champion["version"], tuple(these)) in seen:
                continue  # measured by an earlier run (that one's record stays)
            records.append(
                redact_obj(
                    {
                        "version": champion["version"],
                        "files": these,
                        "rows": part["rows"],
                        "primary_metric": metric,
                        "value": part["value"],
                        "low": part["low"],
                        "high": part["high"],
                        "registered": out.get("registered"),
                        "degraded": part["degraded"],
                        "drifted": part.get("drifted", out.get("drifted")),
                        "per_class": out.get("per_class") if len(out["per_file"]) == 1 else None,
                        "drift": part.get("drift") or (out.get("drift") or {}).get("summary"),
                        "decision": "train" if train else "skipped",
                        "message": out["message"],
                    }
                )
            )
        past = [*past, *({"time": now, **r} for r in records)]
        (w.path / "history.json").write_text(json.dumps(history_table(past), indent=2))
        (w.path / "report.md").write_text(redact(_markdown(out, past)))
        report = HealthReport(
            key=key,
            path=str(entry),
            fingerprint=hash_obj(key, out.get("value"), out["train"]),
            report_markdown=str(entry / "report.md"),
            **{k: v for k, v in out.items() if k in HealthReport.model_fields},
        )
        w.manifest = redact_obj(report.model_dump(mode="json"))
    # once the entry is complete: a retried stage appends no twin
    for record in records:
        history.append(record)
        if record["degraded"]:
            emit_degraded(config.name, config.domain, record)
    log.info("monitor: %s", out["message"])
    return report


def _measure(
    config: RetrainConfig,
    splits: SplitManifest,
    champion: dict[str, Any],
    files: list[str],
    folder: Path,
) -> dict[str, Any]:
    """Score the champion on the new files' rows and measure drift (see the module)."""
    from domaintune.evidence import bootstrap_interval

    task = get_task_type(config.task.type)
    policy = config.retrain
    metric = config.evaluation.primary_metric
    version = champion["version"]
    new = rows_of(splits, ("train", "validation", "test"), set(files))
    if new.empty:  # every new row was a duplicate of an earlier one or quarantined
        return {
            "version": version,
            "message": f"the new files add no row (duplicates of earlier rows): champion "
            f"{version} holds",
            "degraded": False,
            "drifted": False,
        }
    limit = policy.max_rows // 5 if task.generative else policy.max_rows
    scored = sample_examples(new, limit, config.evaluation.split_seed)
    path = folder / "new_rows.parquet"
    scored.drop(columns="_group").to_parquet(path, index=False)
    examples = int(scored["_example"].nunique())
    metrics, predictions = score_model(
        config,
        champion["model_dir"],
        splits,
        who=f"champion {version}",
        split_path=str(path),
        rows=examples,
        stage="monitor",
    )
    predictions.to_parquet(folder / "predictions.parquet", index=False)
    (folder / "metrics.json").write_text(json.dumps(redact_obj(metrics), indent=2))
    registered = champion.get("recorded_metrics", {}).get(metric)
    lower = metric in task.lower_is_better

    def figure(rows: Any, fallback: float | None) -> dict[str, Any]:
        """The metric on ``rows`` of the predictions, its interval, and whether it is
        significantly below the registered figure."""
        stats = task.example_statistics(rows.reset_index(drop=True), metric, labels)
        out: dict[str, Any] = {"value": fallback, "low": None, "high": None}
        if stats is not None and stats.n:
            interval = bootstrap_interval(
                stats,
                confidence=policy.confidence,
                resamples=config.promotion.bootstrap_resamples,
                seed=config.evaluation.split_seed,
            )
            out.update(value=float(interval.point), low=interval.low, high=interval.high)
        out["degraded"] = (
            registered is not None
            and out["value"] is not None
            and is_degraded(
                out["value"],
                (out["low"], out["high"]),
                registered,
                champion.get("recorded_interval"),
                lower,
                policy.degradation_tolerance,
            )
        )
        return out

    labels = list(splits.labels)
    overall = figure(predictions, float(metrics[metric]))
    value, low, high = overall["value"], overall["low"], overall["high"]
    per_file = []
    if "_source" in predictions.columns and len(files) > 1:
        for f in files:
            rows = predictions[predictions["_source"] == f]
            if not rows.empty:
                per_file.append({"file": f, "rows": len(rows), **figure(rows, None)})
    elif files:
        per_file.append({"file": ", ".join(files), "rows": examples, **overall})
    degraded = overall["degraded"] or any(p["degraded"] for p in per_file)
    drift, drift_per_file = _drift(config, splits, champion, files, new)
    for p in per_file:
        if p["file"] in drift_per_file:
            p["drifted"] = drift_per_file[p["file"]].drifted
            p["drift"] = drift_per_file[p["file"]].describe()
    drifted = (drift is not None and drift.drifted) or any(
        r.drifted for r in drift_per_file.values()
    )
    if drift_per_file and drifted and not (drift is not None and drift.drifted):
        shifted = [f for f, r in drift_per_file.items() if r.drifted]
        drift_text = "; ".join(
            f"{f.rsplit('/', 1)[-1]}: {drift_per_file[f].describe()}" for f in shifted
        )
    else:
        drift_text = drift.describe() if drift is not None else "drift not measured"

    def said(p: dict[str, Any]) -> str:
        where = p["file"].rsplit("/", 1)[-1] if "," not in p["file"] else p["file"]
        interval = f" [{p['low']:.4f}, {p['high']:.4f}]" if p["low"] is not None else ""
        return f"{where} ({p['rows']} examples) {metric} {p['value']:.4f}{interval}"

    against = f" vs {registered:.4f} registered" if registered is not None else ""
    worst = [p for p in per_file if p["degraded"]] or per_file[-1:]
    state = "degraded" if degraded else "holds"
    detail = "; ".join(said(p) for p in worst) if worst else f"{metric} {value:.4f}"
    message = f"champion {version} {state} on {detail}{against}; {drift_text}"
    return {
        "version": version,
        "rows": examples,
        "per_file": per_file,
        "value": value,
        "low": low,
        "high": high,
        "registered": registered,
        "degraded": degraded,
        "drifted": drifted,
        "drift": {
            **drift.model_dump(mode="json"),
            "summary": drift.describe(),
        }
        if drift is not None
        else None,
        "per_class": metrics.get("per_class") or metrics.get("per_type"),
        "message": message,
    }


def is_degraded(
    value: float,
    interval: tuple[float | None, float | None],
    registered: float,
    registered_interval: dict[str, Any] | None,
    lower_is_better: bool,
    tolerance: float,
) -> bool:
    """Whether the champion is significantly below its registered test figure: the drop is
    above ``tolerance`` and beyond chance. Both figures are estimates from samples (the
    registered one often from a test split of a few hundred rows), so with both intervals
    known the drop must exceed the two half-widths combined in quadrature (a two-sample
    test at the intervals' level, normal approximation); with only the new data's interval,
    its far end must lie below the registered figure."""
    sign = -1.0 if lower_is_better else 1.0
    drop = sign * (registered - value)  # > 0: worse than registered
    if drop <= tolerance:
        return False
    low, high = interval
    if low is None or high is None:
        return True  # no interval for this metric: the point estimates decide
    half = (high - low) / 2
    if registered_interval and registered_interval.get("low") is not None:
        theirs = (registered_interval["high"] - registered_interval["low"]) / 2
        return drop > (half**2 + theirs**2) ** 0.5
    far = high if not lower_is_better else low  # the interval's end nearest "better"
    return sign * (registered - far) > 0


def _drift(
    config: RetrainConfig,
    splits: SplitManifest,
    champion: dict[str, Any],
    files: list[str],
    new: pd.DataFrame,
) -> tuple[Any, dict[str, Any]]:
    """DriftReports of the new rows against the champion's training rows: all new files
    together, and each file on its own when there are several (a shifted file among
    ordinary ones is diluted in the whole). (None, {}) without training rows of the
    champion's files (files no longer in the data)."""
    from domaintune.drift import drift_report, embed
    from domaintune.loading import load_for_scoring

    earlier = {s.get("path") for s in champion.get("sources", [])} - set(files)
    reference = rows_of(splits, ("train",), earlier)
    if reference.empty:
        return None, {}
    settings = TokenizeSettings.of(config)
    tok, model, _ = load_for_scoring(
        champion["model_dir"],
        config.task.type,
        splits.labels,
        config.training,
        config.model.trust_remote_code,
    )
    seed = config.evaluation.split_seed
    label_column = "label" if "label" in new.columns and "label" in reference.columns else None

    def embedded(rows: pd.DataFrame) -> Any:
        return embed(
            model, tok, [list(x) for x in sample_examples(rows, EMBED_ROWS, seed)["input_ids"]]
        )

    ref_emb = embedded(reference)

    def report(rows: pd.DataFrame) -> Any:
        return drift_report(
            reference,
            rows,
            label_column=label_column,
            unk_id=getattr(tok, "unk_token_id", None),
            max_length=settings.max_length,
            significance=config.retrain.drift_significance,
            reference_emb=ref_emb,
            current_emb=embedded(rows),
        )

    per_file = {}
    if len(files) > 1:
        for f in files:
            rows = new[new["_source"] == f]
            if not rows.empty:
                per_file[f] = report(rows)
    return report(new), per_file


def _markdown(out: dict[str, Any], history: list[dict[str, Any]]) -> str:
    """The health report: the champion's figure on the new files, the decision, drift, and
    the history of the figure (with intervals) as a chart."""
    from domaintune.reporting.charts import data_uri, metric_history_svg

    lines = ["# Champion health on new data", "", f"**{out['message']}**", ""]
    if out.get("value") is not None:
        lines += [
            f"Champion {out.get('version')}, {out.get('primary_metric')} (registered test "
            f"figure {out.get('registered')}):",
            "",
            "| files | examples | value | interval | degraded | drift |",
            "|---|---|---|---|---|---|",
        ]
        parts = out.get("per_file") or []
        if len(parts) > 1:
            whole = {**out, "drift": (out.get("drift") or {}).get("summary")}
            parts = [*parts, {**whole, "file": "all new files"}]
        for p in parts:
            interval = f"[{p['low']:.4f}, {p['high']:.4f}]" if p.get("low") is not None else "n/a"
            lines.append(
                f"| {p['file']} | {p['rows']} | {p['value']:.4f} | {interval} | "
                f"{'yes' if p.get('degraded') else 'no'} | {p.get('drift') or ''} |"
            )
        lines.append("")
    if out.get("per_class"):
        lines += ["| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        for lab, f in out["per_class"].items():
            lines.append(
                f"| {lab} | {f.get('precision', 0):.3f} | {f.get('recall', 0):.3f} | "
                f"{f.get('f1', 0):.3f} | {f.get('support', '')} |"
            )
        lines.append("")
    if out.get("drift"):
        from domaintune.drift import DriftReport

        report = DriftReport.model_validate(
            {k: v for k, v in out["drift"].items() if k != "summary"}
        )
        lines += [report.markdown(), ""]
    if history:
        svg = metric_history_svg(
            [
                {
                    "when": r.get("time"),
                    "value": r.get("value"),
                    "low": r.get("low"),
                    "high": r.get("high"),
                    "label": f"{r.get('version')} on "
                    + ", ".join(f.rsplit("/", 1)[-1] for f in r.get("files", [])),
                    "registered": r.get("registered"),
                    "degraded": bool(r.get("degraded")),
                }
                for r in history
            ]
        )
        lines += ["## History", "", f"![champion health history]({data_uri(svg)})", ""]
    return "\n".join(lines)

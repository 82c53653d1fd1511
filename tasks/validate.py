"""validate: raw snapshot -> Great Expectations validation against the task's data contract.

The contract (``data_contracts/<task>.yaml``) lists Great Expectations expectations with
parameters; this stage fills in the parameters, runs the suite on the tables the task type
derives from the snapshot, and saves a JSON report and a Markdown rendering. A failure raises
``ContractViolation`` naming each failed rule, its unexpected count and example rows, so the
flow stops before any training. The raw snapshot stays in the store either way.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from domaintune.config import RetrainConfig
from domaintune.errors import ConfigError, ContractViolation
from domaintune.fingerprint import hash_obj, stable_json
from domaintune.readers.sources import row_ids
from domaintune.redaction import redact, redact_obj
from domaintune.storage.manifests import RawSnapshot, ValidationReport
from domaintune.storage.store import Store
from domaintune.tasktypes import get_task_type

log = logging.getLogger(__name__)

STAGE = "validate"
VERSION = "2"  # 2: data.on_invalid: quarantine
MAX_EXAMPLES = 5
QUARANTINE = "quarantine.parquet"
_PARSE_WHERE = re.compile(r"^parse: .*?: (?=line \d+: )")  # the file is named beside it
_PARAM = re.compile(r"\$\{(\w+)\}")


# ----------------------------------------------------------------------------- contract


def load_contract(config: RetrainConfig) -> dict[str, Any]:
    """The task's contract with its parameters resolved (defaults < config.contract.params)."""
    task = get_task_type(config.task.type)
    if config.contract.path:
        path = Path(config.contract.path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"contract.path: {path} not found") from None
        origin = str(path)
    else:
        origin, text = task.contract_source()
    try:
        contract = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: not valid YAML: {exc}") from None
    params = dict(contract.get("parameters") or {})
    unknown = sorted(set(config.contract.params) - set(params))
    if unknown:
        raise ConfigError(
            f"contract.params: unknown parameter(s) {unknown}; allowed: {', '.join(sorted(params))}"
        )
    params.update(config.contract.params)
    contract["parameters"] = params
    contract["origin"] = origin
    return contract


def _fill(value: Any, params: dict[str, Any]) -> Any:
    """Replace ${name} placeholders; a whole-string placeholder keeps the value's type."""
    if isinstance(value, str):
        whole = _PARAM.fullmatch(value)
        if whole:
            return params[whole.group(1)]
        return _PARAM.sub(lambda m: str(params[m.group(1)]), value)
    if isinstance(value, dict):
        return {k: _fill(v, params) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, params) for v in value]
    return value


def _expectation_class(type_name: str):
    import great_expectations.expectations as gxe

    cls_name = "".join(p.capitalize() for p in type_name.split("_"))
    cls = getattr(gxe, cls_name, None)
    if cls is None:
        raise ConfigError(f"contract: unknown Great Expectations expectation {type_name!r}")
    return cls


# ----------------------------------------------------------------------------- the stage


def plan(config: RetrainConfig, raw: RawSnapshot) -> tuple[str, dict[str, Any]]:
    contract = load_contract(config)
    key = hash_obj(
        STAGE,
        VERSION,
        raw.fingerprint,
        raw.labels,
        config.task.allow_unanswerable,
        config.data.model_dump(include={"on_invalid", "max_invalid_share"}),
        {k: v for k, v in contract.items() if k != "origin"},
    )
    return key, contract


def validate(config: RetrainConfig, raw: RawSnapshot, store: Store) -> ValidationReport:
    key, contract = plan(config, raw)
    report = store.compute_once(
        STAGE, key, ValidationReport, lambda: _run(config, contract, raw, store, key)
    )
    if not report.success:
        raise ContractViolation(
            redact(_failure_message(report, raw)), report.report_markdown, report.failures
        )
    log.info(
        "validate: contract %r passed (%d expectations) -> %s",
        report.contract,
        report.evaluated,
        report.report_markdown,
    )
    if report.quarantined_rows:
        log.warning(
            "validate: %d row(s) (%.2f%% of the data, at most %.2f%% allowed) broke row rules "
            "and were quarantined, left out of training and evaluation -> %s",
            report.quarantined_rows,
            100 * report.quarantine_share,
            100 * config.data.max_invalid_share,
            report.quarantine_table,
        )
    return report


def _run(
    config: RetrainConfig, contract: dict[str, Any], raw: RawSnapshot, store: Store, key: str
) -> ValidationReport:
    task = get_task_type(contract["name"])
    df = pd.read_parquet(raw.table)
    params = {**contract["parameters"], "labels": raw.labels}
    quarantine_mode = config.data.on_invalid == "quarantine"
    results, bad = _evaluate(
        contract, task.contract_tables(df, raw.labels, config), params, complete=quarantine_mode
    )
    failures = [r for r in results if not r["success"]]
    quarantine: dict[str, Any] | None = None
    qframe: pd.DataFrame | None = None
    unparsed = pd.read_parquet(raw.unparsed_table) if raw.unparsed_table else None
    if quarantine_mode and (bad or unparsed is not None):
        qframe, quarantine = _quarantine(df, bad, unparsed, config)
        row_rule_failures = [r for r in failures if r["id"] in quarantine["by_rule"]]
        nothing_kept = quarantine["rows"] >= quarantine["of_rows"]
        if nothing_kept or quarantine["share"] > config.data.max_invalid_share:
            failures = [_share_failure(quarantine, config)] + failures
            results = [failures[0]] + results
        else:  # judge the rows kept, whole-data rules included
            kept = df[~row_ids(df).isin(set(bad))]
            results, _ = _evaluate(
                contract, task.contract_tables(kept, raw.labels, config), params, complete=False
            )
            failures = [r for r in results if not r["success"]]
        quarantine["row_rule_failures"] = row_rule_failures
    success = not failures
    with store.writer(STAGE, key) as w:
        entry = store.entry_path(STAGE, key)
        report_doc = {
            "contract": contract["name"],
            "contract_origin": contract["origin"],
            "contract_version": contract.get("version"),
            "parameters": contract["parameters"],
            "raw_snapshot": {
                "key": raw.key,
                "fingerprint": raw.fingerprint,
                "rows": raw.rows,
                "sources": [s.path for s in raw.sources],
            },
            "success": success,
            "results": results,
        }
        q_fp = None
        if quarantine is not None and qframe is not None:
            qframe.to_parquet(w.path / QUARANTINE, index=False)
            q_fp = hash_obj(sorted(map(list, zip(qframe["_source"], qframe["_row"], strict=True))))
            quarantine["table"] = str(entry / QUARANTINE)
            report_doc["quarantine"] = quarantine
        report_doc = redact_obj(json.loads(json.dumps(report_doc, default=str)))
        (w.path / "report.json").write_text(json.dumps(report_doc, indent=2))
        (w.path / "report.md").write_text(_markdown(report_doc))
        manifest = ValidationReport(
            key=key,
            path=str(entry),
            fingerprint=hash_obj(raw.fingerprint, success, [r["id"] for r in failures], q_fp),
            success=success,
            contract=contract["name"],
            evaluated=len(results),
            failed=len(failures),
            report_json=str(entry / "report.json"),
            report_markdown=str(entry / "report.md"),
            failures=failures,
            quarantined_rows=quarantine["rows"] if quarantine else 0,
            quarantine_share=quarantine["share"] if quarantine else 0.0,
            quarantine_table=quarantine["table"] if quarantine else None,
            quarantine_fingerprint=q_fp,
        )
        w.manifest = manifest.model_dump(mode="json")
    return manifest


def _evaluate(
    contract: dict[str, Any],
    tables: dict[str, pd.DataFrame],
    params: dict[str, Any],
    complete: bool,
) -> tuple[list[dict[str, Any]], dict[tuple[str, int], list[tuple[str, str, str]]]]:
    """Run the contract's expectations on ``tables``: (results in contract order, and with
    ``complete`` every row that broke a row rule: (source, row) -> [(rule id, rule, the
    values seen)])."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig
    from great_expectations.expectations.expectation import ColumnMapExpectation

    task_name = contract["name"]
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = ctx.data_sources.add_pandas("domaintune")
    results: list[dict[str, Any]] = []
    bad: dict[tuple[str, int], list[tuple[str, str, str]]] = {}
    by_table: dict[str, list[dict[str, Any]]] = {}
    for spec in contract["expectations"]:
        by_table.setdefault(spec.get("table", "rows"), []).append(spec)
    for table_name, specs in by_table.items():
        if table_name not in tables:
            raise ConfigError(
                f"{contract['origin']}: unknown table {table_name!r}; allowed: {', '.join(tables)}"
            )
        frame = tables[table_name]
        batch_def = source.add_dataframe_asset(table_name).add_batch_definition_whole_dataframe(
            "all"
        )
        suite = ctx.suites.add(gx.ExpectationSuite(name=f"{task_name}.{table_name}"))
        index_cols: list[str] = []
        row_rules: set[str] = set()
        for spec in specs:
            kwargs = _fill(spec.get("kwargs") or {}, params)
            cls = _expectation_class(spec["type"])
            suite.add_expectation(cls(**kwargs, meta={"id": spec["id"]}))
            if spec.get("index_column"):
                index_cols.append(spec["index_column"])
            if table_name == "rows" and issubclass(cls, ColumnMapExpectation):
                row_rules.add(spec["id"])  # judged row by row: a bad row can be quarantined
        if not index_cols:
            index_cols = [c for c in ("_row", "_source") if c in frame.columns]
        vd = ctx.validation_definitions.add(
            gx.ValidationDefinition(name=f"{task_name}.{table_name}", data=batch_def, suite=suite)
        )
        res = vd.run(
            batch_parameters={"dataframe": frame},
            result_format={
                "result_format": "COMPLETE" if complete and row_rules else "SUMMARY",
                "unexpected_index_column_names": index_cols,
                "partial_unexpected_count": MAX_EXAMPLES,
            },
        )
        spec_by_id = {s["id"]: s for s in specs}
        for r in res.results:
            d = r.to_json_dict()
            exp_id = (d["expectation_config"].get("meta") or {}).get("id")
            spec = spec_by_id.get(exp_id, {})
            summary = json.loads(
                json.dumps(_summarise(d, spec, table_name, params), default=_plain)
            )
            results.append(summary)
            if complete and exp_id in row_rules and not d["success"]:
                for item in (d.get("result") or {}).get("unexpected_index_list") or []:
                    value = {k: v for k, v in item.items() if k not in ("_row", "_source")}
                    shown = ", ".join(f"{k}={_clip(v)}" for k, v in value.items())
                    bad.setdefault((str(item["_source"]), int(item["_row"])), []).append(
                        (exp_id, summary["rule"], shown)
                    )

    order = {s["id"]: i for i, s in enumerate(contract["expectations"])}
    results.sort(key=lambda r: order.get(r["id"], 0))
    return results, bad


# ----------------------------------------------------------------------------- quarantine


def _quarantine(
    df: pd.DataFrame,
    bad: dict[tuple[str, int], list[tuple[str, str, str]]],
    unparsed: pd.DataFrame | None,
    config: RetrainConfig,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The quarantine table (the raw rows as ingested, plus ``_rules`` and ``_reasons``) and
    its summary for the report."""
    ids = row_ids(df)
    rows = df[ids.isin(set(bad))].copy()
    broken = [bad[i] for i in ids[rows.index]]
    rows["_rules"] = [sorted({rule_id for rule_id, _, _ in b}) for b in broken]
    rows["_reasons"] = [
        "; ".join(f"{i}: {rule}" + (f" ({seen})" if seen else "") for i, rule, seen in b)
        for b in broken
    ]
    short = ["; ".join(f"{i} ({seen})" if seen else i for i, _, seen in b) for b in broken]
    parts = [rows.assign(_short=short)]
    if unparsed is not None:  # records ingest could not read: their line, as text
        parts.append(
            unparsed.assign(
                _rules=[["parse"]] * len(unparsed),
                _short=unparsed["_reasons"].map(lambda r: _PARSE_WHERE.sub("parse: ", r)),
            )
        )
    table = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    table = table.sort_values(["_source", "_row"], kind="stable").reset_index(drop=True)
    total = len(df) + (0 if unparsed is None else len(unparsed))
    by_rule: dict[str, int] = {}
    for rules in table["_rules"]:
        for rule in rules:
            by_rule[rule] = by_rule.get(rule, 0) + 1
    examples = [
        {"_source": s, "_row": int(r), "reasons": why}
        for s, r, why in zip(table["_source"], table["_row"], table["_short"], strict=True)
    ][:MAX_EXAMPLES]
    table = table.drop(columns="_short")
    summary = {
        "policy": "quarantine",
        "rows": len(table),
        "of_rows": total,
        "share": round(len(table) / total, 6) if total else 0.0,
        "max_invalid_share": config.data.max_invalid_share,
        "by_rule": by_rule,
        "examples": examples,
    }
    return table, summary


def _share_failure(quarantine: dict[str, Any], config: RetrainConfig) -> dict[str, Any]:
    """The failure a quarantine above data.max_invalid_share reports (first in the list)."""
    rule = (
        f"at most {config.data.max_invalid_share} of the rows may be quarantined "
        "(data.max_invalid_share)"
    )
    if quarantine["rows"] >= quarantine["of_rows"]:
        rule = "rows must remain after the quarantine: every row broke a row rule"
    return {
        "id": "invalid_share",
        "rule": rule,
        "expectation": "data.on_invalid: quarantine",
        "kwargs": {"max_invalid_share": config.data.max_invalid_share},
        "table": "rows",
        "success": False,
        "element_count": quarantine["of_rows"],
        "unexpected_count": quarantine["rows"],
        "unexpected_percent": 100.0 * quarantine["share"],
        "observed_value": quarantine["share"],
        "examples": [
            {"_source": e["_source"], "_row": e["_row"], "reasons": e["reasons"]}
            for e in quarantine["examples"]
        ],
        "exception": None,
    }


def _plain(v: Any) -> Any:
    """numpy scalars and other oddities from GX results as plain JSON values."""
    if hasattr(v, "item"):
        return v.item()
    return str(v)


def _summarise(
    d: dict[str, Any], spec: dict[str, Any], table: str, params: dict[str, Any]
) -> dict[str, Any]:
    result = d.get("result") or {}
    examples = []
    for item in (result.get("partial_unexpected_index_list") or [])[:MAX_EXAMPLES]:
        examples.append({k: v for k, v in item.items()})
    if not examples:
        examples = [
            {"value": v} for v in (result.get("partial_unexpected_list") or [])[:MAX_EXAMPLES]
        ]
    return {
        "id": spec.get("id", d["expectation_config"]["type"]),
        "rule": _fill(spec.get("rule", ""), params),
        "expectation": d["expectation_config"]["type"],
        "kwargs": {k: v for k, v in d["expectation_config"]["kwargs"].items() if k != "batch_id"},
        "table": table,
        "success": bool(d["success"]),
        "element_count": result.get("element_count"),
        "unexpected_count": result.get("unexpected_count"),
        "unexpected_percent": result.get("unexpected_percent"),
        "observed_value": result.get("observed_value"),
        "examples": examples,
        "exception": (d.get("exception_info") or {}).get("exception_message")
        if (d.get("exception_info") or {}).get("raised_exception")
        else None,
    }


def _example_text(ex: dict[str, Any]) -> str:
    """'data.csv row 4: 'postive'' for a row; "label 'neutral': 4" for a per-label table."""
    if "_row" in ex:
        where = f"{os.path.basename(str(ex.get('_source', '')))} row {ex['_row']}".strip()
        index = ("_row", "_source")
    elif "label" in ex:
        where, index = f"label {ex['label']!r}", ("label",)
    else:
        where, index = "", ()
    shown = ", ".join(
        _clip(v, 160 if k == "reasons" else 60) for k, v in ex.items() if k not in index
    )
    return f"{where}: {shown}" if where else shown


def _clip(v: Any, n: int = 60) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def _failure_line(r: dict[str, Any]) -> str:
    if r.get("exception"):
        return f"{r['id']} ({r['rule']}): could not be evaluated: {r['exception']}"
    if r.get("unexpected_count") is not None:
        pct = r.get("unexpected_percent")
        pct_txt = f" ({pct:.1f}%)" if isinstance(pct, int | float) else ""
        head = f"{r['id']} ({r['rule']}): {r['unexpected_count']} unexpected{pct_txt}"
    else:
        head = f"{r['id']} ({r['rule']}): observed {r.get('observed_value')!r}"
    if r["examples"]:
        head += "; e.g. " + "; ".join(_example_text(e) for e in r["examples"][:3])
    return head


def _failure_message(report: ValidationReport, raw: RawSnapshot) -> str:
    sources = ", ".join(s.path for s in raw.sources[:3]) + (" ..." if len(raw.sources) > 3 else "")
    # the first line stands alone: the rule broken, where (file and row) and what was seen
    first = _failure_line({**report.failures[0], "examples": report.failures[0]["examples"][:1]})
    if len(first) > 400:
        first = first[:397] + "..."
    others = [r["id"] for r in report.failures[1:]]
    more = f"; also broken: {', '.join(others)}" if others else ""
    lines = [
        f"data contract {report.contract!r} failed for {sources}: {first}{more} "
        f"({report.failed} of {report.evaluated} expectations failed; report: "
        f"{report.report_markdown})"
    ]
    lines += [f"  - {_failure_line(r)}" for r in report.failures]
    return "\n".join(lines)


def _markdown(doc: dict[str, Any]) -> str:
    ok = "PASSED" if doc["success"] else "FAILED"
    if doc["success"] and doc.get("quarantine"):
        ok += f" with {doc['quarantine']['rows']} row(s) quarantined"
    lines = [
        f"# Data contract `{doc['contract']}`: {ok}",
        "",
        f"- contract: `{doc['contract_origin']}` (version {doc['contract_version']})",
        f"- raw snapshot: `{doc['raw_snapshot']['key']}`, {doc['raw_snapshot']['rows']} rows, "
        f"fingerprint `{doc['raw_snapshot']['fingerprint']}`",
        f"- sources: {', '.join('`' + s + '`' for s in doc['raw_snapshot']['sources'][:5])}"
        + (" ..." if len(doc["raw_snapshot"]["sources"]) > 5 else ""),
        f"- parameters: {stable_json(doc['parameters'])}",
        "",
        "| result | rule | expectation | unexpected | observed | examples |",
        "|---|---|---|---|---|---|",
    ]
    for r in doc["results"]:
        mark = "pass" if r["success"] else "**FAIL**"
        ex = "; ".join(_example_text(e) for e in r["examples"][:3]).replace("|", "\\|")
        observed = "" if r.get("observed_value") is None else _clip(r["observed_value"], 40)
        unexpected = "" if r.get("unexpected_count") is None else str(r["unexpected_count"])
        lines.append(
            f"| {mark} | {r['id']}: {r['rule']} | `{r['expectation']}` | {unexpected} | {observed} | {ex} |"
        )
    q = doc.get("quarantine")
    if q:
        kept = "the run stops" if q["share"] > q["max_invalid_share"] else "left out"
        lines += [
            "",
            "## Quarantine (`data.on_invalid: quarantine`)",
            "",
            f"{q['rows']} of {q['of_rows']} rows ({100 * q['share']:.2f}%, at most "
            f"{100 * q['max_invalid_share']:.2f}% allowed) broke row rules: {kept}. "
            f"The rules above were judged on the rows kept. Table: `{q.get('table')}`",
            "",
            "| rule | rows |",
            "|---|---|",
            *[f"| {rule} | {n} |" for rule, n in q["by_rule"].items()],
            "",
            "First rows:",
            "",
            *[
                f"- {os.path.basename(str(e['_source']))} row {e['_row']}: "
                + _clip(e["reasons"], 200).replace("|", "\\|")
                for e in q["examples"]
            ],
        ]
    return "\n".join(lines) + "\n"

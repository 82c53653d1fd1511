"""validate: raw snapshot -> Great Expectations validation against the task's data contract.

The contract (``data_contracts/<task>.yaml``) lists Great Expectations expectations with
parameters; this stage fills in the parameters, runs the suite on the tables the task type
derives from the snapshot, and saves a JSON report and a Markdown rendering. A failure raises
``ContractViolation`` naming each failed rule, its unexpected count and example rows, so the
flow stops before any training. The raw snapshot stays in the store either way.
"""

from __future__ import annotations

import importlib.resources
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
from domaintune.manifests import RawSnapshot, ValidationReport
from domaintune.redaction import redact, redact_obj
from domaintune.store import Store
from domaintune.tasktypes import get_task_type

log = logging.getLogger(__name__)

STAGE = "validate"
VERSION = "1"
MAX_EXAMPLES = 5
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
        res = importlib.resources.files("domaintune.data_contracts").joinpath(
            f"{task.contract}.yaml"
        )
        text = res.read_text(encoding="utf-8")
        origin = f"data_contracts/{task.contract}.yaml"
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
    return report


def _run(
    config: RetrainConfig, contract: dict[str, Any], raw: RawSnapshot, store: Store, key: str
) -> ValidationReport:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    task_name = contract["name"]
    task = get_task_type(task_name)
    df = pd.read_parquet(raw.table)
    tables = task.contract_tables(df, raw.labels, config)
    params = {**contract["parameters"], "labels": raw.labels}

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = ctx.data_sources.add_pandas("domaintune")
    results: list[dict[str, Any]] = []
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
        for spec in specs:
            kwargs = _fill(spec.get("kwargs") or {}, params)
            exp = _expectation_class(spec["type"])(**kwargs, meta={"id": spec["id"]})
            suite.add_expectation(exp)
            if spec.get("index_column"):
                index_cols.append(spec["index_column"])
        if not index_cols:
            index_cols = [c for c in ("_row", "_source") if c in frame.columns]
        vd = ctx.validation_definitions.add(
            gx.ValidationDefinition(name=f"{task_name}.{table_name}", data=batch_def, suite=suite)
        )
        res = vd.run(
            batch_parameters={"dataframe": frame},
            result_format={
                "result_format": "SUMMARY",
                "unexpected_index_column_names": index_cols,
                "partial_unexpected_count": MAX_EXAMPLES,
            },
        )
        spec_by_id = {s["id"]: s for s in specs}
        for r in res.results:
            d = r.to_json_dict()
            exp_id = (d["expectation_config"].get("meta") or {}).get("id")
            spec = spec_by_id.get(exp_id, {})
            results.append(
                json.loads(json.dumps(_summarise(d, spec, table_name, params), default=_plain))
            )

    order = {s["id"]: i for i, s in enumerate(contract["expectations"])}
    results.sort(key=lambda r: order.get(r["id"], 0))
    failures = [r for r in results if not r["success"]]
    success = not failures
    with store.writer(STAGE, key) as w:
        entry = store.entry_path(STAGE, key)
        report_doc = {
            "contract": task_name,
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
        report_doc = redact_obj(json.loads(json.dumps(report_doc, default=str)))
        (w.path / "report.json").write_text(json.dumps(report_doc, indent=2))
        (w.path / "report.md").write_text(_markdown(report_doc))
        manifest = ValidationReport(
            key=key,
            path=str(entry),
            fingerprint=hash_obj(raw.fingerprint, success, [r["id"] for r in failures]),
            success=success,
            contract=task_name,
            evaluated=len(results),
            failed=len(failures),
            report_json=str(entry / "report.json"),
            report_markdown=str(entry / "report.md"),
            failures=failures,
        )
        w.manifest = manifest.model_dump(mode="json")
    return manifest


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
    shown = ", ".join(_clip(v) for k, v in ex.items() if k not in index)
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
    return "\n".join(lines) + "\n"

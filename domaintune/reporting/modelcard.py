"""The model card of a registered version: ``model/README.md`` in the Hugging Face format.

The YAML metadata (``huggingface_hub.ModelCardData``) names the base model, the pipeline tag
of the task, the data as fingerprints (raw snapshot and splits) and, as ``model-index``, every
numeric test metric of the fine-tuned model, so ``huggingface_hub.ModelCard.load`` reads the
metrics back. The body is for people: what the model is and whether it was promoted, the
test metrics beside the base model's (and the champion's, when it was re-scored on the same
test split), per-class or per-entity-type scores, what trained and how, the data contract's
result, lineage, how to load the folder, and what the model is for and what was not
evaluated. The folder holding the card is the one transformers loads and one would push to
a model hub. Everything written passes through the redaction (no credential in a card).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from domaintune.config import RetrainConfig
from domaintune.models import MODEL_TERMS, PACKAGED_MODELS
from domaintune.redaction import redact, redact_obj
from domaintune.storage.manifests import (
    EvaluationReport,
    ModelArtifact,
    RawSnapshot,
    Registration,
    SplitManifest,
    scalar_metrics,
)
from domaintune.tasktypes import get_task_type

CARD = "README.md"

#: Hugging Face pipeline tag of a task model, by its transformers Auto class.
PIPELINE_TAGS = {
    "AutoModelForSequenceClassification": "text-classification",
    "AutoModelForTokenClassification": "token-classification",
    "AutoModelForQuestionAnswering": "question-answering",
    "AutoModelForCausalLM": "text-generation",
    "AutoModelForMaskedLM": "fill-mask",
}


def write_model_card(
    folder: Path,
    config: RetrainConfig,
    raw: RawSnapshot,
    splits: SplitManifest,
    model: ModelArtifact,
    evaluation: EvaluationReport,
    registration: Registration,
    lineage: dict[str, Any],
    health: Any = None,
) -> Path:
    """Write ``folder/README.md``, the card of the exported model in ``folder`` (its
    ``config.json`` and ``base_model.json`` say how it loads), and return its path."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from domaintune.reporting.reports import metric_rows

    task = get_task_type(config.task.type)
    pipeline_tag = PIPELINE_TAGS.get(task.auto_model)
    doc = json.loads(Path(evaluation.metrics_json).read_text())
    test = splits.splits["test"]
    data_ids = [f"{config.name}-raw-{raw.fingerprint}"] + [
        f"{config.name}-{name}-{s.fingerprint}" for name, s in splits.splits.items()
    ]
    results = [
        EvalResult(
            task_type=pipeline_tag or config.task.type,
            task_name=config.task.type,
            dataset_type=f"{config.name}-test-{test.fingerprint}",
            dataset_name=f"{config.name} test split {test.fingerprint}",
            dataset_split="test",
            dataset_revision=test.fingerprint,
            metric_type=k,
            metric_name=f"test {k}",
            metric_value=v,
        )
        for k, v in scalar_metrics(doc["finetuned"]).items()
    ]
    chain = lineage.get("stages") or []  # a multi-stage recipe starts from its first base
    origin = chain[0]["base_model"]["name"] if chain else model.base_model
    terms = MODEL_TERMS.get(hub_name(origin))
    data = ModelCardData(
        base_model=hub_name(origin),
        license=terms.license if terms else None,
        pipeline_tag=pipeline_tag,
        library_name="transformers",
        datasets=data_ids,
        tags=["domaintune", config.domain, config.task.type, config.training.strategy.kind],
        model_name=f"{config.name} {registration.version}" if results else None,
        eval_results=results or None,
    )
    lines = [
        *_evaluation(config, model, doc, metric_rows(doc), registration),
        *_training(config, model, doc),
        *_stages(chain, config, doc),
        *_data(config, raw, splits),
        *_monitor(health),
        *_exports(registration),
        *_lineage(lineage),
        _loading(Path(folder), task, model, registration).rstrip(),
        *_limitations(config, splits, doc),
        *(["", "## Licence", "", terms.duties] if terms else []),
    ]
    body = "\n".join(lines) + "\n"
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    path = Path(folder) / CARD
    path.unlink(missing_ok=True)  # a file there may be a hard link into the finetune entry
    path.write_text(redact(str(card)))
    if terms:  # the base model's terms ask for this file beside every copy
        notice = Path(folder) / "NOTICE"
        notice.unlink(missing_ok=True)
        notice.write_text(terms.notice + "\n")
    return path


def _exports(registration: Registration) -> list[str]:
    """The version's exports for serving: each checked against the model on the test split
    (parity) and timed on the machine that made it; refused ones with their reason."""
    exports = registration.exports or {}
    if not exports:
        return []
    lines = [
        "",
        "## Exports",
        "",
        "Each export was checked against this model (PyTorch, fp32) on the same test split "
        "before it was kept, and timed beside it on the machine that made it (p50 of one text "
        "at a time; texts per second in batches of 32; the PyTorch model as `domaintune "
        "predict` runs it). `domaintune predict --runtime` runs them.",
        "",
    ]
    rows, refused, machine = [], [], ""
    for fmt, e in exports.items():
        if e.get("refused"):
            refused.append(f"- **{fmt}** refused: {e['refused']}")
            continue
        p, lat = e.get("parity") or {}, e.get("latency") or {}
        ex, t = lat.get("export") or {}, lat.get("torch") or {}
        machine = e.get("machine") or machine
        rows.append(
            [
                f"`{e['path']}`",
                f"{p.get('metric', '')} {_num(p.get('export'))} (model {_num(p.get('model'))})",
                f"{p.get('identical_predictions', 0):.1%}" if p else "-",
                ex.get("single_p50_ms", "-"),
                t.get("single_p50_ms", "-"),
                ex.get("batch32_texts_per_s", "-"),
                t.get("batch32_texts_per_s", "-"),
                f"{e.get('bytes', 0) / 1e6:.1f}",
            ]
        )
    if rows:
        lines += _table(
            [
                "export",
                "test metric",
                "same predictions",
                "one text p50 ms",
                "PyTorch",
                "texts/s (32)",
                "PyTorch",
                "MB",
            ],
            rows,
        )
        if machine:
            lines += ["", f"Timed on: {machine}."]
    if refused:
        lines += ["", *refused]
    return lines


def _monitor(health: Any) -> list[str]:
    """Why this run trained: the champion it replaces on the newly landed files, and how
    far those files drifted from its training data (the monitor stage's report)."""
    if health is None or not getattr(health, "version", None):
        return []
    lines = ["", "## Why it was trained: the new data", "", health.message]
    drift = (health.drift or {}).get("tests") or []
    if drift:
        from domaintune.drift import DriftTest

        lines += ["", "| drift test | outcome |", "|---|---|"]
        lines += [f"| {t['name']} | {DriftTest.model_validate(t).describe()} |" for t in drift]
    return lines


def hub_name(name: str) -> str:
    """A readable model name for the ``base_model`` field: a hub id as it is, a packaged
    model's hub id, otherwise the folder's or file's own name (never a local path)."""
    for hub_id, spec in PACKAGED_MODELS.items():
        if name == spec:
            return hub_id
    if name.startswith("pkg://"):
        return name[len("pkg://") :].strip("/").removesuffix(".gguf")
    if not name.startswith(("/", ".", "~")) and name.count("/") <= 1:
        return name
    return os.path.basename(name.rstrip("/")).removesuffix(".gguf") or name


def _num(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "-" if v is None else str(v)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(_num(c) for c in row) + " |" for row in rows),
    ]


def _evaluation(
    config: RetrainConfig,
    model: ModelArtifact,
    doc: dict[str, Any],
    rows: list[dict[str, Any]],
    registration: Registration,
) -> list[str]:
    primary = doc["primary_metric"]
    champion = doc.get("champion") or {}
    champ = champion.get("metrics") or {}
    status = "promoted to production" if registration.promoted else "not promoted"
    lines = [
        f"# {config.name} {registration.version}",
        "",
        f"A `{config.task.type}` model for the **{config.domain}** domain, fine-tuned from "
        f"`{hub_name(model.base_model)}` by domaintune and "
        f"registered as {registration.version} of `{config.name}`: "
        f"**{status}** ({registration.promotion_reason}).",
        "",
        f"## Evaluation on {doc['test_rows']} test rows",
        "",
        f"Primary metric: **{primary}**"
        + (
            " (lower is better)"
            if primary in get_task_type(config.task.type).lower_is_better
            else ""
        )
        + ". Base: the pretrained model before fine-tuning, scored the same way on the same "
        "test split (a new task head starts from the training's seed; a registered model's "
        "fitting head, as registered)"
        + (
            f"; the champion {champion['version']} was re-scored on the same test split."
            if champ
            else (
                f"; champion {champion['version']}: {champion.get('note') or 'not re-scored'}."
                if champion
                else "."
            )
        ),
        "",
    ]
    header = ["metric", "fine-tuned", "base", "gain"] + (["champion"] if champ else [])
    lines += _table(
        header,
        [
            [r["metric"], r["fine-tuned"], r["base"], f"{r['gain']:+.4f}"]
            + ([r.get("champion")] if champ else [])
            for r in rows
        ],
    )
    for key, title, unit in (("per_class", "Per class", "label"), ("per_type", "Per entity type", "type")):  # fmt: skip
        table = doc["finetuned"].get(key)
        if not table:
            continue
        base_t = doc["base"].get(key) or {}
        champ_t = champ.get(key) or {}
        lines += ["", f"### {title}", ""]
        lines += _table(
            [unit, "precision", "recall", "f1", "support", "base f1"]
            + (["champion f1"] if champ_t else []),
            [
                [lab, m["precision"], m["recall"], m["f1"], m["support"]]
                + [base_t.get(lab, {}).get("f1")]
                + ([champ_t.get(lab, {}).get("f1")] if champ_t else [])
                for lab, m in table.items()
            ],
        )
    if registration.interval:
        i = registration.interval
        lines += [
            "",
            f"{primary} on the test split: {i['point']:.4f}, {100 * i.get('confidence', 0.95):.0f}% "
            f"bootstrap interval [{i['low']:.4f}, {i['high']:.4f}] ({i['n']} examples).",
        ]
    evidence = registration.evidence or {}
    parts = [(k, evidence.get(k)) for k in ("overall", "earlier", "new") if evidence.get(k)]
    if parts:
        from domaintune.evidence import Comparison

        where = {
            "overall": "whole test split",
            "earlier": "the champion's own test rows",
            "new": "test rows of newer files",
        }
        lines += ["", "### Against the champion (paired tests)", ""]
        lines += [f"- {where[k]}: {Comparison.model_validate(c).describe()}" for k, c in parts]
    elif evidence.get("note"):
        lines += ["", f"Against the champion: {evidence['note']}."]
    return lines


def _limitations(config: RetrainConfig, splits: SplitManifest, doc: dict[str, Any]) -> list[str]:
    return [
        "",
        "## Intended use and limitations",
        "",
        f"- Intended for `{config.task.type}` on **{config.domain}** texts like those it was "
        "trained on"
        + (
            f", with the labels {', '.join(f'`{x}`' for x in splits.labels)}."
            if splits.labels
            else "."
        ),
        f"- Evaluated on {doc['test_rows']} held-out test rows of the same data "
        f"({_split_rows(splits)}); it is not evaluated beyond this data: texts from other "
        "sources, periods or languages"
        + (", or labels outside this set," if splits.labels else "")
        + " may score differently.",
        "- A model that scores well on average can still fail on a class or a kind of text "
        "that is rare in the data; check the per-class table and the evaluation report "
        "(`../evaluation.md`, beside this folder in the registry) before relying on it.",
    ]


def _split_rows(splits: SplitManifest) -> str:
    return ", ".join(f"{name} {s.rows}" for name, s in splits.splits.items()) + " rows"


def _training(config: RetrainConfig, model: ModelArtifact, doc: dict[str, Any]) -> list[str]:
    t = config.training
    launch = model.launch
    facts = [
        ["strategy", t.strategy.describe()],
        ["trainable / total parameters", f"{model.trainable_parameters:,} / {model.total_parameters:,}"],
        ["epochs / max steps", f"{t.epochs:g} / {t.max_steps or '-'}"],
        ["optimizer steps", model.global_step],
        ["learning rate, scheduler", f"{t.learning_rate:g}, {t.lr_scheduler}"],
        ["batch per rank x accumulation x ranks", (
            f"{launch.micro_batch_size} x {launch.gradient_accumulation_steps} x "
            f"{launch.world_size}" if launch.micro_batch_size else t.batch_size)],
        ["max length (tokens)", t.max_length],
        ["seed", t.seed],
        ["precision (training / evaluation)", (
            f"{launch.precision or t.precision} / "
            f"{(doc.get('precision') or {}).get('precision', '-')}")],
        ["training seconds", f"{model.train_seconds:.1f}"],
    ]  # fmt: skip
    section = redact_obj(t.model_dump(mode="json"))
    return [
        "",
        "## Training",
        "",
        *_table(["setting", "value"], facts),
        "",
        "<details><summary>The whole <code>training</code> section</summary>",
        "",
        "```yaml",
        yaml.safe_dump(section, sort_keys=False).rstrip(),
        "```",
        "",
        "</details>",
    ]


def _data(config: RetrainConfig, raw: RawSnapshot, splits: SplitManifest) -> list[str]:
    stats = splits.stats
    contract = (
        config.contract.path or f"{get_task_type(config.task.type).contract_source()[0]} (built-in)"
    )
    counts = [
        ["rows ingested", raw.rows],
        ["records that did not parse (quarantined)", raw.unparsed_rows],
        ["rows quarantined (row rules broken)", int(stats.get("quarantined", 0))],
        ["rows unusable for the task", stats.get("dropped_invalid", 0)],
        ["blank after cleaning", stats.get("dropped_blank_after_cleaning", 0)],
        ["duplicate texts dropped", stats.get("dropped_duplicates", 0)],
        *([f"{name} rows", s.rows] for name, s in splits.splits.items()),
    ]
    lines = [
        "",
        "## Data and data contract",
        "",
        f"The data passed the contract `{contract}` (a model is trained only on data that "
        f"passes); data.on_invalid: `{config.data.on_invalid}`.",
        "",
        *_table(["", "rows"], counts),
    ]
    # the task type's counts per split: examples per label, entities per type, documents...
    keys = list(dict.fromkeys(k for s in splits.splits.values() for k in s.label_counts))
    order = {lab: i for i, lab in enumerate(splits.labels)}
    keys.sort(key=lambda k: order.get(k, len(order)))
    if keys:
        names = list(splits.splits)
        lines += ["", *_table(["per split", *names], [
            [k, *(splits.splits[n].label_counts.get(k, 0) for n in names)] for k in keys
        ])]  # fmt: skip
    return lines


def _stages(chain: list[dict[str, Any]], config: RetrainConfig, doc: dict[str, Any]) -> list[str]:
    """A multi-stage recipe: each stage, what it learned from and its own test figure."""
    if not chain:
        return []
    m = config.evaluation.primary_metric
    rows = [
        [
            f"{i + 1}. {r['stage']}",
            r["task"],
            r["model"].get("strategy") or "-",
            f"{r['raw_snapshot']['rows']} rows, {r['held_out_of_final_stage']} left out",
            f"{r['evaluation']['primary_metric']} {_num(r['evaluation']['base'])} -> "
            f"{_num(r['evaluation']['finetuned'])}",
        ]
        for i, r in enumerate(chain)
    ]
    rows.append([
        f"{len(chain) + 1}. (this model)", config.task.type, config.training.strategy.kind,
        "-", f"{m} {_num(doc['base'].get(m))} -> {_num(doc['finetuned'].get(m))}",
    ])  # fmt: skip
    return [
        "",
        "## Training stages",
        "",
        "Trained in stages, each starting from the model the stage before it trained; "
        '"left out": rows whose text is in this model\'s validation or test split.',
        "",
        *_table(["stage", "task", "strategy", "data", "test metric (start -> end)"], rows),
    ]


def _lineage(lineage: dict[str, Any]) -> list[str]:
    lineage = redact_obj(lineage)
    code = lineage.get("code_version") or {}
    raw = lineage.get("raw_snapshot") or {}
    splits = lineage.get("splits") or {}
    facts = [
        ["raw snapshot", f"`{raw.get('fingerprint')}` ({raw.get('rows')} rows)"],
        *(
            [f"{name} split", f"`{s['fingerprint']}` ({s['rows']} rows)"]
            for name, s in splits.items()
            if isinstance(s, dict)
        ),
        ["tokenizer", f"`{lineage.get('tokenizer_fingerprint')}`"],
        ["base model", f"`{(lineage.get('base_model') or {}).get('fingerprint')}`"],
        ["this model", f"`{(lineage.get('model') or {}).get('fingerprint')}`"],
        ["Prefect flow run", f"`{lineage.get('prefect_flow_run_id') or '-'}`"],
        ["domaintune", code.get("domaintune")],
        ["git commit", f"`{code.get('git_commit') or '-'}`" + (" (uncommitted changes)" if code.get("git_dirty") else "")],
        ["registered at", lineage.get("created_at")],
    ]  # fmt: skip
    sources = [s.get("path") for s in raw.get("sources") or []]
    return [
        "",
        "## Lineage",
        "",
        *_table(["", "fingerprint / value"], facts),
        "",
        "Sources: " + (", ".join(f"`{s}`" for s in sources) or "-") + ". The full record is "
        "`../lineage.json`, beside this folder in the registry.",
    ]


def _loading(folder: Path, task: Any, model: ModelArtifact, registration: Registration) -> str:
    auto_model = task.auto_model
    sized = f", num_labels={len(model.labels)}" if task.labelled_head and model.labels else ""
    config_json = folder / "config.json"
    head = config_json.is_file() and "domaintune_head" in json.loads(config_json.read_text())
    if (folder / "base_model.json").is_file():
        return (
            "\n## How to load it\n\n"
            "This folder holds a LoRA adapter only (`training.strategy.lora.merge_on_export: "
            "false`): load it with `peft` on top of its base model, prepared as the training "
            "strategy prepared it (`base_model.json`):\n\n"
            "```python\n"
            "from peft import PeftModel\n"
            f"from transformers import {auto_model}, AutoTokenizer\n\n"
            f'base = {auto_model}.from_pretrained("{hub_name(model.base_model)}"{sized})\n'
            'model = PeftModel.from_pretrained(base, "path/to/this/folder")\n'
            'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")\n'
            "```\n"
        )
    text = (
        "\n## How to load it\n\n"
        "A plain Hugging Face model folder (safetensors weights, config and tokenizer):\n\n"
        "```python\n"
        f"from transformers import {auto_model}, AutoTokenizer\n\n"
        f'model = {auto_model}.from_pretrained("path/to/this/folder")\n'
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")\n'
        "```\n\n"
        f"or `domaintune predict {registration.name}@{registration.version} INPUT...`, which "
        "scores it exactly as its evaluation did.\n"
    )
    if head:
        text += (
            "\nIts task head is domaintune's own (`domaintune_head` in `config.json`): plain "
            "`from_pretrained` replaces it by a fresh linear layer, so load it with "
            "`domaintune.tasktypes.get_task_type(task).load_model(folder, labels, seed)` or "
            "`domaintune predict`.\n"
        )
    return text

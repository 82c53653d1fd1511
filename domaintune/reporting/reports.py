"""Markdown for people: the evaluation report, the training summary and the scoring counts
(Prefect artifacts and the files beside the store entries). The stages compute; this module
only renders what they recorded."""

from __future__ import annotations

from typing import Any

import pandas as pd

from domaintune.storage.manifests import ModelArtifact, ScoredFile, scalar_metrics
from domaintune.tasktypes import get_task_type


def metric_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Scalar metrics as table rows: metric, base, fine-tuned, gain."""
    rows = []
    champ = (doc.get("champion") or {}).get("metrics") or {}
    for k, v in scalar_metrics(doc["finetuned"]).items():
        row = {
            "metric": k,
            "base": round(doc["base"][k], 4),
            "fine-tuned": round(v, 4),
            "gain": round(v - doc["base"][k], 4),
        }
        if champ:
            row["champion"] = round(champ[k], 4) if k in champ else None
        rows.append(row)
    return rows


def _cell(text: Any, n: int = 200) -> str:
    s = " ".join(str(text).split())
    s = s if len(s) <= n else s[: n - 3] + "..."
    return s.replace("|", "\\|")


def render_markdown(
    doc: dict[str, Any],
    samples: pd.DataFrame | None = None,
    charts: dict[str, str] | None = None,
) -> str:
    from domaintune.reporting.charts import data_uri

    charts = charts or {}
    lines = [
        f"# Evaluation on {doc['test_rows']} test rows",
        "",
        f"Primary metric: **{doc['primary_metric']}**. Base model: `{doc['base_model']}` as "
        "fine-tuning started from it (a new task head: untrained, initialised from the same "
        "seed; a registered model's fitting head: as registered).",
        "",
        "| metric | base | fine-tuned | gain |",
        "|---|---|---|---|",
    ]
    for r in metric_rows(doc):
        lines.append(
            f"| {r['metric']} | {r['base']:.4f} | {r['fine-tuned']:.4f} | {r['gain']:+.4f} |"
        )
    champion = doc.get("champion")
    if champion:
        lines += [
            "",
            f"Champion {champion['version']}: "
            + (
                "re-scored on this test split: "
                + ", ".join(
                    f"{r['metric']} {r['champion']:.4f}"
                    for r in metric_rows(doc)
                    if r.get("champion") is not None
                )
                if champion.get("metrics")
                else champion.get("note", "not re-scored")
            ),
        ]
    for table_key, title, unit in (
        ("per_class", "Per class", "label"),
        ("per_type", "Per entity type", "type"),
    ):
        table = doc["finetuned"].get(table_key)
        if not table:
            continue
        lines += [
            "",
            f"## {title} (fine-tuned)",
            "",
            f"| {unit} | precision | recall | f1 | support | base f1 |",
            "|---|---|---|---|---|---|",
        ]
        base_table = doc["base"].get(table_key) or {}
        for lab, m in table.items():
            bf1 = base_table.get(lab, {}).get("f1", 0.0)
            lines.append(
                f"| {lab} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} | {bf1:.3f} |"
            )
    cm = doc["finetuned"].get("confusion_matrix")
    if cm:
        labs = cm["labels"]
        lines += [
            "",
            "## Confusion matrix (fine-tuned; rows = true, columns = predicted)",
            "",
            "| true \\ predicted | " + " | ".join(labs) + " |",
            "|---" * (len(labs) + 1) + "|",
        ]
        for lab, row in zip(labs, cm["matrix"], strict=True):
            lines.append(f"| {lab} | " + " | ".join(str(x) for x in row) + " |")
    if "confusion_matrix" in charts:
        lines += ["", f"![confusion matrix]({data_uri(charts['confusion_matrix'])})"]
    if "loss_curve" in charts:
        lines += [
            "",
            "## Training curves: loss, validation metric, learning rate",
            "",
            f"![training curves]({data_uri(charts['loss_curve'])})",
        ]
    lines += _generation_lines(doc)
    if samples is not None and len(samples):
        lines += [
            "",
            f"## Sample generations ({min(10, len(samples))} of {len(samples)})",
            "",
            "| prompt | reference | base model | fine-tuned |",
            "|---|---|---|---|",
        ]
        for r in samples.head(10).itertuples(index=False):
            lines.append(f"| {_cell(r[0])} | {_cell(r[1])} | {_cell(r[2])} | {_cell(r[3])} |")
    return "\n".join(lines) + "\n"


def _generation_lines(doc: dict[str, Any]) -> list[str]:
    """How the answers were generated (generative task types): the limits, the share of
    prompts cut to fit, and the speed of each model."""
    tuned = doc["finetuned"].get("generation")
    if not tuned:
        return []
    line = (
        f"Generation: greedy, at most {tuned.get('max_new_tokens')} new tokens, prompts of at "
        f"most {tuned.get('max_prompt_tokens')} tokens ({100 * tuned.get('prompts_cut', 0):.1f}% "
        "of them cut to fit, as training cuts them)"
    )
    speeds = [
        f"{who} {g['tokens']:,} tokens in {g['seconds']:.1f} s ({g['tokens_per_second']:,.1f} tokens/s)"
        for who, g in (("base", doc["base"].get("generation")), ("fine-tuned", tuned))
        if g and g.get("tokens_per_second") is not None
    ]
    return ["", line + (": " + "; ".join(speeds) if speeds else "") + "."]


def training_markdown(model: ModelArtifact) -> str:
    """What trained, for the Prefect UI: strategy, parameters per component, learning rates."""
    s = model.strategy
    lines = [
        f"## Training: {s.strategy}",
        "",
        f"Trainable parameters: **{model.trainable_parameters:,}** of "
        f"{model.total_parameters:,} ({100 * model.trainable_parameters / max(model.total_parameters, 1):.2f}%); "
        f"{model.global_step} steps in {model.train_seconds:.1f} s",
        "",
    ]
    if s.num_layers:
        blocks = s.trained_blocks
        lines += [f"Transformer blocks trained: {blocks or 'none'} of 1..{s.num_layers}", ""]
    if s.components:
        lines += ["| component | trainable | total |", "|---|---:|---:|"]
        for comp, row in s.components.items():
            lines.append(f"| {comp} | {row.trainable:,} | {row.total:,} |")
        lines.append("")
    if model.optimizer_groups:
        lines += [
            "| learning rate | weight decay | parameters | parts |",
            "|---:|---:|---:|---|",
        ]
        for g in model.optimizer_groups:
            lines.append(
                f"| {g.lr:.3g} | {g.weight_decay:g} | {g.parameters:,} | {', '.join(g.parts)} |"
            )
        lines.append("")
    la = model.launch
    if la.global_batch_size:
        zero = f"ZeRO-{la.zero_stage}" if la.zero_stage is not None else "no ZeRO engine"
        lines.append(
            f"Ran on {la.world_size} {la.device.upper()} rank(s) on {la.num_nodes} node(s), "
            f"{la.precision}, {zero}; global batch {la.global_batch_size} = "
            f"{la.micro_batch_size} per rank x {la.gradient_accumulation_steps} accumulation"
        )
        lines.append("")
    tp = model.throughput
    if tp.train_samples_per_second:
        lines.append(
            f"Throughput: {tp.train_samples_per_second:,.1f} samples/s, "
            f"{tp.train_tokens_per_second or 0:,.0f} tokens/s (non-padding)"
        )
        lines.append("")
    mem = model.peak_gpu_allocated_mb or model.peak_rss_mb
    if mem:
        lines.append(
            f"Peak memory of the training process: {mem:,.0f} MB "
            f"({'GPU allocated' if model.peak_gpu_allocated_mb else 'resident'})"
        )
    for note in s.notes:
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def total_counts(scored: list[ScoredFile]) -> dict[str, int]:
    """The counts of several scored files added up (per class or entity type)."""
    totals: dict[str, int] = {}
    for s in scored:
        for k, v in s.counts.items():
            totals[k] = totals.get(k, 0) + v
    return totals


def counts_markdown(name: str, model: str, scored: list[ScoredFile]) -> str:
    """The run in a few lines: the model version, the files, the counts (and a bar chart
    of them where they are counts of predicted classes or entity types)."""
    from domaintune.reporting.charts import bar_chart_svg, data_uri

    totals = total_counts(scored)
    rows = sum(s.rows for s in scored)
    lines = [
        f"# Scoring {name}",
        "",
        f"{len(scored)} file(s), {rows} row(s) scored by **{model}**.",
        "",
        "| | count |",
        "|---|---:|",
        *(f"| {k} | {v} |" for k, v in sorted(totals.items(), key=lambda kv: -kv[1])),
    ]
    what = get_task_type(scored[0].task_type).counted if scored else None
    if what:  # counts per label
        lines += ["", f"![count per {what}]({data_uri(bar_chart_svg(totals, f'per {what}'))})"]
    return "\n".join(lines)

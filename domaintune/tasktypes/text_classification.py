"""Text / sentiment classification: one label per text."""

from __future__ import annotations

import html
import re
import unicodedata
from typing import Any

import numpy as np
import pandas as pd

from domaintune.evidence import ExampleStats, ratio, ratio_of_sums
from domaintune.storage.manifests import scalar_metrics
from domaintune.tasktypes import register_task_type
from domaintune.tasktypes.base import MINILM, TaskType, TokenizeSettings, require_columns

_WS = re.compile(r"\s+")


def _str_or_none(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return None
    return str(value)


def _map_optional(column: pd.Series, fn: Any) -> pd.Series:
    """``fn`` over a column of strings and None, keeping None (``Series.map`` turns an
    all-None result into NaN floats)."""
    out = column.map(lambda v: None if v is None or v is pd.NA or v != v else fn(v))
    out = out.astype(object)
    return out.where(out.notna(), None)


def _optional_str(column: pd.Series) -> pd.Series:
    return _map_optional(column, _str_or_none)


def _int_like(value: str) -> int | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return int(f) if f.is_integer() else None


@register_task_type
class TextClassification(TaskType):
    name = "text_classification"
    counted = "predicted class"
    metrics = ("accuracy", "macro_f1", "weighted_f1")
    default_model = MINILM
    new_head = True
    custom_head = True
    contract = "text_classification"
    auto_model = "AutoModelForSequenceClassification"
    labelled_head = True
    eval_order_free = True
    raw_columns = ("text", "label")
    model_columns = ("input_ids", "attention_mask", "token_type_ids", "labels")
    target_column = "label"
    _keep = ("text", "label", "_row", "_source", "_example")

    # -- ingest ---------------------------------------------------------------
    def map_columns(self, df: pd.DataFrame, config: Any, where: str) -> pd.DataFrame:
        wanted = {"text": config.data.text_column, "label": config.data.label_column}
        require_columns(df, wanted, where)
        return pd.DataFrame(
            {
                "text": _optional_str(df[wanted["text"]]),
                "label": _optional_str(df[wanted["label"]]),
                "_row": df["_row"],
                "_source": df["_source"],
            }
        )

    def normalize_labels(
        self, df: pd.DataFrame, config: Any
    ) -> tuple[pd.DataFrame, list[str], list[str]]:
        notes: list[str] = []
        raw = _map_optional(df["label"], lambda v: str(v).strip())
        declared = config.task.labels
        present = [v for v in raw.dropna().unique() if v != ""]
        if declared is None:
            labels = sorted(present, key=lambda s: (_int_like(s) is None, _int_like(s) or 0, s))
            notes.append(f"task.labels not declared; inferred {labels} from the data")
            return df.assign(label=raw), labels, notes
        labels = list(declared)
        by_fold = {lab.casefold(): lab for lab in labels}
        all_int = bool(present) and all(_int_like(v) is not None for v in present)
        declared_int = any(_int_like(lab) is not None for lab in labels)
        use_ids = all_int and not declared_int

        def norm(v: str | None) -> str | None:
            if v is None:
                return None
            if v in labels:
                return v
            if v.casefold() in by_fold:
                return by_fold[v.casefold()]
            if use_ids:
                i = _int_like(v)
                if i is not None and 0 <= i < len(labels):
                    return labels[i]
            return v

        out = _map_optional(raw, norm)
        if use_ids:
            notes.append(f"integer labels mapped through task.labels (0 -> {labels[0]!r})")
        changed = int(((out != raw) & raw.notna()).sum())
        if changed and not use_ids:
            notes.append(f"{changed} label(s) matched to task.labels ignoring case/whitespace")
        return df.assign(label=out), labels, notes

    def label_counts(self, df: pd.DataFrame) -> dict[str, int]:
        return {str(k): int(v) for k, v in df["label"].value_counts(dropna=True).items()}

    # -- validate -------------------------------------------------------------
    def contract_tables(
        self, df: pd.DataFrame, labels: list[str], config: Any = None
    ) -> dict[str, pd.DataFrame]:
        rows = df.copy()
        key = rows["text"].map(lambda t: _WS.sub(" ", t).strip() if isinstance(t, str) else None)
        rows["_is_duplicate"] = (key.duplicated(keep="first") & key.notna()).astype(float)
        counts = rows["label"].value_counts(dropna=True)
        # declared labels only: labels outside the set are label_in_set's business
        classes = pd.DataFrame({"label": list(labels)})
        classes["count"] = classes["label"].map(lambda lab: int(counts.get(lab, 0)))
        return {"rows": rows, "classes": classes}

    # -- preprocess -----------------------------------------------------------
    def usable_rows(self, df: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
        return df[df["label"].isin(labels) & df["text"].notna()]

    def clean(self, df: pd.DataFrame, config: Any) -> pd.DataFrame:
        p = config.preprocess

        def fix(t: str) -> str:
            if p.unescape_html:
                t = html.unescape(t)
            if p.unicode_normalization != "none":
                t = unicodedata.normalize(p.unicode_normalization, t)
            if p.normalize_whitespace:
                t = _WS.sub(" ", t).strip()
            return t

        out = df.copy()
        out["text"] = out["text"].map(fix)
        return out[out["text"].str.len() > 0]

    def tokenize(
        self, batch: dict[str, list], tokenizer: Any, settings: TokenizeSettings, labels: list[str]
    ) -> dict[str, list]:
        enc = tokenizer(batch["text"], truncation=True, max_length=settings.max_length)
        index = {lab: i for i, lab in enumerate(labels)}
        enc["labels"] = [index[lab] for lab in batch["label"]]
        enc["length"] = [len(ids) for ids in enc["input_ids"]]
        return {**enc, **{k: batch[k] for k in self._keep}}

    # -- train / evaluate ------------------------------------------------------
    def collator(self, tokenizer: Any, settings: Any = None) -> Any:
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)

    def compute_metrics(
        self, predictions: Any, references: Any, labels: list[str]
    ) -> dict[str, Any]:
        return classification_metrics(references, predictions, labels)

    def trainer_metrics(self, eval_pred: Any, labels: list[str]) -> dict[str, float]:
        logits, refs = eval_pred
        logits = logits[0] if isinstance(logits, tuple) else logits
        return scalar_metrics(self.compute_metrics(np.argmax(logits, axis=-1), refs, labels))

    def score_split(
        self,
        model: Any,
        tokenizer: Any,
        split_path: str,
        labels: list[str],
        batch_size: int,
        settings: Any = None,
    ) -> tuple[dict[str, Any], pd.DataFrame]:
        from domaintune.inference import predict_logits, softmax

        logits = np.stack(predict_logits(model, tokenizer, self, split_path, batch_size))
        table = pd.read_parquet(split_path, columns=["text", "label", "labels", "_row", "_source"])
        metrics = self.compute_metrics(logits.argmax(-1), table.pop("labels").to_numpy(), labels)
        probs = softmax(logits)
        table["predicted"] = [labels[i] for i in logits.argmax(-1)]
        table["confidence"] = probs.max(-1)
        return metrics, table

    def example_statistics(
        self, predictions: pd.DataFrame, metric: str, labels: list[str]
    ) -> ExampleStats | None:
        """accuracy: [correct, 1]; macro_f1 / weighted_f1: per class tp, fp, fn (one-hot
        rows), combined as ``classification_metrics`` combines its confusion matrix."""
        if metric not in self.metrics:
            return None
        index = {lab: i for i, lab in enumerate(labels)}
        refs = _label_ids(predictions["label"], index, "label")
        preds = _label_ids(predictions["predicted"], index, "predicted")
        return classification_statistics(refs, preds, len(labels), metric)

    # -- predict ---------------------------------------------------------------
    def predict(self, model: Any, table: pd.DataFrame, text_column: str, load: Any) -> pd.DataFrame:
        """``predicted``, ``confidence`` and ``prob_<label>`` per class."""
        from domaintune.inference import softmax
        from domaintune.tasktypes.predicting import encoded_logits

        tokenizer, net, precision = load()
        texts = table[text_column].fillna("").astype(str).tolist()
        enc = tokenizer(texts, truncation=True, max_length=model.max_length)
        probs = softmax(np.stack(encoded_logits(model, net, tokenizer, precision, enc)))
        labels = model.labels or [str(i) for i in range(probs.shape[1])]
        out = table.copy()
        out["predicted"] = [labels[i] for i in probs.argmax(-1)]
        out["confidence"] = probs.max(-1)
        for i, label in enumerate(labels):
            out[f"prob_{label}"] = probs[:, i]
        return out

    def prediction_counts(self, result: pd.DataFrame) -> dict[str, int]:
        from domaintune.tasktypes.predicting import value_counts

        return value_counts(result["predicted"])


def classification_metrics(references: Any, predictions: Any, labels: list[str]) -> dict[str, Any]:
    """Accuracy, macro / weighted F1, per-class precision, recall, F1 and support, and the
    confusion matrix (rows: true label, columns: predicted), from label ids ``0..len(labels)-1``.

    The same figures as scikit-learn's (``zero_division=0``: a class never predicted has
    precision 0, one never present recall 0; tested equal), from one confusion matrix in NumPy:
    importing ``sklearn.metrics`` costs ~0.85 s on a 2-core machine, paid inside the training
    loop at the first validation pass (5% of a 60-step finance run)."""
    refs = np.asarray(references, dtype=np.int64).ravel()
    preds = np.asarray(predictions, dtype=np.int64).ravel()
    n = len(labels)
    matrix = np.bincount(refs * n + preds, minlength=n * n).reshape(n, n)
    tp = np.diag(matrix).astype(np.float64)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)

    precision, recall = ratio(tp, predicted), ratio(tp, support)
    f1 = ratio(2 * tp, (support + predicted).astype(np.float64))  # = 2PR / (P + R)
    total = int(support.sum())
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_f1": float(f1.mean()) if n else 0.0,
        "weighted_f1": float((f1 * support).sum() / total) if total else 0.0,
        "per_class": {
            lab: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, lab in enumerate(labels)
        },
        "confusion_matrix": {"labels": labels, "matrix": matrix.tolist()},
    }


def _label_ids(column: pd.Series, index: dict[str, int], name: str) -> np.ndarray:
    """Label strings as ids ``0..len(labels)-1``; ValueError naming a label not in the set."""
    ids = column.map(lambda v: index.get(str(v), -1)).to_numpy(dtype=np.int64)
    if (ids < 0).any():
        unknown = column[ids < 0].iloc[0]
        raise ValueError(f"predictions column {name!r}: {unknown!r} is not one of {list(index)}")
    return ids


def classification_statistics(
    references: Any, predictions: Any, n_classes: int, metric: str
) -> ExampleStats:
    """Per-example statistics of ``metric`` (accuracy, macro_f1, weighted_f1) from label ids:
    accuracy [correct, 1]; the F1s one-hot (tp per class, fp per class, fn per class), whose
    sums are the confusion matrix's diagonal, column and row sums minus the diagonal. Summed
    and combined, they give ``classification_metrics``' figures (F1 averaged over all
    ``n_classes``, 0 for a class with no support and no prediction)."""
    refs = np.asarray(references, dtype=np.int64).ravel()
    preds = np.asarray(predictions, dtype=np.int64).ravel()
    correct = (refs == preds).astype(np.float64)
    if metric == "accuracy":
        return ExampleStats(np.column_stack([correct, np.ones_like(correct)]), ratio_of_sums)
    if metric not in ("macro_f1", "weighted_f1"):
        raise ValueError(f"metric: {metric!r} is not accuracy, macro_f1 or weighted_f1")
    c = n_classes
    values = np.zeros((len(refs), 3 * c))
    rows = np.arange(len(refs))
    wrong = correct == 0
    values[rows[~wrong], refs[~wrong]] = 1.0  # tp of the true class
    values[rows[wrong], c + preds[wrong]] = 1.0  # fp of the predicted class
    values[rows[wrong], 2 * c + refs[wrong]] = 1.0  # fn of the true class

    def combine(sums: np.ndarray) -> np.ndarray:
        tp, fp, fn = sums[..., :c], sums[..., c : 2 * c], sums[..., 2 * c :]
        support, predicted = tp + fn, tp + fp
        f1 = ratio(2 * tp, support + predicted)
        if metric == "macro_f1":
            return f1.mean(axis=-1) if c else np.zeros(sums.shape[:-1])
        return ratio((f1 * support).sum(axis=-1), support.sum(axis=-1))

    return ExampleStats(values, combine)

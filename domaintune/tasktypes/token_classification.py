"""Token classification (named entities: people, organisations, drugs, products, tickers ...).

Labels are IOB2 tags. Sub-word alignment: the first sub-token of each word carries the word's
tag and the other sub-tokens are ignored in the loss (label -100); a word's prediction is the
prediction at its first sub-token. This is the convention of the BERT paper and of seqeval
scoring, and it keeps entity counts equal to word-level counts.

Sentences longer than ``training.max_length`` are cut into overlapping windows
(``task.stride`` tokens of overlap) instead of being truncated, so no entity is dropped; at
evaluation each word takes its prediction from the window where it has the most context on
both sides.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd

from domaintune.errors import DataError
from domaintune.evidence import ExampleStats, ratio, ratio_of_sums
from domaintune.readers.sources import load_json
from domaintune.storage.manifests import scalar_metrics
from domaintune.tasktypes import register_task_type
from domaintune.tasktypes.base import MINILM, TaskType, TokenizeSettings, require_columns

_IOB = re.compile(r"^[BI]-.+$")


def _as_list(value: Any) -> list[str] | None:
    """Tokens or tags from a list, an array (Parquet), a JSON list string or a spaced string."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, list | tuple | np.ndarray):
        return [str(x) for x in value]
    text = str(value).strip()
    if text.startswith("["):
        try:
            return [str(x) for x in load_json(text)]
        except (ValueError, TypeError, DataError):  # not JSON, nested too deep, not a list
            pass
    return text.split()


def spans(tags: list[str]) -> list[tuple[str, int, int]]:
    """Entities as (type, first, last) word positions; an I- that starts an entity counts."""
    out: list[tuple[str, int, int]] = []
    current: list | None = None
    for i, tag in enumerate(tags):
        kind, _, etype = tag.partition("-")
        if tag == "O" or not etype:
            current = None
            continue
        if kind == "B" or current is None or current[0] != etype:
            current = [etype, i, i]
            out.append(current)  # type: ignore[arg-type]
        else:
            current[2] = i
    return [tuple(s) for s in out]  # type: ignore[misc]


def word_logits(
    examples: Any, window_word_ids: Any, window_logits: Any
) -> dict[int, dict[int, np.ndarray]]:
    """example -> word -> the logits of the word's first sub-token, from the window (of the
    overlapping windows a long sentence was cut into) where the word has the most context on
    both sides. ``window_word_ids`` hold -1 for special tokens."""
    best: dict[int, dict[int, tuple[int, np.ndarray]]] = {}
    for example, wids, logits in zip(examples, window_word_ids, window_logits, strict=True):
        wids = list(wids)
        content = [p for p, w in enumerate(wids) if w >= 0]
        if not content:
            continue
        lo, hi = content[0], content[-1]
        words = best.setdefault(int(example), {})
        prev = None
        for p, w in enumerate(wids):
            if w >= 0 and w != prev:
                context = min(p - lo, hi - p)
                if w not in words or context > words[w][0]:
                    words[w] = (context, logits[p])
            prev = w
    return {e: {w: row for w, (_, row) in words.items()} for e, words in best.items()}


def pretokenized_words(tokenizer: Any, text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """The words of raw text as the tokenizer's own pre-tokenizer splits it (whitespace and
    punctuation for BERT-like models: the CoNLL convention), with character offsets."""
    pre = tokenizer.backend_tokenizer.pre_tokenizer
    pieces = pre.pre_tokenize_str(text) if pre is not None else []
    if not pieces:  # no pre-tokenizer: whitespace
        pieces = [(m.group(), m.span()) for m in re.finditer(r"\S+", text)]
    return [w for w, _ in pieces], [(int(a), int(b)) for _, (a, b) in pieces]


def iob2_error(tags: list[str]) -> str:
    """'' when the tags are valid IOB2, else the first violation."""
    prev = "O"
    for i, tag in enumerate(tags):
        if tag.startswith("I-") and prev[2:] != tag[2:]:
            return f"token {i + 1}: {tag!r} follows {prev!r}"
        prev = tag
    return ""


def repair_iob(tags: list[str]) -> list[str]:
    """IOB1 -> IOB2: an I- tag that starts an entity becomes B-."""
    out, prev = [], "O"
    for tag in tags:
        if tag.startswith("I-") and prev[2:] != tag[2:]:
            tag = "B-" + tag[2:]
        out.append(tag)
        prev = tag
    return out


def tag_set(labels: list[str]) -> list[str]:
    """Declared labels as a tag list: IOB2 tags as given, or entity types expanded."""
    if all(lab == "O" or _IOB.match(lab) for lab in labels):
        return labels if "O" in labels else ["O", *labels]
    tags = ["O"]
    for etype in labels:
        tags += [f"B-{etype}", f"I-{etype}"]
    return tags


@register_task_type
class TokenClassification(TaskType):
    name = "token_classification"
    counted = "entity type"
    metrics = ("entity_f1", "entity_precision", "entity_recall", "token_accuracy")
    default_model = MINILM
    new_head = True
    custom_head = True
    contract = "token_classification"
    auto_model = "AutoModelForTokenClassification"
    cuts_long_texts = False  # long sentences become overlapping windows
    labelled_head = True
    raw_columns = ("tokens", "tags", "text")
    model_columns = ("input_ids", "attention_mask", "token_type_ids", "labels")
    target_column = "tags"
    _keep = ("text", "tokens", "tags", "_row", "_source", "_example")

    # -- ingest ---------------------------------------------------------------
    def map_columns(self, df: pd.DataFrame, config: Any, where: str) -> pd.DataFrame:
        wanted = {"tokens": config.data.tokens_column, "tags": config.data.tags_column}
        require_columns(df, wanted, where)
        tokens = df[wanted["tokens"]].map(_as_list)
        return pd.DataFrame(
            {
                "tokens": tokens,
                "tags": df[wanted["tags"]].map(_as_list),
                "text": tokens.map(lambda t: " ".join(t) if t else None),
                "_row": df["_row"],
                "_source": df["_source"],
            }
        )

    def normalize_labels(
        self, df: pd.DataFrame, config: Any
    ) -> tuple[pd.DataFrame, list[str], list[str]]:
        notes: list[str] = []
        tags = df["tags"].map(lambda t: None if t is None else [x.strip() for x in t])
        if config.task.iob_repair:
            repaired = tags.map(lambda t: None if t is None else repair_iob(t))
            changed = int((repaired.map(str) != tags.map(str)).sum())
            if changed:
                notes.append(
                    f"task.iob_repair: I- tags starting an entity made B- in {changed} sentence(s)"
                )
            tags = repaired
        if config.task.labels:
            labels = tag_set(list(config.task.labels))
        else:
            present = sorted({t[2:] for ts in tags.dropna() for t in ts if _IOB.match(t)})
            labels = tag_set(present) if present else ["O"]
            notes.append(f"task.labels not declared; inferred entity types {present} from the data")
        return df.assign(tags=tags), labels, notes

    def label_counts(self, df: pd.DataFrame) -> dict[str, int]:
        counts: dict[str, int] = {}
        for ts in df["tags"].dropna():
            for etype, _, _ in spans(list(ts)):
                counts[etype] = counts.get(etype, 0) + 1
        return dict(sorted(counts.items()))

    # -- validate -------------------------------------------------------------
    def contract_tables(
        self, df: pd.DataFrame, labels: list[str], config: Any = None
    ) -> dict[str, pd.DataFrame]:
        rows = df.copy()
        toks = rows["tokens"].map(lambda t: [] if t is None else list(t))
        tags = rows["tags"].map(lambda t: [] if t is None else list(t))
        known = set(labels)
        rows["_n_tokens"] = toks.map(len)
        rows["_length_mismatch"] = [
            "" if len(a) == len(b) else f"{len(a)} tokens, {len(b)} tags"
            for a, b in zip(toks, tags, strict=True)
        ]
        rows["_unknown_tags"] = tags.map(lambda ts: ", ".join(sorted(set(ts) - known)))
        rows["_iob_error"] = tags.map(iob2_error)
        key = rows["text"]
        rows["_is_duplicate"] = (key.duplicated(keep="first") & key.notna()).astype(float)
        rows = rows.drop(columns=["tokens", "tags"])  # lists; the derived columns say it all
        counts = self.label_counts(df)
        types = sorted({lab[2:] for lab in labels if lab != "O"})
        entity_types = pd.DataFrame({"type": types, "count": [counts.get(t, 0) for t in types]})
        return {"rows": rows, "entity_types": entity_types}

    # -- preprocess -----------------------------------------------------------
    def usable_rows(self, df: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
        known = set(labels)
        ok = [
            t is not None and g is not None and 0 < len(t) == len(g) and set(g) <= known
            for t, g in zip(df["tokens"], df["tags"], strict=True)
        ]
        return df[ok]

    def clean(self, df: pd.DataFrame, config: Any) -> pd.DataFrame:
        return df[df["tokens"].map(len) > 0]

    def window_stride(self, settings: TokenizeSettings) -> int:
        return min(settings.stride, settings.max_length // 2)

    def tokenize(
        self, batch: dict[str, list], tokenizer: Any, settings: TokenizeSettings, labels: list[str]
    ) -> dict[str, list]:
        enc = tokenizer(
            [list(t) for t in batch["tokens"]],
            is_split_into_words=True,
            truncation=True,
            max_length=settings.max_length,
            stride=self.window_stride(settings),
            return_overflowing_tokens=True,
        )
        index = {lab: i for i, lab in enumerate(labels)}
        mapping = enc["overflow_to_sample_mapping"]
        label_ids, word_ids = [], []
        for i, sample in enumerate(mapping):
            tags = list(batch["tags"][sample])
            wids = enc.word_ids(i)
            ids, prev = [], None
            for w in wids:
                # first sub-token of a word carries its tag; the rest and specials are ignored
                ids.append(-100 if w is None or w == prev else index[tags[w]])
                prev = w
            label_ids.append(ids)
            word_ids.append([-1 if w is None else w for w in wids])
        out = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        out["labels"] = label_ids
        out["word_ids"] = word_ids
        out["length"] = [len(ids) for ids in enc["input_ids"]]
        for k in self._keep:
            out[k] = [batch[k][s] for s in mapping]
        return out

    # -- train / evaluate ------------------------------------------------------
    def collator(self, tokenizer: Any, settings: Any = None) -> Any:
        from transformers import DataCollatorForTokenClassification

        return DataCollatorForTokenClassification(tokenizer, pad_to_multiple_of=8)

    def compute_metrics(
        self, predictions: Any, references: Any, labels: list[str]
    ) -> dict[str, Any]:
        """Entity-level scores (seqeval, micro-averaged, CoNLL rules) on word tag sequences."""
        from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

        preds = [list(p) for p in predictions]
        refs = [list(r) for r in references]
        flat_p = [t for s in preds for t in s]
        flat_r = [t for s in refs for t in s]
        report = classification_report(refs, preds, output_dict=True, zero_division=0)
        per_type = {
            k: {
                "precision": float(v["precision"]),
                "recall": float(v["recall"]),
                "f1": float(v["f1-score"]),
                "support": int(v["support"]),
            }
            for k, v in report.items()
            if "avg" not in k
        }
        return {
            "entity_f1": float(f1_score(refs, preds, zero_division=0)),
            "entity_precision": float(precision_score(refs, preds, zero_division=0)),
            "entity_recall": float(recall_score(refs, preds, zero_division=0)),
            "token_accuracy": float(np.mean([a == b for a, b in zip(flat_p, flat_r, strict=True)]))
            if flat_r
            else 0.0,
            "per_type": per_type,
        }

    def trainer_metrics(self, eval_pred: Any, labels: list[str]) -> dict[str, float]:
        logits, refs = eval_pred
        logits = logits[0] if isinstance(logits, tuple) else logits
        preds = np.argmax(logits, axis=-1)
        p_seqs, r_seqs = [], []
        for p_row, r_row in zip(preds, refs, strict=True):
            keep = r_row != -100
            p_seqs.append([labels[i] for i in p_row[keep]])
            r_seqs.append([labels[i] for i in r_row[keep]])
        return scalar_metrics(self.compute_metrics(p_seqs, r_seqs, labels))

    def score_split(
        self,
        model: Any,
        tokenizer: Any,
        split_path: str,
        labels: list[str],
        batch_size: int,
        settings: Any = None,
    ) -> tuple[dict[str, Any], pd.DataFrame]:
        from domaintune.inference import predict_logits

        logits = predict_logits(model, tokenizer, self, split_path, batch_size)
        windows = pd.read_parquet(
            split_path,
            columns=["_example", "word_ids", "tokens", "tags", "text", "_row", "_source"],
        )
        best = word_logits(windows["_example"], windows["word_ids"], logits)
        examples = windows.drop_duplicates("_example").sort_values("_example")
        preds, refs = [], []
        for example, tags in zip(examples["_example"], examples["tags"], strict=True):
            words = best.get(int(example), {})
            refs.append(list(tags))
            preds.append(
                [labels[int(words[i].argmax())] if i in words else "O" for i in range(len(tags))]
            )
        metrics = self.compute_metrics(preds, refs, labels)
        table = examples[["text", "_row", "_source"]].copy()
        table["tags"] = [" ".join(r) for r in refs]
        table["predicted"] = [" ".join(p) for p in preds]
        return metrics, table.reset_index(drop=True)

    def example_statistics(
        self, predictions: pd.DataFrame, metric: str, labels: list[str]
    ) -> ExampleStats | None:
        """Per sentence, from its gold ``tags`` and ``predicted`` tags (space-separated, as
        ``score_split`` writes them): entity_f1 / entity_precision / entity_recall
        [tp, fp, fn] entities (seqeval's entities, micro-averaged as seqeval does);
        token_accuracy [correct words, words]."""
        if metric not in self.metrics:
            return None
        refs = [_tag_list(t) for t in predictions["tags"]]
        preds = [_tag_list(t) for t in predictions["predicted"]]
        return entity_statistics(preds, refs, metric)

    # -- predict ---------------------------------------------------------------
    def predict(self, model: Any, table: pd.DataFrame, text_column: str, load: Any) -> pd.DataFrame:
        """Entities with character spans (``start``/``end`` into the text), type and score (the
        mean probability of the words' tags); CoNLL input (``tokens``) is scored as its words,
        its text being the words joined by spaces."""
        from domaintune.inference import softmax
        from domaintune.tasktypes.predicting import encoded_logits

        tokenizer, net, precision = load()
        words_of, offsets_of, texts = [], [], []
        conll = "tokens" in table.columns
        for i in range(len(table)):
            if conll:
                words = [str(w) for w in table["tokens"].iloc[i]]
                starts = np.cumsum([0] + [len(w) + 1 for w in words[:-1]]).tolist()
                offsets = [(s, s + len(w)) for s, w in zip(starts, words, strict=True)]
                text = " ".join(words)
            else:
                text = (
                    "" if pd.isna(table[text_column].iloc[i]) else str(table[text_column].iloc[i])
                )
                words, offsets = pretokenized_words(tokenizer, text)
            words_of.append(words)
            offsets_of.append(offsets)
            texts.append(text)
        rows = [i for i, w in enumerate(words_of) if w]
        enc = tokenizer(  # windowed as training windowed (TokenClassification.tokenize)
            [words_of[i] for i in rows],
            is_split_into_words=True,
            truncation=True,
            max_length=model.max_length,
            stride=self.window_stride(model.tokenize_settings()),
            return_overflowing_tokens=True,
        )
        logits = encoded_logits(model, net, tokenizer, precision, enc)
        examples = [rows[s] for s in enc["overflow_to_sample_mapping"]]
        word_ids = [[-1 if w is None else w for w in enc.word_ids(i)] for i in range(len(examples))]
        best = word_logits(examples, word_ids, logits)
        labels = model.labels
        found: list[list[dict[str, Any]]] = []
        for i, words in enumerate(words_of):
            rows_logits = best.get(i, {})
            tags, scores = [], []
            for w in range(len(words)):
                if w not in rows_logits:
                    tags.append("O")
                    scores.append(1.0)
                    continue
                p = softmax(rows_logits[w])
                tags.append(labels[int(p.argmax())])
                scores.append(float(p.max()))
            entities = []
            for etype, first, last in spans(tags):
                start, end = offsets_of[i][first][0], offsets_of[i][last][1]
                entities.append(
                    {
                        "type": etype,
                        "start": int(start),
                        "end": int(end),
                        "text": texts[i][start:end],
                        "score": float(np.mean(scores[first : last + 1])),
                    }
                )
            found.append(entities)
        out = table.copy()
        if conll:
            out["text"] = texts
        out["entities"] = found
        out["entity_count"] = [len(e) for e in found]
        return out

    def prediction_counts(self, result: pd.DataFrame) -> dict[str, int]:
        from domaintune.tasktypes.predicting import value_counts

        return value_counts([e["type"] for row in result["entities"] for e in row])


def _tag_list(value: Any) -> list[str]:
    """A sentence's tags from a predictions frame: space-separated text, or a list."""
    if isinstance(value, str):
        return value.split()
    return [] if value is None else [str(t) for t in value]


def _entity_scores(sums: np.ndarray, metric: str) -> np.ndarray:
    """seqeval's micro precision, recall or F1 from summed [tp, fp, fn] (0 where undefined),
    computed as seqeval computes them (F1 = 2PR / (P + R))."""
    tp, fp, fn = sums[..., 0], sums[..., 1], sums[..., 2]
    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    if metric == "entity_precision":
        return precision
    if metric == "entity_recall":
        return recall
    return ratio(2 * precision * recall, precision + recall)


def entity_statistics(
    predictions: list[list[str]], references: list[list[str]], metric: str
) -> ExampleStats:
    """Per-sentence statistics of ``metric`` from word tag sequences: entity metrics
    [tp, fp, fn] (an entity is right when its type and both ends match, seqeval's default
    rules), token_accuracy [correct words, words]. Summed and combined, they give
    ``TokenClassification.compute_metrics``' figures."""
    if metric == "token_accuracy":
        values = np.array(
            [
                [sum(a == b for a, b in zip(p, r, strict=True)), len(r)]
                for p, r in zip(predictions, references, strict=True)
            ],
            dtype=np.float64,
        ).reshape(-1, 2)
        return ExampleStats(values, ratio_of_sums)
    if metric not in ("entity_f1", "entity_precision", "entity_recall"):
        raise ValueError(f"metric: {metric!r} is not one of the token_classification metrics")
    from seqeval.metrics.sequence_labeling import get_entities

    rows = []
    for p, r in zip(predictions, references, strict=True):
        found, gold = set(get_entities(list(p))), set(get_entities(list(r)))
        tp = len(found & gold)
        rows.append([tp, len(found) - tp, len(gold) - tp])
    values = np.array(rows, dtype=np.float64).reshape(-1, 3)
    return ExampleStats(values, lambda sums: _entity_scores(sums, metric))

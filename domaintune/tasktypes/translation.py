"""Translation: parallel text fine-tunes a chat model to translate from
``task.source_language`` to ``task.target_language``.

Pairs come from TMX (a column per ``<tuv xml:lang>``), a CSV/TSV with a column per language
(header ``en<TAB>fr``), JSONL or Parquet. The columns are ``data.source_text_column`` /
``data.target_text_column``, or by default the columns named by the language codes, matched
ignoring case and falling back to the primary subtag (``en`` reads a single ``en-US``
column). Each pair becomes a conversation: the user asks "Translate the following text from
English to French." followed by a blank line and the source text; the assistant answers with
the target text. Training, generation and scoring are instruction_tuning's; the metrics are
chrF (sacrebleu's character n-gram F-score, on a 0-1 scale like BLEU here), BLEU and ROUGE-L.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from domaintune.errors import DataError, shown, shown_list
from domaintune.evidence import ExampleStats
from domaintune.tasktypes import register_task_type
from domaintune.tasktypes.base import require_columns
from domaintune.tasktypes.instruction_tuning import (
    InstructionTuning,
    corpus_statistics,
    generate_answers,
    messages_error,
)

PROMPT = "Translate the following text from {source} to {target}.\n\n{text}"
#: names of common language codes (lower case) in prompts; other codes are named by their
#: primary subtag's name and the code (de-AT: "German (de-AT)"), or the code itself
LANGUAGE_NAMES = {
    "ar": "Arabic",
    "bg": "Bulgarian",
    "ca": "Catalan",
    "cs": "Czech",
    "da": "Danish",
    "de": "German",
    "el": "Greek",
    "en": "English",
    "en-gb": "British English",
    "en-us": "American English",
    "es": "Spanish",
    "et": "Estonian",
    "fa": "Persian",
    "fi": "Finnish",
    "fr": "French",
    "fr-ca": "Canadian French",
    "he": "Hebrew",
    "hi": "Hindi",
    "hr": "Croatian",
    "hu": "Hungarian",
    "id": "Indonesian",
    "it": "Italian",
    "ja": "Japanese",
    "ko": "Korean",
    "lt": "Lithuanian",
    "lv": "Latvian",
    "ms": "Malay",
    "nb": "Norwegian Bokmål",
    "nl": "Dutch",
    "no": "Norwegian",
    "pl": "Polish",
    "pt": "Portuguese",
    "pt-br": "Brazilian Portuguese",
    "pt-pt": "European Portuguese",
    "ro": "Romanian",
    "ru": "Russian",
    "sk": "Slovak",
    "sl": "Slovenian",
    "sr": "Serbian",
    "sv": "Swedish",
    "sw": "Swahili",
    "th": "Thai",
    "tl": "Tagalog",
    "tr": "Turkish",
    "uk": "Ukrainian",
    "ur": "Urdu",
    "vi": "Vietnamese",
    "zh": "Chinese",
    "zh-cn": "Simplified Chinese",
    "zh-hans": "Simplified Chinese",
    "zh-hant": "Traditional Chinese",
    "zh-tw": "Traditional Chinese",
}


def _norm(code: Any) -> str:
    return str(code).strip().lower().replace("_", "-")


def language_name(code: str) -> str:
    """English name of a language code, as the prompt says it."""
    key = _norm(code)
    if key in LANGUAGE_NAMES:
        return LANGUAGE_NAMES[key]
    primary = key.split("-")[0]
    return f"{LANGUAGE_NAMES[primary]} ({code})" if primary in LANGUAGE_NAMES else code


def language_column(columns: list[str], code: str, field: str, where: str) -> str:
    """The column of language ``code``: the one named so (ignoring case, ``_`` as ``-``),
    else the single one with the same primary subtag (``en`` -> ``en-US``)."""
    names = [str(c) for c in columns if not str(c).startswith("_")]
    found = [c for c in names if _norm(c) == _norm(code)]
    if not found:
        primary = _norm(code).split("-")[0]
        found = [c for c in names if _norm(c).split("-")[0] == primary]
    if len(found) == 1:
        return found[0]
    column_key = f"data.{field.removeprefix('task.').replace('language', 'text_column')}"
    if not found:
        raise DataError(
            f"{where}: no column for {field} {code!r}; rule: without {column_key} the "
            f"column is named by the language code; columns: {shown_list(names)}"
        )
    raise DataError(
        f"{where}: {field} {code!r} matches columns "
        f"{' and '.join(shown(c, 60, quote=True) for c in found)}; "
        f"rule: one column per language (set {column_key} to choose)"
    )


def _text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return None
    text = str(value)
    return text if text.strip() else None


def pair_error(source: Any, target: Any, messages: Any, languages: tuple[str, str]) -> str:
    """'' for a usable pair, else what is wrong with it."""
    for text, side, code in ((source, "source", languages[0]), (target, "target", languages[1])):
        if _text(text) is None:
            return f"no {side} text ({code}): missing or empty"
    return messages_error(None if messages is None else json.loads(messages))


@register_task_type
class Translation(InstructionTuning):
    name = "translation"
    metrics = ("chrf", "bleu", "rougeL")
    contract = "translation"
    raw_columns = ("messages", "text", "reference", "source_text", "target_text")

    def check_config(self, config: Any) -> None:
        task = config.task
        for key in ("source_language", "target_language"):
            if getattr(task, key) is None:
                raise ValueError(
                    f"task.{key}: required for task.type translation; rule: a language code "
                    "such as en, fr, de, pt-BR"
                )
        if _norm(task.source_language) == _norm(task.target_language):
            raise ValueError(
                f"task.target_language: {task.target_language!r} is the source language too"
            )

    # -- ingest ---------------------------------------------------------------
    def text_columns(self, df: pd.DataFrame, config: Any, where: str) -> tuple[str, str]:
        """(source column, target column) of a file."""
        d, task = config.data, config.task
        chosen = []
        for side, column in (("source", d.source_text_column), ("target", d.target_text_column)):
            if column is not None:
                require_columns(df, {f"{side}_text": column}, where)
            else:
                code = getattr(task, f"{side}_language")
                column = language_column(list(df.columns), code, f"task.{side}_language", where)
            chosen.append(column)
        if chosen[0] == chosen[1]:
            raise DataError(
                f"{where}: the source and target text are both column {chosen[0]!r}; rule: "
                "a pair is two columns (data.source_text_column, data.target_text_column)"
            )
        return chosen[0], chosen[1]

    def columns_read(self, df: pd.DataFrame, config: Any, where: str) -> set[str]:
        return set(self.text_columns(df, config, where))

    def map_columns(self, df: pd.DataFrame, config: Any, where: str) -> pd.DataFrame:
        source_col, target_col = self.text_columns(df, config, where)
        sources = [_text(v) for v in df[source_col]]
        targets = [_text(v) for v in df[target_col]]
        names = (
            language_name(config.task.source_language),
            language_name(config.task.target_language),
        )
        messages = [
            None if s is None or t is None else self.conversation(s, t, names)
            for s, t in zip(sources, targets, strict=True)
        ]
        return pd.DataFrame(
            {
                "messages": [
                    None if m is None else json.dumps(m, ensure_ascii=False) for m in messages
                ],
                "text": [None if m is None else m[0]["content"] for m in messages],
                "reference": targets,
                "source_text": sources,
                "target_text": targets,
                "_row": df["_row"],
                "_source": df["_source"],
            }
        )

    @staticmethod
    def conversation(source: str, target: str, names: tuple[str, str]) -> list[dict]:
        prompt = PROMPT.format(source=names[0], target=names[1], text=source)
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": target}]

    def label_counts(self, df: pd.DataFrame) -> dict[str, int]:
        return {"pairs": int(df["messages"].notna().sum())}

    # -- validate -------------------------------------------------------------
    def contract_tables(
        self, df: pd.DataFrame, labels: list[str], config: Any = None
    ) -> dict[str, pd.DataFrame]:
        task = getattr(config, "task", None)
        languages = (
            getattr(task, "source_language", None) or "source",
            getattr(task, "target_language", None) or "target",
        )
        rows = df.copy()
        rows["_pair_error"] = [
            pair_error(s, t, m, languages)
            for s, t, m in zip(
                rows["source_text"], rows["target_text"], rows["messages"], strict=True
            )
        ]
        pair = rows["source_text"].astype(str) + "\x1f" + rows["target_text"].astype(str)
        complete = rows["source_text"].notna() & rows["target_text"].notna()
        rows["_is_duplicate"] = (pair.duplicated(keep="first") & complete).astype(float)
        return {"rows": rows.drop(columns=["messages"])}

    # -- evaluate -------------------------------------------------------------
    def compute_metrics(
        self, predictions: Any, references: Any, labels: list[str]
    ) -> dict[str, Any]:
        import sacrebleu

        preds = [str(p) for p in predictions]
        refs = [str(r) for r in references]
        chrf = sacrebleu.corpus_chrf(preds, [refs]).score / 100.0 if preds else 0.0
        scores = {"chrf": float(chrf), **super().compute_metrics(predictions, references, labels)}
        return {m: scores[m] for m in self.metrics}

    def example_statistics(
        self, predictions: pd.DataFrame, metric: str, labels: list[str]
    ) -> ExampleStats | None:
        """chrf (corpus chrF): sacrebleu's per-sentence character n-gram counts [hypothesis,
        reference, matching] per order, combined by sacrebleu into the corpus figure; bleu and
        rougeL as instruction_tuning's."""
        if metric == "chrf":
            from sacrebleu.metrics import CHRF

            preds = [str(p) for p in predictions["predicted"]]
            refs = [str(r) for r in predictions["reference"]]
            return corpus_statistics(CHRF(), preds, refs)
        return super().example_statistics(predictions, metric, labels)

    # -- predict ---------------------------------------------------------------
    def predict_inputs(self, model: Any, text_column: str) -> list[tuple[str, tuple[str, ...]]]:
        return []  # the source column is found by its language code

    def predict(self, model: Any, table: pd.DataFrame, text_column: str, load: Any) -> pd.DataFrame:
        """``generated``: the model's translation of each row's source text."""
        return generate_answers(model, table, self._requests(model, table, text_column), load)

    def _requests(self, model: Any, table: pd.DataFrame, text_column: str) -> list:
        """Each row's source text (``data.source_text_column``, or the column named by
        ``task.source_language``) as the request training asked."""
        task, data = model.task_settings(), model.config.data if model.config is not None else None
        column = (data.source_text_column if data is not None else None) or language_column(
            list(table.columns), task.source_language, "task.source_language", "INPUT"
        )
        names = (language_name(task.source_language), language_name(task.target_language))
        return [
            []
            if text is None or pd.isna(text) or not str(text).strip()
            else self.conversation(str(text), "", names)[:1]
            for text in table[column]
        ]

"""SQuAD's nested JSON (v1.1 and v2.0) as one record per question.

A SQuAD file is one JSON object: ``{"version", "data": [{"title", "paragraphs": [{"context",
"qas": [{"id", "question", "answers": [{"text", "answer_start"}], "is_impossible"?,
"plausible_answers"?}]}]}]}``. Each question becomes a record with ``id``, ``title``,
``context``, ``question``, ``answers`` = ``{"text": [...], "answer_start": [...]}`` (the
Hugging Face layout question_answering reads) and ``is_impossible``. A v2.0 unanswerable
question gets empty answers (its ``plausible_answers`` are not answers; task.allow_unanswerable
decides whether it is valid). Records are numbered by the question's 1-based position in the
file; problems name the JSON path (0-based, as jq writes it: ``data[3].paragraphs[2].qas[5]``).

Whether an answer is the context slice at its answer_start is the contract's rule, not the
reader's: the reader only refuses what cannot become a row.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from domaintune.errors import DataError

#: columns the layout adds besides those a question_answering config maps
LAYOUT_COLUMNS = ("id", "title", "is_impossible")
RULE = (
    "SQuAD layout: data[].paragraphs[] hold a 'context' string and 'qas', each with a "
    "'question' string and 'answers' [{text, answer_start}]"
)
#: ``hold(row, record_text, reason)``: keep a question that cannot be read for the quarantine,
#: or raise
Hold = Callable[[int, str, str], None]


def is_squad(doc: Any) -> bool:
    """A JSON object with a ``data`` list whose items have ``paragraphs``."""
    data = doc.get("data") if isinstance(doc, dict) else None
    return (
        isinstance(data, list)
        and bool(data)
        and isinstance(data[0], dict)
        and "paragraphs" in data[0]
    )


def squad_records(doc: dict, where: str, hold: Hold) -> tuple[list[dict], list[int]]:
    """(one record per question, its 1-based position in the file). A question that cannot be
    read goes to ``hold``; an article or paragraph that cannot be read fails the file."""
    records: list[dict] = []
    rows: list[int] = []
    position = 0
    for a, article in enumerate(doc["data"]):
        path = f"data[{a}]"
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        _require_list(paragraphs, where, path, "paragraphs")
        title = article.get("title")
        for p, paragraph in enumerate(paragraphs):
            ppath = f"{path}.paragraphs[{p}]"
            qas = paragraph.get("qas") if isinstance(paragraph, dict) else None
            _require_list(qas, where, ppath, "qas")
            context = paragraph.get("context")
            for q, qa in enumerate(qas):
                position += 1
                qpath = f"{ppath}.qas[{q}]"
                problem = _context_problem(context, ppath) or _question_problem(qa, qpath)
                if problem:
                    hold(position, _clip(qa), f"{where}: {problem}; rule: {RULE}")
                    continue
                records.append(_record(qa, title, context))
                rows.append(position)
    return records, rows


def _require_list(value: Any, where: str, path: str, key: str) -> None:
    if not isinstance(value, list):
        raise DataError(f"{where}: {path}: {key!r} missing or not a list; rule: {RULE}")


def _context_problem(context: Any, path: str) -> str:
    if not isinstance(context, str):
        return f"{path}: 'context' missing or not a string"
    return ""


def _question_problem(qa: Any, path: str) -> str:
    if not isinstance(qa, dict):
        return f"{path}: expected a JSON object, got {type(qa).__name__}"
    if "question" not in qa:
        return f"{path}: 'question' missing"
    if not isinstance(qa["question"], str):
        return f"{path}: 'question' is not a string"
    answers = qa.get("answers", [] if qa.get("is_impossible") is True else None)
    if not isinstance(answers, list):
        return f"{path}: 'answers' missing or not a list"
    if qa.get("is_impossible") is True and answers:
        return f"{path}: 'is_impossible' is true but 'answers' is not empty"
    for i, answer in enumerate(answers):
        if not isinstance(answer, dict) or not isinstance(answer.get("text"), str):
            return f"{path}.answers[{i}]: 'text' missing or not a string"
        if not _is_int(answer.get("answer_start")):
            return f"{path}.answers[{i}]: 'answer_start' missing or not an integer"
    return ""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _record(qa: dict, title: Any, context: str) -> dict[str, Any]:
    answers = qa.get("answers") or []
    return {
        "id": None if qa.get("id") is None else str(qa["id"]),
        "title": None if title is None else str(title),
        "context": context,
        "question": qa["question"],
        "answers": {
            "text": [a["text"] for a in answers],
            "answer_start": [a["answer_start"] for a in answers],
        },
        "is_impossible": bool(qa.get("is_impossible", False)),
    }


def _clip(qa: Any, n: int = 2000) -> str:
    text = json.dumps(qa, ensure_ascii=False, default=str)
    return text if len(text) <= n else text[: n - 3] + "..."

"""Extractive question answering (SQuAD format): the answer is a span of the context.

Rows hold ``context``, ``question`` and ``answers`` = {"text": [...], "answer_start": [...]}
(the Hugging Face SQuAD layout; a flat ``answer_text`` + ``answer_start`` pair works too).
Contexts longer than ``training.max_length`` are cut into overlapping windows
(``task.stride`` tokens of overlap) with their character offsets; a window that does not hold
the answer is trained to point at the first token (no answer here), as is an unanswerable
question (``task.allow_unanswerable``). At evaluation and in ``domaintune predict`` the best
valid span over all windows wins (start and end inside the context, end not before start, at
most ``task.max_answer_tokens`` long, SQuAD's ``MAX_ANSWER_TOKENS`` = 30 by default;
``best_answers``); a model trained with unanswerable questions answers "no answer" when the
first token's score beats the best span (SQuAD 2.0's rule). Metrics are SQuAD's exact match
and token F1, implemented here (``evaluate.load`` needs a hub), taking the best over the gold
answers.
"""

from __future__ import annotations

import collections
import json
import re
import string
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from domaintune.errors import DataError
from domaintune.evidence import ExampleStats, mean_stats
from domaintune.readers.sources import load_json
from domaintune.tasktypes import register_task_type
from domaintune.tasktypes.base import MINILM, TaskType, TokenizeSettings, require_columns

MAX_ANSWER_TOKENS = 30
N_BEST = 20
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, truths: list[str]) -> float:
    if not truths:
        return float(prediction == "")
    return max(float(normalize_answer(prediction) == normalize_answer(t)) for t in truths)


def token_f1(prediction: str, truths: list[str]) -> float:
    if not truths:
        return float(prediction == "")

    def f1(pred: str, truth: str) -> float:
        p, t = normalize_answer(pred).split(), normalize_answer(truth).split()
        if not p or not t:
            return float(p == t)
        common = sum((collections.Counter(p) & collections.Counter(t)).values())
        if common == 0:
            return 0.0
        precision, recall = common / len(p), common / len(t)
        return 2 * precision * recall / (precision + recall)

    return max(f1(prediction, t) for t in truths)


def question_scores(
    predictions: Iterable[str], references: Iterable[list[str]]
) -> tuple[list[float], list[float]]:
    """(exact match, token F1) of each question: its predicted answer against the best of
    its gold answers."""
    em, f1 = [], []
    for p, r in zip(predictions, references, strict=True):
        em.append(exact_match(p, r))
        f1.append(token_f1(p, r))
    return em, f1


def squad_scores(em: list[float], f1: list[float]) -> dict[str, Any]:
    """SQuAD's figures of a split: the means of the questions' scores (0 with none)."""
    return {
        "exact_match": float(np.mean(em)) if em else 0.0,
        "f1": float(np.mean(f1)) if f1 else 0.0,
    }


@dataclass(frozen=True)
class Answer:
    """A predicted answer: its text, character span in the context and probability (start
    times end in its window); ``no_answer`` where the model says the context holds none."""

    text: str
    start: int
    end: int
    score: float
    no_answer: bool = False


NO_ANSWER = Answer("", -1, -1, 0.0, True)


def span_logits(output: Any) -> Any:
    """A question-answering model's start and end logits as one (batch, tokens, 2) tensor."""
    import torch

    return torch.stack([output.start_logits, output.end_logits], dim=-1)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max()
    return z - np.log(np.exp(z).sum())


def best_answers(
    examples: Iterable[int],
    contexts: Iterable[str],
    offsets: Iterable[Any],
    logits: Iterable[np.ndarray],
    allow_unanswerable: bool = False,
    max_answer_tokens: int = MAX_ANSWER_TOKENS,
) -> dict[int, Answer]:
    """The answer to each example from its windows (``logits``: tokens x (start, end) per
    window; ``offsets``: character offsets, negative outside the context). The span with the
    highest start + end logit wins; with ``allow_unanswerable`` the first token's (what
    training points unanswerable questions at; its lowest score over the example's windows)
    wins over a lower span: "no answer". A span is at most ``max_answer_tokens`` long. An
    example with no valid span answers nothing."""
    best: dict[int, tuple[float, Answer]] = {}
    null: dict[int, tuple[float, float]] = {}
    for example, context, offs, lg in zip(examples, contexts, offsets, logits, strict=True):
        example = int(example)
        offs = [list(o) for o in offs]
        st, en = lg[:, 0], lg[:, 1]
        log_start, log_end = _log_softmax(st), _log_softmax(en)
        if allow_unanswerable:
            score = float(st[0] + en[0])
            if example not in null or score < null[example][0]:
                null[example] = (score, float(np.exp(log_start[0] + log_end[0])))
        for a in np.argsort(st)[::-1][:N_BEST]:
            for b in np.argsort(en)[::-1][:N_BEST]:
                if offs[a][0] < 0 or offs[b][0] < 0 or b < a or b - a + 1 > max_answer_tokens:
                    continue
                score = float(st[a] + en[b])
                if example not in best or score > best[example][0]:
                    start, end = int(offs[a][0]), int(offs[b][1])
                    p = float(np.exp(log_start[a] + log_end[b]))
                    best[example] = (score, Answer(context[start:end], start, end, p))
    answers = {e: a for e, (_, a) in best.items()}
    for e, (score, p) in null.items():
        if e not in best or score > best[e][0]:
            answers[e] = Answer("", -1, -1, p, True)
    return answers


def _answers(value: Any) -> dict[str, list] | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, str):
        try:
            value = load_json(value)
        except (ValueError, DataError):  # not JSON, or nested too deep
            return None
    if not isinstance(value, dict):
        return None
    texts = value.get("text")
    starts = value.get("answer_start")
    try:
        texts = [] if texts is None else [str(t) for t in _listed(texts)]
        starts = [] if starts is None else [int(s) for s in _listed(starts)]
    except (TypeError, ValueError, OverflowError):  # not lists; a start that is no integer
        return None
    return {"text": texts, "answer_start": starts}


def _listed(value: Any) -> list:
    """The items of a list (JSON), a tuple or an array (Parquet); TypeError for anything
    else (a string is not a list of answers)."""
    if isinstance(value, list | tuple | np.ndarray):
        return list(value)
    raise TypeError(type(value).__name__)


def answer_error(context: Any, answers: dict | None, allow_unanswerable: bool) -> str:
    """'' when every answer is the context slice at its answer_start, else what is wrong."""
    if not isinstance(context, str):
        return ""  # the null check reports it
    if answers is None:
        return "answers missing or not {text: [...], answer_start: [...]}"
    if len(answers["text"]) != len(answers["answer_start"]):
        return f"{len(answers['text'])} answer texts but {len(answers['answer_start'])} answer_start values"
    if not answers["text"]:
        return "" if allow_unanswerable else "no answer (set task.allow_unanswerable to allow it)"
    for text, start in zip(answers["text"], answers["answer_start"], strict=True):
        found = context[start : start + len(text)]
        if found != text:
            return f"answer {text!r} != context[{start}:{start + len(text)}] {found!r}"
    return ""


@register_task_type
class QuestionAnswering(TaskType):
    name = "question_answering"
    metrics = ("f1", "exact_match")
    default_model = MINILM
    new_head = True
    contract = "question_answering"
    auto_model = "AutoModelForQuestionAnswering"
    cuts_long_texts = False  # long contexts become overlapping windows
    raw_columns = ("context", "question", "answers", "text")
    model_columns = (
        "input_ids",
        "attention_mask",
        "token_type_ids",
        "start_positions",
        "end_positions",
    )
    target_column = "answers"
    _keep = ("_row", "_source", "_example")

    # -- ingest ---------------------------------------------------------------
    def map_columns(self, df: pd.DataFrame, config: Any, where: str) -> pd.DataFrame:
        d = config.data
        flat = d.answers_column not in df.columns and {"answer_text", "answer_start"} <= set(
            df.columns
        )
        wanted = {"context": d.context_column, "question": d.question_column}
        if not flat:
            wanted["answers"] = d.answers_column
        require_columns(df, wanted, where)
        if flat:
            answers = [
                {
                    "text": [] if pd.isna(t) else [str(t)],
                    "answer_start": [] if pd.isna(s) else [int(s)],
                }
                for t, s in zip(df["answer_text"], df["answer_start"], strict=True)
            ]
        else:
            answers = df[d.answers_column].map(_answers).tolist()
        context = df[d.context_column].map(lambda v: None if pd.isna(v) else str(v))
        question = df[d.question_column].map(lambda v: None if pd.isna(v) else str(v))
        return pd.DataFrame(
            {
                "context": context.astype(object),
                "question": question.astype(object),
                # JSON text: a list-of-struct column whose lists may be empty round-trips badly
                "answers": [None if a is None else json.dumps(a) for a in answers],
                "text": [
                    f"{q}\n{c}" if q and c else None for q, c in zip(question, context, strict=True)
                ],
                "_row": df["_row"],
                "_source": df["_source"],
            }
        )

    def label_counts(self, df: pd.DataFrame) -> dict[str, int]:
        answers = df["answers"].map(_answers)
        answerable = int(answers.map(lambda a: bool(a and a["text"])).sum())
        return {
            "questions": int(len(df)),
            "answerable": answerable,
            "unanswerable": int(len(df)) - answerable,
        }

    # -- validate -------------------------------------------------------------
    def contract_tables(
        self, df: pd.DataFrame, labels: list[str], config: Any = None
    ) -> dict[str, pd.DataFrame]:
        allow = bool(getattr(getattr(config, "task", None), "allow_unanswerable", False))
        rows = df.copy()
        rows["_answer_error"] = [
            answer_error(c, _answers(a), allow)
            for c, a in zip(rows["context"], rows["answers"], strict=True)
        ]
        key = rows["text"]
        rows["_is_duplicate"] = (key.duplicated(keep="first") & key.notna()).astype(float)
        return {"rows": rows.drop(columns=["answers"])}

    # -- preprocess -----------------------------------------------------------
    def usable_rows(self, df: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
        ok = [
            isinstance(c, str) and isinstance(q, str) and answer_error(c, _answers(a), True) == ""
            for c, q, a in zip(df["context"], df["question"], df["answers"], strict=True)
        ]
        return df[ok]

    def clean(self, df: pd.DataFrame, config: Any) -> pd.DataFrame:
        # contexts stay byte for byte: answer_start offsets point into them
        out = df.copy()
        out["question"] = out["question"].map(lambda q: " ".join(q.split()))
        return out[out["question"].str.len() > 0]

    def window_stride(self, settings: TokenizeSettings) -> int:
        return min(settings.stride, settings.max_length // 4)  # the question takes room too

    def tokenize(
        self, batch: dict[str, list], tokenizer: Any, settings: TokenizeSettings, labels: list[str]
    ) -> dict[str, list]:
        enc = tokenizer(
            batch["question"],
            batch["context"],
            truncation="only_second",
            max_length=settings.max_length,
            stride=self.window_stride(settings),
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
        )
        mapping = enc.pop("overflow_to_sample_mapping")
        offsets_all = enc.pop("offset_mapping")
        starts, ends, offsets_out = [], [], []
        for i, sample in enumerate(mapping):
            seq_ids = enc.sequence_ids(i)
            offsets = [
                list(o) if s == 1 else [-1, -1]
                for o, s in zip(offsets_all[i], seq_ids, strict=True)
            ]
            offsets_out.append(offsets)
            answers = _answers(batch["answers"][sample])
            start_tok = end_tok = 0  # "not in this window": point at the first token
            if answers and answers["text"]:
                a_start = answers["answer_start"][0]
                a_end = a_start + len(answers["text"][0])
                ctx = [k for k, s in enumerate(seq_ids) if s == 1]
                if ctx and offsets[ctx[0]][0] <= a_start and offsets[ctx[-1]][1] >= a_end:
                    start_tok = next(k for k in ctx if offsets[k][1] > a_start)
                    end_tok = next(k for k in reversed(ctx) if offsets[k][0] < a_end)
            starts.append(start_tok)
            ends.append(end_tok)
        out = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        out.update(
            start_positions=starts,
            end_positions=ends,
            offsets=offsets_out,
            length=[len(x) for x in enc["input_ids"]],
        )
        for k in (*self._keep, "context", "question", "answers", "text"):
            out[k] = [batch[k][s] for s in mapping]
        return out

    # -- train / evaluate ------------------------------------------------------
    def scoring_settings(self, settings: Any) -> dict[str, Any] | None:
        """Whether "no answer" may win and the longest span (``best_answers``); None for the
        defaults (so evaluation keys made before ``max_answer_tokens`` existed still hold)."""
        out: dict[str, Any] = {}
        if settings.allow_unanswerable:
            out["allow_unanswerable"] = True
        if settings.max_answer_tokens != MAX_ANSWER_TOKENS:
            out["max_answer_tokens"] = settings.max_answer_tokens
        return out or None

    def collator(self, tokenizer: Any, settings: Any = None) -> Any:
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)

    def metric_for_best_model(self, primary: str) -> tuple[str, bool]:
        return "loss", False  # span metrics need the contexts: checkpoints are picked by loss

    def compute_metrics(
        self, predictions: Any, references: Any, labels: list[str]
    ) -> dict[str, Any]:
        """``predictions``: answer strings; ``references``: lists of gold answer strings."""
        return squad_scores(*question_scores(predictions, references))

    def trainer_metrics(self, eval_pred: Any, labels: list[str]) -> dict[str, float]:
        raise NotImplementedError("question_answering checkpoints are picked by validation loss")

    def score_split(
        self,
        model: Any,
        tokenizer: Any,
        split_path: str,
        labels: list[str],
        batch_size: int,
        settings: Any = None,
    ) -> tuple[dict[str, Any], pd.DataFrame]:
        from domaintune.inference import batched_logits

        windows = pd.read_parquet(split_path)
        cols = [
            c for c in ("input_ids", "attention_mask", "token_type_ids") if c in windows.columns
        ]
        feats = [{c: windows[c].iloc[i].tolist() for c in cols} for i in range(len(windows))]
        logits = batched_logits(
            model, self.collator(tokenizer), feats, batch_size, logits_of=span_logits
        )
        found = best_answers(
            windows["_example"],
            windows["context"],
            windows["offsets"],
            logits,
            bool(getattr(settings, "allow_unanswerable", False)),
            int(getattr(settings, "max_answer_tokens", MAX_ANSWER_TOKENS)),
        )
        examples = windows.drop_duplicates("_example").sort_values("_example")
        preds, refs = [], []
        for example, answers in zip(examples["_example"], examples["answers"], strict=True):
            preds.append(found.get(int(example), NO_ANSWER).text)
            refs.append((_answers(answers) or {"text": []})["text"])
        em, f1 = question_scores(preds, refs)
        table = examples[["question", "_row", "_source"]].copy()
        table["answers"] = [" | ".join(r) for r in refs]
        table["predicted"] = preds
        table["exact_match"] = em  # per question: what the bootstrap resamples
        table["f1"] = f1
        return squad_scores(em, f1), table.reset_index(drop=True)

    def example_statistics(
        self, predictions: pd.DataFrame, metric: str, labels: list[str]
    ) -> ExampleStats | None:
        """exact_match / f1: [score, 1] per question (both are means over questions), from
        the ``exact_match`` / ``f1`` columns ``score_split`` writes; a frame without them
        (scored before they existed) is rescored from ``answers`` (split at " | ") and
        ``predicted``."""
        if metric not in self.metrics:
            return None
        if metric in predictions.columns:
            return mean_stats(predictions[metric].to_numpy(dtype=np.float64))
        refs = [[] if not a else str(a).split(" | ") for a in predictions["answers"]]
        preds = ["" if p is None or p != p else str(p) for p in predictions["predicted"]]
        em, f1 = question_scores(preds, refs)
        return mean_stats(em if metric == "exact_match" else f1)

    # -- predict ---------------------------------------------------------------
    def predict_inputs(self, model: Any, text_column: str) -> list[tuple[str, tuple[str, ...]]]:
        return [(role, (model.column(f"{role}_column"),)) for role in ("question", "context")]

    def predict(self, model: Any, table: pd.DataFrame, text_column: str, load: Any) -> pd.DataFrame:
        """Per question: ``answer`` (a span of the context), its character ``answer_start`` /
        ``answer_end`` in the context, ``answer_score`` (its probability) and ``no_answer``
        (where a model trained with unanswerable questions finds none). Long contexts are read in
        the training's overlapping windows, the best span over them wins (as in evaluation)."""
        from domaintune.tasktypes.predicting import encoded_logits

        tokenizer, net, precision = load()
        settings = model.tokenize_settings()

        def texts(column: str) -> list[str]:
            return ["" if pd.isna(v) else str(v) for v in table[model.column(column)]]

        questions = [" ".join(q.split()) for q in texts("question_column")]
        contexts = texts("context_column")
        rows = [i for i in range(len(table)) if questions[i] and contexts[i].strip()]
        batch = {
            "question": [questions[i] for i in rows],
            "context": [contexts[i] for i in rows],
            "answers": [None] * len(rows),
            "text": [None] * len(rows),
            **{k: rows for k in ("_row", "_source", "_example")},
        }
        enc = self.tokenize(batch, tokenizer, settings, [])
        logits = encoded_logits(model, net, tokenizer, precision, enc, logits_of=span_logits)
        allow = bool(model.task_settings().allow_unanswerable)
        longest = int(model.task_settings().max_answer_tokens)
        found = best_answers(
            enc["_example"], enc["context"], enc["offsets"], logits, allow, longest
        )
        answers = [found.get(i, NO_ANSWER) for i in range(len(table))]
        out = table.copy()
        out["answer"] = [a.text for a in answers]
        out["answer_start"] = [a.start for a in answers]
        out["answer_end"] = [a.end for a in answers]
        out["answer_score"] = [a.score for a in answers]
        out["no_answer"] = [a.no_answer for a in answers]
        return out

    def prediction_counts(self, result: pd.DataFrame) -> dict[str, int]:
        return {
            "answered": int((~result["no_answer"]).sum()),
            "no_answer": int(result["no_answer"].sum()),
        }

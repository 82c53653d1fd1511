"""Batch predictions with a registered (or any fine-tuned) model: ``domaintune predict``.

    domaintune predict NAME@production data/*.csv --out predictions.parquet
    domaintune predict NAME@v0003 s3://bucket/new/*.jsonl --config configs/x.yaml --json
    domaintune predict path/to/model/folder reviews.txt

MODEL is a registry reference, ``NAME@production``, ``NAME@latest`` or ``NAME@vNNNN``, resolved
in the store of ``--store`` / ``--config`` (default ``./.domaintune``), or a model folder (a
registry version folder, its ``model/`` folder, or a finetune entry). INPUT goes through the
readers of the ingest stage (paths, globs, fsspec URLs; CSV / JSONL / Parquet / text / CoNLL by
suffix; encoding detection; records that do not parse are left out and counted) and needs no
label column. The output keeps every input column (as the readers read it: CSV values as text) and adds the task type's predictions;
its format follows the suffix of ``--out`` (``.parquet``, ``.csv``, ``.jsonl``), JSON Lines on
stdout without one. Rows are scored in batches of similar length, in the precision the model
trained in on this machine's kind (bf16 where the CPU has it).

Columns added per task type: ``text_classification``: ``predicted``, ``confidence``,
``prob_<label>`` per class; ``token_classification``: ``entities`` (type, character ``start`` /
``end``, ``text`` and ``score`` each) and ``entity_count``; ``question_answering`` (input columns
``question`` and ``context``): ``answer``, ``answer_start`` / ``answer_end`` in the context,
``answer_score``, ``no_answer``; ``causal_lm``: ``perplexity_tokens`` scored and ``perplexity``
per document; ``instruction_tuning`` (chat ``messages``, ``instruction`` [+ ``input``] or a
prompt in the text column): ``generated``. ``masked_lm`` models are not served (they are
encoders to fine-tune further): predict says so in one line.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from domaintune.errors import ConfigError, DataError, DomainTuneError, ModelError
from domaintune.inference import batched_logits, softmax
from domaintune.progress import Progress
from domaintune.registry import REFERENCE as _REFERENCE
from domaintune.tasktypes import get_task_type

log = logging.getLogger(__name__)

#: where the architecture of a plain model folder says which task type it was trained for
_HEADS = {
    "ForSequenceClassification": "text_classification",
    "ForTokenClassification": "token_classification",
    "ForQuestionAnswering": "question_answering",
    "ForCausalLM": "causal_lm",
    "ForMaskedLM": "masked_lm",  # known, so that predict says it does not serve it
}


class PredictError(DomainTuneError):
    """A model reference, input or output that predict cannot use (one line, exit 2)."""


@dataclass
class PredictModel:
    """The model a reference resolved to, and what predicting with it needs."""

    reference: str
    model_dir: Path
    task_type: str
    labels: list[str]
    text_column: str = "text"
    max_length: int = 256
    batch_size: int = 64
    version: str | None = None
    config: Any = None
    notes: list[str] = field(default_factory=list)

    def column(self, name: str) -> str:
        """A column setting of the model's data (``data.<name>``; the default without one)."""
        from domaintune.config import DataConfig

        data = self.config.data if self.config is not None else None
        return getattr(data, name) if data is not None else DataConfig.model_fields[name].default

    def task_settings(self) -> Any:
        """The model's ``task`` section (its defaults without a config)."""
        from domaintune.config import TaskConfig

        return self.config.task if self.config is not None else TaskConfig(type=self.task_type)

    def tokenize_settings(self) -> Any:
        """How the model's training tokenized (max_length, stride): the same here."""
        from domaintune.tasktypes.base import TokenizeSettings

        return TokenizeSettings(max_length=self.max_length, stride=self.task_settings().stride)

    def describe(self) -> str:
        where = f" = {self.version}" if self.version and self.version not in self.reference else ""
        return f"{self.reference}{where} ({self.task_type}, {self.model_dir})"


def resolve(reference: str, store: Any = None) -> PredictModel:
    """The model of ``reference``: ``NAME@production|latest|vNNNN`` in ``store`` (a Store;
    default ``./.domaintune``), or a folder."""
    match = _REFERENCE.match(reference)
    if match and not Path(reference).exists():
        return _from_registry(match["name"], match["version"], reference, store)
    folder = Path(reference)
    if not folder.is_dir():
        raise PredictError(
            f"{reference}: not a model folder and not a registry reference; rule: MODEL is "
            "NAME@production, NAME@latest, NAME@vNNNN or a folder holding a fine-tuned model"
        )
    return _from_folder(folder, reference)


def _from_registry(name: str, version: str, reference: str, store: Any) -> PredictModel:
    from domaintune.registry import Registry
    from domaintune.store import Store

    registry = Registry(store if store is not None else Store(".domaintune"), name)
    try:  # the registry's one rule for production / latest / vNNNN and its errors
        chosen = registry.resolve(version, reference)
    except ModelError as exc:
        raise PredictError(str(exc)) from None
    model = _from_folder(registry.version_dir(chosen), reference)
    model.version = chosen
    return model


def _from_folder(folder: Path, reference: str) -> PredictModel:
    """A registry version folder (config.yaml + model/), a model folder inside one, a
    finetune entry, or a bare Hugging Face model folder with a task head."""
    from domaintune.config import RetrainConfig
    from domaintune.runconfig import complete

    model_dir = folder / "model" if (folder / "model" / "config.json").is_file() else folder
    if not (model_dir / "config.json").is_file():
        raise PredictError(f"{reference}: {model_dir} holds no model (no config.json)")
    config = None
    for candidate in (model_dir.parent / "config.yaml", model_dir / "config.yaml"):
        if candidate.is_file():
            import yaml

            config = complete(RetrainConfig.model_validate(yaml.safe_load(candidate.read_text())))
            break
    hf = json.loads((model_dir / "config.json").read_text())
    if config is not None:
        task_type = config.task.type
    else:
        arch = " ".join(hf.get("architectures") or [])
        task_type = next((t for k, t in _HEADS.items() if k in arch), None)
        if task_type is None:
            raise PredictError(
                f"{reference}: cannot tell the task type of {model_dir} (architectures: "
                f"{arch or 'none'}); predict from a registry version, which records it"
            )
    id2label = hf.get("id2label") or {}
    labels = [id2label[k] for k in sorted(id2label, key=int)] if id2label else []
    model = PredictModel(reference, model_dir, task_type, labels, config=config)
    if config is not None:
        model.text_column = config.data.text_column
        model.max_length = config.training.max_length
        model.batch_size = config.evaluation.batch_size
    return model


# ------------------------------------------------------------------------------ inputs


#: what each input column is for, and where its name comes from
_COLUMN_RULES = {
    "text": "the column the model was trained on (data.text_column), or --text-column",
    "question": "the column of the questions (data.question_column)",
    "context": "the column of the passages (data.context_column)",
    "prompt": "a column of chat messages (data.messages_column), of instructions "
    "(data.instruction_column, with data.input_column), or of prompts (--text-column)",
}


def read_inputs(
    specs: list[str],
    text_column: str,
    storage_options: dict[str, Any] | None = None,
    needs: list[tuple[str, tuple[str, ...]]] | None = None,
) -> tuple[pd.DataFrame, list[str]]:
    """Every input row (columns as read, plus ``_source`` and ``_row``) and notes. ``needs``:
    (role, column names of which one must be there), checked in each file; default the
    text column."""
    from domaintune.redaction import redact
    from domaintune.sources import infer_format, read_file, resolve_sources

    try:
        files = resolve_sources(specs, field="INPUT", storage_options=storage_options)
        fmt = infer_format(files, None)
    except (ConfigError, DataError) as exc:
        raise PredictError(str(exc).replace("data.format: ", "INPUT: ")) from exc
    tables, notes, unparsed = [], [], []
    for f in files:
        held = len(unparsed)
        df, encoding = read_file(f, fmt, "auto", None, unparsed)
        text = text_column if fmt not in ("text", "conll") else "text"
        if fmt == "conll" and "tokens" in df.columns:
            df["text"] = df["tokens"].map(" ".join)
        for role, names in needs or [("text", (text_column,))]:
            names = tuple(text if n == text_column else n for n in names)
            if not any(n in df.columns for n in names):
                raise PredictError(
                    f"{redact(f.url)}: no {role} column {' or '.join(map(repr, names))} "
                    f"(columns: "
                    f"{', '.join(str(c) for c in df.columns if not str(c).startswith('_'))}); "
                    f"rule: {_COLUMN_RULES[role]}"
                )
        df["_source"] = redact(f.url)
        if encoding and encoding != "utf-8":
            notes.append(f"{redact(f.url)}: decoded as {encoding}")
        if len(unparsed) > held:
            notes.append(
                f"{redact(f.url)}: {len(unparsed) - held} record(s) did not parse and were "
                f"left out (first: record {unparsed[held]['_row']}: "
                f"{unparsed[held]['_reasons'].removeprefix('parse: ')})"
            )
        tables.append(df)
    table = pd.concat(tables, ignore_index=True) if len(tables) > 1 else tables[0]
    return table, notes


# ------------------------------------------------------------------------- predicting


def _served(model: PredictModel) -> Served:
    """How predict serves the model's task type (a clear error where it does not yet)."""
    if model.task_type not in SUPPORTED:
        raise PredictError(
            f"{model.reference}: predict does not support task type {model.task_type!r} yet "
            f"(supported: {', '.join(SUPPORTED)})"
        )
    return SUPPORTED[model.task_type]


def predict_table(model: PredictModel, table: pd.DataFrame, text_column: str) -> pd.DataFrame:
    """``table`` with the predictions of ``model`` added (rows in their input order)."""
    return _served(model).predict(model, table, text_column)


def _load(model: PredictModel) -> tuple[Any, Any, str]:
    """(tokenizer, model, precision), loaded as the evaluate stage loads a model to score, so
    that predictions on the test split are the evaluation's."""
    from domaintune.config import TrainingConfig
    from domaintune.loading import load_for_scoring

    config = model.config
    tokenizer, net, precision = load_for_scoring(
        str(model.model_dir),
        model.task_type,
        model.labels,
        config.training if config is not None else TrainingConfig(),
        bool(config.model.trust_remote_code) if config is not None else False,
    )
    model.notes.append(f"scored in {precision}")
    return tokenizer, net, precision


def _logits(
    model: PredictModel,
    net: Any,
    tokenizer: Any,
    precision: str,
    enc: Any,
    logits_of: Callable[[Any], Any] | None = None,
) -> list:
    """The logits of every encoded row (inference.batched_logits, with the task type's
    collator as in evaluation, in ``precision``, with a progress display)."""
    from domaintune.loading import autocast_for
    from domaintune.tasktypes import get_task_type

    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    feats = [{k: enc[k][i] for k in keys} for i in range(len(enc["input_ids"]))]
    collate = get_task_type(model.task_type).collator(tokenizer)
    progress = Progress(len(feats), "predict", logger=log)
    with autocast_for(net, precision):
        out = batched_logits(net, collate, feats, model.batch_size, progress.advance, logits_of)
    progress.close()
    return out


def _classify(model: PredictModel, table: pd.DataFrame, text_column: str) -> pd.DataFrame:
    tokenizer, net, precision = _load(model)
    texts = table[text_column].fillna("").astype(str).tolist()
    enc = tokenizer(texts, truncation=True, max_length=model.max_length)
    probs = softmax(np.stack(_logits(model, net, tokenizer, precision, enc)))
    labels = model.labels or [str(i) for i in range(probs.shape[1])]
    out = table.copy()
    out["predicted"] = [labels[i] for i in probs.argmax(-1)]
    out["confidence"] = probs.max(-1)
    for i, label in enumerate(labels):
        out[f"prob_{label}"] = probs[:, i]
    return out


def _words(tokenizer: Any, text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """The words of raw text as the tokenizer's own pre-tokenizer splits it (whitespace and
    punctuation for BERT-like models: the CoNLL convention), with character offsets."""
    pre = tokenizer.backend_tokenizer.pre_tokenizer
    pieces = pre.pre_tokenize_str(text) if pre is not None else []
    if not pieces:  # no pre-tokenizer: whitespace
        pieces = [(m.group(), m.span()) for m in re.finditer(r"\S+", text)]
    return [w for w, _ in pieces], [(int(a), int(b)) for _, (a, b) in pieces]


def _entities(model: PredictModel, table: pd.DataFrame, text_column: str) -> pd.DataFrame:
    """Entities with character spans (``start``/``end`` into the text), type and score (the
    mean probability of the words' tags); CoNLL input (``tokens``) is scored as its words,
    its text being the words joined by spaces."""
    from domaintune.tasktypes.token_classification import spans, word_logits

    tokenizer, net, precision = _load(model)
    words_of, offsets_of, texts = [], [], []
    conll = "tokens" in table.columns
    for i in range(len(table)):
        if conll:
            words = [str(w) for w in table["tokens"].iloc[i]]
            starts = np.cumsum([0] + [len(w) + 1 for w in words[:-1]]).tolist()
            offsets = [(s, s + len(w)) for s, w in zip(starts, words, strict=True)]
            text = " ".join(words)
        else:
            text = "" if pd.isna(table[text_column].iloc[i]) else str(table[text_column].iloc[i])
            words, offsets = _words(tokenizer, text)
        words_of.append(words)
        offsets_of.append(offsets)
        texts.append(text)
    rows = [i for i, w in enumerate(words_of) if w]
    enc = tokenizer(  # windowed as training windowed (TokenClassification.tokenize)
        [words_of[i] for i in rows],
        is_split_into_words=True,
        truncation=True,
        max_length=model.max_length,
        stride=get_task_type(model.task_type).window_stride(model.tokenize_settings()),
        return_overflowing_tokens=True,
    )
    logits = _logits(model, net, tokenizer, precision, enc)
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


# ---------------------------------------------------------------------------- output

_WRITERS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl"}


def output_format(out: str | None) -> str:
    """The format of ``--out`` from its suffix (JSON Lines on stdout without one)."""
    if out is None:
        return "jsonl"
    suffix = Path(out).suffix.lower()
    if suffix not in _WRITERS:
        raise PredictError(
            f"--out {out}: unknown output format {suffix or '(no suffix)'!r}; rule: end the "
            f"file name in {', '.join(_WRITERS)}"
        )
    return _WRITERS[suffix]


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def write_output(table: pd.DataFrame, out: str | None) -> None:
    fmt = output_format(out)
    if out is None:
        table.to_json(sys.stdout, orient="records", lines=True, force_ascii=False)
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    if fmt == "parquet":
        table.to_parquet(tmp, index=False)
    elif fmt == "csv":  # lists (entities, tokens) as JSON text in a cell
        table.assign(
            **{
                c: table[c].map(lambda v: json.dumps(_plain(v), ensure_ascii=False))
                for c in table.columns
                if table[c].map(lambda v: isinstance(v, list | dict | np.ndarray)).any()
            }
        ).to_csv(tmp, index=False)
    else:
        table.to_json(tmp, orient="records", lines=True, force_ascii=False)
    tmp.replace(path)  # a reader never sees half a file


def predict(
    reference: str,
    inputs: list[str],
    out: str | None = None,
    store: Any = None,
    text_column: str | None = None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Resolve, read, predict and write; returns a summary (model, version, rows, counts)."""
    output_format(out)  # a bad --out fails before any work
    model = resolve(reference, store)
    if batch_size:
        model.batch_size = batch_size
    result, summary = predict_inputs(model, inputs, text_column)
    write_output(result, out)
    return {
        "model": model.reference,
        "version": model.version,
        "model_dir": str(model.model_dir),
        "task_type": model.task_type,
        "out": out,
        **summary,
    }


def predict_inputs(
    model: PredictModel,
    inputs: list[str],
    text_column: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """(the inputs with the predictions of ``model``, {rows, counts, seconds, notes}): what
    ``domaintune predict`` writes and the ``score`` stage keeps."""
    served = _served(model)  # before any input is read
    column = text_column or model.text_column
    table, notes = read_inputs(inputs, column, storage_options, needs=served.inputs(model, column))
    column = column if column in table.columns else "text"
    log.info("predict: %d rows with %s", len(table), model.describe())
    t0 = time.time()
    result = served.predict(model, table, column)
    return result, {
        "rows": len(result),
        "counts": served.counts(result),
        "seconds": round(time.time() - t0, 2),
        "notes": notes + model.notes,
    }


def _perplexities(model: PredictModel, table: pd.DataFrame, text_column: str) -> pd.DataFrame:
    """Per document: ``perplexity_tokens`` scored and ``perplexity`` = exp(mean negative log-likelihood).
    A document (its tokens and end-of-sequence token, as training packs it) is cut into
    blocks of ``training.max_length``; each block's first token has no context and is not
    scored, as in the evaluation's packed blocks."""
    import torch
    import torch.nn.functional as F

    from domaintune.loading import autocast_for

    tokenizer, net, precision = _load(model)
    texts = table[text_column].fillna("").astype(str).tolist()
    eos = tokenizer.eos_token_id
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    blocks: list[tuple[int, list[int]]] = []  # (document, token ids)
    for doc, doc_ids in enumerate(ids):
        doc_ids = [*doc_ids, eos] if eos is not None else list(doc_ids)
        for start in range(0, len(doc_ids), model.max_length):
            block = doc_ids[start : start + model.max_length]
            if len(block) > 1:
                blocks.append((doc, block))
    nll = np.zeros(len(texts))
    scored = np.zeros(len(texts), dtype=np.int64)
    order = np.argsort([len(b) for _, b in blocks], kind="stable")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    progress = Progress(len(blocks), "predict", unit="blocks", logger=log)
    with torch.inference_mode(), autocast_for(net, precision):
        for start in range(0, len(order), model.batch_size):
            chosen = [blocks[i] for i in order[start : start + model.batch_size]]
            width = max(len(b) for _, b in chosen)
            input_ids = torch.full((len(chosen), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chosen), width), dtype=torch.long)
            for j, (_, b) in enumerate(chosen):
                input_ids[j, : len(b)] = torch.tensor(b)
                mask[j, : len(b)] = 1
            logits = net(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
            target = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            losses = F.cross_entropy(
                logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="none"
            ).view(target.shape)
            for j, (doc, _) in enumerate(chosen):
                nll[doc] += float(losses[j].sum())
                scored[doc] += int((target[j] != -100).sum())
            progress.advance(len(chosen))
    progress.close()
    out = table.copy()
    out["perplexity_tokens"] = scored
    with np.errstate(divide="ignore", invalid="ignore"):
        out["perplexity"] = np.where(scored > 0, np.exp(nll / np.maximum(scored, 1)), np.nan)
    return out


def _answers(model: PredictModel, table: pd.DataFrame, text_column: str) -> pd.DataFrame:
    """Per question: ``answer`` (a span of the context), its character ``answer_start`` /
    ``answer_end`` in the context, ``answer_score`` (its probability) and ``no_answer``
    (where a model trained with unanswerable questions finds none). Long contexts are read in
    the training's overlapping windows, the best span over them wins (as in evaluation)."""
    from domaintune.tasktypes import get_task_type
    from domaintune.tasktypes.question_answering import NO_ANSWER, best_answers, span_logits

    tokenizer, net, precision = _load(model)
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
    enc = get_task_type("question_answering").tokenize(batch, tokenizer, settings, [])
    logits = _logits(model, net, tokenizer, precision, enc, logits_of=span_logits)
    allow = bool(model.task_settings().allow_unanswerable)
    longest = int(model.task_settings().max_answer_tokens)
    found = best_answers(enc["_example"], enc["context"], enc["offsets"], logits, allow, longest)
    answers = [found.get(i, NO_ANSWER) for i in range(len(table))]
    out = table.copy()
    out["answer"] = [a.text for a in answers]
    out["answer_start"] = [a.start for a in answers]
    out["answer_end"] = [a.end for a in answers]
    out["answer_score"] = [a.score for a in answers]
    out["no_answer"] = [a.no_answer for a in answers]
    return out


def generation_settings(model: PredictModel) -> Any:
    """How ``model`` generates: its run's ``evaluation.max_new_tokens`` (auto: the value
    derived from its training answers, in its ``generation_config.json``) and prompts cut to
    the room its training left them, in batches of ``--batch-size``: as its evaluation."""
    from domaintune.chat import prompt_budget
    from domaintune.generation import GenerationSettings

    wanted = model.config.evaluation.max_new_tokens if model.config is not None else "auto"
    if wanted == "auto":
        saved = model.model_dir / "generation_config.json"
        doc = json.loads(saved.read_text()) if saved.is_file() else {}
        wanted = doc.get("max_new_tokens") or 128
    return GenerationSettings(
        max_new_tokens=int(wanted),
        batch_size=model.batch_size,
        max_prompt_tokens=prompt_budget(model.max_length, int(wanted)),
    )


def _conversations(model: PredictModel, table: pd.DataFrame, text_column: str) -> list[list]:
    """Each row's conversation up to the answer: its chat turns (``data.messages_column`` or
    ShareGPT ``conversations``; a closing assistant message is the reference, left out), an
    instruction (+ input), or a prompt in the text column."""
    from domaintune.tasktypes.instruction_tuning import messages_from_row, turns_column

    names = {k: model.column(f"{k}_column") for k in ("messages", "instruction", "input", "output")}
    turns = turns_column(table.columns, names["messages"])
    if turns is not None:
        names.update(messages=turns, system="system")
    has_instruction = names["instruction"] in table.columns
    out = []
    for row in table.to_dict("records"):
        if turns is not None or has_instruction:
            messages = messages_from_row(row, turns is not None, names) or []
        else:
            text = row.get(text_column)
            messages = (
                [] if text is None or pd.isna(text) else [{"role": "user", "content": str(text)}]
            )
        messages = [m for m in messages if isinstance(m, dict)]
        if messages and messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        out.append(messages)
    return out


def _translation_requests(model: PredictModel, table: pd.DataFrame, text_column: str) -> list:
    """Each row's source text (``data.source_text_column``, or the column named by
    ``task.source_language``) as the request training asked."""
    from domaintune.tasktypes.translation import Translation, language_column, language_name

    task, data = model.task_settings(), model.config.data if model.config is not None else None
    column = (data.source_text_column if data is not None else None) or language_column(
        list(table.columns), task.source_language, "task.source_language", "INPUT"
    )
    names = (language_name(task.source_language), language_name(task.target_language))
    return [
        []
        if text is None or pd.isna(text) or not str(text).strip()
        else Translation.conversation(str(text), "", names)[:1]
        for text in table[column]
    ]


def _generate_answers(
    model: PredictModel, table: pd.DataFrame, conversations: list[list]
) -> pd.DataFrame:
    """``table`` with ``generated``: the model's greedy answer to each conversation, rendered
    with its chat template and cut to fit as training cut prompts (domaintune.chat), generated
    as its evaluation generated."""
    from domaintune.generation import cast_for_generation, generate_texts
    from domaintune.loading import autocast_for
    from domaintune.tasktypes.instruction_tuning import prompt_ids

    tokenizer, net, precision = _load(model)
    if not getattr(tokenizer, "chat_template", None):
        raise PredictError(
            f"{model.reference}: the model's tokenizer has no chat template; rule: "
            f"{model.task_type} prompts are rendered with it"
        )
    cast_for_generation(net, precision)  # as evaluation generates
    settings = generation_settings(model)
    prompts, empty = [], []
    for i, messages in enumerate(conversations):
        if not any(m.get("role") == "user" for m in messages):
            empty.append(i)
            messages = [{"role": "user", "content": ""}]
        prompts.append(prompt_ids(tokenizer, messages, settings.max_prompt_tokens))
    progress = Progress(len(prompts), "predict", unit="answers", logger=log)
    with autocast_for(net, precision):
        generated = generate_texts(net, tokenizer, prompts, settings, progress.advance)
    progress.close()
    for i in empty:
        generated[i] = ""
    if empty:
        model.notes.append(f"{len(empty)} row(s) had no prompt: nothing generated")
    out = table.copy()
    out["generated"] = generated
    return out


@dataclass(frozen=True)
class Served:
    """A task type predict serves: its predictions, and what the summary counts."""

    predict: Callable[[PredictModel, pd.DataFrame, str], pd.DataFrame]
    counts: Callable[[pd.DataFrame], dict[str, int]]
    #: (role, column names one of which the input needs), given the text column
    inputs: Callable[[PredictModel, str], list[tuple[str, tuple[str, ...]]]] = lambda model, text: [
        ("text", (text,))
    ]


def _generated_counts(r: pd.DataFrame) -> dict[str, int]:
    return {"prompts": len(r), "empty": int((r["generated"] == "").sum())}


def _value_counts(values: Any) -> dict[str, int]:
    return {str(k): int(v) for k, v in pd.Series(values, dtype=object).value_counts().items()}


#: the task types predict serves, and how
SUPPORTED = {
    "text_classification": Served(_classify, lambda r: _value_counts(r["predicted"])),
    "token_classification": Served(
        _entities, lambda r: _value_counts([e["type"] for row in r["entities"] for e in row])
    ),
    "causal_lm": Served(  # the corpus as a whole
        _perplexities,
        lambda r: {"documents": len(r), "tokens": int(r["perplexity_tokens"].sum())},
    ),
    "question_answering": Served(
        _answers,
        lambda r: {
            "answered": int((~r["no_answer"]).sum()),
            "no_answer": int(r["no_answer"].sum()),
        },
        lambda model, text: [
            (role, (model.column(f"{role}_column"),)) for role in ("question", "context")
        ],
    ),
    "instruction_tuning": Served(
        lambda model, table, text: _generate_answers(
            model, table, _conversations(model, table, text)
        ),
        _generated_counts,
        lambda model, text: [
            (
                "prompt",
                (
                    model.column("messages_column"),
                    "conversations",
                    model.column("instruction_column"),
                    text,
                ),
            )
        ],
    ),
    "translation": Served(
        lambda model, table, text: _generate_answers(
            model, table, _translation_requests(model, table, text)
        ),
        _generated_counts,
        lambda model, text: [],  # the source column is found by its language code
    ),
}

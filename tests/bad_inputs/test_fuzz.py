"""Fuzzing every input reader (issue 33): whatever a data file, a config, an override, a
hostfile or a model reference holds, the outcome is a result or the documented error of that
API (a ``DomainTuneError``; a hostfile that cannot be read: ``HostError``) whose message is one
line (the schema's ``ConfigError`` and a ``ContractViolation``: a first line that stands alone,
then one line per problem), never a traceback; and no input file is changed.

Each ``Target`` is a strategy of inputs and a check of one input. CI runs every target on a
small, fixed set of examples (``derandomize``: the same on every run, so a failure reproduces);
``DOMAINTUNE_FUZZ_EXAMPLES=N`` runs N per target, and ``bench/fuzz.py`` runs a long,
time-bounded campaign over the same targets. Besides raw bytes the strategies are shaped by the
formats' grammars (JSON nested up to 6,000 levels, JSON Lines, SQuAD documents, chat records,
XML / TMX fragments, CoNLL lines, CSV rows, Parquet tables of any column types, compressed
files, YAML configs and ``key.path=value`` overrides, hostfile lines, registry references), so
that most examples get past the first parse and reach the code behind it.
"""

from __future__ import annotations

import bz2
import csv
import functools
import gzip
import io
import json
import lzma
import os
import re
import string
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from domaintune import errors
from domaintune.readers.sources import MAX_JSON_DEPTH, read_file, resolve_sources

#: examples per target: each target's own CI budget, or this many everywhere
EXAMPLES = int(os.environ.get("DOMAINTUNE_FUZZ_EXAMPLES", "0"))
#: errors whose message is a stand-alone first line and then one line per problem
MULTI_LINE = (errors.ContractViolation, errors.ConfigError)


# ------------------------------------------------------------------------------ outcomes


def check_message(exc: BaseException) -> None:
    """The property of every error a user's input may cause: it says something, its first
    line stands alone (under 2,000 characters), it holds no traceback, and it is one line
    unless its type is documented as a first line plus one line per problem."""
    text = str(exc)
    first = text.split("\n")[0]
    name = type(exc).__name__
    assert first.strip(), f"{name} with an empty first line: {text[:300]!r}"
    assert len(first) < 2000, f"{name}: first line of {len(first)} characters: {first[:300]!r}"
    assert "Traceback (most recent call last)" not in text, f"{name}: {text[:2000]}"
    if isinstance(exc, MULTI_LINE):
        assert all(len(line) < 2000 for line in text.split("\n")), f"{name}: {text[:300]!r}"
    else:
        assert "\n" not in text and "\r" not in text, f"{name} of several lines: {text[:600]!r}"


#: how the examples ended, "result" or the error and the start of its rule (what bench/fuzz.py
#: prints, to show how far the examples get)
SEEN: Counter[str] = Counter()


def outcome(call: Callable[[], Any], allowed: tuple[type[BaseException], ...]) -> Any:
    """``call()``'s result, or None where it raised one of ``allowed`` with a good message;
    anything else propagates (a failure of the property)."""
    try:
        result = call()
    except allowed as exc:
        check_message(exc)
        _seen(f"{type(exc).__name__}: {_gist(str(exc))}")
        return None
    _seen("result")
    return result


def _gist(message: str) -> str:
    """A message without its file names and numbers: what kind of refusal it is."""
    text = re.sub(r"\S*/tmp\w*\S*|\d+", "N", message.split("\n")[0])
    return text[:70]


def _seen(label: str) -> None:
    SEEN[label] += 1
    if currently_in_test_context():  # (a check may also run on its own, to reproduce)
        event(label)


def _unchanged(path: Path, content: bytes) -> None:
    assert path.read_bytes() == content, f"{path.name}: the input was modified"


# ------------------------------------------------------------------------------ checks

LABELS = ["negative", "positive"]
NER_LABELS = ["PER", "ORG"]
#: a task per data layout: what ingest maps the rows to, and whose contract validate runs
TASKS = {
    "text_classification": {"type": "text_classification", "labels": LABELS},
    "token_classification": {"type": "token_classification", "labels": NER_LABELS},
    "question_answering": {"type": "question_answering", "allow_unanswerable": True},
    "instruction_tuning": {"type": "instruction_tuning"},
    "translation": {"type": "translation", "source_language": "en", "target_language": "fr"},
}


@dataclass(frozen=True)
class DataFile:
    """A data file to fuzz: its name (the suffix picks the reader), bytes, the task that
    maps its rows, and data.* settings."""

    name: str
    content: bytes
    task: str = "text_classification"
    data: tuple[tuple[str, Any], ...] = ()


def check_read(f: DataFile) -> None:
    """The reader alone: a table (with ``_row`` and ``_source``) or a one-line DataError."""
    from domaintune.readers.sources import infer_format

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f.name
        path.write_bytes(f.content)
        data = dict(f.data)

        def read() -> Any:
            (src,) = resolve_sources(str(path))
            fmt = infer_format([src], data.get("format"))
            unparsed = [] if data.get("on_invalid") == "quarantine" else None
            return read_file(src, fmt, data.get("encoding", "auto"), None, unparsed)

        result = outcome(read, (errors.DomainTuneError,))
        if result is not None:
            df = result[0]
            assert {"_row", "_source"} <= set(map(str, df.columns)) and len(df) > 0
        _unchanged(path, f.content)


def check_ingest(f: DataFile) -> None:
    """What ``domaintune validate`` does: ingest (read, map to the task's columns, write the
    snapshot) and validate against the task's contract."""
    from domaintune.runconfig import load_config
    from domaintune.storage.store import Store
    from domaintune.tasks.ingest import ingest
    from domaintune.tasks.validate import validate

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "in" / f.name
        path.parent.mkdir()
        path.write_bytes(f.content)
        cfg = load_config(
            data={
                "name": "fuzz",
                "task": TASKS[f.task],
                "data": {"source": str(path), **dict(f.data)},
                "store": {"root": str(Path(tmp) / "store")},
            }
        )
        store = Store(cfg.store.root)
        outcome(lambda: validate(cfg, ingest(cfg, store), store), (errors.DomainTuneError,))
        _unchanged(path, f.content)


def check_config_text(text: str) -> None:
    """A config file holding ``text`` (UTF-8, or bytes as they come)."""
    from domaintune.runconfig import load_config

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        content = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
        path.write_bytes(content)
        outcome(lambda: load_config(path), (errors.ConfigError,))
        _unchanged(path, content)


def check_overrides(overrides: list[str]) -> None:
    """``--set`` overrides on a valid config."""
    from domaintune.runconfig import load_config

    outcome(lambda: load_config(data=_base_config(), overrides=overrides), (errors.ConfigError,))


def check_hostfile(content: bytes) -> None:
    """A hostfile: hosts and slots, a ConfigError (DeepSpeed would reject it) or a HostError
    (it cannot be read)."""
    from domaintune.training.launch import read_hostfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "hostfile"
        path.write_bytes(content)
        hosts = outcome(lambda: read_hostfile(str(path)), (errors.ConfigError, errors.HostError))
        if hosts is not None:
            assert hosts and all(isinstance(h, str) and n >= 1 for h, n in hosts)
        _unchanged(path, content)


def check_reference(reference: str) -> None:
    """A model reference against an empty store: the registry's reader (ModelError) and
    predict's (PredictError, which also takes a folder)."""
    from domaintune.registry import resolve_reference
    from domaintune.serving.predict import resolve
    from domaintune.storage.store import Store

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "store")
        outcome(lambda: resolve_reference(store, reference), (errors.DomainTuneError,))
        outcome(lambda: resolve(reference, store), (errors.DomainTuneError,))


def _base_config() -> dict[str, Any]:
    return {
        "name": "fuzz",
        "task": dict(TASKS["text_classification"]),
        "data": {"source": "data/*.csv"},
        "store": {"root": ".domaintune-fuzz"},
    }


# ------------------------------------------------------------------------------ strategies

# text that exercises parsers: delimiters, quotes, brackets, escapes, markup, line breaks
PUNCT = ",;\t|\"'\\[]{}<>&#:=@/\n\r -"
words = st.text(
    alphabet=st.sampled_from(
        list(string.ascii_letters[:8] + string.digits[:3] + PUNCT) + ["é", "\u2028", "\ufeff", "😀"]
    ),
    max_size=12,
)
any_text = st.one_of(words, st.text(max_size=12))
column_names = st.one_of(
    st.sampled_from(
        "text label tokens tags context question answers messages conversations system "
        "instruction input output en fr _row _source directory filename id title".split()
        + [""]
    ),
    words,
)
labels = st.sampled_from(LABELS + ["", "postive", "0", "1", "NaN"])
#: data.on_invalid both ways; a share of 1 lets the quarantine keep nothing at all
policies = st.sampled_from(
    [
        (),
        (("on_invalid", "quarantine"),),
        (("on_invalid", "quarantine"), ("max_invalid_share", 1.0)),
    ]
)

# -- JSON

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    any_text,
    labels,
)
json_values = st.recursive(
    json_scalars,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4), st.dictionaries(column_names, kids, max_size=4)
    ),
    max_leaves=12,
)


def _dumps(value: Any) -> str:
    return json.dumps(value, allow_nan=True, ensure_ascii=False)


@st.composite
def deep_json(draw: Any, max_depth: int = 6000) -> str:
    """JSON text nested ``depth`` levels (arrays, objects or both), closed or cut off, with a
    value inside: the shape of input that made Python's parser raise RecursionError."""
    depth = draw(
        st.one_of(
            st.integers(0, max_depth),
            st.sampled_from([MAX_JSON_DEPTH - 1, MAX_JSON_DEPTH, MAX_JSON_DEPTH + 1]),
        )
    )
    kind = draw(st.sampled_from(["array", "object", "mixed"]))
    opens, closes = [], []
    for i in range(depth):
        is_array = kind == "array" or (kind == "mixed" and i % 2 == 0)
        opens.append("[" if is_array else '{"a":')
        closes.append("]" if is_array else "}")
    inner = _dumps(draw(json_scalars))
    end = "".join(reversed(closes)) if draw(st.booleans()) else ""
    return "".join(opens) + inner + end


json_records = st.one_of(
    st.dictionaries(column_names, json_values, max_size=5),
    st.fixed_dictionaries({"text": any_text, "label": labels}),
    st.builds(lambda t, d: f'{{"text": {_dumps(t)}, "label": {d}}}', any_text, deep_json()),
    json_values,
)


def _record_line(record: Any) -> str:
    return record if isinstance(record, str) else _dumps(record)


@st.composite
def jsonl_files(draw: Any) -> DataFile:
    lines = draw(
        st.lists(st.one_of(json_records.map(_record_line), deep_json(), any_text), max_size=8)
    )
    sep = draw(st.sampled_from(["\n", "\r\n"]))
    name = draw(st.sampled_from(["in.jsonl", "in.ndjson", "in.json"]))
    return DataFile(name, sep.join(lines).encode("utf-8", "surrogatepass"), data=draw(policies))


def _squad(draw: Any) -> dict[str, Any]:
    """A SQuAD document, some of whose parts have the wrong type or are missing."""

    def maybe(value: Any) -> Any:  # the part, or (one time in eight) any JSON value
        return value if draw(st.integers(0, 7)) else draw(json_values)

    def many(make: Callable[[], Any], most: int) -> list[Any]:
        return [make() for _ in range(draw(st.integers(0, most)))]

    def answer() -> Any:
        return maybe(
            {"text": maybe(draw(any_text)), "answer_start": maybe(draw(st.integers(-3, 40)))}
        )

    def qa() -> Any:
        q = {"question": maybe(draw(any_text)), "answers": maybe(many(answer, 2))}
        if draw(st.booleans()):
            q["is_impossible"] = maybe(draw(st.booleans()))
        if draw(st.booleans()):
            q["id"] = draw(json_scalars)
        return maybe(q)

    def paragraph() -> Any:
        return maybe({"context": maybe(draw(any_text)), "qas": maybe(many(qa, 3))})

    def article() -> Any:
        return {
            "title": draw(json_scalars),
            "paragraphs": maybe([paragraph(), *many(paragraph, 1)]),
        }

    return {"version": "v2.0", "data": [article(), *many(article, 1)]}


@st.composite
def json_documents(draw: Any) -> DataFile:
    """A ``.json`` file holding one document (pretty-printed or not): SQuAD, one record, an
    array of records, any JSON value, or text nested deep."""
    kind = draw(st.sampled_from(["squad", "record", "array", "value", "deep"]))
    indent = draw(st.sampled_from([None, 2]))
    if kind == "squad":
        doc = _squad(draw)
    elif kind == "record":
        doc = draw(st.dictionaries(column_names, json_values, min_size=1, max_size=5))
    elif kind == "array":
        doc = draw(st.lists(json_records.filter(lambda r: not isinstance(r, str)), max_size=5))
    else:
        doc = draw(json_values)
    text = draw(deep_json()) if kind == "deep" else json.dumps(doc, indent=indent, allow_nan=True)
    if draw(st.integers(0, 3)) == 0:  # cut off: a truncated download
        text = text[: draw(st.integers(1, max(1, len(text))))]
    task = "question_answering" if kind == "squad" else draw(st.sampled_from(list(TASKS)))
    return DataFile("in.json", text.encode(), task, draw(policies))


# -- chat and instruction records

turn = st.one_of(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "assistant", "system", "tool", "", "USER"])
            | json_scalars,
            "content": any_text | json_values,
        }
    ),
    st.fixed_dictionaries(
        {
            "from": st.sampled_from(["human", "gpt", "system", "bing", "function_call"])
            | json_scalars,
            "value": any_text | json_values,
        }
    ),
    json_values,
)
chat_records = st.one_of(
    st.fixed_dictionaries({"messages": st.lists(turn, max_size=4) | json_values}),
    st.fixed_dictionaries(
        {"conversations": st.lists(turn, max_size=4) | json_values},
        optional={"system": any_text | json_values},
    ),
    st.fixed_dictionaries(
        {"instruction": any_text | json_values, "output": any_text | json_values},
        optional={"input": any_text | json_values},
    ),
    st.builds(lambda d: f'{{"messages": {d}}}', deep_json()),
)


@st.composite
def chat_files(draw: Any) -> DataFile:
    """Chat / ShareGPT / Alpaca records as JSON Lines, or as CSV with the messages as JSON text
    in a cell, for instruction_tuning."""
    records = draw(st.lists(chat_records, min_size=1, max_size=5))
    if draw(st.booleans()):
        lines = [_record_line(r) for r in records]
        return DataFile("chat.jsonl", "\n".join(lines).encode(), "instruction_tuning")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["messages"])
    for r in records:
        w.writerow([r if isinstance(r, str) else _dumps(r.get("messages", r))])
    return DataFile("chat.csv", buf.getvalue().encode(), "instruction_tuning")


# -- CSV and text

ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "cp1252", "latin-1", "shift_jis"]


def _encode(text: str, encoding: str) -> bytes:
    try:
        return text.encode(encoding)
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


cells = st.one_of(st.none(), any_text, labels, st.integers().map(str), deep_json(200))


@st.composite
def csv_files(draw: Any) -> DataFile:
    """Rows under a header (any names, any count, ragged), written with any delimiter and
    quoting, in any encoding; as .csv or .tsv, for any task."""
    header = draw(st.lists(column_names, min_size=1, max_size=5))
    width = len(header)
    rows = draw(
        st.lists(st.lists(cells, min_size=max(0, width - 1), max_size=width + 1), max_size=8)
    )
    delimiter = draw(st.sampled_from([",", ";", "\t", "|"]))
    quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONE]))
    buf = io.StringIO()
    w = csv.writer(buf, delimiter=delimiter, quoting=quoting, escapechar="\\")
    for row in [header, *rows]:
        row = ["" if c is None else c for c in row]
        try:
            w.writerow(row)
        except csv.Error:  # QUOTE_NONE cannot write a lone empty field
            buf.write(delimiter.join(row) + "\r\n")
    encoding = draw(st.sampled_from(ENCODINGS))
    name = draw(st.sampled_from(["in.csv", "in.tsv"]))
    data = (("encoding", draw(st.sampled_from(["auto", encoding]))), *draw(policies))
    task = draw(st.sampled_from(list(TASKS)))
    return DataFile(name, _encode(buf.getvalue(), encoding), task, data)


@st.composite
def raw_files(draw: Any) -> DataFile:
    """Raw bytes (sometimes behind a signature or a byte-order mark) under any data suffix."""
    head = draw(
        st.sampled_from([b"", b"\xef\xbb\xbf", b"\xff\xfe", b"PAR1", b"<?xml", b"\x1f\x8b"])
    )
    names = "in.csv in.tsv in.txt in.jsonl in.json in.conll in.tmx in.parquet".split()
    name = draw(st.sampled_from(names))
    return DataFile(name, head + draw(st.binary(max_size=600)), data=draw(policies))


@st.composite
def text_files(draw: Any) -> DataFile:
    text = draw(st.text(max_size=300))
    encoding = draw(st.sampled_from(ENCODINGS))
    data = (("encoding", draw(st.sampled_from(["auto", encoding]))), ("label_column", "directory"))
    return DataFile("in.txt", _encode(text, encoding), data=data)


# -- CoNLL

tags = st.sampled_from(["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-", "I-X", "X", "-"])
conll_lines = st.one_of(
    st.just(""),
    st.just("-DOCSTART- -X- O O"),
    st.builds(
        lambda token, middle, tag, sep: sep.join([token, *middle, tag]),
        words.filter(lambda w: w.strip() != ""),
        st.lists(st.sampled_from(["NNP", "VBZ", "B-NP", "x"]), max_size=3),
        tags,
        st.sampled_from([" ", "\t", "  "]),
    ),
    words,
)


@st.composite
def conll_files(draw: Any) -> DataFile:
    lines = draw(st.lists(conll_lines, max_size=12))
    name = draw(st.sampled_from(["in.conll", "in.iob", "in.bio"]))
    return DataFile(name, "\n".join(lines).encode(), "token_classification", draw(policies))


# -- TMX / XML

xml_names = st.sampled_from(
    "tmx header body tu tuv seg bpt ept ph it ut hi sub prop note x:tu foo".split()
)
xml_text = st.one_of(
    st.text(
        alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="<&"), max_size=10
    ),
    st.sampled_from(
        "&amp; &lt; &#233; &#x1F600; &#0; &foo; <![CDATA[x<y]]> ]]> & < <?pi?>".split()
        + ["<!-- c -->"]
    ),
)
xml_attrs = st.dictionaries(
    st.sampled_from(["xml:lang", "lang", "version", "srclang", "i", "type", "x:y"]),
    st.sampled_from(["en", "fr", "EN-us", "en-US", "", " ", "de", "&amp;", 'a"b']),
    max_size=3,
)


def _element(name: str, attrs: dict[str, str], children: list[str]) -> str:
    attr = "".join(f' {k}="{v}"' for k, v in attrs.items())
    return f"<{name}{attr}>{''.join(children)}</{name}>" if children else f"<{name}{attr}/>"


xml_nodes = st.recursive(
    xml_text,
    lambda kids: st.builds(_element, xml_names, xml_attrs, st.lists(kids, max_size=4)),
    max_leaves=20,
)


@st.composite
def tmx_files(draw: Any) -> DataFile:
    """A TMX-shaped document: declaration (any encoding, true or not), DOCTYPE (with entity
    declarations or not), <tmx><body> of random units and fragments, deeply nested or cut off."""
    encoding = draw(st.sampled_from([None, "UTF-8", "UTF-16", "ISO-8859-1", "bogus", "utf-32"]))
    decl = "" if encoding is None else f'<?xml version="1.0" encoding="{encoding}"?>\n'
    doctype = draw(
        st.sampled_from(
            [
                "",
                "",
                "",
                '<!DOCTYPE tmx SYSTEM "tmx14.dtd">',
                '<!DOCTYPE tmx [<!ENTITY e "x">]>',
                '<!DOCTYPE tmx [<!ENTITY % p SYSTEM "file:///etc/passwd"> %p;]>',
                '<!DOCTYPE tmx SYSTEM "file:///etc/passwd">',
            ]
        )
    )
    units = [
        _element(
            "tu",
            {},
            [
                _element("tuv", {"xml:lang": lang}, [_element("seg", {}, [text])])
                for lang, text in pairs
            ],
        )
        for pairs in draw(
            st.lists(
                st.lists(st.tuples(st.sampled_from(["en", "fr", "EN", ""]), xml_text), max_size=3),
                max_size=4,
            )
        )
    ]
    units += draw(st.lists(xml_nodes, max_size=3))
    depth = draw(st.sampled_from([0, 0, 0, 50, 3000]))
    body = "<seg>" * depth + "".join(units) + "</seg>" * depth
    root = draw(st.sampled_from(["tmx", "tmx", "xliff"]))
    text = f'{decl}{doctype}<{root} version="1.4"><header/><body>{body}</body></{root}>'
    content = _encode(text, draw(st.sampled_from(["utf-8", "utf-16", "latin-1"])))
    if draw(st.integers(0, 3)) == 0:  # cut off
        content = content[: draw(st.integers(1, max(1, len(content))))]
    encodings = ["auto", "auto", "auto", "utf-8", "latin-1", "no-such-codec"]
    data = (("encoding", draw(st.sampled_from(encodings))),)
    return DataFile("in.tmx", content, "translation", data)


# -- Parquet


def _parquet_columns() -> list[tuple[Any, Any]]:
    """(Arrow type, values strategy) of the column kinds a Parquet export may hold."""
    import datetime

    import pyarrow as pa

    text = st.text(max_size=8)
    return [
        (pa.string(), text),
        (pa.large_string(), text),
        (pa.int64(), st.integers(-(2**63), 2**63 - 1)),
        (pa.uint8(), st.integers(0, 255)),
        (pa.float64(), st.floats(allow_nan=True, allow_infinity=True)),
        (pa.bool_(), st.booleans()),
        (pa.binary(), st.binary(max_size=8)),
        (pa.null(), st.none()),
        (pa.list_(pa.string()), st.lists(text, max_size=3)),
        (
            pa.list_(pa.list_(pa.int64())),
            st.lists(st.lists(st.integers(-9, 9), max_size=2), max_size=2),
        ),
        (
            pa.struct([("text", pa.string()), ("answer_start", pa.int64())]),
            st.fixed_dictionaries({"text": text, "answer_start": st.integers(-5, 5)}),
        ),
        (
            pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])),
            st.lists(
                st.fixed_dictionaries(
                    {"role": st.sampled_from(["user", "assistant", "x"]), "content": text}
                ),
                max_size=3,
            ),
        ),
        (
            pa.map_(pa.string(), pa.int64()),
            st.lists(st.tuples(text, st.integers(0, 9)), max_size=2),
        ),
        (
            pa.timestamp("ns"),
            st.datetimes(
                min_value=datetime.datetime(1700, 1, 1), max_value=datetime.datetime(2200, 1, 1)
            ),
        ),
        (pa.date32(), st.dates()),
        (
            pa.decimal128(10, 2),
            st.decimals(min_value=-99999, max_value=99999, places=2, allow_nan=False),
        ),
        (
            pa.duration("s"),
            st.timedeltas(
                min_value=datetime.timedelta(days=-9), max_value=datetime.timedelta(days=9)
            ),
        ),
        (pa.dictionary(pa.int32(), pa.string()), labels),
        (pa.float16(), st.just(None)),
    ]


@st.composite
def parquet_files(draw: Any) -> DataFile:
    """A valid Parquet file of random columns (names may repeat or clash with the reader's
    own), types and values, sometimes cut off or with bytes changed; for any task."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    kinds = _parquet_columns()
    n_rows = draw(st.integers(0, 5))
    names, arrays = [], []
    for _ in range(draw(st.integers(0, 4))):
        kind, values = kinds[draw(st.integers(0, len(kinds) - 1))]
        column = draw(st.lists(st.none() | values, min_size=n_rows, max_size=n_rows))
        if pa.types.is_dictionary(kind):
            arrays.append(pa.array(column, pa.string()).dictionary_encode())
        else:
            arrays.append(pa.array(column, kind))
        names.append(draw(column_names))
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_arrays(arrays, names=names), buf)
    content = buf.getvalue()
    damage = draw(st.sampled_from(["none", "none", "truncate", "flip"]))
    if damage == "truncate":
        content = content[: draw(st.integers(1, max(1, len(content))))]
    elif damage == "flip" and content:
        at = draw(st.integers(0, len(content) - 1))
        content = (
            content[:at] + bytes([content[at] ^ draw(st.integers(1, 255))]) + content[at + 1 :]
        )
    return DataFile("in.parquet", content, draw(st.sampled_from(list(TASKS))))


# -- compressed

CODECS = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}


def _zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


@st.composite
def compressed_files(draw: Any) -> DataFile:
    """Any of the files above, compressed (named ``in.csv.gz``...), whole, cut off, or not
    compressed at all though its name says so."""
    inner = draw(st.one_of(csv_files(), jsonl_files(), conll_files(), text_files(), tmx_files()))
    suffix = draw(st.sampled_from([".gz", ".bz2", ".xz", ".zst"]))
    compress = CODECS.get(suffix, _zstd)
    how = draw(st.sampled_from(["whole", "whole", "cut", "plain"]))
    content = compress(inner.content) if how != "plain" else inner.content
    if how == "cut":
        content = content[: draw(st.integers(1, max(1, len(content))))]
    return DataFile(inner.name + suffix, content, inner.task, inner.data)


# -- configs, overrides, hostfiles, references


@functools.cache
def _config_paths() -> list[str]:
    """Every key path of the config schema (``training.strategy.kind``...)."""
    from pydantic import BaseModel

    from domaintune.config import RetrainConfig

    paths: list[str] = []

    def walk(model: type[BaseModel], prefix: str, depth: int) -> None:
        for name, field in model.model_fields.items():
            paths.append(prefix + name)
            ann = field.annotation
            if depth < 3 and isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.", depth + 1)
            for arg in getattr(ann, "__args__", ()):  # Optional[Section]
                if depth < 3 and isinstance(arg, type) and issubclass(arg, BaseModel):
                    walk(arg, f"{prefix}{name}.", depth + 1)

    walk(RetrainConfig, "", 0)
    return sorted(set(paths))


config_values = st.one_of(
    json_values,
    st.sampled_from(
        "${env:HOME} pkg://no_such_package/x s3://bucket/key registry://a@v0001 ../x ~ / "
        "*.csv 1e400 -1 0 null".split()
        + ["a\x00b", "x" * 5000]
    ),
)


def _set(doc: dict[str, Any], path: str, value: Any) -> None:
    node = doc
    *parents, last = path.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[last] = value


@st.composite
def config_texts(draw: Any) -> Any:
    """A YAML config: a valid one with random keys set to random values, arbitrary text,
    arbitrary bytes, YAML nested deep, or YAML aliases that expand exponentially or refer to
    themselves."""
    kind = draw(
        st.sampled_from(["mutated", "mutated", "mutated", "text", "bytes", "deep", "aliases"])
    )
    if kind == "text":
        return draw(st.text(max_size=200))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "deep":
        depth = draw(st.integers(1, 6000))
        style = draw(st.sampled_from(["[", "{a: ", "- "]))
        if style == "- ":
            return (
                "name: x\ntask: "
                + "".join("\n" + " " * (i + 1) + "-" for i in range(min(depth, 300)))
                + " 1\n"
            )
        close = "]" if style == "[" else "}"
        return f"name: x\ntask: {style * depth}1{close * depth}\n"
    if kind == "aliases":
        levels = draw(st.integers(1, 12))
        lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
        for i in range(1, levels):
            lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 8) + "]")
        lines.append(f"name: *a{levels - 1}")
        if draw(st.booleans()):
            lines.append("task: &self [1, *self]")
        return "\n".join(lines) + "\n"
    doc = _base_config()
    paths = _config_paths()
    for path in draw(st.lists(st.sampled_from(paths), max_size=4)):
        _set(doc, path, draw(config_values))
    return yaml.safe_dump(doc, allow_unicode=draw(st.booleans()))


@st.composite
def override_lists(draw: Any) -> list[str]:
    paths = st.sampled_from(_config_paths()) | words | st.just("") | st.just("a..b")
    value = st.one_of(
        st.text(max_size=30),
        config_values.map(lambda v: json.dumps(v, allow_nan=True)),
        deep_json(),
        st.just("&a [*a]"),
        st.just("!!python/object:os.system x"),
    )
    pair = st.builds(lambda k, v: f"{k}={v}", paths, value)
    item = st.one_of(pair, pair, pair, st.text(max_size=30))
    return draw(st.lists(item, max_size=4))


host_lines = st.one_of(
    st.builds(
        lambda host, sep, slots, tail: f"{host}{sep}slots={slots}{tail}",
        st.one_of(st.sampled_from(["worker-1", "10.0.0.2", "localhost", "#c"]), words),
        st.sampled_from([" ", "\t", "   ", ""]),
        st.one_of(st.integers(-5, 64).map(str), st.just("9" * 5000), st.just("٣"), words),
        st.sampled_from(["", " max_slots=8", " # comment", ",", " slots=2"]),
    ),
    st.just(""),
    st.just("# a comment"),
    words,
)


@st.composite
def hostfiles(draw: Any) -> bytes:
    if draw(st.integers(0, 3)) == 0:
        return draw(st.binary(max_size=300))
    lines = draw(st.lists(host_lines, max_size=6))
    sep = draw(st.sampled_from(["\n", "\r\n", "\r", "\x0c", "\u2028"]))
    return _encode(sep.join(lines), draw(st.sampled_from(["utf-8", "latin-1", "utf-16"])))


references = st.one_of(
    st.text(max_size=40),
    st.builds(
        lambda scheme, name, version: f"{scheme}{name}@{version}",
        st.sampled_from(["", "registry://", "registry:/", "s3://"]),
        st.one_of(st.sampled_from(["a", "news", "x" * 300, ".", "..", "a/b", "\x00"]), words),
        st.one_of(
            st.sampled_from(["production", "latest", "champion", "v0001", "v0", "v" + "9" * 40]),
            words,
        ),
    ),
    st.sampled_from(
        ["", ".", "/", "..", "~", "/dev/null", "\x00", "a\nb@v1", "x" * 5000, "/proc/self"]
    ),
)


# ------------------------------------------------------------------------------ targets


@dataclass(frozen=True)
class Target:
    """A fuzz target: a strategy of inputs, the check of one input (raises AssertionError or
    the unexpected exception on a failure of the property), and its CI example budget."""

    name: str
    inputs: Any
    check: Callable[[Any], None]
    examples: int


TARGETS = [
    Target("raw_bytes_read", raw_files(), check_read, 300),
    Target("csv_read", csv_files(), check_read, 150),
    Target("csv_ingest", csv_files(), check_ingest, 30),
    Target("jsonl_read", jsonl_files(), check_read, 150),
    Target("jsonl_ingest", jsonl_files(), check_ingest, 30),
    Target("json_document_read", json_documents(), check_read, 150),
    Target("json_document_ingest", json_documents(), check_ingest, 30),
    Target("chat_ingest", chat_files(), check_ingest, 30),
    Target("text_read", text_files(), check_read, 80),
    Target("conll_read", conll_files(), check_read, 120),
    Target("conll_ingest", conll_files(), check_ingest, 20),
    Target("tmx_read", tmx_files(), check_read, 150),
    Target("tmx_ingest", tmx_files(), check_ingest, 30),
    Target("parquet_read", parquet_files(), check_read, 120),
    Target("parquet_ingest", parquet_files(), check_ingest, 30),
    Target("compressed_read", compressed_files(), check_read, 100),
    Target("config_file", config_texts(), check_config_text, 120),
    Target("config_overrides", override_lists(), check_overrides, 120),
    Target("hostfile", hostfiles(), check_hostfile, 150),
    Target("model_reference", references, check_reference, 150),
]


def property_test(target: Target, max_examples: int, **options: Any) -> Callable[[], None]:
    """``target``'s property as a Hypothesis test of ``max_examples`` examples; ``options``
    are more Hypothesis settings (the bench's seed-free, database-free campaign)."""
    config = {
        "max_examples": max_examples,
        "deadline": None,
        "derandomize": True,
        "database": None,
        "suppress_health_check": list(HealthCheck),
        **options,
    }
    return settings(**config)(given(target.inputs)(target.check))


@pytest.mark.parametrize("target", TARGETS, ids=[t.name for t in TARGETS])
def test_every_input_gives_a_result_or_a_one_line_error(target):
    property_test(target, EXAMPLES or target.examples)()


def test_validate_command_refuses_json_nested_5000_deep_in_one_line(tmp_path):
    """The reported bug, as a user met it: ``domaintune validate`` on a JSON file nested 5,000
    levels deep printed RecursionError's traceback."""
    data = tmp_path / "deep.json"
    content = ("[" * 5000 + "]" * 5000).encode()
    data.write_bytes(content)
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "deep",
                "task": TASKS["text_classification"],
                "data": {"source": str(data)},
                "store": {"root": str(tmp_path / "store")},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    done = subprocess.run(
        [sys.executable, "-m", "domaintune.cli", "validate", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("domaintune: ")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"{data}: line 1: nested deeper than {MAX_JSON_DEPTH} levels" in lines[0]
    assert data.read_bytes() == content

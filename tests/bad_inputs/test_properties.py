"""Property-based tests: whatever bytes or rows arrive, ingest and validate either accept
them or raise one of the project's own errors (a clear message naming the file), never an
unhandled exception."""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domaintune import errors
from domaintune.runconfig import load_config
from domaintune.storage.store import Store
from domaintune.tasks.ingest import ingest
from domaintune.tasks.validate import validate

LABELS = ["negative", "positive"]
SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,  # the same examples on every CI run; failures reproduce
)

#: data.on_invalid both ways; a share of 1 lets the quarantine keep nothing at all
POLICIES = [
    {},
    {"on_invalid": "quarantine"},
    {"on_invalid": "quarantine", "max_invalid_share": 1.0},
]


def _run(name: str, content: bytes, fmt: str | None = None, **data) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(content)
        cfg = load_config(
            data={
                "name": "prop",
                "task": {"type": "text_classification", "labels": LABELS},
                "data": {"source": str(path), **({"format": fmt} if fmt else {}), **data},
                "store": {"root": str(Path(tmp) / "store")},
            }
        )
        store = Store(cfg.store.root)
        try:
            raw = ingest(cfg, store)
            validate(cfg, raw, store)
        except errors.DomainTuneError as exc:
            first = str(exc).splitlines()[0]
            assert first.strip(), "an error must say something"
            assert len(first) < 2000
        assert path.read_bytes() == content, "the input was modified"


@SETTINGS
@given(
    st.binary(min_size=0, max_size=2000),
    st.sampled_from(["csv", "jsonl", "conll", "text"]),
    st.sampled_from(POLICIES),
)
def test_arbitrary_bytes_give_an_own_error_or_a_table(content, fmt, policy):
    suffix = {"csv": ".csv", "jsonl": ".jsonl", "conll": ".conll", "text": ".txt"}[fmt]
    if fmt == "conll":
        # NER reads CoNLL; the rows then go through the token-classification contract
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"in{suffix}"
            path.write_bytes(content)
            cfg = load_config(
                data={
                    "name": "prop",
                    "task": {"type": "token_classification", "labels": ["PER", "ORG"]},
                    "data": {"source": str(path), **policy},
                    "store": {"root": str(Path(tmp) / "store")},
                }
            )
            store = Store(cfg.store.root)
            try:
                validate(cfg, ingest(cfg, store), store)
            except errors.DomainTuneError as exc:
                assert str(exc).strip()
        return
    _run(f"in{suffix}", content, label_column="directory" if fmt == "text" else "label", **policy)


cell = st.one_of(st.none(), st.text(max_size=40), st.integers(), st.floats(allow_nan=True))


@SETTINGS
@given(
    st.lists(st.tuples(cell, st.one_of(st.sampled_from(LABELS), cell)), min_size=0, max_size=40),
    st.sampled_from(["utf-8", "utf-16", "cp1252", "auto"]),
    st.sampled_from(POLICIES),
)
def test_arbitrary_rows_as_csv(rows, encoding, policy):
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["text", "label"])
    for text, label in rows:
        w.writerow(["" if text is None else text, "" if label is None else label])
    try:
        content = buf.getvalue().encode("utf-8" if encoding == "auto" else encoding)
    except UnicodeEncodeError:
        return  # not representable in that encoding: not a file anyone could have
    _run("rows.csv", content, encoding=encoding, **policy)


@SETTINGS
@given(
    st.lists(
        st.dictionaries(
            st.sampled_from(["text", "label", "other"]),
            st.one_of(cell, st.lists(cell, max_size=3), st.dictionaries(st.text(max_size=3), cell)),
        ),
        max_size=30,
    ),
    st.lists(st.text(max_size=20), max_size=3),
    st.sampled_from(POLICIES),
)
def test_arbitrary_json_records(records, junk_lines, policy):
    lines = [json.dumps(r, allow_nan=True) for r in records] + junk_lines
    _run("rows.jsonl", ("\n".join(lines) + "\n").encode(), **policy)

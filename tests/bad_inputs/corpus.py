"""The bad-input corpus: each case builds one bad input and names the error it must produce.

A case writes its input files under a folder and returns config sections; the test runs
the stages a run would (config -> ingest -> validate -> preprocess -> the finetune
pre-flight) and requires the first project error to match ``expect`` (a regex on its first
line, which must name the file / row / field and the rule), the input files to be
byte-for-byte unchanged, and no model to have been trained or registered.

Small inputs are generated here rather than committed, so that the corpus stays readable
and the 10 MB line does not live in git.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GOOD = [
    ("record profit and strong growth", "positive"),
    ("shares drop on weak outlook", "negative"),
]


def _csv(rows: list[tuple[str, str]], header: str = "text,label", n: int = 12) -> str:
    lines = [header]
    for i in range(n):
        for text, label in rows:
            lines.append(f"{text} {i},{label}")
    return "\n".join(lines) + "\n"


@dataclass
class BadInput:
    name: str
    expect: str  # regex on the error's first line
    build: Callable[[Path], dict[str, Any]]  # writes files, returns config sections
    error: str = "DataError"  # DataError | ContractViolation | ConfigError | ModelError
    #: instead of a run's stages: what the user does (``data add`` into a landing zone)
    action: Callable[[dict[str, Any]], None] | None = None


def _symlink_out(d: Path) -> dict[str, Any]:
    outside = _write(d / "outside" / "secret.csv", _csv(GOOD))
    zone = d / "landing" / "finance"
    _write(zone / "ok.csv", _csv(GOOD))
    (zone / "link.csv").symlink_to(outside)
    return src(zone / "*.csv")


def _land_outside(sections: dict[str, Any]) -> None:
    from domaintune.landing import add_files

    add_files("../../outside", [sections["file"]], root=sections["root"])


def _pickle_model(d: Path) -> dict[str, Any]:
    """A model folder whose weights are a pickle (pytorch_model.bin), no safetensors."""
    import torch
    from transformers import AutoModel

    from tests.conftest import build_tiny_model

    folder = build_tiny_model(d / "pickled")
    state = AutoModel.from_pretrained(folder).state_dict()
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    return {**src(_write(d / "ok.csv", _csv(GOOD))), "model": {"name_or_path": str(folder)}}


def _mismatched_tokenizer(d: Path) -> dict[str, Any]:
    """A model whose embedding matrix is smaller than its tokenizer's vocabulary (a
    tokenizer copied in from another model)."""
    from transformers import AutoModel

    from tests.conftest import build_tiny_model

    folder = build_tiny_model(d / "model")
    model = AutoModel.from_pretrained(folder)
    model.resize_token_embeddings(50)
    model.save_pretrained(folder)
    return {**src(_write(d / "ok.csv", _csv(GOOD))), "model": {"name_or_path": str(folder)}}


def _write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def src(path: Path, **data: Any) -> dict[str, Any]:
    return {"data": {"source": str(path), **data}}


CASES: list[BadInput] = [
    BadInput(
        "empty_file", r"empty\.csv: file is empty", lambda d: src(_write(d / "empty.csv", ""))
    ),
    BadInput(
        "header_only",
        r"header\.csv: header only",
        lambda d: src(_write(d / "header.csv", "text,label\n")),
    ),
    BadInput(
        "missing_column",
        r"nolabel\.csv: .*column 'label' \(data\.label_column\) not found",
        lambda d: src(_write(d / "nolabel.csv", "text\n" + "some text\n" * 30)),
    ),
    BadInput(
        "renamed_column",
        r"renamed\.csv: .*column 'text' \(data\.text_column\) not found; did you mean 'texts'",
        lambda d: src(_write(d / "renamed.csv", _csv(GOOD, header="texts,label"))),
    ),
    BadInput(
        "extra_columns_refused",
        r"extra\.csv: unexpected column\(s\) 'source_id'.*data\.extra_columns",
        lambda d: src(
            _write(
                d / "extra.csv",
                _csv([(f"{t},s1", lab) for t, lab in GOOD], header="text,source_id,label"),
            ),
            extra_columns="error",
        ),
    ),  # fmt: skip
    BadInput(
        "wrong_delimiter",
        r"semi\.csv: .*column 'text' \(data\.text_column\) not found.*delimiter",
        lambda d: src(_write(d / "semi.csv", _csv(GOOD).replace(",", ";")), delimiter=","),
    ),
    BadInput(
        "non_utf8_declared_utf8",
        r"cp1252\.csv: line 2: bytes .* are not valid utf-8 \(data\.encoding\)",
        lambda d: src(
            _write(
                d / "cp1252.csv",
                _csv([("caf\xe9 profits \u2013 up", "positive"), ("weak", "negative")]).encode(
                    "cp1252"
                ),
            ),
            encoding="utf-8",
        ),
    ),  # fmt: skip
    BadInput(
        "mixed_encodings_detected",
        r"mixed\.csv: mixed encodings: line 26 is UTF-8 but line 27 is not",
        lambda d: src(
            _write(
                d / "mixed.csv",
                _csv(GOOD).encode()
                + "caf\u00e9 \u2013 cr\u00e8me,positive\n".encode()
                + "caf\u00e9 profits,negative\n".encode("cp1252"),
            )
        ),
    ),
    BadInput(
        "bom_with_wrong_encoding",
        r"bom\.csv: .*byte-order mark.*data\.encoding",
        lambda d: src(
            _write(d / "bom.csv", b"\xef\xbb\xbf" + _csv(GOOD).encode()), encoding="latin-1"
        ),
    ),
    BadInput(
        "nul_bytes",
        r"nul\.csv: line 4: NUL byte in text",
        lambda d: src(_write(d / "nul.csv", _csv(GOOD).replace("1,positive", "1\x00,positive", 1))),
    ),
    BadInput(
        "ragged_rows",
        r"ragged\.csv: malformed CSV: .*line 4",
        lambda d: src(_write(d / "ragged.csv", "text,label\na,positive\nb,negative\nc,x,y\n")),
    ),
    BadInput(
        "broken_quoting",
        r"quote\.csv: malformed CSV: .*(quote|EOF)",
        lambda d: src(
            _write(d / "quote.csv", _csv(GOOD) + '"an unclosed quote,positive\nmore,negative\n')
        ),
    ),
    BadInput(
        "ten_megabyte_line",
        r"text_length .*long\.csv row 25",
        lambda d: src(_write(d / "long.csv", _csv(GOOD) + ("x" * 10_000_000) + ",positive\n")),
        error="ContractViolation",
    ),
    BadInput(
        "blank_and_null_texts",
        r"blank\.csv: text_not_null \(every example has a text\): 1 unexpected.*blank\.csv row 26.*also broken: text_not_blank",
        lambda d: src(_write(d / "blank.csv", _csv(GOOD) + "   ,positive\n,negative\n")),
        error="ContractViolation",
    ),
    BadInput(
        "label_outside_set",
        r"label_in_set .*labels\.csv row \d+: 'postive'",
        lambda d: src(_write(d / "labels.csv", _csv(GOOD) + "typo here,postive\n")),
        error="ContractViolation",
    ),
    BadInput(
        "quarantine_above_its_share",
        r"invalid_share \(at most 0\.05 of the rows may be quarantined.*: 6 unexpected "
        r"\(20\.0%\); e\.g\. typos\.csv row 25: .*label_in_set",
        lambda d: src(
            _write(d / "typos.csv", _csv(GOOD)[:-1] + "\n" + "typo here,postive\n" * 6),
            on_invalid="quarantine",
        ),
        error="ContractViolation",
    ),
    BadInput(
        "nothing_parses_under_quarantine",
        r"broken\.jsonl: no records \(3 line\(s\) did not parse; first: .*broken\.jsonl: line 1: not "
        r"valid JSON",
        lambda d: src(_write(d / "broken.jsonl", "{oops\n" * 3), on_invalid="quarantine"),
    ),
    BadInput(
        "one_class_only",
        r"rows_per_class .*'negative'",
        lambda d: src(_write(d / "one.csv", _csv(GOOD[:1], n=30))),
        error="ContractViolation",
    ),
    BadInput(
        "class_below_minimum",
        r"rows_per_class .*'negative'",
        lambda d: src(_write(d / "thin.csv", _csv(GOOD[:1], n=30) + "bad day 1,negative\n")),
        error="ContractViolation",
    ),
    BadInput(
        "all_rows_duplicated",
        r"duplicate_share",
        lambda d: src(
            _write(d / "dups.csv", "text,label\n" + "same text,positive\nother,negative\n" * 20)
        ),
        error="ContractViolation",
    ),
    BadInput(
        "binary_file_named_csv",
        r"binary\.csv: this is a PNG image, not csv text",
        lambda d: src(_write(d / "binary.csv", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40)),
    ),
    BadInput(
        "malformed_jsonl_line",
        r"bad\.jsonl: line 3: not valid JSON",
        lambda d: src(
            _write(
                d / "bad.jsonl",
                json.dumps({"text": "a", "label": "positive"})
                + "\n"
                + json.dumps({"text": "b", "label": "negative"})
                + "\n{not json\n",
            )
        ),
    ),  # fmt: skip
    BadInput(
        "json_array_nested_5000_deep",
        r"deep\.json: line 1: nested deeper than 100 levels; rule: JSON input nests at most",
        lambda d: src(_write(d / "deep.json", "[" * 5000 + "]" * 5000)),
    ),
    BadInput(
        "json_object_nested_5000_deep",
        r"deepobj\.json: line 1: nested deeper than 100 levels; rule: JSON input nests at most",
        lambda d: src(_write(d / "deepobj.json", '{"a":' * 5000 + "1" + "}" * 5000)),
    ),
    BadInput(
        "jsonl_line_nested_5000_deep",
        r"deep\.jsonl: line 2: nested deeper than 100 levels; rule: JSON input nests at most",
        lambda d: src(
            _write(
                d / "deep.jsonl",
                json.dumps({"text": "a", "label": "positive"})
                + "\n"
                + '{"text": '
                + "[" * 5000
                + "]" * 5000
                + ', "label": "negative"}\n',
            )
        ),
    ),
    BadInput(
        "jsonl_object_nested_5000_deep",
        r"deepobj\.jsonl: line 1: nested deeper than 100 levels; rule: JSON input nests at most",
        lambda d: src(_write(d / "deepobj.jsonl", '{"a":' * 5000 + "1" + "}" * 5000 + "\n")),
    ),
    BadInput(
        "conll_token_tag_mismatch",
        r"tags\.conll: line 4: expected 'token TAG', got 'Acme'",
        lambda d: {
            "task": {"type": "token_classification", "labels": ["PER", "ORG"]},
            **src(_write(d / "tags.conll", "John B-PER\nworks O\nat O\nAcme\n\n")),
        },
    ),
    BadInput(
        "conll_invalid_iob_sequence",
        r"valid_iob2 .*iob\.conll row 1: \"token 4: 'I-ORG' follows 'O'\"",
        lambda d: {
            "task": {"type": "token_classification", "labels": ["PER", "ORG"]},
            **src(
                _write(
                    d / "iob.conll",
                    "".join(f"John{i} B-PER\nworks O\nat O\nAcme I-ORG\n\n" for i in range(20)),
                )
            ),
        },
        error="ContractViolation",
    ),  # fmt: skip
    BadInput(
        "qa_answer_not_at_its_span",
        r"qa\.jsonl.*answer.*qa\.jsonl row 1",
        lambda d: {
            "task": {"type": "question_answering"},
            **src(
                _write(
                    d / "qa.jsonl",
                    "".join(
                        json.dumps(
                            {
                                "context": f"Acme was founded in {1900 + i} by John.",
                                "question": "When was Acme founded?",
                                "answers": {
                                    "text": [str(1900 + i)],
                                    "answer_start": [3 if i == 0 else 20],
                                },
                            }
                        )
                        + "\n"
                        for i in range(30)
                    ),
                )
            ),
        },
        error="ContractViolation",
    ),  # fmt: skip
    BadInput(
        "glob_matching_nothing",
        r"matched no files",
        lambda d: src(d / "nothing" / "*.csv"),
    ),
    BadInput(
        "unknown_config_key",
        r"training\.epocs: unknown key; did you mean 'epochs'",
        lambda d: {**src(_write(d / "ok.csv", _csv(GOOD))), "training": {"epocs": 3}},
        error="ConfigError",
    ),
    BadInput(
        "mistyped_config_value",
        r"training\.learning_rate: .*(number|float).*'fast'",
        lambda d: {**src(_write(d / "ok.csv", _csv(GOOD))), "training": {"learning_rate": "fast"}},
        error="ConfigError",
    ),
    BadInput(
        "symlink_escaping_the_landing_folder",
        r"finance/link\.csv: links to .*outside/secret\.csv, outside .*landing/finance",
        _symlink_out,
    ),
    BadInput(
        "dotdot_domain_escaping_the_landing_root",
        r"domain '\.\./\.\./outside': rule: a domain is a plain name",
        lambda d: {"file": str(_write(d / "new.csv", _csv(GOOD))), "root": str(d / "landing")},
        action=_land_outside,
    ),
    BadInput(
        "tokenizer_not_of_its_model",
        r"model\.name_or_path .*model: the tokenizer has \d+ tokens but the model's embedding "
        r"matrix has 50 rows",
        _mismatched_tokenizer,
        error="ModelError",
    ),
    BadInput(
        "model_with_pickle_weights_only",
        r"model\.name_or_path .*pickled: weights only as pickle \(pytorch_model\.bin\)",
        _pickle_model,
        error="ModelError",
    ),
    BadInput(
        "missing_model_path",
        r"model\.name_or_path: .*no-such-model does not exist",
        lambda d: {
            **src(_write(d / "ok.csv", _csv(GOOD))),
            "model": {"name_or_path": str(d / "no-such-model")},
        },
        error="ModelError",
    ),  # fmt: skip
]

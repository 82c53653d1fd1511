"""The formats generative and QA data come in: SQuAD's nested JSON, ShareGPT conversations,
and parallel text (TMX, a column per language) for the translation task type. Each through
the real ingest (and validate where the contract judges), with tiny files written here."""

from __future__ import annotations

import gzip
import json
import re

import pandas as pd
import pytest

from domaintune.errors import ConfigError, ContractViolation, DataError
from domaintune.runconfig import load_config
from domaintune.storage.store import Store
from domaintune.tasks.ingest import ingest
from domaintune.tasks.preprocess import preprocess
from domaintune.tasks.validate import validate
from domaintune.tasktypes import get_task_type
from tests.conftest import make_qa_rows, make_rows, merge_sections

QUARANTINE = {"on_invalid": "quarantine", "max_invalid_share": 0.2}


def run_ingest(make_config, source, **sections):
    cfg = make_config(source, **sections)
    store = Store(cfg.store.root)
    return cfg, store, ingest(cfg, store)


# --------------------------------------------------------------------------------- SQuAD

QA = {"type": "question_answering", "allow_unanswerable": True}
NORMANS = (
    "The Normans were the people who in the 10th and 11th centuries gave their name to "
    "Normandy, a region in France."
)
TRADE = "Acme Corp opened an office in Lisbon in 2020 to sell its shares in Europe."


def _answer(context: str, text: str) -> dict:
    return {"text": text, "answer_start": context.index(text)}


def squad_v2() -> dict:
    """SQuAD 2.0 dev's shape: an unanswerable question with plausible_answers."""
    return {
        "version": "v2.0",
        "data": [
            {
                "title": "Normans",
                "paragraphs": [
                    {
                        "context": NORMANS,
                        "qas": [
                            {
                                "question": "In what country is Normandy located?",
                                "id": "56ddde6b9a695914005b9628",
                                "answers": [_answer(NORMANS, "France"), _answer(NORMANS, "France")],
                                "is_impossible": False,
                            },
                            {
                                "plausible_answers": [_answer(NORMANS, "Normans")],
                                "question": "Who gave their name to Normandy in 1066?",
                                "id": "5ad39d53604f3c001a3fe8d1",
                                "answers": [],
                                "is_impossible": True,
                            },
                        ],
                    }
                ],
            },
            {
                "title": "Acme",
                "paragraphs": [
                    {
                        "context": TRADE,
                        "qas": [
                            {
                                "question": "Where did Acme Corp open an office?",
                                "id": "t1",
                                "answers": [_answer(TRADE, "Lisbon")],
                                "is_impossible": False,
                            }
                        ],
                    }
                ],
            },
        ],
    }


def squad_v1(n: int = 12) -> dict:
    """SQuAD 1.1's shape (no is_impossible), a paragraph per context, several articles."""
    articles: list[dict] = []
    for i, r in enumerate(make_qa_rows(n, seed=5)):
        if i % 4 == 0:
            articles.append({"title": f"Article_{len(articles)}", "paragraphs": []})
        answers = [
            {"text": t, "answer_start": s}
            for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"], strict=True)
        ]
        qa = {"id": f"q{i}", "question": r["question"], "answers": answers}
        articles[-1]["paragraphs"].append({"context": r["context"], "qas": [qa]})
    return {"version": "1.1", "data": articles}


def test_squad_v2_json_becomes_one_row_per_question(tmp_path, make_config):
    src = tmp_path / "dev-v2.0.json"
    src.write_text(json.dumps(squad_v2()))  # one line, as the official files are
    before = src.read_bytes()
    cfg, store, snap = run_ingest(make_config, src, task=QA, data={"extra_columns": "error"})
    assert src.read_bytes() == before
    df = pd.read_parquet(snap.table)
    assert list(df["_row"]) == [1, 2, 3]
    assert list(df["question"])[2] == "Where did Acme Corp open an office?"
    answers = [json.loads(a) for a in df["answers"]]
    start = NORMANS.index("France")
    assert answers[0] == {"text": ["France", "France"], "answer_start": [start, start]}
    assert answers[1] == {"text": [], "answer_start": []}, "plausible answers are not answers"
    assert snap.label_counts == {"questions": 3, "answerable": 2, "unanswerable": 1}
    assert not [n for n in snap.notes if "not used" in n], snap.notes
    # the same file gzip-compressed: the same rows
    gz = tmp_path / "gz" / "dev-v2.0.json.gz"
    gz.parent.mkdir()
    gz.write_bytes(gzip.compress(before))
    _, _, again = run_ingest(make_config, gz, task=QA)
    pd.testing.assert_frame_equal(
        pd.read_parquet(again.table).drop(columns="_source"), df.drop(columns="_source")
    )


def test_squad_v1_pretty_printed_passes_the_contract_and_an_answer_off_its_span_fails(
    tmp_path, make_config
):
    doc = squad_v1(12)
    good = tmp_path / "train-v1.1.json"
    good.write_text(json.dumps(doc, indent=2))
    cfg, store, snap = run_ingest(make_config, good, task={"type": "question_answering"})
    assert snap.rows == 12 and snap.label_counts["answerable"] == 12
    assert validate(cfg, snap, store).success
    doc["data"][1]["paragraphs"][2]["qas"][0]["answers"][0]["answer_start"] += 3  # question 7
    bad = tmp_path / "off.json"
    bad.write_text(json.dumps(doc))
    cfg, store, snap = run_ingest(make_config, bad, task={"type": "question_answering"})
    with pytest.raises(ContractViolation) as e:
        validate(cfg, snap, store)
    first = str(e.value).splitlines()[0]
    assert "answer_matches_span" in first and "off.json row 7" in first and "!= context[" in first


def test_squad_question_that_cannot_be_read_names_its_json_path(tmp_path, make_config):
    doc = squad_v1(12)
    del doc["data"][2]["paragraphs"][1]["qas"][0]["question"]  # question 10
    src = tmp_path / "noq.json"
    src.write_text(json.dumps(doc))
    with pytest.raises(DataError) as e:
        run_ingest(make_config, src, task=QA)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{src}: data[2].paragraphs[1].qas[0]: 'question' missing; rule: SQuAD")
    # quarantine: the question is held with its reason, the others are ingested
    cfg, store, snap = run_ingest(make_config, src, task=QA, data=QUARANTINE)
    assert snap.rows == 11 and snap.unparsed_rows == 1
    report = validate(cfg, snap, store)
    q = pd.read_parquet(report.quarantine_table)
    assert list(q["_row"]) == [10] and "'question' missing" in q.loc[0, "_reasons"]


def test_squad_answer_without_start_and_impossible_with_answers_are_refused(tmp_path, make_config):
    doc = squad_v2()
    qas = doc["data"][0]["paragraphs"][0]["qas"]
    del qas[0]["answers"][1]["answer_start"]
    src = tmp_path / "nostart.json"
    src.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"qas\[0\]\.answers\[1\]: 'answer_start' missing or not"):
        run_ingest(make_config, src, task=QA)
    doc = squad_v2()
    doc["data"][0]["paragraphs"][0]["qas"][1]["answers"] = [_answer(NORMANS, "Normans")]
    src.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"qas\[1\]: 'is_impossible' is true but 'answers'"):
        run_ingest(make_config, src, task=QA)


def test_truncated_json_is_one_line_naming_where_it_ends(tmp_path, make_config):
    text = json.dumps(squad_v2())
    src = tmp_path / "cut.json"
    src.write_text(text[: len(text) // 2])
    with pytest.raises(DataError) as e:
        run_ingest(make_config, src, task=QA)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{src}: line 1, column ")
    assert "not valid JSON" in msg and "truncated?" in msg and "SQuAD" in msg
    pretty = tmp_path / "cut_pretty.json"
    pretty.write_text(json.dumps(squad_v2(), indent=2)[:-30])
    with pytest.raises(DataError, match=r"cut_pretty\.json: line \d+, column \d+: not valid JSON"):
        run_ingest(make_config, pretty, task=QA)


def test_json_object_that_is_neither_squad_nor_a_record(tmp_path, make_config, rows):
    src = tmp_path / "wrapped.json"
    src.write_text(json.dumps({"version": 2, "data": rows(2)}))
    with pytest.raises(DataError) as e:
        run_ingest(make_config, src)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{src}: a JSON object holding a list of objects under 'data'")
    assert "JSON Lines" in msg and "an array of objects" in msg and "SQuAD" in msg
    # one record, pretty-printed, is a record; JSON Lines named .json stay JSON Lines
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"text": "Profit rose.", "label": "positive"}, indent=2))
    assert run_ingest(make_config, one)[2].rows == 1
    lines = tmp_path / "lines.json"
    lines.write_text("\n".join(json.dumps(r) for r in rows(2)) + "\n{broken\n")
    with pytest.raises(DataError, match=r"lines\.json: line 7: not valid JSON"):
        run_ingest(make_config, lines)


# ------------------------------------------------------------------------------ ShareGPT

IT = {"type": "instruction_tuning"}


def sharegpt_rows(n: int = 12) -> list[dict]:
    return [
        {
            "id": f"c{i}",
            "system": "You label headlines." if i % 2 else "",
            "conversations": [
                {"from": "human", "value": f"Label this headline: {r['text']}"},
                {"from": "gpt", "value": r["label"]},
            ],
        }
        for i, r in enumerate(make_rows(n // 3 + 1)[:n])
    ]


def test_sharegpt_conversations_become_chat_messages(tmp_path, make_config):
    rows = sharegpt_rows()
    src = tmp_path / "sharegpt.json"  # LLaMA-Factory's sharegpt layout: a JSON array
    src.write_text(json.dumps(rows, indent=1))
    cfg, store, snap = run_ingest(make_config, src, task=IT)
    df = pd.read_parquet(snap.table)
    first, second = json.loads(df["messages"][0]), json.loads(df["messages"][1])
    assert first == [
        {"role": "user", "content": rows[0]["conversations"][0]["value"]},
        {"role": "assistant", "content": rows[0]["conversations"][1]["value"]},
    ]
    assert second[0] == {"role": "system", "content": "You label headlines."}
    assert [m["role"] for m in second] == ["system", "user", "assistant"]
    assert df["reference"][1] == rows[1]["conversations"][1]["value"]
    assert snap.label_counts == {"conversations": 12}
    assert [n for n in snap.notes if "not used" in n] == [
        "column(s) not used by instruction_tuning, left out: id"
    ]
    assert validate(cfg, snap, store).success


def test_sharegpt_unknown_role_is_a_row_failure_naming_the_turn_and_role(tmp_path, make_config):
    rows = sharegpt_rows()
    rows[2]["conversations"].insert(1, {"from": "function_call", "value": '{"name": "x"}'})
    src = tmp_path / "tools.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg, store, snap = run_ingest(make_config, src, task=IT)
    with pytest.raises(ContractViolation) as e:
        validate(cfg, snap, store)
    first = str(e.value).splitlines()[0]
    assert "conversation_well_formed" in first and "tools.jsonl row 3" in first
    assert "row 3: \"message 2: unknown role 'function_call'\"" in first
    cfg, store, snap = run_ingest(make_config, src, task=IT, data=QUARANTINE)
    report = validate(cfg, snap, store)
    assert report.success and report.quarantined_rows == 1
    q = pd.read_parquet(report.quarantine_table)
    assert list(q["_row"]) == [3] and "'function_call'" in q.loc[0, "_reasons"]


def test_openai_messages_with_from_value_keys_and_alpaca_arrays(tmp_path, make_config):
    mixed = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"from": "human", "value": r["text"]},
                {"from": "assistant", "value": r["label"]},
            ]
        }
        for r in make_rows(4)
    ]
    src = tmp_path / "mixed.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in mixed))
    cfg, store, snap = run_ingest(make_config, src, task=IT)
    roles = [[m["role"] for m in json.loads(x)] for x in pd.read_parquet(snap.table)["messages"]]
    assert set(map(tuple, roles)) == {("system", "user", "assistant")}
    assert validate(cfg, snap, store).success
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(
        json.dumps(
            [
                {"instruction": "Label the sentiment.", "input": r["text"], "output": r["label"]}
                for r in make_rows(4)
            ]
        )
    )
    _, _, snap = run_ingest(make_config, alpaca, task=IT)
    first = json.loads(pd.read_parquet(snap.table)["messages"][0])
    assert [m["role"] for m in first] == ["user", "assistant"] and snap.rows == 12


# --------------------------------------------------------------------------- translation

EN_FR = [
    ("Wash your hands often.", "Lavez-vous souvent les mains."),
    ("Keep a distance of one metre.", "Gardez une distance d'un mètre."),
    ("Cover your mouth when you cough.", "Couvrez-vous la bouche quand vous toussez."),
    ("Stay at home if you feel unwell.", "Restez chez vous si vous vous sentez mal."),
    ("The vaccine is free.", "Le vaccin est gratuit."),
    ("Call your doctor first.", "Appelez d'abord votre médecin."),
    ("Wear a mask on public transport.", "Portez un masque dans les transports publics."),
    ("Fever is a common symptom.", "La fièvre est un symptôme courant."),
    ("Open the windows to air the room.", "Ouvrez les fenêtres pour aérer la pièce."),
    ("Avoid touching your face.", "Évitez de vous toucher le visage."),
    ("Tests are available at the pharmacy.", "Des tests sont disponibles en pharmacie."),
    ("Children can go to school.", "Les enfants peuvent aller à l'école."),
]
TRANSLATION = {"type": "translation", "source_language": "en", "target_language": "fr"}


def tu(en: str | None, fr: str | None, lang_attr: str = "xml:lang") -> str:
    tuvs = [
        f'<tuv {lang_attr}="{code}"><seg>{text}</seg></tuv>'
        for code, text in (("en", en), ("fr", fr))
        if text is not None
    ]
    return f"<tu>{''.join(tuvs)}</tu>"


def tmx(units: list[str], doctype: str = "") -> str:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"{doctype}"
        '<tmx version="1.4">\n'
        '<header creationtool="Uplug" datatype="PlainText" segtype="sentence" adminlang="en"'
        ' srclang="en" o-tmf="unknown"/>\n<body>\n' + "\n".join(units) + "\n</body>\n</tmx>\n"
    )


def tr_config(make_config, source, **over):
    return make_config(source, **merge_sections({"task": TRANSLATION}, over))


def test_tmx_pairs_become_translation_conversations(tmp_path, make_config, tiny_causal_model):
    units = [tu(en, fr) for en, fr in EN_FR]
    units[1] = tu(*EN_FR[1], lang_attr="lang")  # TMX 1.1
    units[2] = (  # inline codes dropped with their contents, <hi> text kept
        '<tu tuid="3"><prop type="note">doc 7</prop>'
        '<tuv xml:lang="EN"><seg>Cover your <bpt i="1">&lt;b&gt;</bpt>mouth<ept i="1">'
        '&lt;/b&gt;</ept> when you <ph x="2">{1}</ph> cough.</seg></tuv>'
        '<tuv xml:lang="FR"><seg>Couvrez-vous la <hi type="b">bouche</hi> quand vous '
        "toussez.</seg></tuv></tu>"
    )
    src = tmp_path / "en-fr.tmx"
    src.write_text(tmx(units, '<!DOCTYPE tmx SYSTEM "tmx14.dtd">\n'))
    model = {"name_or_path": str(tiny_causal_model)}
    cfg = tr_config(make_config, src, data={"extra_columns": "error"}, model=model)
    store = Store(cfg.store.root)
    snap = ingest(cfg, store)
    df = pd.read_parquet(snap.table)
    assert snap.rows == 12 and snap.label_counts == {"pairs": 12}
    assert list(df["_row"]) == list(range(1, 13))
    assert json.loads(df["messages"][0]) == [
        {
            "role": "user",
            "content": "Translate the following text from English to French.\n\n"
            "Wash your hands often.",
        },
        {"role": "assistant", "content": "Lavez-vous souvent les mains."},
    ]
    assert df["source_text"][1] == EN_FR[1][0], "lang= (TMX 1.1)"
    assert df["source_text"][2] == "Cover your mouth when you cough."
    assert df["reference"][2] == df["target_text"][2] == EN_FR[2][1]
    assert df["text"][0].endswith("\n\nWash your hands often.")
    assert not [n for n in snap.notes if "not used" in n], snap.notes
    assert validate(cfg, snap, store).success
    splits = preprocess(cfg, snap, store)  # instruction_tuning's tokenizing, inherited
    assert sum(s.label_counts["pairs"] for s in splits.splits.values()) == 12
    test = pd.read_parquet(splits.splits["test"].path)
    assert {"messages", "labels", "reference", "answer_tokens"} <= set(test.columns)


def test_language_columns_match_ignoring_case_and_region(tmp_path, make_config):
    src = tmp_path / "pairs.tsv"
    src.write_text("EN-us\tfr_FR\tnote\n" + "".join(f"{en}\t{fr}\tx\n" for en, fr in EN_FR))
    cfg = tr_config(make_config, src)
    snap = ingest(cfg, Store(cfg.store.root))
    df = pd.read_parquet(snap.table)
    assert df["target_text"][0] == EN_FR[0][1]
    assert [n for n in snap.notes if "not used" in n] == [
        "column(s) not used by translation, left out: note"
    ]
    both = tmp_path / "both.tsv"
    both.write_text("en-US\ten-GB\tfr\n" + "".join(f"{en}\t{en}\t{fr}\n" for en, fr in EN_FR))
    with pytest.raises(DataError) as e:
        ingest(tr_config(make_config, both), Store(cfg.store.root))
    assert str(e.value) == (
        f"{both}: task.source_language 'en' matches columns 'en-US' and 'en-GB'; rule: one "
        "column per language (set data.source_text_column to choose)"
    )
    chosen = tr_config(make_config, both, data={"source_text_column": "en-GB"})
    assert ingest(chosen, Store(cfg.store.root)).rows == 12
    named = tmp_path / "named.csv"
    pd.DataFrame(EN_FR, columns=["english", "french"]).to_csv(named, index=False)
    with pytest.raises(DataError, match=r"named\.csv: no column for task\.source_language 'en'"):
        ingest(tr_config(make_config, named), Store(cfg.store.root))
    explicit = tr_config(
        make_config, named, data={"source_text_column": "english", "target_text_column": "french"}
    )
    assert ingest(explicit, Store(cfg.store.root)).label_counts == {"pairs": 12}


def test_tmx_unit_missing_a_language_is_a_row_failure(tmp_path, make_config):
    units = [tu(en, fr) for en, fr in EN_FR]
    units[4] = tu(EN_FR[4][0], None)  # no French tuv (row 5)
    src = tmp_path / "gap.tmx.gz"
    src.write_bytes(gzip.compress(tmx(units).encode()))
    cfg = tr_config(make_config, src)
    store = Store(cfg.store.root)
    snap = ingest(cfg, store)
    assert snap.rows == 12 and snap.label_counts == {"pairs": 11}
    with pytest.raises(ContractViolation) as e:
        validate(cfg, snap, store)
    first = str(e.value).splitlines()[0]
    assert "pair_complete" in first and "gap.tmx.gz row 5" in first
    assert "no target text (fr): missing or empty" in first
    cfg = tr_config(make_config, src, data=QUARANTINE)
    report = validate(cfg, ingest(cfg, store), store)
    assert report.success and report.quarantined_rows == 1


def test_duplicates_are_repeated_pairs_not_repeated_sources(tmp_path, make_config):
    pairs = EN_FR + [(EN_FR[0][0], "Lavez vos mains souvent.")] * 1 + [EN_FR[1]] * 2
    src = tmp_path / "dupes.tmx"
    src.write_text(tmx([tu(en, fr) for en, fr in pairs]))
    cfg = tr_config(make_config, src)
    store = Store(cfg.store.root)
    snap = ingest(cfg, store)
    rows = get_task_type("translation").contract_tables(pd.read_parquet(snap.table), [], cfg)[
        "rows"
    ]
    assert list(rows["_is_duplicate"][12:]) == [0.0, 1.0, 1.0]
    with pytest.raises(ContractViolation, match="duplicate_share"):
        validate(cfg, snap, store)


@pytest.mark.parametrize(
    "name, text, expected",
    [
        (
            "mismatched.tmx",
            tmx([tu("Hello.", "Bonjour.")]).replace("</seg></tuv></tu>", "</tuv></tu>", 1),
            r"line 5, column \d+: not well-formed XML \(mismatched tag\); rule: data.format tmx",
        ),
        (
            "cut.tmx",
            tmx([tu("Hello.", "Bonjour.")])[:-20],
            r"line \d+, column \d+: not well-formed XML \((no element found|unclosed token)\) "
            r"\(the file ends before its elements close: truncated\?\)",
        ),
        (
            "bomb.tmx",
            '<?xml version="1.0"?>\n<!DOCTYPE tmx [\n <!ENTITY lol "lol">\n'
            ' <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">\n]>\n'
            "<tmx><body><tu><tuv xml:lang='en'><seg>&lol2;</seg></tuv></tu></body></tmx>\n",
            r"line 3: the XML declares entity 'lol'; rule: TMX input may not declare entities",
        ),
        (
            "external.tmx",
            '<?xml version="1.0"?>\n<!DOCTYPE tmx [<!ENTITY x SYSTEM "file:///etc/passwd">]>\n'
            "<tmx><body><tu><tuv xml:lang='en'><seg>&x;</seg></tuv></tu></body></tmx>\n",
            r"line 2: the XML declares entity 'x'",
        ),
        (
            "xliff.tmx",
            '<?xml version="1.0"?>\n<xliff version="1.2"><file/></xliff>\n',
            r"line 2: the root element is <xliff>, not <tmx>",
        ),
        (
            "empty_body.tmx",
            tmx([]),
            r"no <tu> translation units; rule: data.format tmx reads TMX files",
        ),
    ],
)
def test_broken_tmx_is_one_line_naming_the_file_and_line(
    tmp_path, make_config, name, text, expected
):
    src = tmp_path / name
    src.write_text(text)
    with pytest.raises(DataError) as e:
        ingest(tr_config(make_config, src), Store(tmp_path / "s"))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{src}: ")
    assert re.search(expected, msg), msg


def test_translation_config_needs_its_languages():
    base = {"name": "uc", "data": {"source": "pairs.tmx"}}
    with pytest.raises(ConfigError) as e:
        load_config(data={**base, "task": {"type": "translation", "source_language": "en"}})
    problems = str(e.value).splitlines()[1:]
    assert problems == [
        "  task.target_language: required for task.type translation; rule: a language code "
        "such as en, fr, de, pt-BR"
    ]
    with pytest.raises(ConfigError, match="task.source_language: .*not a language code"):
        load_config(data={**base, "task": {**TRANSLATION, "source_language": "English (US)"}})
    with pytest.raises(ConfigError, match="task.target_language: 'EN' is the source language"):
        load_config(data={**base, "task": {**TRANSLATION, "target_language": "EN"}})
    cfg = load_config(data={**base, "task": TRANSLATION})
    assert cfg.evaluation.primary_metric == "chrf" and cfg.data.source_text_column is None
    # other task types ignore the languages
    assert load_config(data={**base, "task": {"type": "causal_lm"}}).task.source_language is None


def test_translation_metrics_chrf_first_on_bleus_scale():
    task = get_task_type("translation")
    assert task.metrics == ("chrf", "bleu", "rougeL") and not task.lower_is_better
    refs = [fr for _, fr in EN_FR]
    perfect = task.compute_metrics(refs, refs, [])
    assert list(perfect) == ["chrf", "bleu", "rougeL"]
    assert perfect["chrf"] == pytest.approx(1.0) and perfect["bleu"] == pytest.approx(1.0)
    worse = task.compute_metrics([r[:-8] for r in refs], refs, [])
    assert 0.0 < worse["chrf"] < 1.0

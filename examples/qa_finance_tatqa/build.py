"""Rebuild the TAT-QA extractive extract: the text-span questions, in SQuAD's nested JSON, gzipped.

    git clone https://github.com/NExTplusplus/TAT-QA
    python examples/qa_finance_tatqa/build.py TAT-QA

TAT-QA (Zhu et al., ACL 2021; CC BY 4.0) asks questions about hybrid contexts from company
annual reports: one table and the paragraphs around it. This script keeps exactly the questions
that TAT-QA itself labels as extractive QA over the text: ``answer_type == "span"`` and
``answer_from == "text"`` (one answer string, copied by the annotator from a paragraph). Every
other question (arithmetic, counting, multi-span, table cells) needs the table or a calculation
and is left out.

Each kept hybrid context becomes one SQuAD article (``title``: the table's uid) with one
paragraph whose ``context`` is all the context's paragraphs, in their ``order``, joined by a
newline: the model reads the whole text, not only the paragraph the annotator marked. The table
is left out (no kept answer comes from it). Each question keeps its ``uid`` as ``id`` and its
text unchanged. TAT-QA gives answers as strings, without offsets; the offset is found here:

- the first occurrence of the answer in the lowest-``order`` paragraph of the question's
  ``rel_paragraphs`` that contains it (all kept answers occur in a relevant paragraph);
- where the answer is not in the text as written, it is looked for ignoring letter case
  (annotators capitalised the first letter of 35 answers: "Annual basis" for "annual basis");
  the answer text is then the context's slice, which differs from TAT-QA's only in case, so
  SQuAD's EM and F1 (which lower-case both sides) are unchanged.

A question whose answer is found neither way would stop the script (none does in the files
below). Files (from ``dataset_raw/``, checked by SHA-256):

    tatqa_dataset_dev.json        -> tatqa-span-text.dev.json.gz   (official dev split)
    tatqa_dataset_test_gold.json  -> tatqa-span-text.test.json.gz  (official test split, gold)

The official train split (``tatqa_dataset_train.json``) is over the 4 MiB limit of the
repository snapshots this was built from; pass ``--train`` with it to also write
``tatqa-span-text.train.json.gz`` the same way. Contexts and questions keep the source's order; the
output is gzip with no name and no timestamp, so every run gives the same bytes.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = {
    "dev": (
        "tatqa_dataset_dev.json",
        "8da095a819af6db3c14877c6df2d4d29960e41d1a63dd1fa853507bd2a616af5",
    ),
    "test": (
        "tatqa_dataset_test_gold.json",
        "c4d08418359c1d76468dec420ee748a37f48c06b63cb8ec2766f19d5d314b597",
    ),
}
VERSION = "tatqa-1.0-span-text"


def locate(answer: str, paragraphs: dict[int, str], relevant: list[int]) -> tuple[int, int, bool]:
    """(paragraph order, character offset in it, found only ignoring case) of ``answer``."""
    for ignore_case in (False, True):
        for order in sorted(relevant):
            text = paragraphs.get(order, "")
            hay, needle = (text.lower(), answer.lower()) if ignore_case else (text, answer)
            at = hay.find(needle)
            if at >= 0:
                return order, at, ignore_case
    raise SystemExit(f"answer {answer!r} is in none of paragraphs {relevant}")


def convert(source: list[dict], split: str) -> tuple[dict, dict[str, int]]:
    articles = []
    stats = {"contexts": len(source), "questions": 0, "kept": 0, "recased": 0, "repeated": 0}
    for item in source:
        stats["questions"] += len(item["questions"])
        paragraphs = {int(p["order"]): p["text"] for p in item["paragraphs"]}
        orders = sorted(paragraphs)
        starts, at = {}, 0
        for order in orders:
            starts[order] = at
            at += len(paragraphs[order]) + 1
        context = "\n".join(paragraphs[o] for o in orders)
        qas = []
        for q in sorted(item["questions"], key=lambda q: q["order"]):
            if (q["answer_type"], q["answer_from"]) != ("span", "text"):
                continue
            (answer,) = q["answer"]
            relevant = [int(r) for r in q["rel_paragraphs"]] or orders
            order, offset, recased = locate(answer, paragraphs, relevant)
            start = starts[order] + offset
            text = context[start : start + len(answer)]
            assert text.lower() == answer.lower()
            stats["recased"] += recased
            stats["repeated"] += context.lower().count(answer.lower()) > 1
            qas.append(
                {
                    "id": q["uid"],
                    "question": q["question"],
                    "answers": [{"text": text, "answer_start": start}],
                }
            )
        if qas:
            stats["kept"] += len(qas)
            title = item["table"]["uid"]
            articles.append({"title": title, "paragraphs": [{"context": context, "qas": qas}]})
    stats["kept_contexts"] = len(articles)
    return {"version": VERSION, "data": articles}, stats


def write(name: str, doc: dict) -> None:
    text = json.dumps(doc, ensure_ascii=False)
    with (HERE / name).open("wb") as f, gzip.GzipFile("", "wb", fileobj=f, mtime=0) as gz:
        gz.write(text.encode("utf-8"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo", type=Path, help="a clone of NExTplusplus/TAT-QA")
    parser.add_argument("--train", type=Path, help="tatqa_dataset_train.json, if you have it")
    args = parser.parse_args()
    jobs = [
        (split, args.repo / "dataset_raw" / name, sha) for split, (name, sha) in SOURCES.items()
    ]
    if args.train:
        jobs.append(("train", args.train, None))
    for split, path, sha in jobs:
        raw = path.read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        if sha and digest != sha:
            raise SystemExit(f"{path}: SHA-256 {digest}, expected {sha} (another version?)")
        doc, stats = convert(json.loads(raw), split)
        write(f"tatqa-span-text.{split}.json.gz", doc)
        print(
            f"{split}: {stats['questions']} questions over {stats['contexts']} contexts -> "
            f"kept {stats['kept']} span/text questions over {stats['kept_contexts']} contexts "
            f"({stats['recased']} located ignoring case, {stats['repeated']} whose answer "
            "occurs more than once in the context)"
        )


if __name__ == "__main__":
    main()

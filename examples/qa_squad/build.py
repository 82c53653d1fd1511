"""Rebuild the SQuAD v1.1 extract: whole articles, SQuAD's nested JSON, gzipped.

    python examples/qa_squad/build.py /path/to/dev-v1.1.json

The argument is an official SQuAD v1.1 file (https://rajpurkar.github.io/SQuAD-explorer/), as
`.json`, `.json.zip` or `.json.gz`. It is identified by its MD5: the committed extract was built
from the official dev file (dev-v1.1.json, 48 articles, 10,570 questions), because the 30 MB
train file could not be fetched; passing the official train file (train-v1.1.json) builds the
same kind of extract from training articles instead.

Articles are shuffled with a fixed seed and taken whole, in that order, into the training extract
until it holds at least TRAIN_QUESTIONS questions, then into the validation extract until it holds
at least VALIDATION_QUESTIONS. Inside each file the articles keep the order of the source file,
and every article, paragraph, question and answer is copied unchanged:

    squad-v1.1.train.json.gz        squad-v1.1.validation.json.gz

Each is `{"version": "1.1", "data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}`.
The gzip members have no name and no timestamp, so every run gives the same bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import sys
import zipfile
from pathlib import Path

SEED = 20161
TRAIN_QUESTIONS = 3000
VALIDATION_QUESTIONS = 1000
KNOWN = {
    "3e85deb501d4e538b6bc56f786231552": "dev-v1.1.json",
    "981b29407e0affa3b1b156f72073b945": "train-v1.1.json",
}
HERE = Path(__file__).resolve().parent


def read_source(path: Path) -> bytes:
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as z:
            name = next(n for n in z.namelist() if n.endswith(".json"))
            return z.read(name)
    if path.suffix == ".gz":
        return gzip.decompress(path.read_bytes())
    return path.read_bytes()


def questions(article: dict) -> int:
    return sum(len(p["qas"]) for p in article["paragraphs"])


def write(name: str, version: str, articles: list[dict]) -> None:
    text = json.dumps({"version": version, "data": articles}, ensure_ascii=False)
    out = HERE / name
    with out.open("wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as gz:
        gz.write(text.encode("utf-8"))
    n_par = sum(len(a["paragraphs"]) for a in articles)
    n_q = sum(questions(a) for a in articles)
    print(f"{name}: {len(articles)} articles, {n_par} paragraphs, {n_q} questions")


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    raw = read_source(Path(sys.argv[1]))
    md5 = hashlib.md5(raw).hexdigest()
    if md5 not in KNOWN:
        raise SystemExit(f"MD5 {md5} is not an official SQuAD v1.1 file ({', '.join(KNOWN)})")
    squad = json.loads(raw)
    articles = squad["data"]
    print(f"source: {KNOWN[md5]}, {len(articles)} articles")
    order = list(range(len(articles)))
    random.Random(SEED).shuffle(order)
    picked: dict[str, list[int]] = {"train": [], "validation": []}
    counts = {"train": 0, "validation": 0}
    goals = {"train": TRAIN_QUESTIONS, "validation": VALIDATION_QUESTIONS}
    for i in order:
        split = "train" if counts["train"] < goals["train"] else "validation"
        if counts[split] >= goals[split]:
            break
        picked[split].append(i)
        counts[split] += questions(articles[i])
    for split, indices in picked.items():
        write(
            f"squad-v1.1.{split}.json.gz", squad["version"], [articles[i] for i in sorted(indices)]
        )


if __name__ == "__main__":
    main()

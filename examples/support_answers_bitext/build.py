"""Rebuild the Bitext customer-support extract: the publisher's 4,514-row CSV, gzipped.

    git clone https://github.com/bitext/customer-support-llm-chatbot-training-dataset bitext
    git -C bitext show 337b96868e02b40a05f9c0df3290c65a15ea573e:data/train/Bitext_Sample_Customer_Support_Training_Dataset.csv > bitext.csv
    python examples/support_answers_bitext/build.py bitext.csv

The file is the version Bitext published in its own repository on 2023-09-19 (commit 337b968,
CDLA-Sharing-1.0). Later the same day it was replaced by the 26,872-row
`Bitext_Sample_Customer_Support_Training_Dataset_27K_responses-v11.csv`, which has different
columns. This script checks that the input is that exact file (SHA-256), parses it as CSV to
count and check the rows, and writes it unchanged, byte for byte, as a gzip member with no name
and no timestamp, so every run gives the same bytes:

    Bitext_Sample_Customer_Support_Training_Dataset.csv.gz

Nothing is sampled, reordered or edited. Read it with `pandas.read_csv(path)` or
`csv.DictReader(gzip.open(path, "rt", encoding="utf-8", newline=""))`.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import sys
from pathlib import Path

SHA256 = "079b0cec48d34c319c9877b6d178390bf7187a7f7a604958e0ed5a096bba5af6"
COLUMNS = [
    "context",
    "role",
    "instruction",
    "intent",
    "entity_type",
    "entity_value",
    "start_offset",
    "end_offset",
    "category",
    "tags",
    "response",
]
ROWS = 4514
OUT = Path(__file__).resolve().with_name("Bitext_Sample_Customer_Support_Training_Dataset.csv.gz")


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    raw = Path(sys.argv[1]).read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"SHA-256 {digest} is not the 2023-09-19 file ({SHA256}); see --help")
    reader = csv.DictReader(io.StringIO(raw.decode("utf-8"), newline=""))
    rows = list(reader)
    if reader.fieldnames != COLUMNS or len(rows) != ROWS:
        raise SystemExit(f"unexpected layout: {reader.fieldnames}, {len(rows)} rows")
    if any(not r["instruction"].strip() or not r["response"].strip() for r in rows):
        raise SystemExit("a row has an empty instruction or response")
    with OUT.open("wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as gz:
        gz.write(raw)
    print(f"{len(rows)} rows, {len(raw):,} bytes -> {OUT.name} ({OUT.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()

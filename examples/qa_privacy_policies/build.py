"""Rebuild the PolicyQA extract: the official dev and test splits, SQuAD JSON, gzipped.

    git clone https://github.com/wasiahmad/PolicyQA
    python examples/qa_privacy_policies/build.py PolicyQA

The argument is a checkout of the PolicyQA repository. The script reads `data/dev.json` and
`data/test.json` (SQuAD v1 layout), checks them against the SHA-256 of the published files and
their question counts, and writes each one unchanged, byte for byte, as a gzip member with no
name and no timestamp, so every run gives the same bytes:

    policyqa.dev.json.gz     (20 policies, 3,809 questions: train on this)
    policyqa.test.json.gz    (20 policies, 4,152 questions: the official test split, whole)

The official train split (`data/train.json`, 75 policies, 17,056 questions) is larger than the
repository snapshots available when this extract was made and is not included; nothing is
sampled.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
from pathlib import Path

FILES = {
    "dev": ("5ced8cbe6617c132999a57b3ab910fc242501357fc99cbc5a1802f0a1b9ce4bf", 20, 3809),
    "test": ("92929068b7dffa1843f81d661f23da86a64f4a35ffae59fa8d78878277ab9a7f", 20, 4152),
}
HERE = Path(__file__).resolve().parent


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    data = Path(sys.argv[1]) / "data"
    for split, (sha256, policies, questions) in FILES.items():
        raw = (data / f"{split}.json").read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        if digest != sha256:
            raise SystemExit(f"{split}.json: SHA-256 {digest}, expected {sha256}")
        squad = json.loads(raw)
        n_q = sum(len(p["qas"]) for a in squad["data"] for p in a["paragraphs"])
        if (len(squad["data"]), n_q) != (policies, questions):
            raise SystemExit(f"{split}.json: {len(squad['data'])} policies, {n_q} questions")
        out = HERE / f"policyqa.{split}.json.gz"
        with out.open("wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as gz:
            gz.write(raw)
        print(f"{split}: {policies} policies, {n_q} questions -> {out.name}")


if __name__ == "__main__":
    main()

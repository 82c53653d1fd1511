"""Rebuild the TICO-19 English->French extract: the official dev and test splits as TMX.

    python examples/translation_healthcare_en_fr/build.py /path/to/tico-19.github.io

The argument is a checkout of https://github.com/tico-19/tico-19.github.io (CC0). The script
reads `data/TM/all.en-fr.tmx` (or `data/TM/all.en-fr.tmx.zip`), the 3,071 translation units of
the benchmark, and writes them back out unchanged, split into the benchmark's official
development set (971 units) and test set (2,100 units):

    tico19.en-fr.dev.tmx    tico19.en-fr.test.tmx

and copies the two CC0 COVID-19 term lists for French (`data/terminologies/f_en-fr_XX.csv`,
Facebook; `data/terminologies/g_en_fr-FR.csv`, Google) into `terminology/`.

The TMX files carry no split. The official split is by document: the dev set is the twelve
documents in DEV_DOCUMENTS plus the 37 CMU medical phrases in DEV_CMU_PHRASES; every other unit
is test (README.md says where this list comes from). Each unit is copied byte for byte from the
source file, so the entities, spacing and the few odd segments of the original stay as they are.
Nothing is random: units keep the order of the source file.
"""

from __future__ import annotations

import re
import shutil
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

DEV_DOCUMENTS = frozenset(
    {
        "PubMed_9",
        "PubMed_10",
        "Wikinews_2",
        "Wikinews_5",
        "Wikipedia_handpicked_5",
        "Wikisource_1",
        "Wikivoyage_1",
        "wiki_5",
        "wiki_11",
        "wiki_13",
        "wiki_26",
        "wiki_29",
    }
)
DEV_CMU_PHRASES = frozenset(
    f"CMU_1:{n}"
    for n in (6, 7, 11, 12, 21, 22, 28, 32, 34, 39, 42, 48, 52, 59, 62, 67, 68, 75, 77)
    + (78, 85, 88, 94, 95, 96, 100, 101, 104, 105, 107, 112, 119, 125, 126, 129, 132, 138)
)
EXPECTED = {"dev": 971, "test": 2100}

TU = re.compile(r'<tu tuid="([^"]+)">.*?</tu>\n', re.DOTALL)
XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"


def read_tmx(repo: Path) -> str:
    tm = repo / "data" / "TM"
    plain, zipped = tm / "all.en-fr.tmx", tm / "all.en-fr.tmx.zip"
    if plain.exists():
        return plain.read_text(encoding="utf-8")
    if zipped.exists():
        with zipfile.ZipFile(zipped) as z:
            name = next(n for n in z.namelist() if n.endswith("all.en-fr.tmx"))
            return z.read(name).decode("utf-8")
    raise SystemExit(f"neither {plain} nor {zipped} exists: pass a tico-19.github.io checkout")


def split_of(tuid: str) -> str:
    if tuid in DEV_CMU_PHRASES or tuid.split(":", 1)[0] in DEV_DOCUMENTS:
        return "dev"
    return "test"


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    repo = Path(sys.argv[1])
    text = read_tmx(repo)
    body_at = text.index("<body>") + len("<body>\n")
    head = text[:body_at]
    units: dict[str, list[str]] = {"dev": [], "test": []}
    for m in TU.finditer(text, body_at):
        units[split_of(m.group(1))].append(m.group(0))
    for split, rows in units.items():
        if len(rows) != EXPECTED[split]:
            raise SystemExit(f"{split}: {len(rows)} units, expected {EXPECTED[split]}")
        out = HERE / f"tico19.en-fr.{split}.tmx"
        out.write_text(head + "".join(rows) + "</body>\n</tmx>\n", encoding="utf-8")
        parsed = ET.parse(out).getroot().findall("body/tu")
        langs = {tuple(v.get(XML_LANG) for v in tu.findall("tuv")) for tu in parsed}
        assert len(parsed) == len(rows) and langs == {("en", "fr")}, (out, langs)
        print(f"{split}: {len(rows)} translation units -> {out.name}")
    terms = HERE / "terminology"
    terms.mkdir(exist_ok=True)
    for name in ("f_en-fr_XX.csv", "g_en_fr-FR.csv"):
        shutil.copyfile(repo / "data" / "terminologies" / name, terms / name)
        print(f"terminology/{name}")


if __name__ == "__main__":
    main()

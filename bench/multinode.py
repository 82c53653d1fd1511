"""Two hosts over SSH against one host, on real data: BBC news topics with all-MiniLM-L6-v2,
DeepSpeed's pdsh launcher reaching 127.0.0.1 and 127.0.0.2 (one sshd on a free port of
each, as in tests/training/test_multinode.py), one gloo CPU rank per host, against two
ranks on one host with the same global batch, side by side in this process.

Prints, for ZeRO-2 and ZeRO-3:
1. training seconds on two hosts and on one host, and their ratio (the cost of going
   through SSH + pdsh + TCP gloo instead of one host's shared-memory all-reduce);
2. the largest weight difference between the two saved models (goal: < 1e-5, fp32), against
   the largest change training made to a weight;
3. the parameter elements each rank held (ZeRO-3: about half each);
then, for ZeRO-2 on two hosts, the rank on 127.0.0.2 SIGKILLed right after the first
checkpoint: seconds until every process of the launch on both hosts was gone, the steps
lost, and the resumed run's largest weight difference from the uninterrupted one.

    python bench/multinode.py                 # 40 steps, a checkpoint every 10
    python bench/multinode.py --steps 20 --every 5 --skip kill
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _config(store: Path, steps: int, every: int, zero: int, hosts=None, hostfile=None):
    import yaml

    from domaintune.runconfig import validate_config

    doc = yaml.safe_load((ROOT / "configs" / "bbc_news.yaml").read_text())
    where = (
        {"num_nodes": 2, "hostfile": str(hostfile), "ssh_config": str(hosts.ssh_config)}
        if hosts
        else {"cpu_processes": 2}
    )
    doc["store"] = {"root": str(store)}
    doc["training"] = {
        **doc.get("training", {}),
        "max_length": 64,
        "batch_size": 8,
        "global_batch_size": 16,
        "max_steps": steps,
        "checkpoint_every_steps": every,
        "early_stopping_patience": None,
        "precision": "fp32",
        "deepspeed": {"zero_stage": zero},
        **where,
    }
    doc.setdefault("evaluation", {})["val_size"] = 0.03
    return validate_config(doc)


def _train(cfg):
    from domaintune.storage.store import Store
    from domaintune.tasks import finetune as finetune_stage
    from domaintune.tasks.ingest import ingest
    from domaintune.tasks.preprocess import preprocess

    store = Store(cfg.store.root)
    splits = preprocess(cfg, ingest(cfg, store), store)
    t0 = time.perf_counter()
    try:
        return finetune_stage.finetune(cfg, splits, store), time.perf_counter() - t0
    except Exception as exc:
        return exc, time.perf_counter() - t0


def _learned(model) -> float:
    """The largest change training made to an encoder weight."""
    from transformers import AutoModelForSequenceClassification

    trained = AutoModelForSequenceClassification.from_pretrained(model.model_dir).state_dict()
    from domaintune.chaining import resolve_model

    base = AutoModelForSequenceClassification.from_pretrained(
        resolve_model(model.base_model).path, num_labels=len(model.labels)
    ).state_dict()
    return max(
        (trained[k] - v).abs().max().item()
        for k, v in base.items()
        if k in trained and not k.startswith("classifier")
    )


def compare(work: Path, hosts, steps: int, every: int, zero: int) -> dict:
    from domaintune.training.checks import max_weight_difference

    hostfile = hosts.hostfile(work / "hostfile")
    store = work / f"store-zero{zero}"  # one store: ingest and preprocess once for both runs
    one, one_s = _train(_config(store, steps, every, zero))
    two, two_s = _train(_config(store, steps, every, zero, hosts, hostfile))
    for m in (one, two):
        if isinstance(m, Exception):
            raise m
    summary = json.loads((Path(two.model_dir) / "training_summary.json").read_text())
    return {
        "one_host_seconds": one.train_seconds,
        "two_hosts_seconds": two.train_seconds,
        "one_host_stage_seconds": one_s,
        "two_hosts_stage_seconds": two_s,
        "difference": max_weight_difference(two.model_dir, one.model_dir),
        "learned": _learned(two),
        "held": [r["parameter_elements"] for r in summary["ranks"]],
        "addresses": [r["ssh_address"] for r in summary["ranks"]],
        "total": two.total_parameters,
        "two": two,
    }


def kill_drill(work: Path, hosts, steps: int, every: int, reference) -> dict:
    from domaintune.training.checks import max_weight_difference
    from tests.training.test_multinode import _alive, _launch_processes, _rank

    cfg = _config(work / "store-kill", steps, every, 2, hosts, work / "hostfile")
    found: dict = {}

    def killer() -> None:
        root = Path(cfg.store.root) / "finetune" / ".work"
        deadline = time.time() + 1800
        while not list(root.glob("*/checkpoints/checkpoint-*/.domaintune-complete")):
            if time.time() > deadline:
                return
            time.sleep(0.05)
        spec = next(root.glob("*/spec.json"))
        rank1, env = _rank(spec, 1, deadline)
        procs = _launch_processes(spec)
        found["host"] = env["SSH_CONNECTION"].split()[2]
        found["time"] = time.time()
        rank1.send_signal(signal.SIGKILL)
        while any(_alive(p) for p in procs):
            time.sleep(0.05)
        found["ended_after"] = time.time() - found["time"]

    t = threading.Thread(target=killer)
    t.start()
    failed, _ = _train(cfg)
    t.join()
    assert isinstance(failed, Exception), "the kill came too late: the run completed"
    resumed, _ = _train(cfg)  # what the task's retry runs
    if isinstance(resumed, Exception):
        raise resumed
    first, second = resumed.attempts
    return {
        "host": found["host"],
        "ended_after": found["ended_after"],
        "message": str(failed).split(": training exited", 1)[-1][:160],
        "resumed_from": second["resumed_from"],
        "difference": max_weight_difference(resumed.model_dir, reference.model_dir),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--skip", default="", help="comma list of zero2,zero3,kill")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from domaintune.environment import configure_environment
    from tests.services import ssh_hosts, ssh_tools_missing

    missing = ssh_tools_missing()
    if missing:
        print(f"cannot run: {missing}")
        return 2
    configure_environment()
    skip = set(args.skip.split(","))
    work = Path(tempfile.mkdtemp(prefix="bench-multinode-"))
    print(f"work folder {work}; {args.steps} steps, global batch 16 (8 per rank x 2 ranks)")
    results: dict = {}
    with ssh_hosts(work / "ssh") as hosts:
        for zero in (2, 3):
            if f"zero{zero}" in skip:
                continue
            r = results[zero] = compare(work, hosts, args.steps, args.every, zero)
            print(
                f"ZeRO-{zero}: training {r['two_hosts_seconds']:.1f} s on two hosts "
                f"({', '.join(r['addresses'])}) vs {r['one_host_seconds']:.1f} s on one host: "
                f"ratio {r['two_hosts_seconds'] / r['one_host_seconds']:.2f} (finetune stage "
                f"{r['two_hosts_stage_seconds']:.1f} vs {r['one_host_stage_seconds']:.1f} s); "
                f"largest weight difference {r['difference']:.2e} (goal < 1e-5; training moved "
                f"weights by up to {r['learned']:.2e}); parameter elements held per rank "
                f"{r['held']} of {r['total']:,}",
                flush=True,
            )
        if "kill" not in skip and 2 in results:
            k = kill_drill(work, hosts, args.steps, args.every, results[2]["two"])
            print(
                f"ZeRO-2 on two hosts, rank on {k['host']} SIGKILLed after the first "
                f"checkpoint: every process of the launch on both hosts gone "
                f"{k['ended_after']:.1f} s after the kill; the task said: ...{k['message']}; "
                f"the retry resumed from {k['resumed_from']}; largest weight difference from "
                f"the uninterrupted two-host run {k['difference']:.2e}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

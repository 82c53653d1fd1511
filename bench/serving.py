"""Serving figures, side by side in one run: PyTorch vs ONNX vs int8 ONNX, and the model behind
MLflow's model server under load.

For each config (default: the demo, configs/bbc_news.yaml, and the finance model,
configs/finance_sentiment.yaml, skipped when ../shared/datasets is absent):

1. ``domaintune run CONFIG --set export.formats=[onnx,onnx-int8]`` into a bench store (trained
   once, Cached after; the flow's export and register path), then ``domaintune export`` of
   the version again in a process of its own (its entries removed first): each export
   checked on the test split and timed beside the PyTorch model as ``domaintune predict``
   runs it (bf16 autocast where the CPU has it), in one process;
2. the table: test metric, identical predictions, one text p50 / p95, batches of 32
   texts/s, and the ratios to PyTorch (goal: int8 one text <= 0.5x, batch >= 2x, metric
   within 0.5 points);
3. ``domaintune serve-model NAME@vNNNN --runtime R`` (``mlflow models serve``; R: int8 where
   it was verified, else onnx) on 127.0.0.1:
   its answers on the test texts against ``domaintune predict``'s, then ``--clients``
   concurrent clients sending one text each for ``--seconds``: p50 / p95 and requests/s.

    .venv/bin/python bench/serving.py                       # both configs
    .venv/bin/python bench/serving.py --configs configs/bbc_news.yaml --seconds 20
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def run_config(config: str, store: Path) -> dict:
    cmd = [PY, "-m", "domaintune.cli", "run", config, "--json",
           "--set", "export.formats=[onnx, onnx-int8]", "--set", f"store.root={store}"]  # fmt: skip
    t0 = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"{config}: run failed: {out.stdout[-1500:]}{out.stderr[-1500:]}")
    summary = json.loads(out.stdout)
    summary["_wall"] = time.time() - t0
    return summary


def _post(url: str, body: dict, timeout: float = 60.0) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def serve_and_load(
    name: str,
    version: str,
    store: Path,
    texts: list[str],
    clients: int,
    seconds: float,
    runtime: str,
) -> dict:
    from domaintune.serving.serve import free_port

    ref = f"{name}@{version}"
    pd.DataFrame({"text": texts}).to_csv(store / "bench-texts.csv", index=False)
    want_file = store / "bench-predict.parquet"
    subprocess.run(
        [PY, "-m", "domaintune.cli", "predict", ref, str(store / "bench-texts.csv"),
         "--store", str(store), "--out", str(want_file), "--text-column", "text",
         "--runtime", runtime],
        check=True, capture_output=True, cwd=ROOT, timeout=1800,
    )  # fmt: skip
    want = pd.read_parquet(want_file)
    port = free_port()
    log = open(store / "bench-server.log", "w")
    server = subprocess.Popen(
        [PY, "-m", "domaintune.cli", "serve-model", ref, "--store", str(store), "--port", str(port),
         "--runtime", runtime],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    t0 = time.time()
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.time() - t0 > 300:
                raise SystemExit(
                    f"server did not start: {(store / 'bench-server.log').read_text()[-2000:]}"
                )
            time.sleep(0.5)
        started = time.time() - t0
        # the whole test set in one request (the rows predict batched together), then in
        # requests of 64: dynamic int8 quantizes activations per batch, so its answers may
        # depend on which rows share a batch
        whole = _post(f"{base}/invocations", {"dataframe_records": [{"text": t} for t in texts]},
                      timeout=600)  # fmt: skip
        same_whole = float(
            np.mean(np.asarray([p["predicted"] for p in whole["predictions"]])
                    == want["predicted"].to_numpy())
        )  # fmt: skip
        got = []
        for i in range(0, len(texts), 64):
            answer = _post(f"{base}/invocations",
                           {"dataframe_records": [{"text": t} for t in texts[i : i + 64]]})  # fmt: skip
            got += [p["predicted"] for p in answer["predictions"]]
        same = float(np.mean(np.asarray(got) == want["predicted"].to_numpy()))
        latencies: list[float] = []
        errors: list[str] = []
        stop = time.time() + seconds

        def client(k: int) -> None:
            i = k
            while time.time() < stop:
                t = time.perf_counter()
                try:
                    _post(
                        f"{base}/invocations",
                        {"dataframe_records": [{"text": texts[i % len(texts)]}]},
                    )
                    latencies.append(time.perf_counter() - t)
                except Exception as exc:  # noqa: BLE001 - counted
                    errors.append(repr(exc))
                i += clients

        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        t_load = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 120)
        span = time.time() - t_load
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
    ms = np.asarray(latencies) * 1000
    return {
        "started_s": round(started, 1),
        "same_as_predict": same_whole,
        "same_in_requests_of_64": same,
        "rows": len(texts),
        "requests": len(latencies),
        "errors": len(errors),
        "p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
        "p95_ms": round(float(np.percentile(ms, 95)), 1) if len(ms) else None,
        "requests_per_s": round(len(latencies) / span, 1),
        "runtime": runtime,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="+",
                    default=["configs/bbc_news.yaml", "configs/finance_sentiment.yaml"])  # fmt: skip
    ap.add_argument("--store", default=str(ROOT / ".bench-serving"))
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from domaintune.exporting import machine_line

    print(f"machine: {machine_line()}; {time.strftime('%Y-%m-%d %H:%M')}")
    store = Path(args.store).resolve()
    for config in args.configs:
        if "finance" in config and not (ROOT / "../shared/datasets/finance_phrasebank").exists():
            print(f"\n{config}: skipped (../shared/datasets/finance_phrasebank is absent)")
            continue
        summary = run_config(config, store)
        name, version = summary["name"], summary["version"]
        # the figures: made again by `domaintune export` in a process of its own (the run's
        # export stage timed them inside the run's process, beside its Prefect server), so
        # this model's export entries are removed first; a refused format's one-line reason
        import shutil

        lineage = json.loads((store / "registry" / name / version / "lineage.json").read_text())
        for marker in (store / "export").glob("*/_COMPLETE.json"):
            if (
                json.loads(marker.read_text())["manifest"]["model_fingerprint"]
                == lineage["model"]["fingerprint"]
            ):
                shutil.rmtree(marker.parent)
        run_exports: dict = {}
        for fmt in ("onnx", "onnx-int8"):
            got = subprocess.run(
                [PY, "-m", "domaintune.cli", "export", f"{name}@{version}", "--format", fmt,
                 "--store", str(store), "--json"],
                capture_output=True, text=True, cwd=ROOT, timeout=3600,
            )  # fmt: skip
            doc = json.loads(got.stdout)
            run_exports[fmt] = (
                doc["exports"][fmt] if got.returncode == 0 else {"refused": doc["error"]}
            )
        reg = {"exports": run_exports}
        print(f"\n== {config}: {name} {version}, run {summary['_wall']:.0f} s")
        head = (f"{'runtime':10s} {'test metric':>22s} {'same':>6s} {'1 text p50':>10s} "
                f"{'p95':>7s} {'x torch':>7s} {'32/batch t/s':>12s} {'x torch':>7s} {'MB':>6s}")  # fmt: skip
        print(head)
        for fmt, e in reg["exports"].items():
            if e.get("refused"):
                print(f"{fmt:10s} refused: {e['refused']}")
                continue
            e = {**e, "bytes": e.get("bytes", 0)}
            p, lat = e["parity"], e["latency"]
            t, x = lat["torch"], lat["export"]
            if fmt == next(iter(reg["exports"])):
                print(f"{'torch':10s} {p['metric'] + ' ' + format(p['model'], '.4f'):>22s} {'':>6s} "
                      f"{t['single_p50_ms']:>10.2f} {t['single_p95_ms']:>7.2f} {1:>7.2f} "
                      f"{t['batch32_texts_per_s']:>12.1f} {1:>7.2f} {'':>6s}  ({t['precision']})")  # fmt: skip
            print(f"{fmt:10s} {p['metric'] + ' ' + format(p['export'], '.4f'):>22s} "
                  f"{p['identical_predictions']:>6.1%} {x['single_p50_ms']:>10.2f} "
                  f"{x['single_p95_ms']:>7.2f} {x['single_p50_ms'] / t['single_p50_ms']:>7.2f} "
                  f"{x['batch32_texts_per_s']:>12.1f} "
                  f"{x['batch32_texts_per_s'] / t['batch32_texts_per_s']:>7.2f} "
                  f"{e['bytes'] / 1e6:>6.1f}")  # fmt: skip
        test = json.loads((store / "registry" / name / version / "lineage.json").read_text())
        splits = json.loads(
            (store / "preprocess" / test["splits"]["key"] / "_COMPLETE.json").read_text()
        )["manifest"]
        texts = pd.read_parquet(splits["splits"]["test"]["path"], columns=["text"])["text"].tolist()
        runtime = next((f for f in ("onnx-int8", "onnx") if "parity" in run_exports[f]), "torch")
        served = serve_and_load(name, version, store, texts, args.clients, args.seconds, runtime)
        print(
            f"served (mlflow models serve, runtime {runtime}): ready in {served['started_s']} s; "
            f"{served['same_as_predict']:.1%} of {served['rows']} test texts answered as "
            f"`domaintune predict` (in one request; {served['same_in_requests_of_64']:.1%} in "
            f"requests of 64); {args.clients} clients x {args.seconds:.0f} s, one text per "
            f"request: {served['requests']} requests, {served['errors']} errors, p50 "
            f"{served['p50_ms']} ms, p95 {served['p95_ms']} ms, {served['requests_per_s']} req/s"
        )


if __name__ == "__main__":
    main()

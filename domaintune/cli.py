"""The ``domaintune`` command.

    domaintune run CONFIG.yaml [--set key.path=value ...] [--json]
    domaintune validate CONFIG.yaml [--set key.path=value ...] [--json]
    domaintune tune CONFIG.yaml [--trials N] [--set key.path=value ...] [--json]
    domaintune models list [NAME] | show NAME VERSION | promote NAME VERSION | rollback NAME
                   | health NAME
        [--store ROOT | --config CONFIG.yaml] [--json]
    domaintune predict MODEL INPUT... [--out FILE] [--store ROOT | --config CONFIG.yaml] [--json]

Exit codes: 0 success, 1 the run failed, 2 bad config or bad data (nothing trained).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from domaintune.errors import ContractViolation, DomainTuneError

log = logging.getLogger("domaintune.cli")


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s | %(levelname)-7s | %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger("domaintune")
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="domaintune", description="Fine-tune pretrained language models for your domains."
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text in (
        (
            "run",
            "run the retrain flow (ingest, validate, preprocess, finetune, evaluate, register)",
        ),
        ("validate", "ingest and validate the data against its contract; no training"),
        (
            "tune",
            "the tune flow: search training settings (tune.space) with Optuna on the "
            "validation split, then test and register the best model",
        ),
    ):
        c = sub.add_parser(name, help=help_text)
        c.add_argument("config", help="YAML config of the use case")
        if name == "tune":
            c.add_argument(
                "--trials",
                type=int,
                help="trials to finish (default tune.trials); the same search run again "
                "continues its study",
            )
        c.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config key, e.g. --set training.epochs=1 (repeatable)",
        )
        c.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        c.add_argument(
            "-v", "--verbose", action="store_true", help="debug logging (training output too)"
        )
    m = sub.add_parser("models", help="the model registry: list, show, promote, roll back")
    msub = m.add_subparsers(dest="action", required=True)
    for action, help_text, positional in (
        ("list", "use cases, or the versions of one with their status", ["name?"]),
        ("show", "one version: metrics, lineage, config", ["name", "version"]),
        ("promote", "make a version the champion (production) by hand", ["name", "version"]),
        ("rollback", "give production back to the previous champion", ["name"]),
        ("health", "the champion scored on each landed file: figure, interval, drift", ["name"]),
    ):
        a = msub.add_parser(action, help=help_text)
        for pos in positional:
            if pos.endswith("?"):
                a.add_argument(pos[:-1], nargs="?", help="use case name")
            else:
                a.add_argument(pos)
        where = a.add_mutually_exclusive_group()
        where.add_argument("--store", help="store root (default ./.domaintune)")
        where.add_argument("--config", help="take the store root from this config")
        a.add_argument("--json", action="store_true", help="print JSON on stdout")
        a.add_argument("-v", "--verbose", action="store_true")
        if action in ("promote", "rollback"):
            a.add_argument("--reason", default=f"manual {action} (domaintune models {action})")
    pr = sub.add_parser(
        "predict",
        help="batch predictions with a registered model (NAME@production, NAME@latest, "
        "NAME@vNNNN) or a model folder",
    )
    sc = sub.add_parser(
        "score",
        help="the score flow: score files into the store with a registered model, each file "
        "once per model version (cached), with a Prefect artifact of the counts",
    )
    for c in (pr, sc):
        c.add_argument("model", help="NAME@production | NAME@latest | NAME@vNNNN | a model folder")
        c.add_argument("inputs", nargs="+", metavar="INPUT", help="files, globs or fsspec URLs")
        if c is pr:
            c.add_argument(
                "--out", help="write here (.parquet, .csv or .jsonl); default: JSON Lines on stdout"
            )
        else:
            c.add_argument("--name", help="name of the scoring job (default: the model's name)")
        where = c.add_mutually_exclusive_group()
        where.add_argument("--store", help="store root of the registry (default ./.domaintune)")
        where.add_argument("--config", help="take the store from this config")
        c.add_argument("--text-column", help="the input's text column (default: the model's)")
        c.add_argument("--batch-size", type=int, help="rows per batch (default: the model's)")
        c.add_argument(
            "--runtime",
            choices=("auto", "torch", "onnx", "onnx-int8"),
            default="auto",
            help="what runs the model: auto (default: its fastest verified export, else "
            "torch), torch, or a verified ONNX export (export.formats, domaintune export)",
        )
        c.add_argument("--json", action="store_true", help="print a summary as JSON on stdout")
        c.add_argument("-v", "--verbose", action="store_true")
    sm = sub.add_parser(
        "serve-model",
        help="serve a registered model over HTTP with MLflow's model server (mlflow models "
        "serve): POST /invocations answers as domaintune predict",
    )
    sm.add_argument("model", help="NAME@production | NAME@latest | NAME@vNNNN")
    sm.add_argument("--host", default="127.0.0.1", help="default loopback only")
    sm.add_argument("--port", type=int, default=5001)
    sm.add_argument("--workers", type=int, default=1, help="server worker processes")
    sm.add_argument(
        "--runtime",
        choices=("auto", "torch", "onnx", "onnx-int8"),
        default="auto",
        help="as for predict (default: the fastest verified export, else torch)",
    )
    sm.add_argument("--build-only", metavar="DIR", help="write the MLflow model here; no server")
    where = sm.add_mutually_exclusive_group()
    where.add_argument("--store", help="store root of the registry (default ./.domaintune)")
    where.add_argument("--config", help="take the store from this config")
    sm.add_argument("--json", action="store_true")
    sm.add_argument("-v", "--verbose", action="store_true")
    ex = sub.add_parser(
        "export",
        help="export a registered model for serving (onnx, onnx-int8, merged, gguf), checked "
        "against the model on its test split and timed; cached in the store",
    )
    ex.add_argument("model", help="NAME@production | NAME@latest | NAME@vNNNN")
    ex.add_argument(
        "--format",
        dest="formats",
        action="append",
        required=True,
        choices=("onnx", "onnx-int8", "merged", "gguf"),
        help="repeatable",
    )
    ex.add_argument("--out", help="also copy the export here (one folder per format)")
    where = ex.add_mutually_exclusive_group()
    where.add_argument("--store", help="store root of the registry (default ./.domaintune)")
    where.add_argument("--config", help="take the store (and export settings) from this config")
    ex.add_argument("--json", action="store_true", help="print a summary as JSON on stdout")
    ex.add_argument("-v", "--verbose", action="store_true")
    d = sub.add_parser("data", help="land new data for a domain")
    dsub = d.add_subparsers(dest="action", required=True)
    add = dsub.add_parser(
        "add", help="copy files into the domain's landing folder atomically and announce them"
    )
    add.add_argument("domain")
    add.add_argument("files", nargs="+")
    add.add_argument("--landing", help="landing root (default $DOMAINTUNE_LANDING or ./landing)")
    add.add_argument("--no-event", action="store_true", help="land only; the watcher announces")
    add.add_argument("--json", action="store_true")
    add.add_argument("-v", "--verbose", action="store_true")

    w = sub.add_parser("watch", help="announce new complete files in the landing zones")
    w.add_argument("--landing", help="landing root (default $DOMAINTUNE_LANDING or ./landing)")
    w.add_argument("--domain", action="append", help="only these domains (repeatable)")
    w.add_argument("--interval", type=float, default=2.0, help="seconds between scans")
    w.add_argument("--settle", type=float, default=2.0, help="seconds a file must be unchanged")
    w.add_argument("--once", action="store_true", help="one scan, then exit")
    w.add_argument("--json", action="store_true")
    w.add_argument("-v", "--verbose", action="store_true")

    srv = sub.add_parser(
        "serve",
        help="a Prefect server (unless PREFECT_API_URL is set), the deployments, a worker and "
        "the landing watcher, all local",
    )
    srv.add_argument(
        "--host",
        default="127.0.0.1",
        help="address the Prefect server listens on (default loopback only; its API has no "
        "authentication)",
    )
    srv.add_argument("--port", type=int, default=4200)
    srv.add_argument("--prefect-file", default="deployments/prefect.yaml")
    srv.add_argument("--pool", default="domaintune")
    srv.add_argument("--landing", help="landing root (default $DOMAINTUNE_LANDING or ./landing)")
    srv.add_argument("--no-watch", action="store_true")
    srv.add_argument(
        "--database-url",
        help="the database of the Prefect server this starts, e.g. "
        "postgresql+asyncpg://prefect:PASSWORD@db:5432/prefect, or ${env:NAME} to read it from "
        "the environment (default: $PREFECT_API_DATABASE_CONNECTION_URL, else SQLite under "
        "PREFECT_HOME); its password is never printed",
    )
    srv.add_argument(
        "--workers",
        type=int,
        default=1,
        help="process workers to start on this machine (0: none, e.g. on the server's host)",
    )
    srv.add_argument(
        "--crash-after",
        type=float,
        default=None,
        help="seconds without a heartbeat after which a running flow run is marked Crashed and "
        "retried on any worker (default: 3 heartbeats)",
    )
    srv.add_argument("--json", action="store_true")
    srv.add_argument("-v", "--verbose", action="store_true")
    return p


class Stopped(BaseException):
    """The command was stopped by SIGTERM or SIGHUP (a scheduler, ``timeout``, a closed
    terminal). A BaseException, like KeyboardInterrupt: no ``except Exception`` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop(signum: int, frame: Any) -> None:
    raise Stopped(signum)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # SIGTERM / SIGHUP unwind the command as Ctrl-C does, instead of ending the process at
    # once: Prefect's engine marks the run Crashed and sends the signal again, the finetune
    # task kills its ranks' process group, and at exit Prefect stops its temporary server
    # (an atexit handler, which the default SIGTERM action never runs: the server was left
    # running, re-parented to PID 1).
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _stop)
    try:
        return _main(args)
    except (Stopped, KeyboardInterrupt) as exc:
        name = exc.args[0] if isinstance(exc, Stopped) else "SIGINT"
        code = 128 + (exc.signum if isinstance(exc, Stopped) else signal.SIGINT)
        print(
            f"domaintune: stopped by {name}; everything it started was stopped, and a "
            "rerun reuses the stages that had finished",
            file=sys.stderr,
        )
        return code


def _main(args: argparse.Namespace) -> int:
    from domaintune.environment import configure_environment

    configure_environment()
    _setup_logging(args.verbose)
    if args.command == "models":
        return _models(args)
    if args.command == "predict":
        return _predict(args)
    if args.command == "score":
        return _score(args)
    if args.command == "export":
        return _export(args)
    if args.command == "serve-model":
        return _serve_model(args)
    if args.command == "data":
        return _data_add(args)
    if args.command == "watch":
        return _watch(args)
    if args.command == "serve":
        from domaintune.serving.serve import serve

        return serve(args)
    from domaintune.runconfig import load_config

    try:
        config = load_config(args.config, args.overrides)
    except DomainTuneError as exc:
        return _fail(args, exc, 2)
    if args.command == "validate":
        return _validate(args, config)
    if args.command == "tune":
        return _tune(args, config)
    return _run(args, config)


def _fail(
    args: argparse.Namespace, exc: BaseException, code: int, extra: dict[str, Any] | None = None
) -> int:
    from domaintune.redaction import redact

    msg = redact(str(exc))
    if args.json:
        doc = {"status": "failed", "error": msg, "error_type": type(exc).__name__, **(extra or {})}
        if isinstance(exc, ContractViolation):
            doc["validation_report"] = exc.report_path
        print(json.dumps(doc, indent=2, default=str))
    else:
        print(f"domaintune: {msg}", file=sys.stderr)
    return code


def _validate(args: argparse.Namespace, config: Any) -> int:
    from domaintune.recipes import stage_configs
    from domaintune.storage.store import Store
    from domaintune.tasks.ingest import ingest
    from domaintune.tasks.validate import validate

    store = Store.of(config)
    docs = []
    for stage in stage_configs(config):  # a multi-stage recipe: every stage's data
        try:
            raw = ingest(stage.config, store)
            report = validate(stage.config, raw, store)
        except DomainTuneError as exc:
            if stage.name is not None:
                exc.args = (f"stage {stage.name}: {exc}",)
            return _fail(args, exc, 2)
        doc = {
            **({"stage": stage.name} if stage.name is not None else {}),
            "status": "passed",
            "rows": raw.rows,
            "label_counts": raw.label_counts,
            "raw_snapshot": raw.table,
            "validation_report": report.report_markdown,
            "expectations": report.evaluated,
            "quarantined_rows": report.quarantined_rows,
            "quarantine_table": report.quarantine_table,
            "notes": raw.notes,
        }
        docs.append(doc)
        if args.json:
            continue
        where = f" stage {stage.name} ({stage.config.task.type})" if stage.name else ""
        print(
            f"{config.name}{where}: data contract passed ({report.evaluated} expectations, "
            f"{raw.rows} rows)"
        )
        if raw.label_counts:
            print(f"  labels: {', '.join(f'{k} {v}' for k, v in raw.label_counts.items())}")
        for note in raw.notes:
            print(f"  note: {note}")
        if report.quarantined_rows:
            print(
                f"  quarantined: {report.quarantined_rows} row(s) "
                f"({100 * report.quarantine_share:.2f}%) -> {report.quarantine_table}"
            )
        print(f"  report: {report.report_markdown}")
    if args.json:
        out = docs[0] if len(docs) == 1 else {"status": "passed", "stages": docs}
        print(json.dumps(out, indent=2))
    return 0


def _run(args: argparse.Namespace, config: Any) -> int:
    from domaintune.flows.retrain import retrain
    from domaintune.orchestration import failed_run_stages, own_temporary_server

    t0 = time.perf_counter()
    # keep stdout for the summary alone: libraries that print go to stderr
    with contextlib.redirect_stdout(sys.stderr):
        own_temporary_server()
        state = retrain(config, return_state=True)
    seconds = round(time.perf_counter() - t0, 3)
    if state.is_completed():
        summary = state.result()
        summary["seconds"] = seconds
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            print(render_summary(summary))
        return 0
    exc = state.result(raise_on_failure=False)
    run_id = str(state.state_details.flow_run_id) if state.state_details.flow_run_id else None
    stages = [s.model_dump() for s in failed_run_stages(run_id)]
    code = 2 if isinstance(exc, DomainTuneError) else 1
    if not isinstance(exc, BaseException):
        exc = RuntimeError(f"flow ended in state {state.name}: {state.message}")
    return _fail(
        args, exc, code, {"run_id": run_id, "stages": stages, "promoted": False, "seconds": seconds}
    )


def _tune(args: argparse.Namespace, config: Any) -> int:
    from domaintune.flows.tune import tune
    from domaintune.orchestration import own_temporary_server
    from domaintune.tuning import check_space

    try:
        check_space(config)  # a value the search would try that the config refuses
    except DomainTuneError as exc:
        return _fail(args, exc, 2)
    if args.trials is not None and args.trials < 1:
        return _fail(args, DomainTuneError("--trials must be at least 1"), 2)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        own_temporary_server()
        state = tune(config, trials=args.trials, return_state=True)
    seconds = round(time.perf_counter() - t0, 3)
    if state.is_completed():
        summary = state.result()
        summary["seconds"] = seconds
        print(json.dumps(summary, indent=2) if args.json else render_tune_summary(summary))
        return 0
    exc = state.result(raise_on_failure=False)
    run_id = str(state.state_details.flow_run_id) if state.state_details.flow_run_id else None
    code = 2 if isinstance(exc, DomainTuneError) else 1
    if not isinstance(exc, BaseException):
        exc = RuntimeError(f"flow ended in state {state.name}: {state.message}")
    return _fail(args, exc, code, {"run_id": run_id, "promoted": False, "seconds": seconds})


def _store_of(args: argparse.Namespace) -> Any:
    """The store a command names: ``--config``'s ``store``, else ``--store`` (default
    ./.domaintune)."""
    from domaintune.storage.store import Store

    if args.config:
        from domaintune.runconfig import load_config

        return Store.of(load_config(args.config))
    return Store(args.store or "./.domaintune")


def _predict(args: argparse.Namespace) -> int:
    from domaintune.errors import StoreError
    from domaintune.serving.predict import predict

    if args.json and not args.out:
        return _fail(args, DomainTuneError("--json needs --out (stdout carries the summary)"), 2)
    try:
        store = _store_of(args)
        summary = predict(
            args.model,
            args.inputs,
            out=args.out,
            store=store,
            text_column=args.text_column,
            batch_size=args.batch_size,
            runtime=args.runtime,
        )
    except (DomainTuneError, StoreError) as exc:
        return _fail(args, exc, 2)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for note in summary["notes"]:
            log.info("predict: %s", note)
        counts = ", ".join(f"{k} {v}" for k, v in summary["counts"].items())
        log.info(
            "predict: %d rows with %s%s [%s] in %.1f s: %s%s",
            summary["rows"],
            summary["model"],
            f" ({summary['version']})" if summary["version"] else "",
            summary["runtime"],
            summary["seconds"],
            counts,
            f" -> {summary['out']}" if summary["out"] else "",
        )
    return 0


def _serve_model(args: argparse.Namespace) -> int:
    """Build the MLflow model of a registered version (in the local cache, per version and
    runtime) and replace this process with ``mlflow models serve`` on it."""
    import os

    from domaintune.errors import StoreError
    from domaintune.serving.predict import choose_runtime, resolve
    from domaintune.storage.store import cache_root

    try:
        store = _store_of(args)
        model = resolve(args.model, store)
        if model.version is None:
            raise DomainTuneError(
                f"{args.model}: serve a registered version (NAME@production, NAME@vNNNN)"
            )
        runtime = choose_runtime(model, args.runtime, store)
        folder = model.exports[runtime]["folder"] if runtime != "torch" else None
        # a registered export travels inside the version folder; a later one beside it
        extra = folder if folder is not None and folder.parent.name != "exports" else None
        from domaintune.serving.mlflow_model import build, serve_command

        name = args.model.split("@")[0]
        target = (
            Path(args.build_only)
            if args.build_only
            else (cache_root() / "serving" / f"{name}-{model.version}-{runtime}")
        )
        build(model.model_dir.parent, target, runtime, extra)
    except (DomainTuneError, StoreError) as exc:
        return _fail(args, exc, 2)
    command = serve_command(target, args.host, args.port, args.workers)
    info = {"model": args.model, "version": model.version, "runtime": runtime,
            "mlflow_model": str(target), "command": command}  # fmt: skip
    if args.json:
        print(json.dumps(info, indent=2), flush=True)
    else:
        log.info("serve-model: %s (%s, %s) from %s", args.model, model.version, runtime, target)
    if args.build_only:
        return 0
    log.info("serve-model: http://%s:%d/invocations", args.host, args.port)
    sys.stdout.flush()
    sys.stderr.flush()
    # mlflow starts `uvicorn` by name: this environment's scripts first on the PATH
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    os.execve(command[0], command, env)  # the server is this process now: signals reach it
    return 0  # not reached


def _export(args: argparse.Namespace) -> int:
    """``domaintune export MODEL --format F [--out DIR]``: each format made once per model
    (the store's export entry), checked on the version's test split; one line per format."""
    import shutil

    from domaintune.errors import StoreError
    from domaintune.serving.predict import resolve
    from domaintune.tasks.export import export_format, registered_job, summary_line

    results: dict[str, Any] = {}
    try:
        store = _store_of(args)
        model = resolve(args.model, store)
        if model.config is None:
            raise DomainTuneError(
                f"{args.model}: not a registered version; rule: export NAME@production, "
                "NAME@latest or NAME@vNNNN (its test split checks the export)"
            )
        job = registered_job(model.model_dir.parent, model.reference, store, model.config)
        for fmt in dict.fromkeys(args.formats):
            manifest = export_format(job, fmt, store)
            folder = store.materialize("export", manifest.key)
            if args.out:
                target = Path(args.out) / fmt
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(folder, target, ignore=shutil.ignore_patterns("_COMPLETE.json"))
                folder = target
            results[fmt] = {**manifest.model_dump(mode="json"), "folder": str(folder)}
            if not args.json:
                log.info(
                    "export: %s %s (%s)%s: %s -> %s",
                    args.model,
                    fmt,
                    model.version,
                    " [cached]" if manifest.reused else "",
                    summary_line(manifest),
                    folder,
                )
    except (DomainTuneError, StoreError) as exc:
        return _fail(args, exc, 2, {"exports": results})
    if args.json:
        print(json.dumps({"status": "exported", "model": args.model, "exports": results}, indent=2))
    return 0


def _score(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from domaintune.config import StoreConfig
    from domaintune.flows.score import score
    from domaintune.orchestration import own_temporary_server
    from domaintune.tasks.score import ScoreConfig

    try:
        if args.config:
            from domaintune.runconfig import load_config

            store = load_config(args.config).store
        else:
            store = StoreConfig(root=args.store or "./.domaintune")
        config = ScoreConfig(
            name=args.name or Path(args.model.split("@")[0].rstrip("/")).name,
            model=args.model,
            source=args.inputs,
            text_column=args.text_column,
            batch_size=args.batch_size,
            runtime=args.runtime,
            store=store,
        )
    except DomainTuneError as exc:
        return _fail(args, exc, 2)
    except ValidationError as exc:
        from domaintune.config import format_validation_error

        return _fail(args, DomainTuneError(format_validation_error(exc, "score")), 2)
    with contextlib.redirect_stdout(sys.stderr):
        own_temporary_server()
        state = score(config, return_state=True)
    if not state.is_completed():
        exc = state.result(raise_on_failure=False)
        if not isinstance(exc, BaseException):
            exc = RuntimeError(f"flow ended in state {state.name}: {state.message}")
        return _fail(args, exc, 2 if isinstance(exc, DomainTuneError) else 1)
    summary = state.result()
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    for f in summary["files"]:
        print(f"{f['file']}: {f['rows']} rows, {'cached' if f['cached'] else 'scored'} by "
              f"{f['version']}: {f['counts']} -> {f['predictions']}")  # fmt: skip
    counts = ", ".join(f"{k} {v}" for k, v in summary["counts"].items())
    print(f"{summary['name']}: {len(summary['files'])} file(s), {summary['rows']} rows by "
          f"{summary['model']} ({summary['scored']} scored, {summary['cached']} cached): "
          f"{counts or 'nothing to score'}")  # fmt: skip
    return 0


def _models(args: argparse.Namespace) -> int:
    from domaintune.errors import StoreError
    from domaintune.registry import Registry, use_cases

    try:
        store = _store_of(args)
        if not args.config:
            store.check_reachable()
        if args.action == "list":
            doc: Any = (
                Registry(store, args.name).table()
                if args.name
                else [
                    {"name": n, "versions": len(Registry(store, n).state().versions)}
                    for n in use_cases(store)
                ]
            )
        elif args.action == "show":
            doc = Registry(store, args.name).show(args.version)
        elif args.action == "health":
            from domaintune.monitoring import HealthLog

            doc = HealthLog(store, args.name).records()
        elif args.action == "promote":
            doc = {"production": Registry(store, args.name).promote(args.version, args.reason)}
        else:
            doc = {"production": Registry(store, args.name).rollback(args.reason)}
    except DomainTuneError as exc:
        return _fail(args, exc, 2)
    except StoreError as exc:
        return _fail(args, exc, 1)
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
    elif args.action == "list" and args.name:
        print(f"{'version':<8} {'status':<17} {'metric':<12} {'value':>8}  reason")
        for r in doc:
            value = f"{r['value']:.4f}" if isinstance(r["value"], float) else "-"
            print(
                f"{r['version']:<8} {r['status']:<17} {r['primary_metric']:<12} {value:>8}  "
                f"{r['reason']}"
            )
    elif args.action == "list":
        for r in doc:
            print(f"{r['name']}  ({r['versions']} versions)")
    elif args.action == "show":
        reg, lin = doc["registration"], doc["lineage"]
        print(f"{reg['name']} {reg['version']}{'  (production)' if doc['production'] else ''}")
        print(f"  promoted: {reg['promoted']} - {reg['promotion_reason']}")
        for k, v in reg["metrics"].items():
            print(f"  {k}: {v:.4f}")
        print(f"  model: {reg['model_dir']}")
        print(f"  base model: {lin['base_model']['name']}")
        print(
            f"  data: {lin['raw_snapshot']['rows']} rows, fingerprint {lin['raw_snapshot']['fingerprint']}"
        )
        print(f"  code: {lin['code_version']}")
        print(f"  prefect flow run: {lin['prefect_flow_run_id']}")
        if reg.get("evidence"):
            for part in ("overall", "earlier", "new"):
                c = reg["evidence"].get(part)
                if c:
                    print(f"  evidence ({part}): {_comparison_line(c)}")
        for fmt, e in (reg.get("exports") or {}).items():
            if e.get("refused"):
                print(f"  export {fmt}: refused: {e['refused']}")
                continue
            p, lat = e.get("parity") or {}, e.get("latency") or {}
            x, t = lat.get("export") or {}, lat.get("torch") or {}
            print(
                f"  export {fmt}: {e['path']}; test {p.get('metric')} {p.get('export')} "
                f"(model {p.get('model')}), {p.get('identical_predictions', 0):.1%} identical; "
                f"one text p50 {x.get('single_p50_ms')} ms (torch {t.get('single_p50_ms')}), "
                f"{x.get('batch32_texts_per_s')} texts/s in 32s (torch "
                f"{t.get('batch32_texts_per_s')})"
            )
    elif args.action == "health":
        from domaintune.monitoring import history_table

        if not doc:
            print(
                f"{args.name}: no health record yet (none is written before a file lands "
                "after a champion)"
            )
        for r in history_table(doc):
            value = f"{r['value']:.4f}" if isinstance(r["value"], float) else "-"
            flags = ", ".join(k for k in ("degraded", "drifted") if r.get(k)) or "holds"
            print(
                f"{r['time']}  {r['version']}  {r['files']}  {r['rows']} rows  {r['metric']} "
                f"{value} {r['interval']}  registered {r['registered']}  {flags}  "
                f"-> {r['decision']}"
            )
    else:
        print(f"{args.name}: production is now {doc['production']}")
    return 0


def _comparison_line(c: dict[str, Any]) -> str:
    from domaintune.evidence import Comparison

    return Comparison.model_validate(c).describe()


def _data_add(args: argparse.Namespace) -> int:
    from domaintune.landing import land_and_announce, landing_root

    try:
        announced = land_and_announce(
            args.domain, args.files, landing_root(args.landing), emit=not args.no_event
        )
    except DomainTuneError as exc:
        return _fail(args, exc, 2)
    if args.json:
        print(json.dumps({"domain": args.domain, "announced": announced}, indent=2))
    else:
        for f in announced:
            print(f"{args.domain}: landed {f['path']} ({f['bytes']:,} bytes)")
        if not announced:
            print(f"{args.domain}: nothing new (the same content was landed before)")
    return 0


def _watch(args: argparse.Namespace) -> int:
    from domaintune.landing import landing_root, watch, watch_once

    root = landing_root(args.landing)
    if args.once:
        fired = watch_once(root, args.domain, args.settle)
        if args.json:
            print(json.dumps(fired, indent=2))
        return 0
    try:
        watch(root, args.domain, args.interval, args.settle)
    except KeyboardInterrupt:
        pass
    return 0


def _num(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, int | float) else "-"


def render_tune_summary(s: dict[str, Any]) -> str:
    """``domaintune tune``: the best model as ``run`` shows one, then the search."""
    from domaintune.tuning import render_trials

    return f"{render_summary(s)}\n\n{render_trials(s)}"


def render_summary(s: dict[str, Any]) -> str:
    lines = [
        f"{s.get('flow', 'retrain')} {s['name']!r} (domain {s['domain']}): "
        f"{s['status'].upper()} in {s['seconds']:.1f} s"
        f"   [flow run {s['run_id']}]",
        "",
    ]
    width = max([12, *(len(st["name"]) for st in s["stages"])])
    lines.append(f"  {'stage':<{width}} cached   seconds")
    for st in s["stages"]:
        lines.append(
            f"  {st['name']:<{width}} {'yes' if st['cached'] else 'no':<8} {st['seconds']:>7.1f}"
        )
    for r in s.get("recipe") or []:  # a multi-stage recipe's earlier stages
        e = r["evaluation"]
        lines.append(
            f"  stage {r['stage']} ({r['task']}): test {e['primary_metric']} "
            f"{_num(e['base'])} -> {_num(e['finetuned'])}"
        )
    t = s.get("training") or {}
    if t:
        lines += [
            "",
            f"  trained:  {t['strategy']}: {t['trainable_parameters']:,} of "
            f"{t['total_parameters']:,} parameters ({100 * t['trainable_share']:.2f}%), "
            f"{t['global_step']} steps",
        ]
        if t.get("world_size"):
            rate = t.get("tokens_per_second")
            lines.append(
                f"            on {t['world_size']} rank(s), {t.get('precision')}, global batch "
                f"{t.get('global_batch_size')}" + (f", {rate:,.0f} tokens/s" if rate else "")
            )
    if s.get("trust_remote_code"):
        lines.append("  note:     model.trust_remote_code is on: code shipped with the model ran")
    m = s["metrics"]
    if s["status"] == "skipped":  # retrain.when: nothing trained
        return "\n".join([*lines, "", f"  {s['promotion_reason']}"])
    health = m.get("health") or {}
    if health.get("message"):
        lines += ["", f"  monitor:  {health['message']}"]
    lines += ["", f"  test metrics ({m['test_rows']} rows)   base   fine-tuned   gain"]
    for k, v in m["finetuned"].items():
        b = m["base"][k]
        star = " *" if k == m["primary_metric"] else ""
        lines.append(f"  {k + star:<26} {b:6.4f}   {v:6.4f}    {v - b:+.4f}")
    lines += [
        "",
        f"  model:    {s['model_dir']}  ({s['version']})",
        f"  promoted: {'yes' if s['promoted'] else 'no'} - {s['promotion_reason']}",
        f"  report:   {m['report']}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

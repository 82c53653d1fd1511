"""finetune: tokenized splits + base model -> fine-tuned model folder (safetensors).

Training runs in child processes started by the DeepSpeed launcher: one CPU process with
``DS_ACCELERATOR=cpu`` (gloo) on a machine without a GPU, one process per visible GPU
otherwise. This function streams their output into the log, turns a non-zero exit into
``TrainingFailed``, and keeps checkpoints in a persistent working folder so that a retried
task resumes from the newest complete checkpoint instead of starting over.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from domaintune.chaining import resolve_config_model, resolve_model
from domaintune.config import RetrainConfig
from domaintune.errors import TrainingFailed
from domaintune.fingerprint import hash_obj, library_versions
from domaintune.manifests import ModelArtifact, SplitManifest
from domaintune.models import ResolvedModel
from domaintune.redaction import redact
from domaintune.store import Store, atomic_write_text
from domaintune.tasktypes import get_task_type
from domaintune.tracking import TrainingTracker
from domaintune.training.checkpoints import CheckpointMirror, latest_complete_checkpoint
from domaintune.training.checks import verify_saved_model
from domaintune.training.deepspeed_config import build_deepspeed_config
from domaintune.training.launch import (
    LaunchPlan,
    check_hosts,
    child_env,
    plan_launch,
    remove_shared_memory,
    write_deepspeed_env,
)
from domaintune.training.spec import WorkerSpec
from domaintune.training.strategies import preflight
from domaintune.training.worker import PROGRESS_PREFIX

log = logging.getLogger(__name__)

STAGE = "finetune"
VERSION = "2"  # 2: launch plan, throughput and saved-model check in the artifact
_TAIL_LINES = 60
_NOT_IN_KEY = {
    "logging_steps",
    "hostfile",
    "master_addr",
    "master_port",
    "launcher",
    "ssh_config",
    "forward_env",
    "cpu_allocator",  # where memory comes from, not what is computed
}


def plan(config: RetrainConfig, splits: SplitManifest) -> tuple[str, ResolvedModel, str]:
    base = resolve_config_model(config)
    base_fp = base.fingerprint()
    embeddings_from = config.training.strategy.init_embeddings_from
    # task settings that change what is learned (masked_lm's masking)
    learned = get_task_type(config.task.type).learning_settings(config.task)
    key = hash_obj(
        STAGE,
        VERSION,
        splits.fingerprint,
        splits.labels,
        config.task.type,
        # no term where the task type learns from no settings: those keys stay as they were
        *([learned] if learned is not None else []),
        base_fp,
        config.model.trust_remote_code,
        # where rank 0 listens and how hosts are reached do not change what is learned
        config.training.model_dump(exclude=_NOT_IN_KEY),
        config.evaluation.primary_metric,
        resolve_model(embeddings_from).fingerprint() if embeddings_from else None,
        library_versions("torch", "transformers", "deepspeed", "accelerate", "peft"),
    )
    return key, base, base_fp


def finetune(
    config: RetrainConfig,
    splits: SplitManifest,
    store: Store,
    observer: Callable[[dict[str, Any]], None] | None = None,
) -> ModelArtifact:
    """``observer``: called with each ``log`` progress event of rank 0 (``step``, ``epoch``,
    ``eval_<metric>`` after an evaluation, ...); an exception it raises stops the training
    (its process group is killed), leaves the entry incomplete and propagates."""
    key, base, base_fp = plan(config, splits)
    return store.compute_once(
        STAGE,
        key,
        ModelArtifact,
        lambda: _run(config, splits, store, key, base, base_fp, observer),
    )


# -------------------------------------------------------------------------------- stage


def _attempts(
    attempts_path: Path, resume: Path | None, launch: Any
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(the attempts on record, this one): an attempt on record that never finished lost its
    process or host."""
    attempts: list[dict[str, Any]] = (
        json.loads(attempts_path.read_text()) if attempts_path.is_file() else []
    )
    for earlier in attempts:
        if "exit_code" not in earlier:  # on record, never finished: its process or host died
            earlier.update(exit_code=None, lost=True)
    attempt = {
        "attempt": len(attempts) + 1,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "resumed_from": resume.name if resume else None,
        "processes": launch.world_size,
        "nodes": launch.num_nodes,
        "device": "gpu" if launch.use_gpu else "cpu",
    }
    return attempts, attempt


def _worker_spec(
    config: RetrainConfig,
    splits: SplitManifest,
    base: ResolvedModel,
    checked: dict[str, Any],
    launch: Any,
    ckpt_dir: Path,
    final_dir: Path,
    resume: Path | None,
    to_store: bool,
) -> WorkerSpec:
    """What every rank is told (domaintune.training.spec)."""
    return WorkerSpec(
        task=config.task,
        training=config.training,
        labels=splits.labels,
        model_path=base.path,
        trust_remote_code=config.model.trust_remote_code,
        config_overrides=checked["config_overrides"],
        bf16=launch.bf16,
        fp16=launch.fp16,
        splits={name: s.path for name, s in splits.splits.items()},
        output_dir=str(ckpt_dir),
        final_dir=str(final_dir),
        primary_metric=config.evaluation.primary_metric,
        deepspeed=build_deepspeed_config(
            config.training.deepspeed,
            bf16=launch.bf16,
            fp16=launch.fp16,
            autocast=not launch.use_gpu,  # CPU: bf16 autocast, fp32 weights
        )
        if launch.uses_zero
        else None,
        launch=launch.summary(),
        resume_from=str(resume) if resume else None,
        checkpoints_to_store=to_store,
    )


def _model_artifact(
    config: RetrainConfig,
    splits: SplitManifest,
    key: str,
    entry: str,
    base: ResolvedModel,
    base_fp: str,
    model_fp: str,
    summary: dict[str, Any],
    attempts: list[dict[str, Any]],
    launch: Any,
) -> ModelArtifact:
    """The finetune entry's manifest, from the worker's training summary."""
    return ModelArtifact(
        key=key,
        path=entry,
        fingerprint=model_fp,
        model_dir=entry,
        base_model=base.name,
        base_fingerprint=base_fp,
        labels=splits.labels,
        trainable_parameters=int(summary["trainable_parameters"]),
        total_parameters=int(summary["total_parameters"]),
        global_step=int(summary["global_step"]),
        best_metric=summary.get("best_metric"),
        train_seconds=float(summary["train_seconds"]),
        attempts=attempts,
        strategy=summary.get("strategy", {}),
        optimizer_groups=summary.get("optimizer_groups", []),
        seconds_per_epoch=summary.get("seconds_per_epoch"),
        peak_rss_mb=summary.get("peak_rss_mb"),
        peak_gpu_allocated_mb=summary.get("peak_gpu_allocated_mb"),
        launch={
            **summary.get("launch", {}),
            "precision": summary.get("precision"),
            "attention": summary.get("attention"),
            "allocator": summary.get("allocator"),
            "gradient_checkpointing": summary.get("gradient_checkpointing"),
            "torch_compile": summary.get("torch_compile"),
            "zero_stage": config.training.deepspeed.zero_stage if launch.uses_zero else None,
        },
        throughput={
            k: summary[k]
            for k in (
                "trained_steps",
                "train_samples",
                "train_tokens",
                "train_samples_per_second",
                "train_tokens_per_second",
            )
            if k in summary
        },
        saved_model=summary["saved_model"],
    )


def _run(
    config: RetrainConfig,
    splits: SplitManifest,
    store: Store,
    key: str,
    base: ResolvedModel,
    base_fp: str,
    observer: Callable[[dict[str, Any]], None] | None = None,
) -> ModelArtifact:
    # a strategy that cannot apply to this model fails here, clearly, before any launch
    checked = preflight(
        config.training,
        base.path,
        config.task.type,
        splits.labels,
        config.model.trust_remote_code,
    )
    if checked["head"]:  # a registered model of another task or label set (chaining)
        log.info("finetune: base model %s: %s", base.name, checked["head"])
    work = store.scratch_dir(STAGE, key)
    ckpt_dir = work / "checkpoints"
    final_dir = work / "final"
    shutil.rmtree(final_dir, ignore_errors=True)
    launch = plan_launch(config.training)
    # every host answers, takes the key, has this environment and sees this folder
    answers = check_hosts(launch, work)
    if answers:
        log.info(
            "finetune: hosts answer over SSH: %s",
            ", ".join(f"{h} ({name})" for h, name in answers.items()),
        )
    # a remote store holds the checkpoints of a training in progress: a retry on any host
    # (or after the local cache was deleted) resumes from them
    mirror = CheckpointMirror(store, key, work)
    mirror.restore()
    resume = latest_complete_checkpoint(ckpt_dir)
    attempts_path = work / "attempts.json"
    attempts, attempt = _attempts(attempts_path, resume, launch)
    # tracking.report_to: TensorBoard events and the MLflow run (its id goes in the attempt)
    tracker = TrainingTracker.start(config, key, work, attempts, attempt)
    spec = _worker_spec(
        config, splits, base, checked, launch, ckpt_dir, final_dir, resume, mirror.enabled
    )
    spec_path = work / "spec.json"
    spec.write(spec_path)
    if resume:
        log.info("finetune: attempt %d resumes from %s", attempt["attempt"], resume.name)
    env = child_env(launch)
    if launch.multi_node:  # ranks on other hosts get these variables from the launcher
        write_deepspeed_env(work, env, config.training.forward_env)
    cmd = launch.command(spec_path, config.training.cpu_allocator)
    _say_how_it_launches(launch, config)
    # the attempt is on record before it runs: a host lost mid-training still counts
    atomic_write_text(attempts_path, json.dumps([*attempts, attempt], indent=2))
    mirror.save_file("attempts.json")
    t0 = time.time()
    rc = None
    try:
        with mirror.running():
            rc, tail, first, fault = _launch(cmd, env, work / "train.log", work, tracker, observer)
    finally:
        remove_shared_memory(launch)
        tracker.close(succeeded=rc == 0 and (final_dir / "training_summary.json").is_file())
    attempt.update(exit_code=rc, seconds=round(time.time() - t0, 2))
    attempts.append(attempt)
    atomic_write_text(attempts_path, json.dumps(attempts, indent=2))
    mirror.save_file("attempts.json")
    if rc != 0 or not (final_dir / "training_summary.json").is_file():
        mirror.sync_once(include_final=True)  # the retry, wherever it runs, starts from here
        raise _training_failed(rc, attempt["attempt"], tail, first, fault, work / "train.log")
    summary = _checked_summary(final_dir, config, splits)
    _write_generation_config(final_dir, config, splits)
    model_fp = ResolvedModel(name="finetuned", path=str(final_dir)).fingerprint()
    with store.writer(STAGE, key) as w:
        for item in final_dir.iterdir():
            os.replace(item, w.path / item.name)
        (w.path / "log_history.json").write_text(
            json.dumps(summary.get("log_history", []), indent=2, default=float)
        )
        shutil.copy2(work / "train.log", w.path / "train.log")
        tracker.export(w.path)  # TensorBoard event files, beside the model
        (w.path / "attempts.json").write_text(json.dumps(attempts, indent=2))
        entry = store.entry_path(STAGE, key)
        manifest = _model_artifact(
            config, splits, key, str(entry), base, base_fp, model_fp, summary, attempts, launch
        )
        w.manifest = manifest.model_dump(mode="json")
    shutil.rmtree(work, ignore_errors=True)  # checkpoints (optimizer state) are no longer needed
    mirror.clear()
    _say_what_it_trained(manifest, summary)
    return manifest


def _write_generation_config(final_dir: Path, config: RetrainConfig, splits: SplitManifest) -> None:
    """A generative model's ``generation_config.json``: greedy, at most the run's
    ``max_new_tokens`` (auto: from the training answers' lengths), stopping at the chat
    template's end of turn as well as at end-of-sequence; predict, the model server and
    plain ``model.generate`` then generate as evaluation does."""
    if not get_task_type(config.task.type).generative:
        return
    from transformers import AutoTokenizer, GenerationConfig

    from domaintune.generation import GenerationSettings, stop_token_ids

    tokenizer = AutoTokenizer.from_pretrained(final_dir)
    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    GenerationConfig(
        do_sample=False,
        max_new_tokens=GenerationSettings.of_run(config, splits).max_new_tokens,
        eos_token_id=stops if len(stops) > 1 else stops[0],
        pad_token_id=pad,
        bos_token_id=tokenizer.bos_token_id,
    ).save_pretrained(final_dir)


def _say_how_it_launches(launch: LaunchPlan, config: RetrainConfig) -> None:
    for note in launch.notes:
        log.info("finetune: %s", note)
    # emulated bf16 (asked for on a CPU without it) is right but slow: say so louder
    (log.warning if "emulated" in launch.precision_reason else log.info)(
        "finetune: precision: %s", launch.precision_reason
    )
    log.info(
        "finetune: launching %s through the DeepSpeed launcher, %s",
        launch.describe(),
        f"ZeRO-{config.training.deepspeed.zero_stage}" if launch.uses_zero else "no ZeRO engine",
    )


def _say_what_it_trained(manifest: ModelArtifact, summary: dict[str, Any]) -> None:
    log.info(
        "finetune: strategy %s trained %s of %s parameters",
        manifest.strategy.get("strategy", "full"),
        f"{manifest.trainable_parameters:,}",
        f"{manifest.total_parameters:,}",
    )
    log.info(
        "finetune: %d steps in %.1f s, best %s %.4f -> %s",
        manifest.global_step,
        manifest.train_seconds,
        summary.get("metric_for_best_model"),
        manifest.best_metric or float("nan"),
        manifest.model_dir,
    )


def _training_failed(
    rc: int | None,
    attempt: int,
    tail: list[str],
    first: str | None,
    fault: str,
    train_log: Path,
) -> TrainingFailed:
    """The one-line error for a failed launch: the exit code, which rank failed first and the
    last error a rank wrote; the log's tail travels with it."""
    cause = next((ln for ln in reversed(tail) if "Error" in ln or "error" in ln), "")
    if first:  # which rank went first says more than the errors of those it took along
        said = cause or _last_rank_words(tail)  # an abort says "Assertion ... failed"
        said = f"{said.strip()} ({fault})" if said and fault else said or fault
        cause = f"{first}; last error: {said.strip()}" if said else first
    return TrainingFailed(
        f"finetune: training exited with code {rc} (attempt {attempt}): "
        f"{cause.strip()[:400]}; a retry resumes from the newest checkpoint; full log: "
        f"{train_log}",
        log_tail="\n".join(tail),
    )


def _checked_summary(
    final_dir: Path, config: RetrainConfig, splits: SplitManifest
) -> dict[str, Any]:
    """The ranks' training summary, with proof that the saved model loads in plain
    transformers: a "successful" run that saved empty ZeRO-3 partitions gets no further."""
    summary = json.loads((final_dir / "training_summary.json").read_text())
    summary["saved_model"] = verify_saved_model(
        final_dir,
        config.task.type,
        splits.labels,
        expected_parameters=summary.get("exported_parameters"),
        seed=config.training.seed,
        trust_remote_code=config.model.trust_remote_code,
    )
    atomic_write_text(final_dir / "training_summary.json", json.dumps(summary, indent=2))
    log.info(
        "finetune: saved model checked: %s parameters in %d tensors (%.1f MB) load in plain "
        "transformers",
        f"{summary['saved_model']['parameters']:,}",
        summary["saved_model"]["tensors"],
        summary["saved_model"]["bytes"] / 2**20,
    )
    return summary


def _launch(
    cmd: list[str],
    env: dict[str, str],
    log_path: Path,
    cwd: Path | None = None,
    tracker: TrainingTracker | None = None,
    observer: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[int, list[str], str | None, str]:
    """Run the launcher, forward its output; return (exit code, last lines, the rank that
    ended with an error first (``root_failure``), in words, and the first fatal-signal dump,
    in words). Fault dumps stay in train.log, not in the tail: their frames would bury the
    error lines."""
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
    progress = _PrefectProgress()
    dumps = FaultDumps()
    failures: list[str] = []
    with open(log_path, "a", encoding="utf-8") as logf:
        logf.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
            start_new_session=True,  # its own process group: killed as one on cancellation
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = redact(line)
                logf.write(line)
                logf.flush()  # train.log is current for whoever tails it
                line = line.rstrip("\n")
                if dumps.feed(line):
                    continue
                tail.append(line)
                failure = rank_failure(line)
                if failure:
                    failures.append(failure)
                _forward(line, progress, tracker, observer)
            rc = proc.wait()
        except BaseException:
            _kill_group(proc)
            raise
    return rc, list(tail), root_failure(failures), dumps.summary


_RANK_EXIT = re.compile(
    r"^(?:(?P<host>[^\s:]+): )?.*launch\.py.*exits with return code = (?P<code>-?\d+)"
)


def _last_rank_words(tail: list[str]) -> str:
    """The last line the ranks themselves printed before the launcher reported one of them
    gone (not the launcher's own log lines, not progress events)."""
    for line in reversed(tail):
        body = _rank_body(line)
        if body.strip() and not _LAUNCHER_LOG.match(body) and PROGRESS_PREFIX not in body:
            return body
    return ""


def _rank_body(line: str) -> str:
    """A line without the ``host: `` prefix pdsh puts before a remote rank's output."""
    return line.partition(": ")[2] if _HOST_PREFIX.match(line) else line


_HOST_PREFIX = re.compile(r"^[^\s:]+: ")
_LAUNCHER_LOG = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\] \[[A-Z]+\] ")
_DUMP_BODY = re.compile(
    r"^(?:(?:Current thread|Thread) 0x[0-9a-fA-F]+ |  File \"|  <no Python frame>|  \.\.\.|"
    r"Extension modules: |Python runtime state: |\s*$)"
)
_DUMP_FRAME = re.compile(r'^  File "(?:.*/)?(?P<file>[^/"]+)", line (?P<line>\d+) in (?P<func>\S+)')


class FaultDumps:
    """Reads the dumps Python's faulthandler prints when a rank dies by a signal (the worker
    enables it), line by line: ``Fatal Python error: Aborted``, then every thread's stack.
    ``summary`` names the first one and where its crashing thread was, e.g. "Fatal Python
    error: Aborted, current thread in end_distributed (worker.py:490)"."""

    def __init__(self) -> None:
        self.summary = ""
        self._in_dump = False
        self._wanted = ""  # "thread": the crashing thread's header; "frame": its innermost frame

    def feed(self, line: str) -> bool:
        """Take one line of output; True if it belongs to a dump."""
        body = _rank_body(line)
        if body.startswith("Fatal Python error: "):
            if not self.summary:
                self.summary = body.strip()
                self._wanted = "thread"
            self._in_dump = True
            return True
        if not (self._in_dump and _DUMP_BODY.match(body)):
            self._in_dump = False
            return False
        if self._wanted == "thread" and body.startswith("Current thread "):
            self._wanted = "frame"
        elif self._wanted == "frame":
            frame = _DUMP_FRAME.match(body)
            if frame:
                self.summary += (
                    f", current thread in {frame['func']} ({frame['file']}:{frame['line']})"
                )
            elif "<no Python frame>" in body:
                self.summary += ", current thread outside Python code"
            self._wanted = ""
        return True


def rank_failure(line: str) -> str | None:
    """DeepSpeed's per-host launcher reporting a rank that ended with an error, in words
    (``the rank on host 10.0.0.2 was killed by SIGKILL``); None for any other line."""
    m = _RANK_EXIT.match(line)
    if not m or int(m["code"]) == 0:
        return None
    code = int(m["code"])
    where = f"the rank on host {m['host']}" if m["host"] else "a rank"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"{where} was killed by {name}"
    return f"{where} exited with code {code}"


def root_failure(failures: list[str]) -> str | None:
    """Of the ranks the launchers reported ending with an error, the one that most likely
    went first. Not simply the first report: a rank killed on another host is reported over
    SSH, while the ranks that lose it fail at once with a connection reset (exit code 1) on
    hosts whose reports may arrive sooner. So a rank killed by a signal (other than the
    SIGTERM / SIGINT launchers send when they stop) comes before one that exited with an
    error, which comes before one stopped by SIGTERM; the order of reports breaks ties."""

    def weight(failure: str) -> int:
        if failure.endswith(("killed by SIGTERM", "killed by SIGINT")):
            return 2
        return 0 if " killed by " in failure else 1

    return min(failures, key=weight) if failures else None


class _PrefectProgress:
    """A Prefect progress artifact for the training, updated as steps complete (only when
    running inside a Prefect task run; never fails the training)."""

    def __init__(self) -> None:
        self.artifact_id: Any = None
        self.last = -1.0

    def update(self, step: int, max_steps: int, **latest: float) -> None:
        if max_steps <= 0:
            return
        percent = round(100.0 * min(step, max_steps) / max_steps, 1)
        if percent == self.last and not latest:
            return
        try:
            from prefect.artifacts import create_progress_artifact, update_progress_artifact
            from prefect.context import TaskRunContext

            if TaskRunContext.get() is None:
                return
            description = progress_description(step, max_steps, **latest)
            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(percent, description=description)
            else:
                update_progress_artifact(self.artifact_id, percent, description=description)
            self.last = percent
        except Exception as exc:  # the UI's progress bar is not worth a failed run
            log.debug("finetune: progress artifact not updated: %s", exc)


def progress_description(step: int, max_steps: int, **latest: float) -> str:
    """ "Training: step 40 of 80 · loss 0.5312 · 1,234 tokens/s"."""
    parts = [f"Training: step {step} of {max_steps}"]
    if latest.get("loss") is not None:
        parts.append(f"loss {latest['loss']:.4g}")
    if latest.get("tokens_per_second"):
        parts.append(f"{latest['tokens_per_second']:,.0f} tokens/s")
    if latest.get("samples_per_second"):
        parts.append(f"{latest['samples_per_second']:,.1f} samples/s")
    return " · ".join(parts)


def _forward(
    line: str,
    progress: _PrefectProgress | None = None,
    tracker: TrainingTracker | None = None,
    observer: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    host, sep, rest = line.partition(": ")
    if sep and " " not in host and rest.startswith(PROGRESS_PREFIX):
        line = rest  # pdsh puts "<host>: " before each line of the ranks on several hosts
    if line.startswith(PROGRESS_PREFIX):
        try:
            event = json.loads(line[len(PROGRESS_PREFIX) :])
        except ValueError:
            log.info("train: %s", line)
            return
        kind = event.pop("event", "")
        if progress is not None and kind in ("train_begin", "log", "done"):
            step = event.get("step", event.get("start_step", event.get("global_step", 0)))
            total = event.get("max_steps") or (event.get("global_step") if kind == "done" else 0)
            latest = {
                k: event[k]
                for k in ("loss", "tokens_per_second", "samples_per_second")
                if kind == "log" and isinstance(event.get(k), int | float)
            }
            progress.update(int(step or 0), int(total or 0), **latest)
        if kind == "log":
            if tracker is not None:  # tracking.report_to: TensorBoard, MLflow
                tracker.log(event)
            shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in event.items()}
            log.info("train: %s", " ".join(f"{k}={v}" for k, v in shown.items()))
            if observer is not None:  # may raise to stop the training (tune's pruning)
                observer(dict(event))
        else:
            log.info("train %s: %s", kind, json.dumps(event, default=str))
    elif "Traceback" in line or "Error" in line or "error:" in line:
        log.warning("train: %s", line)
    else:
        log.debug("train: %s", line)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def training_summary(model: ModelArtifact) -> dict[str, Any]:
    """The run summary's view of what trained."""
    return {
        "strategy": model.strategy.get("strategy", "full"),
        "trainable_parameters": model.trainable_parameters,
        "total_parameters": model.total_parameters,
        "trainable_share": round(model.trainable_parameters / max(model.total_parameters, 1), 6),
        "trained_blocks": model.strategy.get("trained_blocks"),
        "global_step": model.global_step,
        "train_seconds": round(model.train_seconds, 2),
        "seconds_per_epoch": model.seconds_per_epoch,
        "peak_rss_mb": model.peak_rss_mb,
        "peak_gpu_allocated_mb": model.peak_gpu_allocated_mb,
        "world_size": model.launch.get("world_size"),
        "precision": model.launch.get("precision"),
        "global_batch_size": model.launch.get("global_batch_size"),
        "samples_per_second": _rounded(model.throughput.get("train_samples_per_second")),
        "tokens_per_second": _rounded(model.throughput.get("train_tokens_per_second")),
    }


def _rounded(x: float | None) -> float | None:
    return None if x is None else round(float(x), 2)

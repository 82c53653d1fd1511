"""finetune: tokenized splits + base model -> fine-tuned model folder (safetensors).

Training runs in child processes started by the DeepSpeed launcher: one CPU process with
``DS_ACCELERATOR=cpu`` (gloo) on a machine without a GPU, one process per visible GPU
otherwise, supervised by ``domaintune.training.supervisor`` (output streamed into the log,
a non-zero exit named as ``TrainingFailed``). This stage keys the entry, builds the ranks'
``WorkerSpec``, keeps checkpoints in a persistent working folder so that a retried task
resumes from the newest complete checkpoint instead of starting over, and turns what the
ranks saved into a ``ModelArtifact``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from domaintune.chaining import resolve_config_model, resolve_model
from domaintune.config import RetrainConfig
from domaintune.errors import StoreError
from domaintune.fingerprint import hash_obj, library_versions
from domaintune.models import ResolvedModel
from domaintune.reporting.tracking import TrainingTracker
from domaintune.storage.manifests import ModelArtifact, SavedModelCheck, SplitManifest
from domaintune.storage.store import Store, atomic_write_text
from domaintune.tasktypes import get_task_type
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
from domaintune.training.spec import RESULT_FILE, WorkerResult, WorkerSpec
from domaintune.training.strategies import preflight
from domaintune.training.supervisor import run_launcher, training_failed

log = logging.getLogger(__name__)

STAGE = "finetune"
VERSION = "2"  # 2: launch plan, throughput and saved-model check in the artifact
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
        precision=launch.precision,
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
        launch=launch.summary(config.training.deepspeed.zero_stage),
        resume_from=str(resume) if resume else None,
        checkpoints_to_store=to_store,
    )


def _model_artifact(
    splits: SplitManifest,
    key: str,
    entry: str,
    base: ResolvedModel,
    base_fp: str,
    model_fp: str,
    result: WorkerResult,
    attempts: list[dict[str, Any]],
) -> ModelArtifact:
    """The finetune entry's manifest, from what the ranks handed back."""
    assert result.saved_model is not None  # _checked_result set it
    return ModelArtifact(
        key=key,
        path=entry,
        fingerprint=model_fp,
        model_dir=entry,
        base_model=base.name,
        base_fingerprint=base_fp,
        labels=splits.labels,
        trainable_parameters=result.trainable_parameters,
        total_parameters=result.total_parameters,
        global_step=result.global_step,
        best_metric=result.best_metric,
        train_seconds=result.train_seconds,
        attempts=attempts,
        strategy=result.strategy,
        optimizer_groups=result.optimizer_groups,
        seconds_per_epoch=result.seconds_per_epoch,
        peak_rss_mb=result.peak_rss_mb,
        peak_gpu_allocated_mb=result.peak_gpu_allocated_mb,
        # the plan the ranks ran, and what they ran with
        launch=result.launch.model_copy(
            update={
                "precision": result.precision,
                "attention": result.attention,
                "allocator": result.allocator,
                "gradient_checkpointing": result.gradient_checkpointing,
                "torch_compile": result.torch_compile,
            }
        ),
        throughput=result.throughput,
        saved_model=result.saved_model,
    )


#: a rank's words for a full disk: Python's OSError, Rust's (safetensors), C's (pyarrow)
_DISK_FULL = re.compile(r"No space left on device|\[Errno 28\]|os error 28|StorageFull")


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
            rc, tail, first, fault = run_launcher(
                cmd, env, work / "train.log", work, tracker, observer
            )
    finally:
        remove_shared_memory(launch)
        tracker.close(succeeded=rc == 0 and (final_dir / RESULT_FILE).is_file())
    attempt.update(exit_code=rc, seconds=round(time.time() - t0, 2))
    attempts.append(attempt)
    atomic_write_text(attempts_path, json.dumps(attempts, indent=2))
    mirror.save_file("attempts.json")
    if rc != 0 or not (final_dir / RESULT_FILE).is_file():
        mirror.sync_once(include_final=True)  # the retry, wherever it runs, starts from here
        if any(_DISK_FULL.search(line) for line in tail):
            # a rank could not write a checkpoint or the model: say so, not the library's
            # serialisation error; the checkpoints written before stay (a retry resumes)
            raise StoreError(
                f"store: no space left on device while writing {work} (the checkpoints and "
                f"model of the finetune entry {key}, attempt {attempt['attempt']})"
            )
        raise training_failed(rc, attempt["attempt"], tail, first, fault, work / "train.log")
    result = _checked_result(final_dir, config, splits)
    _write_generation_config(final_dir, config, splits)
    model_fp = ResolvedModel(name="finetuned", path=str(final_dir)).fingerprint()
    with store.writer(STAGE, key) as w:
        for item in final_dir.iterdir():
            os.replace(item, w.path / item.name)
        (w.path / "log_history.json").write_text(
            json.dumps(result.log_history, indent=2, default=float)
        )
        shutil.copy2(work / "train.log", w.path / "train.log")
        tracker.export(w.path)  # TensorBoard event files, beside the model
        (w.path / "attempts.json").write_text(json.dumps(attempts, indent=2))
        entry = store.entry_path(STAGE, key)
        manifest = _model_artifact(
            splits, key, str(entry), base, base_fp, model_fp, result, attempts
        )
        w.manifest = manifest.model_dump(mode="json")
    shutil.rmtree(work, ignore_errors=True)  # checkpoints (optimizer state) are no longer needed
    mirror.clear()
    _say_what_it_trained(manifest, result)
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


def _say_what_it_trained(manifest: ModelArtifact, result: WorkerResult) -> None:
    log.info(
        "finetune: strategy %s trained %s of %s parameters",
        manifest.strategy.strategy,
        f"{manifest.trainable_parameters:,}",
        f"{manifest.total_parameters:,}",
    )
    log.info(
        "finetune: %d steps in %.1f s, best %s %.4f -> %s",
        manifest.global_step,
        manifest.train_seconds,
        result.metric_for_best_model,
        manifest.best_metric or float("nan"),
        manifest.model_dir,
    )


def _checked_result(final_dir: Path, config: RetrainConfig, splits: SplitManifest) -> WorkerResult:
    """What the ranks handed back, with proof that the saved model loads in plain
    transformers: a "successful" run that saved empty ZeRO-3 partitions gets no further."""
    result = WorkerResult.read(final_dir / RESULT_FILE)
    result.saved_model = SavedModelCheck(
        **verify_saved_model(
            final_dir,
            config.task.type,
            splits.labels,
            expected_parameters=result.exported_parameters,
            seed=config.training.seed,
            trust_remote_code=config.model.trust_remote_code,
        )
    )
    atomic_write_text(final_dir / RESULT_FILE, result.model_dump_json(indent=2))
    log.info(
        "finetune: saved model checked: %s parameters in %d tensors (%.1f MB) load in plain "
        "transformers",
        f"{result.saved_model.parameters:,}",
        result.saved_model.tensors,
        result.saved_model.bytes / 2**20,
    )
    return result


def run_summary_training(model: ModelArtifact) -> dict[str, Any]:
    """The run summary's view of what trained."""
    return {
        "strategy": model.strategy.strategy,
        "trainable_parameters": model.trainable_parameters,
        "total_parameters": model.total_parameters,
        "trainable_share": round(model.trainable_parameters / max(model.total_parameters, 1), 6),
        "trained_blocks": model.strategy.trained_blocks,
        "global_step": model.global_step,
        "train_seconds": round(model.train_seconds, 2),
        "seconds_per_epoch": model.seconds_per_epoch,
        "peak_rss_mb": model.peak_rss_mb,
        "peak_gpu_allocated_mb": model.peak_gpu_allocated_mb,
        "world_size": model.launch.world_size,
        "precision": model.launch.precision,
        "global_batch_size": model.launch.global_batch_size,
        "samples_per_second": _rounded(model.throughput.train_samples_per_second),
        "tokens_per_second": _rounded(model.throughput.train_tokens_per_second),
    }


def _rounded(x: float | None) -> float | None:
    return None if x is None else round(float(x), 2)

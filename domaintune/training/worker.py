"""The training process: one per rank, started by the DeepSpeed launcher.

    python -m deepspeed.launcher.runner ... --module domaintune.training.worker --spec SPEC.json

It reads everything from the spec file written by ``tasks/finetune.py``: tokenized split
Parquet files, the base model folder, the training arguments and the DeepSpeed config.
Rank 0 prints progress as ``DOMAINTUNE {json}`` lines, which the parent task forwards to
Prefect. Each checkpoint gets a completion marker once every rank has written it; the parent
resumes a retried run from the newest marked checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from domaintune.cpu_share import cpu_slot
from domaintune.training.events import emit
from domaintune.training.events import rank as _rank

if TYPE_CHECKING:  # at run time imported where used: a CPU rank restarts itself with
    # TCMalloc before anything heavy loads (_restart_with_allocator)
    from domaintune.storage.manifests import LaunchRecord, StrategyReport
    from domaintune.training.spec import WorkerResult, WorkerSpec


def prepare_model(spec: WorkerSpec) -> Any:
    """The base model as training starts from it (``domaintune.loading``: dropout overrides,
    the attention function, then the strategy's architecture changes: dropped blocks,
    custom head, embeddings from a checkpoint), with cheaper dropout masks on a CPU."""
    import torch

    from domaintune.loading import LoadSpec, load_model
    from domaintune.training.attention import attention_implementation

    training = spec.training
    model = load_model(
        LoadSpec(
            path=spec.model_path,
            task_type=spec.task_type,
            labels=tuple(spec.labels),
            seed=training.seed,
            trust_remote_code=spec.trust_remote_code,
            structure=training.strategy,
            config_overrides=spec.config_overrides,
            attention=attention_implementation(training.attention, spec.precision, spec.model_path),
        )
    )
    if not torch.cuda.is_available():
        from domaintune.training.dropout import use_cpu_dropout

        count = use_cpu_dropout(model)  # bernoulli_ masks were a third of a CPU step
        if count:
            logging.getLogger(__name__).info("dropout: %d modules draw cheaper CPU masks", count)
    return model


def _per_rank(info: dict[str, Any]) -> list[dict[str, Any]]:
    """``info`` of every rank, in rank order (this rank's alone when not distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [info]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, info)
    return out


def _rank_info(model: Any, optimizer: Any, allocator: str | None) -> dict[str, Any]:
    """Where this rank ran and what it held: under ZeRO-3 its own partition of the
    parameters, under ZeRO-1/2/3 its partition of the optimizer state; on CPU, the memory
    allocator it ran with."""
    import socket

    from domaintune.training import strategies

    held = sum(
        p.ds_tensor.numel() if getattr(p, "ds_tensor", None) is not None else p.numel()
        for p in model.parameters()
    )
    ssh = os.environ.get("SSH_CONNECTION", "").split()
    return {
        "rank": _rank(),
        "node_rank": int(os.environ.get("CROSS_RANK", "0")),
        "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
        "hostname": socket.gethostname(),
        # the address this host was reached at over SSH (multi-node launches)
        "ssh_address": ssh[2] if len(ssh) == 4 else None,
        "pid": os.getpid(),
        "allocator": allocator,
        "parameter_elements": held,
        "optimizer_state_elements": strategies.optimizer_state_elements(optimizer),
    }


def _peak_memory_mb() -> dict[str, float]:
    import resource

    import torch

    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        out["peak_gpu_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def training_arguments(
    spec: WorkerSpec,
    launch: LaunchRecord,
    metric_name: str,
    greater: bool,
    padding_free: bool = False,
) -> Any:
    """The Trainer's arguments: every one from the spec's typed settings or the launch plan
    (``padding_free``: the batches are packed without padding)."""
    import torch
    from transformers import TrainingArguments

    training = spec.training
    every = training.checkpoint_every_steps
    strategy = "steps" if every else "epoch"
    use_cpu = not torch.cuda.is_available()
    return TrainingArguments(
        output_dir=spec.output_dir,
        num_train_epochs=training.epochs,
        max_steps=training.max_steps or -1,
        learning_rate=training.learning_rate,
        per_device_train_batch_size=training.batch_size,
        per_device_eval_batch_size=training.eval_batch_size,
        # derived by the launch plan so that the global batch is the same at any world size
        gradient_accumulation_steps=launch.gradient_accumulation_steps,
        weight_decay=training.weight_decay,
        warmup_steps=training.warmup_ratio,  # a float < 1 is a share of the total steps
        lr_scheduler_type=training.lr_scheduler,
        max_grad_norm=training.max_grad_norm,
        seed=training.seed,
        data_seed=training.seed,
        eval_strategy=strategy,
        save_strategy=strategy,
        eval_steps=every,
        save_steps=every,
        logging_steps=training.logging_steps,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model=metric_name,
        # judged by the validation loss alone (causal LM): never gather full-vocabulary logits
        prediction_loss_only=metric_name == "loss",
        greater_is_better=greater,
        # padded batches: of similar length (less padding); padding-free ones: random
        train_sampling_strategy="random" if padding_free else "group_by_length",
        length_column_name="length",
        report_to=[],
        disable_tqdm=True,
        use_cpu=use_cpu,
        # on CPU under the ZeRO engine, bf16 is DeepSpeed's torch_autocast (see
        # build_deepspeed_config); the Trainer's flag would switch on DeepSpeed's bf16 mode
        bf16=spec.bf16 and not (use_cpu and spec.deepspeed),
        fp16=spec.fp16,
        deepspeed=spec.deepspeed,  # None: one rank, nothing to partition
        dataloader_num_workers=0,
        average_tokens_across_devices=False,
        save_only_model=False,
        label_smoothing_factor=training.label_smoothing,
        # the early-stopping counter (and other callback state) survives a resume
        restore_callback_states_from_checkpoint=True,
        # tokens/s counts real tokens only (a padding-free batch has no other kind)
        include_num_input_tokens_seen="all" if padding_free else "non_padding",
        activation_checkpointing=training.gradient_checkpointing,
        # non-reentrant: gradients also flow when the embeddings are frozen
        activation_checkpointing_kwargs={"use_reentrant": False}
        if training.gradient_checkpointing
        else None,
        torch_compile=training.torch_compile,
    )


def _datasets(spec: WorkerSpec, task: Any) -> tuple[Any, Any]:
    """The tokenized train and validation splits, with only the columns the model takes."""
    from datasets import Dataset

    def load(split: str) -> Dataset:
        ds = Dataset.from_parquet(spec.splits[split])
        keep = [c for c in (*task.model_columns, "length") if c in ds.column_names]
        return ds.select_columns(keep)

    train_ds, eval_ds = load("train"), load("validation")
    if task.eval_order_free and "length" in eval_ds.column_names:
        # validation batches of similar length: less padding, same metrics
        eval_ds = eval_ds.sort("length")
    return train_ds, eval_ds


def _single_process_without_ddp(spec: WorkerSpec) -> None:
    """One rank without a ZeRO engine: a plain process. Under the launcher's variables the
    Trainer wraps the model in DDP at world size 1, which copies every gradient into
    buckets and walks the autograd graph for unused parameters each step, for nothing."""
    if not spec.deepspeed and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        for var in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
            os.environ.pop(var, None)


def _save_final(trainer: Any, spec: WorkerSpec, tokenizer: Any) -> None:
    """The trained model in ``spec.final_dir``, loadable by plain transformers."""
    from domaintune.training import strategies

    final = Path(spec.final_dir)
    lora = spec.training.strategy.kind == "lora"
    # every rank: ZeRO-3 gathers the full weights here (for LoRA: the adapter and new head)
    trainer.save_model(str(final / "adapter" if lora else final))
    if not trainer.is_world_process_zero():
        return
    if lora:
        # the plain model: the base as prepared for training + the adapter, merged; loaded
        # whole on this rank (not partitioned as ZeRO-3 would while its config is active)
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        merged = strategies.merge_lora(prepare_model(spec), str(final / "adapter"))
        merged.save_pretrained(str(final))
        (final / "adapter" / "training_args.bin").unlink(missing_ok=True)
    tokenizer.save_pretrained(str(final))
    (final / "training_args.bin").unlink(missing_ok=True)  # a pickle; the summary has the args


def _training_result(
    trainer: Any,
    result: Any,
    spec: WorkerSpec,
    *,
    report: StrategyReport,
    seen: dict[str, Any],
    launch: LaunchRecord,
    seconds: float,
    metric_name: str,
    allocator: str | None,
    ranks: list[dict[str, Any]],
    padding_free: bool,
    answer_only_logits: bool,
) -> WorkerResult:
    """What the run did, for the finetune task: steps, best metric, throughput, memory,
    what trained and what the saved model must hold (``training_summary.json``)."""
    from domaintune.training.spec import WorkerResult
    from domaintune.training.trainer import early_stopper

    state, training, resume = trainer.state, spec.training, spec.resume_from
    trained_steps = state.global_step - seen.get("start_step", 0)
    tokens = state.num_input_tokens_seen - seen.get("tokens_at_start", 0)
    counts = [r["optimizer_state_elements"] for r in ranks]
    stopper = early_stopper(trainer)
    samples = trained_steps * (launch.global_batch_size or 1)
    return WorkerResult(
        global_step=state.global_step,
        best_metric=state.best_metric,
        best_checkpoint=state.best_model_checkpoint,
        metric_for_best_model=metric_name,
        train_seconds=seconds,
        train_loss=result.training_loss,
        trainable_parameters=report.trainable_parameters,
        total_parameters=report.total_parameters,
        strategy=report,
        optimizer_groups=trainer.group_report,
        optimizer_parameters=sum(g["parameters"] for g in trainer.group_report),
        optimizer_state_elements=None if None in counts else sum(counts),
        early_stopping_counter=getattr(stopper, "early_stopping_patience_counter", None),
        early_stopping_counter_at_start=seen.get("early_stopping_counter_at_start"),
        epochs_completed=state.epoch,
        seconds_per_epoch=seconds / max(state.epoch or 1.0, 1e-9) if not resume else None,
        **_peak_memory_mb(),
        resumed_from=resume,
        launch=launch,
        precision=spec.precision,
        attention=getattr(getattr(trainer.model, "config", None), "_attn_implementation", None),
        allocator=allocator,
        gradient_checkpointing=training.gradient_checkpointing,
        padding_free=padding_free,
        answer_only_logits=answer_only_logits,
        torch_compile=training.torch_compile,
        # what the saved model must hold: the parent checks the files against it
        exported_parameters=report.total_parameters,
        trained_steps=trained_steps,
        train_samples=samples,
        train_tokens=tokens,
        train_samples_per_second=samples / seconds,
        train_tokens_per_second=tokens / seconds,
        start_step=seen.get("start_step", 0),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        ranks=ranks,
        log_history=state.log_history,
    )


def run(spec: WorkerSpec, allocator: str | None = None) -> None:
    """Train as the spec says: the model as training starts from it, the strategy's choice
    of what trains, the Trainer, the saved model and its summary. ``allocator``: what this
    CPU rank allocates with (None on GPU)."""
    from datasets import disable_progress_bars
    from transformers import AutoTokenizer, EarlyStoppingCallback
    from transformers.utils import logging as hf_logging

    from domaintune.storage.manifests import LaunchRecord
    from domaintune.tasktypes import get_task_type
    from domaintune.training import strategies
    from domaintune.training.spec import RESULT_FILE
    from domaintune.training.trainer import StrategyTrainer
    from domaintune.training.trainer import callbacks as trainer_callbacks

    disable_progress_bars()
    hf_logging.set_verbosity_warning() if _rank() == 0 else hf_logging.set_verbosity_error()
    training = spec.training
    task = get_task_type(spec.task_type)
    tokenizer = AutoTokenizer.from_pretrained(
        spec.model_path, use_fast=True, trust_remote_code=spec.trust_remote_code
    )
    if allocator and _rank() == 0:
        logging.getLogger(__name__).info("memory allocator: %s", allocator)
    model = prepare_model(spec)
    answer_only = task.generative and _accepts_logits_to_keep(model)
    if getattr(model.config, "use_cache", None):
        # no key/value cache in training: it is never read, and a model that holds one
        # builds no per-example attention mask for padding-free batches (transformers'
        # packed-sequence detection); the saved model gets it back (_save_final)
        model.config.use_cache = False
        had_cache = True
    else:
        had_cache = False
    # before DeepSpeed initialises: what trains is decided here, once
    model, report = strategies.apply_strategy(model, training.strategy, spec.task_type)
    if not _on_gpu():  # the adapters' own dropout too (LoRA adds one per adapted layer)
        from domaintune.training.dropout import use_cpu_dropout

        use_cpu_dropout(model)
    emit("strategy", **report.model_dump(mode="json", exclude={"components"}))
    train_ds, eval_ds = _datasets(spec, task)
    metric_name, greater = task.metric_for_best_model(spec.primary_metric)
    launch = spec.launch or LaunchRecord(  # a plain call without a launch plan (one process)
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        global_batch_size=training.batch_size * training.gradient_accumulation_steps,
    )
    report.global_batch_size = launch.global_batch_size
    _single_process_without_ddp(spec)
    flat = task.padding_free_collator(tokenizer) if training.padding_free else None
    args = training_arguments(spec, launch, metric_name, greater, padding_free=flat is not None)
    if _rank() == 0:
        logging.getLogger(__name__).info(
            "batches: %s%s",
            "padding-free (examples end to end, positions per example)" if flat else "padded",
            "; output layer on answer positions only" if answer_only else "",
        )

    seen: dict[str, Any] = {}
    callbacks = trainer_callbacks(report, seen, to_store=spec.checkpoints_to_store)
    if training.early_stopping_patience:
        callbacks.append(
            EarlyStoppingCallback(early_stopping_patience=training.early_stopping_patience)
        )
    trainer = StrategyTrainer(
        training_config=training,
        answer_only_logits=answer_only,
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=flat or task.collator(tokenizer, spec.task),
        compute_metrics=None
        if args.prediction_loss_only
        else (lambda eval_pred: task.trainer_metrics(eval_pred, spec.labels)),
        callbacks=callbacks,
    )
    seen["trainer"] = trainer
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=spec.resume_from)
    seconds = time.time() - t0
    # every rank (a collective), before the model is saved: what each held and where it ran
    ranks = _per_rank(_rank_info(trainer.model, trainer.optimizer, allocator))

    if had_cache:
        trainer.model.config.use_cache = True
    _save_final(trainer, spec, tokenizer)
    if trainer.is_world_process_zero():
        _training_result(
            trainer, result, spec, report=report, seen=seen, launch=launch, seconds=seconds,
            metric_name=metric_name, allocator=allocator, ranks=ranks,
            padding_free=flat is not None, answer_only_logits=answer_only,
        ).write(Path(spec.final_dir) / RESULT_FILE)  # fmt: skip
        emit(
            "done",
            global_step=trainer.state.global_step,
            best_metric=trainer.state.best_metric,
            train_seconds=round(seconds, 2),
        )


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _accepts_logits_to_keep(model: Any) -> bool:
    """Whether the model's forward can compute its output layer on chosen positions."""
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def watch_task_process(interval: float = 1.0) -> Callable[[], None]:
    """End this rank when the finetune task that launched it is gone (SIGKILLed worker,
    lost pod): otherwise orphaned ranks would keep training into the same checkpoint folder
    that the retried task resumes from. Only on the task's own host. Returns the function
    that stops the watch (before the interpreter exits: a daemon thread that wakes during
    shutdown may take the process down with it)."""
    import socket
    import threading

    pid = os.environ.get("DOMAINTUNE_TASK_PID")
    if not pid or os.environ.get("DOMAINTUNE_TASK_HOST") != socket.gethostname():
        return lambda: None
    done = threading.Event()

    def watch() -> None:
        while not done.wait(interval):
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                try:  # its last words go to the dead task's pipe, which may be gone too
                    print(f"DOMAINTUNE: the task process {pid} is gone: ending rank {_rank()}")
                    sys.stdout.flush()
                except Exception:
                    pass
                finally:
                    os._exit(4)
            except PermissionError:
                pass  # alive, another user's (pid reuse): keep going

    thread = threading.Thread(target=watch, name="task-watchdog", daemon=True)
    thread.start()

    def stop() -> None:
        done.set()
        thread.join(timeout=interval + 5)

    return stop


def end_distributed() -> None:
    """Leave the process group together: every rank waits for the others to finish, then
    closes its connections. A rank that simply exits while a peer still talks to it can
    take that peer down (gloo aborts on a connection closed mid-operation)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="domaintune.training.worker")
    parser.add_argument("--spec", required=True)
    #: a CPU rank only (training.cpu_allocator): _restart_with_allocator acted on it already
    parser.add_argument("--cpu-allocator", choices=["auto", "system"])
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if _rank() == 0 else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    # a rank that dies by a signal (abort, segfault) prints where each of its threads was
    faulthandler.enable(all_threads=True)
    from domaintune.training.allocator import describe as describe_allocator
    from domaintune.training.spec import WorkerSpec

    spec = WorkerSpec.read(args.spec)
    stop_watch = watch_task_process()
    try:
        # a CPU rank's threads: its share of this host's cores, looked at again every step
        # (domaintune.cpu_share; nothing on a GPU)
        with cpu_slot(f"training rank {_rank()}"):
            run(spec, describe_allocator(args.cpu_allocator) if args.cpu_allocator else None)
        end_distributed()  # only after success: a failed rank's peers are ended by the launcher
    finally:
        stop_watch()
    return 0


def exit_without_finalizing(code: int) -> NoReturn:
    """End the rank without Python's interpreter teardown, once its work is written.

    PyTorch has an open race at interpreter exit (pytorch/pytorch#190489): a gloo or autograd
    worker thread that drops a tensor while ``Py_FinalizeEx`` runs takes the GIL, is ended by
    ``pthread_exit`` inside C++ code, and the process aborts with "terminate called without
    an active exception". A rank that trained and saved its model then dies by SIGABRT and
    the launch fails. Nothing a rank leaves for others is written at exit (the model, the
    checkpoints and their markers are written and closed before this), so output is flushed
    and the process ends here."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _restart_with_allocator(argv: list[str]) -> None:
    """A CPU rank re-executes itself with TCMalloc preloaded (``training.cpu_allocator``;
    domaintune.training.allocator), before it imports anything heavy."""
    from domaintune.training.allocator import restart_with_tcmalloc

    try:  # from the command line: this runs before anything heavy is imported
        choice = argv[argv.index("--cpu-allocator") + 1]
    except (ValueError, IndexError):  # a GPU rank; main() reports a bad command line
        return
    restart_with_tcmalloc(choice, "domaintune.training.worker", argv)


def entry(argv: list[str] | None = None) -> NoReturn:
    try:
        _restart_with_allocator(sys.argv[1:] if argv is None else argv)
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    exit_without_finalizing(code)


if __name__ == "__main__":
    entry()

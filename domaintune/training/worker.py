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
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

CHECKPOINT_MARKER = ".domaintune-complete"
PROGRESS_PREFIX = "DOMAINTUNE "


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def emit(event: str, **fields: Any) -> None:
    """One progress line for the parent (rank 0 only)."""
    if _rank() == 0:
        print(PROGRESS_PREFIX + json.dumps({"event": event, **fields}, default=float), flush=True)


def _callbacks(total_params: int, trainable: int, seen: dict[str, Any]):
    from transformers import TrainerCallback

    class CheckpointMarker(TrainerCallback):
        """Mark a checkpoint complete only after every rank has written its part."""

        def on_save(self, args, state, control, **kwargs):
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.barrier()
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if ckpt.is_dir():
                    (ckpt / CHECKPOINT_MARKER).write_text(
                        json.dumps({"step": state.global_step, "time": time.time()})
                    )
                    emit("checkpoint", step=state.global_step, path=str(ckpt))

    class Progress(TrainerCallback):
        def __init__(self):
            self.t0 = time.time()

        def on_train_begin(self, args, state, control, **kwargs):
            seen["start_step"] = state.global_step  # > 0 when resumed from a checkpoint
            emit(
                "train_begin",
                start_step=state.global_step,
                max_steps=state.max_steps,
                epochs=args.num_train_epochs,
                trainable_parameters=trainable,
                total_parameters=total_params,
            )

        def on_log(self, args, state, control, logs=None, **kwargs):
            fields = {
                "step": state.global_step,
                "max_steps": state.max_steps,
                "epoch": state.epoch,
                "elapsed": round(time.time() - self.t0, 2),
            }
            fields.update({k: v for k, v in (logs or {}).items() if isinstance(v, int | float)})
            emit("log", **fields)

    return [CheckpointMarker(), Progress()]


def run(spec: dict[str, Any]) -> None:
    import torch
    from datasets import Dataset, disable_progress_bars
    from transformers import AutoTokenizer, EarlyStoppingCallback, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    from domaintune.tasktypes import get_task_type

    disable_progress_bars()
    hf_logging.set_verbosity_warning() if _rank() == 0 else hf_logging.set_verbosity_error()
    t = spec["training"]
    task = get_task_type(spec["task_type"])
    labels = spec["labels"]
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"], use_fast=True)
    model = task.load_model(
        spec["model_path"], labels, t["seed"], spec.get("trust_remote_code", False)
    )
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def load(split: str) -> Dataset:
        ds = Dataset.from_parquet(spec["splits"][split])
        keep = [c for c in (*task.model_columns, "length") if c in ds.column_names]
        return ds.select_columns(keep)

    train_ds, eval_ds = load("train"), load("validation")
    primary = spec["primary_metric"]
    metric_name, greater = task.metric_for_best_model(primary)

    def compute_metrics(eval_pred) -> dict[str, float]:
        return task.trainer_metrics(eval_pred, labels)

    # judged by the validation loss alone (causal LM): never gather full-vocabulary logits
    loss_only = metric_name == "loss"

    every = t.get("checkpoint_every_steps")
    strategy = "steps" if every else "epoch"
    use_cpu = not torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=spec["output_dir"],
        num_train_epochs=t["epochs"],
        max_steps=t["max_steps"] or -1,
        learning_rate=t["learning_rate"],
        per_device_train_batch_size=t["batch_size"],
        per_device_eval_batch_size=t["eval_batch_size"],
        gradient_accumulation_steps=t["gradient_accumulation_steps"],
        weight_decay=t["weight_decay"],
        warmup_steps=t["warmup_ratio"],  # a float < 1 is a share of the total steps
        lr_scheduler_type=t["lr_scheduler"],
        max_grad_norm=t["max_grad_norm"],
        seed=t["seed"],
        data_seed=t["seed"],
        eval_strategy=strategy,
        save_strategy=strategy,
        eval_steps=every,
        save_steps=every,
        logging_steps=t["logging_steps"],
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model=metric_name,
        prediction_loss_only=loss_only,
        greater_is_better=greater,
        train_sampling_strategy="group_by_length",  # less padding per batch
        length_column_name="length",
        report_to=[],
        disable_tqdm=True,
        use_cpu=use_cpu,
        bf16=spec["bf16"],
        fp16=spec["fp16"],
        deepspeed=spec["deepspeed"],
        dataloader_num_workers=0,
        average_tokens_across_devices=False,
        save_only_model=False,
    )
    seen: dict[str, Any] = {}
    callbacks = _callbacks(total, trainable, seen)
    if t.get("early_stopping_patience"):
        callbacks.append(
            EarlyStoppingCallback(early_stopping_patience=t["early_stopping_patience"])
        )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=task.collator(tokenizer),
        compute_metrics=None if loss_only else compute_metrics,
        callbacks=callbacks,
    )
    resume = spec.get("resume_from")
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.time() - t0
    final = Path(spec["final_dir"])
    trainer.save_model(str(final))  # every rank: ZeRO-3 gathers the full weights here
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(final))
        (final / "training_args.bin").unlink(missing_ok=True)  # a pickle; the summary has the args
        summary = {
            "global_step": trainer.state.global_step,
            "best_metric": trainer.state.best_metric,
            "best_checkpoint": trainer.state.best_model_checkpoint,
            "metric_for_best_model": metric_name,
            "train_seconds": seconds,
            "train_loss": result.training_loss,
            "trainable_parameters": trainable,
            "total_parameters": total,
            "resumed_from": resume,
            "start_step": seen.get("start_step", 0),
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "log_history": trainer.state.log_history,
        }
        (final / "training_summary.json").write_text(json.dumps(summary, indent=2, default=float))
        emit(
            "done",
            global_step=trainer.state.global_step,
            best_metric=trainer.state.best_metric,
            train_seconds=round(seconds, 2),
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="domaintune.training.worker")
    parser.add_argument("--spec", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if _rank() == 0 else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    spec = json.loads(Path(args.spec).read_text())
    run(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())

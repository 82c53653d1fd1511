"""The Trainer the ranks train with, and its callbacks: domaintune's optimizer groups, the
answer-only loss of generative task types, clipping without a copy, an ended training that
stays ended on resume; checkpoint completion markers, progress lines and fault injection.

It imports transformers at module level: the worker imports this module inside ``run``,
because a CPU rank restarts itself with TCMalloc (``worker._restart_with_allocator``)
before anything heavy loads.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback

from domaintune import cpu_share
from domaintune.storage.manifests import StrategyReport, scalar_metrics
from domaintune.training.checkpoints import CHECKPOINT_MARKER, wait_until_stored
from domaintune.training.events import emit, rank
from domaintune.training.strategies import param_groups


class StrategyTrainer(Trainer):
    """The Trainer with domaintune's optimizer groups: trainable parameters only, the head /
    layer-wise learning rates, no weight decay on biases and norms.

    ``training_config``: the run's TrainingConfig (the groups' learning rates);
    ``answer_only_logits``: a generative task whose output layer computes only the positions
    whose next token is learned (the answers), not the prompts' (``answer_only_loss``)."""

    def __init__(self, *args: Any, training_config: Any, answer_only_logits: bool, **kwargs: Any):
        self.training_config = training_config
        self.answer_only_logits = answer_only_logits
        #: the optimizer's groups as the artifact records them (create_optimizer)
        self.group_report: list[dict[str, Any]] = []
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.answer_only_logits or "labels" not in inputs or self.label_smoother:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs, scaled = answer_only_loss(model, inputs, num_items_in_batch)
        self.loss_is_scaled_for_ga = scaled
        return (loss, outputs) if return_outputs else loss

    def _run_epoch(self, *args, **kwargs):
        # Resumed from the checkpoint where training had already ended (the task was killed
        # while saving the model): transformers would run one more optimizer step before it
        # checks the step limit or the early-stopping decision. Finish instead.
        if self.state.global_step >= self.state.max_steps or stopped_early(self):
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _clip_grad_norm(self, model):
        from accelerate.utils import DistributedType

        from domaintune.training.clipping import clip_grad_norm

        plain = (
            self.accelerator.distributed_type == DistributedType.NO
            and self.accelerator.scaler is None  # fp16 unscales its gradients first
        )
        if not plain:
            return super()._clip_grad_norm(model)
        return clip_grad_norm(model.parameters(), self.args.max_grad_norm)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            groups, self.group_report = param_groups(
                model if model is not None else self.model, self.training_config
            )
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            self.optimizer = cls(groups, **kwargs)
        return self.optimizer


def answer_only_loss(
    model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None
) -> tuple[Any, Any, bool]:
    """(loss, outputs, whether the loss is already divided over the accumulated batch) of a
    causal LM whose output layer runs only where a label is learned: the model's
    ``logits_to_keep`` picks those positions (an SFT prompt's ~90% of the tokens skip the
    vocabulary-sized matrix product, forward and backward). The loss is the same
    token-mean cross-entropy as the model's own: summed, then divided by
    ``num_items_in_batch`` (the learned tokens of the accumulated batch, as transformers
    counts them) or, without it, by this batch's."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    targets = labels[:, 1:]  # position t predicts token t + 1
    keep = (targets != -100).any(0).nonzero().squeeze(-1)
    outputs = model(**inputs, logits_to_keep=keep)
    logits = outputs.logits
    picked = targets[:, keep]
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        picked.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    if num_items_in_batch is None:
        return loss / (picked != -100).sum().clamp(min=1), outputs, False
    return loss / num_items_in_batch, outputs, True


def early_stopper(trainer: Any) -> Any:
    """The trainer's early-stopping callback, or None."""
    if trainer is None:
        return None
    return next(
        (cb for cb in trainer.callback_handler.callbacks if isinstance(cb, EarlyStoppingCallback)),
        None,
    )


def stopped_early(trainer: Any) -> bool:
    """Whether the early-stopping counter restored from a checkpoint had reached patience."""
    stopper = early_stopper(trainer)
    return bool(
        stopper is not None
        and stopper.early_stopping_patience_counter >= stopper.early_stopping_patience
    )


class CheckpointMarker(TrainerCallback):
    """Mark a checkpoint complete only after every rank has written its part (``to_store``:
    a remote store, where a checkpoint counts once it is there)."""

    def __init__(self, to_store: bool = False):
        self.to_store = to_store

    def on_save(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        if not state.is_world_process_zero:
            return
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not ckpt.is_dir():
            return
        # the last checkpoint of a training that is ending: the task stores it only if the
        # launch fails (on success the model becomes the entry)
        final = state.global_step >= state.max_steps or control.should_training_stop
        (ckpt / CHECKPOINT_MARKER).write_text(
            json.dumps({"step": state.global_step, "time": time.time(), "final": final})
        )
        if self.to_store and not final:
            t0 = time.time()
            wait_until_stored(ckpt)
            emit("checkpoint_stored", step=state.global_step, seconds=round(time.time() - t0, 2))
        emit("checkpoint", step=state.global_step, path=str(ckpt))


class Progress(TrainerCallback):
    """Progress lines: where training starts (a resume's step and early-stopping counter,
    written into ``seen`` for the result) and each log with samples and tokens per second."""

    def __init__(self, report: StrategyReport, seen: dict[str, Any]):
        self.report, self.seen = report, seen
        self.t0 = time.time()
        self.last: tuple[float, int, int] | None = None  # (time, step, tokens)

    def on_train_begin(self, args, state, control, **kwargs):
        seen = self.seen
        seen["start_step"] = state.global_step  # > 0 when resumed from a checkpoint
        seen["tokens_at_start"] = state.num_input_tokens_seen or 0
        stopper = early_stopper(seen.get("trainer"))
        if stopper is not None:  # restored from the checkpoint on resume
            seen["early_stopping_counter_at_start"] = stopper.early_stopping_patience_counter
        self.last = (time.time(), state.global_step, state.num_input_tokens_seen or 0)
        emit(
            "train_begin",
            start_step=state.global_step,
            max_steps=state.max_steps,
            epochs=args.num_train_epochs,
            strategy=self.report.strategy,
            trainable_parameters=self.report.trainable_parameters,
            total_parameters=self.report.total_parameters,
            early_stopping_counter=seen.get("early_stopping_counter_at_start"),
        )

    def on_log(self, args, state, control, logs=None, **kwargs):
        fields = {
            "step": state.global_step,
            "max_steps": state.max_steps,
            "epoch": state.epoch,
            "elapsed": round(time.time() - self.t0, 2),
        }
        fields.update(scalar_metrics(logs or {}))
        now, tokens = time.time(), state.num_input_tokens_seen or 0
        if self.last is not None and state.global_step > self.last[1] and now > self.last[0]:
            dt = now - self.last[0]  # includes any evaluation since: a conservative rate
            fields["samples_per_second"] = round(
                (state.global_step - self.last[1]) * (self.report.global_batch_size or 1) / dt, 2
            )
            if tokens > self.last[2]:
                fields["tokens_per_second"] = round((tokens - self.last[2]) / dt, 1)
            self.last = (now, state.global_step, tokens)
        emit("log", **fields)


class CpuShare(TrainerCallback):
    """A CPU rank takes its current share of the host's cores between steps (another run
    may have started or ended beside it; ``domaintune.cpu_share``)."""

    def on_step_begin(self, args, state, control, **kwargs):
        cpu_share.refresh()

    def on_prediction_step(self, args, state, control, **kwargs):
        cpu_share.refresh()


class CrashAfterCheckpoint(TrainerCallback):
    """Fault injection (tests, bench/faults.py), never in a normal run: right after the
    checkpoint of step ``crash_at`` is marked, every rank exits, or only rank
    DOMAINTUNE_FAULT_KILL_RANK dies by SIGKILL (a lost rank: the others are left waiting in a
    collective until the launcher ends them)."""

    def __init__(self, crash_at: int):
        self.crash_at = crash_at

    def on_save(self, args, state, control, **kwargs):
        if state.global_step < self.crash_at:
            return
        victim = os.environ.get("DOMAINTUNE_FAULT_KILL_RANK")
        if victim is None:
            print(f"DOMAINTUNE_FAULT_EXIT_AFTER_STEP={self.crash_at}: exiting", flush=True)
            os._exit(3)
        if int(victim) == rank():
            print(f"DOMAINTUNE_FAULT_KILL_RANK={victim}: SIGKILL", flush=True)
            time.sleep(1.0)  # rank 0 marks the checkpoint it has just written
            os.kill(os.getpid(), signal.SIGKILL)


def callbacks(report: StrategyReport, seen: dict[str, Any], to_store: bool = False) -> list:
    """The ranks' callbacks: checkpoint markers, progress, and (DOMAINTUNE_FAULT_EXIT_AFTER_STEP
    set) the fault injection, right after the marker."""
    out: list[TrainerCallback] = [CheckpointMarker(to_store), Progress(report, seen), CpuShare()]
    crash_at = os.environ.get("DOMAINTUNE_FAULT_EXIT_AFTER_STEP")
    if crash_at:
        out.insert(1, CrashAfterCheckpoint(int(crash_at)))
    return out

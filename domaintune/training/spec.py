"""What crosses the process boundary of a training, both ways, typed.

- :class:`WorkerSpec` (``spec.json``): what the finetune task hands every training rank. The
  task builds it from the run's config and launch plan (tasks/finetune.py); each rank reads
  it back with :meth:`WorkerSpec.read` and uses its fields, the run's own ``training`` and
  ``task`` sections included: every setting is read one way, from these typed models.
- :class:`WorkerResult` (``training_summary.json`` beside the saved model): what rank 0 hands
  back (steps, best metric, what trained, where it ran, throughput, memory). The task reads
  it with :meth:`WorkerResult.read`, adds the saved-model check and builds the
  ``ModelArtifact`` from its typed parts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from domaintune.config import Precision, TaskConfig, TrainingConfig
from domaintune.storage.manifests import (
    LaunchRecord,
    OptimizerGroup,
    SavedModelCheck,
    StrategyReport,
    Throughput,
)

#: the file rank 0 writes its WorkerResult to, beside the saved model
RESULT_FILE = "training_summary.json"


class WorkerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: the run's ``task`` and ``training`` sections
    task: TaskConfig
    training: TrainingConfig
    labels: list[str]
    #: the base model's local folder, and whether its own code may run
    model_path: str
    trust_remote_code: bool = False
    #: model config attributes set when loading it (training.dropout)
    config_overrides: dict[str, Any] = Field(default_factory=dict)
    #: the launch plan's precision (bf16 / fp16: mixed precision, fp32 master weights)
    precision: Precision = "fp32"
    # -- a training (a merge of a LoRA adapter prepares the model only) --------------
    #: tokenized split name -> Parquet path
    splits: dict[str, str] = Field(default_factory=dict)
    output_dir: str = ""
    final_dir: str = ""
    primary_metric: str = ""
    #: the DeepSpeed config (None: one rank without a ZeRO engine)
    deepspeed: dict[str, Any] | None = None
    #: the launch plan's summary (device, ranks, batch arithmetic); None: one plain process
    launch: LaunchRecord | None = None
    resume_from: str | None = None
    checkpoints_to_store: bool = False

    @property
    def task_type(self) -> str:
        return self.task.type

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    @property
    def fp16(self) -> bool:
        return self.precision == "fp16"

    def write(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=2))

    @classmethod
    def read(cls, path: str | Path) -> WorkerSpec:
        return cls.model_validate_json(Path(path).read_text())


class RankRecord(BaseModel):
    """Where one rank ran and what it held (under ZeRO its own partitions)."""

    model_config = ConfigDict(extra="forbid")

    rank: int
    node_rank: int = 0
    local_rank: int = 0
    hostname: str
    #: the address this host was reached at over SSH (multi-node launches)
    ssh_address: str | None = None
    pid: int
    allocator: str | None = None
    parameter_elements: int
    optimizer_state_elements: int | None = None


class WorkerResult(BaseModel):
    """What a training hands back: written by rank 0 after the model is saved, read by the
    finetune task (which adds ``saved_model``: the check that the files load)."""

    model_config = ConfigDict(extra="forbid")

    global_step: int
    best_metric: float | None = None
    best_checkpoint: str | None = None
    metric_for_best_model: str | None = None
    train_seconds: float
    train_loss: float | None = None
    trainable_parameters: int
    total_parameters: int
    strategy: StrategyReport
    optimizer_groups: list[OptimizerGroup] = Field(default_factory=list)
    optimizer_parameters: int = 0
    #: optimizer state elements over all ranks (None where a rank could not count them)
    optimizer_state_elements: int | None = None
    early_stopping_counter: int | None = None
    early_stopping_counter_at_start: int | None = None
    epochs_completed: float | None = None
    #: None for a resumed attempt (its seconds cover part of an epoch)
    seconds_per_epoch: float | None = None
    peak_rss_mb: float | None = None
    peak_gpu_allocated_mb: float | None = None
    resumed_from: str | None = None
    #: the launch plan's summary as the ranks got it (WorkerSpec.launch)
    launch: LaunchRecord
    precision: Precision
    attention: str | None = None
    allocator: str | None = None
    gradient_checkpointing: bool = False
    #: padding-free batches; the output layer on answer positions only
    padding_free: bool = False
    answer_only_logits: bool = False
    torch_compile: bool = False
    #: what the saved model must hold: the task checks the files against it
    exported_parameters: int
    trained_steps: int
    train_samples: int
    train_tokens: int
    train_samples_per_second: float
    train_tokens_per_second: float
    start_step: int = 0
    world_size: int = 1
    ranks: list[RankRecord] = Field(default_factory=list)
    #: the Trainer's log (losses, evaluations, learning rates), as it keeps it
    log_history: list[dict[str, Any]] = Field(default_factory=list)
    #: set by the finetune task, not the ranks
    saved_model: SavedModelCheck | None = None

    @property
    def throughput(self) -> Throughput:
        return Throughput(
            trained_steps=self.trained_steps,
            train_samples=self.train_samples,
            train_tokens=self.train_tokens,
            train_samples_per_second=self.train_samples_per_second,
            train_tokens_per_second=self.train_tokens_per_second,
        )

    def write(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=2))

    @classmethod
    def read(cls, path: str | Path) -> WorkerResult:
        return cls.model_validate_json(Path(path).read_text())

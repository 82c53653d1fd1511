"""What the finetune task hands every training rank: one typed spec (``spec.json``).

The task builds it from the run's config and launch plan (tasks/finetune.py); each rank
reads it back with :meth:`WorkerSpec.read` and uses its fields, the run's own ``training``
and ``task`` sections included: every setting is read one way, from these typed models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from domaintune.config import TaskConfig, TrainingConfig


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
    bf16: bool = False
    fp16: bool = False
    # -- a training (a merge of a LoRA adapter prepares the model only) --------------
    #: tokenized split name -> Parquet path
    splits: dict[str, str] = Field(default_factory=dict)
    output_dir: str = ""
    final_dir: str = ""
    primary_metric: str = ""
    #: the DeepSpeed config (None: one rank without a ZeRO engine)
    deepspeed: dict[str, Any] | None = None
    #: the launch plan's summary (device, ranks, batch arithmetic)
    launch: dict[str, Any] = Field(default_factory=dict)
    resume_from: str | None = None
    checkpoints_to_store: bool = False

    @property
    def task_type(self) -> str:
        return self.task.type

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"

    def write(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=2))

    @classmethod
    def read(cls, path: str | Path) -> WorkerSpec:
        return cls.model_validate_json(Path(path).read_text())

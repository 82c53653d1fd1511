"""The whole config of a retraining use case, and the rules that span its sections."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from domaintune.config.sections import (
    ContractConfig,
    DataConfig,
    EvaluationConfig,
    ModelConfig,
    PreprocessConfig,
    PromotionConfig,
    RetriesConfig,
    Section,
    StoreConfig,
    TaskConfig,
    TrackingConfig,
    TrainingConfig,
    TuneConfig,
)


class RetrainConfig(Section):
    """Everything a retraining run needs. Loaded from YAML; every key has a default but
    `name` and `data.source`."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Use case name.")
    domain: str = Field("general", description="Business domain (finance, healthcare, ...).")
    task: TaskConfig = Field(default_factory=TaskConfig)
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    contract: ContractConfig = Field(default_factory=ContractConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    retries: RetriesConfig = Field(default_factory=RetriesConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig,
        description="Experiment tracking (TensorBoard, MLflow); never part of a cache key.",
    )
    stages: list[dict[str, Any]] | None = Field(
        None,
        description="A multi-stage recipe (domaintune.recipes): stages run in order, each "
        "the config above with the stage's own sections merged on, each starting from the "
        "previous stage's model; only the last is registered.",
    )
    tune: TuneConfig = Field(
        default_factory=TuneConfig,
        description="Hyperparameter search (domaintune tune); never part of a cache key.",
    )

    @model_validator(mode="after")
    def _credentials_by_reference(self) -> RetrainConfig:
        from domaintune.credentials import literal_secrets

        written = literal_secrets(self.data.storage_options, "data.storage_options")
        written += literal_secrets(self.store.storage_options, "store.storage_options")
        if written:
            raise ValueError(
                f"{', '.join(written)}: a credential written into the config; rule: reference "
                "it as ${env:NAME} (Prefect stores a run's parameters as given and shows them "
                "in its UI)"
            )
        return self

    @model_validator(mode="after")
    def _stages_run(self) -> RetrainConfig:
        if self.stages is not None:
            from domaintune.recipes import check_stages

            check_stages(self)
        return self

    @model_validator(mode="after")
    def _metric_fits_task(self) -> RetrainConfig:
        from domaintune.tasktypes import get_task_type

        task = get_task_type(self.task.type)
        if self.model.name_or_path is None:
            self.model.name_or_path = task.default_model
        allowed = task.metrics
        if self.evaluation.primary_metric is None:
            self.evaluation.primary_metric = allowed[0]
        if self.evaluation.primary_metric not in allowed:
            raise ValueError(
                f"evaluation.primary_metric {self.evaluation.primary_metric!r} is not a "
                f"{self.task.type} metric; allowed: {', '.join(allowed)}"
            )
        if self.training.strategy.head is not None and not task.custom_head:
            from domaintune.tasktypes import task_type_names

            able = [n for n in task_type_names() if get_task_type(n).custom_head]
            raise ValueError(
                f"training.strategy.head applies to {' and '.join(able)}, not {self.task.type}"
            )
        return self

    @model_validator(mode="after")
    def _task_settings(self) -> RetrainConfig:
        """The settings the task type needs (translation: its languages)."""
        from domaintune.tasktypes import get_task_type

        get_task_type(self.task.type).check_config(self)
        return self

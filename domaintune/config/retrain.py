"""The whole config of a retraining use case, and the rules that span its sections."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from domaintune.config.sections import (
    ContractConfig,
    DataConfig,
    EvaluationConfig,
    ExportConfig,
    ModelConfig,
    PreprocessConfig,
    PromotionConfig,
    RetrainPolicyConfig,
    RetriesConfig,
    Section,
    StoreConfig,
    TaskConfig,
    TrackingConfig,
    TrainingConfig,
    TuneConfig,
)
from domaintune.config.space import check_space_keys
from domaintune.credentials import literal_secrets


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
    retrain: RetrainPolicyConfig = Field(
        default_factory=RetrainPolicyConfig,
        description="When a run trains and from what: the champion's health on new files, "
        "drift, continual training (domaintune.monitoring).",
    )
    export: ExportConfig = Field(
        default_factory=ExportConfig,
        description="Exports of each new version for serving (domaintune.exporting).",
    )
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
    def _tune_space(self) -> RetrainConfig:
        """Each key of ``tune.space`` is a training key that takes every value it lists."""
        check_space_keys(self.tune.space, type(self))
        return self

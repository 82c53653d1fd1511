"""The one configuration model of a retraining use case.

Loaded from YAML by the CLI, from Prefect parameters by deployments, and from Python alike.
Unknown keys are errors (with a did-you-mean), and every error names the key and the allowed
values, so that a typo never silently falls back to a default.

- ``sections.py``: each section's model (what it can say, defaults, rules);
- ``retrain.py``: ``RetrainConfig``, the whole config, and the rules that span sections;
- ``loading.py``: YAML / dict / overrides -> a validated config, errors as one line each.
"""

from domaintune.config.loading import (
    apply_override,
    format_validation_error,
    parse_config,
    read_config,
    validate_schema,
)
from domaintune.config.retrain import RetrainConfig
from domaintune.config.sections import (
    ContractConfig,
    DataConfig,
    DeepSpeedConfig,
    DropoutConfig,
    EvaluationConfig,
    ExportConfig,
    HeadConfig,
    LoraConfig,
    ModelConfig,
    Precision,
    PreprocessConfig,
    PromotionConfig,
    RetrainPolicyConfig,
    RetriesConfig,
    Section,
    StoreConfig,
    StrategyConfig,
    TaskConfig,
    TrackingConfig,
    TrainingConfig,
    TuneConfig,
    TuneParamConfig,
)

__all__ = [
    "ContractConfig",
    "DataConfig",
    "DeepSpeedConfig",
    "DropoutConfig",
    "EvaluationConfig",
    "ExportConfig",
    "HeadConfig",
    "LoraConfig",
    "ModelConfig",
    "Precision",
    "PreprocessConfig",
    "PromotionConfig",
    "RetrainConfig",
    "RetrainPolicyConfig",
    "RetriesConfig",
    "Section",
    "StoreConfig",
    "StrategyConfig",
    "TaskConfig",
    "TrackingConfig",
    "TrainingConfig",
    "TuneConfig",
    "TuneParamConfig",
    "apply_override",
    "format_validation_error",
    "parse_config",
    "read_config",
    "validate_schema",
]

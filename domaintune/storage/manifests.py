"""What passes between stages: manifests (paths, fingerprints, counts), never DataFrames."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from domaintune.config import Precision


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The figures of a metrics mapping (not its per-class tables, confusion matrices, texts
    or flags): what is tracked, compared, charted and registered."""
    return {
        k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: str
    key: str = Field(description="Content-addressed store key of this output.")
    path: str = Field(description="Local folder of the store entry.")
    fingerprint: str = Field(description="Fingerprint of the content, for downstream keys.")
    reused: bool = Field(False, description="True when the entry came from the store.")


class IngestedFile(BaseModel):
    """One file ingest read, as the raw snapshot records it (the file to read is
    ``readers.sources.SourceFile``)."""

    path: str
    sha256: str
    rows: int
    encoding: str | None = None
    split: str | None = Field(None, description="Predefined split (data.splits), if any.")


class RawSnapshot(Manifest):
    stage: str = "ingest"
    rows: int
    columns: list[str]
    sources: list[IngestedFile]
    labels: list[str]
    label_counts: dict[str, int]
    notes: list[str] = Field(default_factory=list)
    #: data.on_invalid: quarantine: records that did not parse (kept with their line and
    #: reason in ``unparsed.parquet``, judged by validate's quarantine share).
    unparsed_rows: int = 0
    #: CSV rows whose every field was empty (skipped, not data)
    empty_rows: int = 0

    @property
    def table(self) -> str:
        return f"{self.path}/raw.parquet"

    @property
    def unparsed_table(self) -> str | None:
        return f"{self.path}/unparsed.parquet" if self.unparsed_rows else None


class ValidationReport(Manifest):
    stage: str = "validate"
    success: bool
    contract: str
    evaluated: int
    failed: int
    report_json: str
    report_markdown: str
    failures: list[dict[str, Any]] = Field(default_factory=list)
    #: data.on_invalid: quarantine: rows left out (row rules broken or not parsed), their
    #: share of all rows, and the Parquet table listing them with their reasons.
    quarantined_rows: int = 0
    quarantine_share: float = 0.0
    quarantine_table: str | None = None
    quarantine_fingerprint: str | None = None


class SplitInfo(BaseModel):
    path: str
    rows: int
    fingerprint: str
    label_counts: dict[str, int]


class SplitManifest(Manifest):
    stage: str = "preprocess"
    splits: dict[str, SplitInfo]
    labels: list[str]
    tokenizer_fingerprint: str
    stats: dict[str, Any] = Field(default_factory=dict)


class Part(BaseModel):
    """A typed part of a manifest. Entries written by older code still read: a field they
    lack takes its default, a key they had that is gone is ignored (a cached model is not
    retrained for a change in what its record says)."""

    model_config = ConfigDict(extra="ignore")


class ComponentCount(Part):
    trainable: int = 0
    total: int = 0


class StrategyReport(Part):
    """What trained (``training.strategy`` as applied to this model, by
    ``training.strategies.apply_strategy``)."""

    #: the strategy as the config's ``describe()`` says it ("full", "lora(r=16, ...)", ...)
    strategy: str = "full"
    #: full / frozen / components / top_layers / lora ...
    kind: str = "full"
    trainable_parameters: int = 0
    total_parameters: int = 0
    trainable_share: float = 0.0
    #: embeddings / attention / feed_forward / layer_norm / head / other -> counts
    components: dict[str, ComponentCount] = Field(default_factory=dict)
    num_layers: int = 0
    trained_blocks: list[int] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    #: LoRA: the adapters' own parameters
    adapter_parameters: int | None = None
    global_batch_size: int | None = None


class OptimizerGroup(Part):
    """One optimizer parameter group: its learning rate and weight decay, what it holds."""

    lr: float
    weight_decay: float
    parameters: int
    tensors: int = 0
    #: embeddings / body / block N / top / head
    parts: list[str] = Field(default_factory=list)


class LaunchRecord(Part):
    """Where and how it ran: the launch plan's summary and what the ranks reported."""

    world_size: int = 1
    num_nodes: int = 1
    hosts: list[list[Any]] = Field(default_factory=list)
    device: str = "cpu"
    precision: Precision | None = None
    precision_reason: str | None = None
    micro_batch_size: int | None = None
    gradient_accumulation_steps: int = 1
    global_batch_size: int | None = None
    zero_engine: bool = False
    zero_stage: int | None = None
    attention: str | None = None
    allocator: str | None = None
    gradient_checkpointing: bool | None = None
    torch_compile: bool | None = None


class Throughput(Part):
    """Training throughput of the last attempt: samples and real (non-padding) tokens."""

    trained_steps: int | None = None
    train_samples: int | None = None
    train_tokens: int | None = None
    train_samples_per_second: float | None = None
    train_tokens_per_second: float | None = None


class SavedModelCheck(Part):
    """What the saved-model check found (``training.checks.verify_saved_model``)."""

    files: list[str] = Field(default_factory=list)
    tensors: int = 0
    parameters: int = 0
    bytes: int = 0
    loads_in_transformers: bool = False


class ModelArtifact(Manifest):
    stage: str = "finetune"
    model_dir: str
    base_model: str
    base_fingerprint: str
    labels: list[str]
    trainable_parameters: int
    total_parameters: int
    global_step: int
    best_metric: float | None = None
    train_seconds: float
    #: One record per launch of the ranks (the attempts log, ``attempts.json``).
    attempts: list[dict[str, Any]] = Field(default_factory=list)
    strategy: StrategyReport = Field(default_factory=StrategyReport)
    optimizer_groups: list[OptimizerGroup] = Field(default_factory=list)
    seconds_per_epoch: float | None = None
    peak_rss_mb: float | None = None
    peak_gpu_allocated_mb: float | None = None
    launch: LaunchRecord = Field(default_factory=LaunchRecord)
    throughput: Throughput = Field(default_factory=Throughput)
    saved_model: SavedModelCheck = Field(default_factory=SavedModelCheck)


class EvaluationReport(Manifest):
    stage: str = "evaluate"
    primary_metric: str
    finetuned: dict[str, Any]
    base: dict[str, Any]
    gain: dict[str, float]
    test_rows: int
    #: The production model at evaluation time: {version, metrics (re-scored on this test
    #: split, or None), note}; None when there is no champion yet.
    champion: dict[str, Any] | None = None
    metrics_json: str
    report_markdown: str


class HealthReport(Manifest):
    """The monitor stage's outcome (tasks/monitor.py): the champion on the files that
    landed since it was trained, the drift of those files from its training data, and
    whether this run trains (``retrain.when``)."""

    stage: str = "monitor"
    #: the production version measured (None: none yet)
    version: str | None = None
    new_files: list[str] = Field(default_factory=list)
    rows: int = 0
    #: the figure per new file: file, rows, value, low, high, degraded
    per_file: list[dict[str, Any]] = Field(default_factory=list)
    primary_metric: str | None = None
    #: the champion's primary metric on the new rows, with its bootstrap interval
    value: float | None = None
    low: float | None = None
    high: float | None = None
    #: the champion's registered test figure
    registered: float | None = None
    degraded: bool | None = None
    drifted: bool | None = None
    #: DriftReport (domaintune.drift) as JSON
    drift: dict[str, Any] | None = None
    train: bool = True
    message: str = ""
    report_markdown: str | None = None


class ExportManifest(Manifest):
    """One export of one model (``domaintune.tasks.export``): its folder, its parity with
    the model on the test split and its speed on this machine."""

    stage: str = "export"
    format: str
    model_fingerprint: str
    files: list[str] = Field(default_factory=list)
    bytes: int = 0
    parity: dict[str, Any] = Field(default_factory=dict)
    latency: dict[str, Any] = Field(
        default_factory=dict,
        description="p50/p95 ms of one text and of batches of 32, texts/s: the export's "
        "(``export``) and the PyTorch model's measured beside it (``torch``).",
    )
    machine: str = ""
    seconds: float = 0.0
    refused: str | None = Field(
        None, description="Why the export was refused (its rule broken); nothing kept then."
    )


class Registration(Manifest):
    stage: str = "register"
    name: str
    version: str
    model_dir: str
    promoted: bool
    promotion_reason: str
    registry_dir: str
    primary_metric: str
    metrics: dict[str, float] = Field(default_factory=dict, description="Fine-tuned test metrics.")
    interval: dict[str, Any] | None = Field(
        None,
        description="The primary metric's bootstrap interval on the test split "
        "(domaintune.evidence.Interval): what the champion's health on new data is held to.",
    )
    evidence: dict[str, Any] | None = Field(
        None,
        description="The paired tests against the champion (domaintune.promotion.Evidence): "
        "on the whole test split, on the champion's own test rows and on the new rows.",
    )
    exports: dict[str, Any] = Field(
        default_factory=dict,
        description="format -> its folder under the version (exports/<format>), parity, "
        "latency; or the reason it was refused.",
    )


class ScoredFile(Manifest):
    """One input file scored by one model version (``domaintune.tasks.score``)."""

    stage: str = "score"
    source: str = Field(description="The input file (credentials redacted).")
    sha256: str = Field(description="Fingerprint of the input file's content.")
    rows: int
    model: str = Field(description="The model reference as given (NAME@production, ...).")
    version: str | None = Field(None, description="The registry version that scored it.")
    model_fingerprint: str
    task_type: str
    counts: dict[str, int] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)
    seconds: float = 0.0

    @property
    def predictions(self) -> str:
        return f"{self.path}/predictions.parquet"


class StageRecord(BaseModel):
    name: str
    cached: bool
    seconds: float
    key: str | None = None


class RunSummary(BaseModel):
    run_id: str | None
    name: str
    domain: str
    status: str
    stages: list[StageRecord]
    metrics: dict[str, Any] = Field(default_factory=dict)
    model_dir: str | None = None
    version: str | None = None
    promoted: bool = False
    promotion_reason: str | None = None
    validation_report: str | None = None
    #: Rows left out by data.on_invalid: quarantine, and the table that lists them.
    quarantined_rows: int = 0
    quarantine_table: str | None = None
    #: What trained: strategy, trainable / total parameters, seconds per epoch, peak memory.
    training: dict[str, Any] = Field(default_factory=dict)
    #: Whether code shipped with the model was allowed to run (model.trust_remote_code).
    trust_remote_code: bool = False
    #: A multi-stage recipe's earlier stages (domaintune.recipes.stage_record), in order.
    recipe: list[dict[str, Any]] = Field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None

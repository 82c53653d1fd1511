"""What ``domaintune predict`` (and the score stage) hands a task type's ``predict``: the
model a reference resolved to (:class:`PredictModel`), a loader that loads it as its
evaluation loaded it, and the shared mechanics (:func:`encoded_logits`: logits of encoded
rows in batches, with the task type's collator, in the model's precision, with progress).
The task type turns raw input rows into its predictions with them; ``domaintune.serving.predict``
only resolves the reference, reads the inputs and writes the outputs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from domaintune.config import Precision
from domaintune.inference import autocast_for, batched_logits
from domaintune.progress import Progress

log = logging.getLogger("domaintune.serving.predict")

#: () -> (tokenizer, model in eval mode, precision): the model loaded as its evaluation
#: loaded it to score (``domaintune.loading.load_for_scoring``), given by predict
Loader = Callable[[], tuple[Any, Any, str]]


@dataclass
class PredictModel:
    """The model a reference resolved to, and what predicting with it needs."""

    reference: str
    model_dir: Path
    task_type: str
    labels: list[str]
    text_column: str = "text"
    max_length: int = 256
    batch_size: int = 64
    version: str | None = None
    config: Any = None
    notes: list[str] = field(default_factory=list)
    #: what runs the model: torch, or a verified ONNX export (onnx, onnx-int8)
    runtime: str = "torch"
    #: the verified exports it has: format -> {"folder": local folder, "parity", "latency"}
    exports: dict[str, Any] = field(default_factory=dict)

    def column(self, name: str) -> str:
        """A column setting of the model's data (``data.<name>``; the default without one)."""
        from domaintune.config import DataConfig

        data = self.config.data if self.config is not None else None
        return getattr(data, name) if data is not None else DataConfig.model_fields[name].default

    def task_settings(self) -> Any:
        """The model's ``task`` section (its defaults without a config)."""
        from domaintune.config import TaskConfig

        return self.config.task if self.config is not None else TaskConfig(type=self.task_type)

    def tokenize_settings(self) -> Any:
        """How the model's training tokenized (max_length, stride): the same here."""
        from domaintune.tasktypes.base import TokenizeSettings

        return TokenizeSettings(max_length=self.max_length, stride=self.task_settings().stride)

    def describe(self) -> str:
        where = f" = {self.version}" if self.version and self.version not in self.reference else ""
        return f"{self.reference}{where} ({self.task_type}, {self.model_dir})"


def encoded_logits(
    model: PredictModel,
    net: Any,
    tokenizer: Any,
    precision: Precision,
    enc: Any,
    logits_of: Callable[[Any], Any] | None = None,
) -> list:
    """The logits of every encoded row (``inference.batched_logits``, with the task type's
    collator as in evaluation, in ``precision``, with a progress display)."""
    from domaintune.tasktypes import get_task_type

    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    feats = [{k: enc[k][i] for k in keys} for i in range(len(enc["input_ids"]))]
    collate = get_task_type(model.task_type).collator(tokenizer)
    progress = Progress(len(feats), "predict", logger=log)
    with autocast_for(net, precision):
        out = batched_logits(net, collate, feats, model.batch_size, progress.advance, logits_of)
    progress.close()
    return out


def value_counts(values: Any) -> dict[str, int]:
    """How often each value occurs (a summary's counts)."""
    return {str(k): int(v) for k, v in pd.Series(values, dtype=object).value_counts().items()}

"""Loading a task model: the one way training (``training.worker``), scoring (the evaluate
stage: the base model, the fine-tuned one, the champion; ``domaintune predict``), the merge
of a registered LoRA adapter (``domaintune.chaining``) and chaining load one, from one small
typed spec, :class:`LoadSpec`.

What it does, in order: the task type's loader (``TaskType.load_model``: the Auto class, the
label maps, a custom head restored), a fresh head initialised from the seed where the
folder's own head does not fit the run (another task or label set:
``strategies.head_change``), then the training strategy's changes to the architecture
(dropped blocks, a custom head, embeddings from another model: ``strategies.prepare_structure``)
for a base model that training starts from. Scoring adds the tokenizer, the precision the
training used on this machine and eval mode (:func:`load_for_scoring`), and runs under ``autocast_for`` (``domaintune.inference``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from domaintune.config import StrategyConfig, TrainingConfig
from domaintune.inference import autocast_for
from domaintune.tasktypes import get_task_type
from domaintune.training.attention import CPU_ATTENTION, attention_implementation
from domaintune.training.launch import inference_precision
from domaintune.training.strategies import fresh_head, head_change, prepare_structure

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadSpec:
    """How a task model is loaded."""

    #: a local model folder (``domaintune.models`` / ``domaintune.chaining`` resolve names)
    path: str
    task_type: str
    #: the run's labels (the new head's size and label maps; [] for tasks without labels)
    labels: tuple[str, ...] = ()
    #: a new head is initialised from it alone (the base model scored "before fine-tuning"
    #: starts from exactly the head training started from)
    seed: int = 42
    trust_remote_code: bool = False
    #: the training strategy whose architecture changes apply, for a base model as training
    #: starts from it; None for a model as it was saved (a fine-tuned one)
    structure: StrategyConfig | None = None
    #: model config attributes set on load (dropout: ``strategies.dropout_overrides``)
    config_overrides: Mapping[str, Any] = field(default_factory=dict)
    #: the attention function (``training.attention.attention_implementation``); None:
    #: transformers' default
    attention: str | None = None


def load_model(spec: LoadSpec) -> Any:
    """The task model ``spec`` describes (train mode, as transformers loads it)."""
    overrides = dict(spec.config_overrides)
    if spec.attention:
        overrides["attn_implementation"] = spec.attention
    model = load_task_model(
        spec.task_type,
        spec.path,
        list(spec.labels),
        spec.seed,
        spec.trust_remote_code,
        **overrides,
    )
    if spec.structure is not None:
        for note in prepare_structure(model, spec.structure, spec.path):
            log.info("strategy: %s", note)
    return model


def load_task_model(
    task_type: str,
    path: str,
    labels: list[str],
    seed: int,
    trust_remote_code: bool = False,
    **config_overrides: Any,
) -> Any:
    """The task type's ``load_model``, with a fresh head where the folder's own head does
    not fit the run (``strategies.head_change``), so training, the base model's evaluation
    and the merge of an adapter start from the same head."""
    task = get_task_type(task_type)
    if head_change(path, task_type, labels) is None:
        return task.load_model(path, labels, seed, trust_remote_code, **config_overrides)
    saved = json.loads((Path(path) / "config.json").read_text())
    if saved.get("domaintune_head"):  # a custom head of the other task: not rebuilt
        config_overrides["domaintune_head"] = None
    model = task.load_model(
        path, labels, seed, trust_remote_code, ignore_mismatched_sizes=True, **config_overrides
    )
    fresh_head(model, seed)
    return model


def load_for_scoring(
    model_path: str,
    task_type: str,
    labels: list[str],
    training: TrainingConfig,
    trust_remote_code: bool = False,
    structure: StrategyConfig | None = None,
) -> tuple[Any, Any, str]:
    """(tokenizer, model in eval mode, precision): a model loaded to be scored, the one way
    every scoring does it (the evaluate stage, the base model, the champion, ``domaintune
    predict``): :func:`load_model` with the CPU attention function (see
    domaintune.training.attention; on GPUs transformers' default) and the training's
    precision on this machine. ``structure`` (a base model: the training strategy): its
    changes to the architecture, applied as training applies them before its first step."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "newly initialised head" report is expected here
    tok = AutoTokenizer.from_pretrained(
        model_path, use_fast=True, trust_remote_code=trust_remote_code
    )
    precision = inference_precision(training)[0]
    attention = attention_implementation(training.attention, precision, model_path)
    spec = LoadSpec(
        path=model_path,
        task_type=task_type,
        labels=tuple(labels),
        seed=training.seed,
        trust_remote_code=trust_remote_code,
        structure=structure,
        attention=attention if attention == CPU_ATTENTION else None,
    )
    model = load_model(spec)
    model.eval()
    return tok, model, precision


__all__ = ["LoadSpec", "autocast_for", "load_for_scoring", "load_model", "load_task_model"]

"""The config rules that need the task type, applied once after the schema has parsed a
config (``domaintune.runconfig.complete``; a recipe's stages in ``domaintune.recipes``): the
config package itself knows no task type.

- ``task.type`` names a task type (built in, an entry point, or registered in-process);
- its defaults: ``model.name_or_path`` (the task type's ``default_model``) and
  ``evaluation.primary_metric`` (its first metric);
- the primary metric is one of its metrics; ``training.strategy.head`` only where the task
  type builds a custom head;
- the settings the task type asks for itself (``TaskType.check_config``: translation's
  languages) and the options it declares (``task.options``, checked by its
  ``options_model``, defaults filled in: a plug-in's own settings).
"""

from __future__ import annotations

from typing import Any

from domaintune.tasktypes import get_task_type, task_type_names


def apply_task_rules(config: Any) -> None:
    """Fill the task type's defaults into ``config`` (a RetrainConfig, in place) and check
    the rules above; ValueError with one line naming the key when one is broken. Applying
    it again changes nothing."""
    names = task_type_names()
    if config.task.type not in names:
        raise ValueError(
            f"task.type: unknown task type {config.task.type!r}; allowed: {', '.join(names)}"
        )
    task = get_task_type(config.task.type)
    if config.model.name_or_path is None:
        config.model.name_or_path = task.default_model
    allowed = task.metrics
    if config.evaluation.primary_metric is None:
        config.evaluation.primary_metric = allowed[0]
    if config.evaluation.primary_metric not in allowed:
        raise ValueError(
            f"evaluation.primary_metric {config.evaluation.primary_metric!r} is not a "
            f"{config.task.type} metric; allowed: {', '.join(allowed)}"
        )
    if config.training.strategy.head is not None and not task.custom_head:
        able = [n for n in names if get_task_type(n).custom_head]
        raise ValueError(
            f"training.strategy.head applies to {' and '.join(able)}, not {config.task.type}"
        )
    exportable = task.export_formats()
    refused = [f for f in config.export.formats if f not in exportable]
    if refused:
        raise ValueError(
            f"export.formats: {', '.join(refused)} cannot be made for {config.task.type}; "
            f"allowed: {', '.join(exportable) or 'none'}"
        )
    task.complete_options(config)
    task.check_config(config)

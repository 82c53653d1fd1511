"""A run's config: parsed and validated by the schema (``domaintune.config``, which knows no
task type, recipe or tuner), then completed and checked by the rules that need them, in one
explicit step (:func:`complete`):

1. the task type's rules and defaults (``domaintune.tasktypes.rules``: the task type exists,
   its default base model and primary metric, its own settings);
2. a multi-stage recipe's stages (``domaintune.recipes.check_stages``: each stage a complete,
   valid config).

Every way a config enters a run goes through it: :func:`load_config` / :func:`validate_config`
(the CLI, the tuner's trials, Python), and :func:`complete` at the start of each flow (Prefect
validates a deployment's parameters with the schema alone). Errors are ConfigError, one line
per problem, as the schema's.
"""

from __future__ import annotations

import os
import re
from typing import Any

from domaintune.config import RetrainConfig, read_config, validate_schema
from domaintune.errors import ConfigError, shown
from domaintune.recipes import check_stages
from domaintune.tasktypes import task_type_names
from domaintune.tasktypes.rules import apply_task_rules


def complete(config: RetrainConfig, origin: str = "<config>") -> RetrainConfig:
    """``config`` with the task type's defaults filled in (in place; returned), after the
    rules above; ConfigError naming ``origin`` and the key otherwise. Idempotent."""
    try:
        apply_task_rules(config)
        if config.stages is not None:
            check_stages(config)
    except ValueError as exc:
        raise ConfigError(f"{origin}: invalid config (1 problem(s))\n  {exc}") from None
    return config


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    data: dict[str, Any] | None = None,
) -> RetrainConfig:
    """A config from YAML (or a dict) with ``key.path=value`` overrides, validated by the
    schema and completed (:func:`complete`)."""
    origin = str(path) if path is not None else "<config>"
    return validate_config(read_config(path, overrides, data), origin)


def validate_config(data: dict[str, Any], origin: str = "<config>") -> RetrainConfig:
    """A config from a dict, validated by the schema and completed. An unknown task type is
    named beside the schema's problems, as one of them."""
    try:
        config = validate_schema(data, origin)
    except ConfigError as exc:
        unknown = _unknown_task_type(data)
        if unknown is None:
            raise
        raise ConfigError(_with_problem(str(exc), unknown)) from None
    return complete(config, origin)


def _unknown_task_type(data: dict[str, Any]) -> str | None:
    task = data.get("task")
    name = task.get("type") if isinstance(task, dict) else None
    names = task_type_names()
    if isinstance(name, str) and name not in names:
        shown_name = shown(name, quote=True)
        return f"task.type: unknown task type {shown_name}; allowed: {', '.join(names)}"
    return None


def _with_problem(message: str, problem: str) -> str:
    """The schema's error (``origin: invalid config (N problem(s))`` and a line each) with
    one more problem."""
    head, *lines = message.splitlines()
    counted = re.sub(r"\((\d+) problem\(s\)\)", lambda m: f"({int(m[1]) + 1} problem(s))", head)
    return "\n".join([counted, f"  {problem}", *lines])

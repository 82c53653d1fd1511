"""Task types are plug-ins behind one interface (``base.TaskType``), found by name.

A task type is one module plus one contract in ``data_contracts/``: a module of this package
named like the task type (``domaintune/tasktypes/<name>.py``) that defines its class with
``@register_task_type``; a class in another package, through the ``domaintune.task_types``
entry-point group (``name = "package.module:Class"``); or, in-process, any class passed to
:func:`register_task_type`. The config, the stages and the training strategies ask the task
type (its metrics, default model, head kind); no table elsewhere lists them.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points

from domaintune.config import sections as _config_sections
from domaintune.errors import ConfigError
from domaintune.tasktypes.base import TaskType

#: name -> class, for every task type imported so far
_REGISTRY: dict[str, type[TaskType]] = {}
_GROUP = "domaintune.task_types"
_NOT_TASK_TYPES = {"base", "heads", "predicting", "rules"}  # helper modules


def register_task_type(cls: type[TaskType]) -> type[TaskType]:
    """Class decorator: make ``cls`` the task type named ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, TaskType)):
        raise TypeError(f"{cls!r} is not a TaskType subclass")
    _REGISTRY[cls.name] = cls
    return cls


def _builtin_names() -> list[str]:
    return sorted(
        m.name
        for m in pkgutil.iter_modules(__path__)
        if not m.name.startswith("_") and m.name not in _NOT_TASK_TYPES
    )


def _plugins() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=_GROUP)}


def task_type_names() -> list[str]:
    """Every task type a config may name (without importing their modules)."""
    return sorted({*_builtin_names(), *_plugins(), *_REGISTRY})


def get_task_type(name: str) -> TaskType:
    if name not in _REGISTRY:
        if name in _builtin_names():
            importlib.import_module(f"{__name__}.{name}")  # registers itself
        elif name in _plugins():
            module, _, attr = _plugins()[name].partition(":")
            register_task_type(getattr(importlib.import_module(module), attr))
    if name not in _REGISTRY:
        raise ConfigError(
            f"task.type: unknown task type {name!r}; allowed: {', '.join(task_type_names())}"
        )
    return _REGISTRY[name]()


# the config's JSON schema offers these names (the Prefect form's drop-down)
_config_sections.task_type_choices = task_type_names

__all__ = ["TaskType", "get_task_type", "register_task_type", "task_type_names"]

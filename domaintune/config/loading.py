"""Loading a config: YAML or a dict, ``key.path=value`` overrides, paths relative to the
file, and validation errors as one line per problem with a did-you-mean."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from domaintune.config.retrain import RetrainConfig
from domaintune.errors import ConfigError


def parse_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    data: dict[str, Any] | None = None,
) -> RetrainConfig:
    """Parse a config from YAML (or a dict), apply ``key.path=value`` overrides, validate it
    by the schema. A run's config is this completed by the rules that need the task types
    and recipes: ``domaintune.runconfig.load_config``."""
    origin = str(path) if path is not None else "<config>"
    return validate_schema(read_config(path, overrides, data), origin)


def read_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A config's YAML (or a copy of ``data``) with the overrides applied, not yet
    validated.

    Relative local paths (``data.source``, ``store.root``, ``contract.path``) are resolved
    against the working directory, as with other training CLIs; run from the project root.
    """
    origin = str(path) if path is not None else "<config>"
    if data is None:
        if path is None:
            raise ConfigError("no config given")
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{origin}: config file not found") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{origin}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the config must be a mapping of keys to values")
    data = _deepcopy(data)
    for item in overrides or []:
        apply_override(data, item)
    _resolve_relative_paths(data, Path.cwd())
    return data


def validate_schema(data: dict[str, Any], origin: str = "<config>") -> RetrainConfig:
    try:
        return RetrainConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, origin)) from None


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override; the value is parsed as YAML (3, true, [a, b])."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {key}: {part!r} is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def _resolve_relative_paths(data: dict[str, Any], base: Path) -> None:
    """Make local paths absolute (relative to ``base``) so that the config means the same
    files wherever the flow later runs (a worker, a retry in another process)."""

    def fix(p: str) -> str:
        if "://" in p:
            return p
        p = os.path.expanduser(p)
        return p if os.path.isabs(p) else os.path.normpath(str(base / p))

    def fix_source(src: Any) -> Any:
        if isinstance(src, str):
            return fix(src)
        if isinstance(src, list):
            return [fix(s) if isinstance(s, str) else s for s in src]
        return src

    d = data.get("data")
    if isinstance(d, dict):
        if "source" in d:
            d["source"] = fix_source(d["source"])
        if isinstance(d.get("splits"), dict):
            d["splits"] = {k: fix_source(v) for k, v in d["splits"].items()}
    for section, key in (("store", "root"), ("contract", "path")):
        sec = data.get(section)
        if isinstance(sec, dict) and isinstance(sec.get(key), str):
            sec[key] = fix(sec[key])
    training = data.get("training")
    for key in ("hostfile", "ssh_config"):
        if isinstance(training, dict) and isinstance(training.get(key), str):
            training[key] = fix(training[key])
    strategy = (data.get("training") or {}).get("strategy")
    if isinstance(strategy, dict) and isinstance(strategy.get("init_embeddings_from"), str):
        src = strategy["init_embeddings_from"]
        if (base / src).exists():  # a local folder; otherwise a hub id or pkg:// URL
            strategy["init_embeddings_from"] = fix(src)
    for stage in data.get("stages") or []:  # a recipe's stages name files too
        if isinstance(stage, dict):
            _resolve_relative_paths(stage, base)


def format_validation_error(exc: ValidationError, origin: str) -> str:
    lines = [f"{origin}: invalid config ({exc.error_count()} problem(s))"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if not err["loc"] and err["type"] == "value_error":  # a rule across keys names its keys
            lines.append(f"  {str(err['msg']).removeprefix('Value error, ')}")
            continue
        if err["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key{_suggest(err['loc'])}")
        elif err["type"] == "missing":
            lines.append(f"  {loc}: required key is missing")
        else:
            got = err.get("input")
            got_txt = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {loc}: {err['msg']}{got_txt}")
    return "\n".join(lines)


def _suggest(loc: tuple) -> str:
    model: type[BaseModel] = RetrainConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return ""
    allowed = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} allowed here: {', '.join(allowed)}"


def _deepcopy(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _deepcopy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_deepcopy(v) for v in obj]
    return obj

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
from domaintune.errors import ConfigError, shown, utf8_text

#: The deepest nesting of sections, lists and mappings a config may have, and the most values
#: it may hold once YAML's aliases are expanded: configs nest a few levels, and the steps after
#: loading (copying, validation, messages) walk a config recursively, so that YAML nested
#: thousands of levels deep, aliases that refer to themselves or expand exponentially (the
#: "billion laughs") are refused here, in one line, instead of ending in a RecursionError or
#: exhausting memory.
MAX_CONFIG_DEPTH = 50
MAX_CONFIG_VALUES = 100_000


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
        data = load_yaml(_read_text(path, origin), origin) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the config must be a mapping of keys to values")
    check_shape(data, origin)
    data = _deepcopy(data)
    for item in overrides or []:
        apply_override(data, item)
    check_shape(data, origin)  # the overrides' key paths nest too
    _resolve_relative_paths(data, Path.cwd())
    return data


def _read_text(path: str | os.PathLike, origin: str) -> str:
    try:
        content = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{origin}: config file not found") from None
    except OSError as exc:  # a folder, no permission
        raise ConfigError(f"{origin}: cannot be read ({exc.strerror or exc})") from None
    return utf8_text(content, origin, "a config file is UTF-8 YAML", ConfigError)


def load_yaml(text: str, where: str) -> Any:
    """YAML text (a config file, an override's value) as Python values: YAML that does not
    parse, nests deeper than MAX_CONFIG_DEPTH or expands to more than MAX_CONFIG_VALUES values
    is a one-line ConfigError naming ``where``, the line and column, and the rule."""
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""
        said = "; ".join(str(p) for p in (exc.context, exc.problem) if p)
        raise ConfigError(f"{where}:{at} not valid YAML ({shown(said, 300)})") from None
    except yaml.YAMLError as exc:  # the reader's: a character YAML does not allow
        said = shown(" ".join(str(exc).split()), 300)
        raise ConfigError(f"{where}: not valid YAML ({said})") from None
    except RecursionError:  # the composer recurses once per level
        raise ConfigError(_too_deep(where)) from None
    check_shape(data, where)
    return data


def _too_deep(where: str) -> str:
    return (
        f"{where}: nested deeper than {MAX_CONFIG_DEPTH} levels; rule: a config nests at most "
        f"{MAX_CONFIG_DEPTH} levels of sections, lists and mappings"
    )


def check_shape(data: Any, where: str) -> None:
    """Refuse (ConfigError) a config that nests deeper than MAX_CONFIG_DEPTH, holds itself (a
    YAML alias inside its own anchor) or expands to more than MAX_CONFIG_VALUES values (YAML
    aliases of aliases). Walks each shared part once, without recursion."""
    done: dict[int, tuple[int, int]] = {}  # id -> (values below, depth)
    open_: set[int] = set()  # the containers being walked: the current path
    stack: list[tuple[Any, bool]] = [(data, False)]
    while stack:
        node, walked = stack.pop()
        if not isinstance(node, dict | list) or (not walked and id(node) in done):
            continue
        children = [c for c in (node.values() if isinstance(node, dict) else node)]
        children = [c for c in children if isinstance(c, dict | list)]
        if not walked:
            if id(node) in open_:
                raise ConfigError(
                    f"{where}: a value contains itself (a YAML alias inside its own anchor); "
                    "rule: a config is a tree of values"
                )
            open_.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in children)
            continue
        open_.discard(id(node))
        values = len(node) + sum(done[id(c)][0] for c in children)
        depth = 1 + max((done[id(c)][1] for c in children), default=0)
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(_too_deep(where))
        if values > MAX_CONFIG_VALUES:
            raise ConfigError(
                f"{where}: expands to more than {MAX_CONFIG_VALUES} values (YAML aliases of "
                f"aliases); rule: a config holds at most {MAX_CONFIG_VALUES} values"
            )
        done[id(node)] = (values, depth)


def validate_schema(data: dict[str, Any], origin: str = "<config>") -> RetrainConfig:
    try:
        return RetrainConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, origin)) from None


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override; the value is parsed as YAML (3, true, [a, b])."""
    if "=" not in item:
        raise ConfigError(f"--set {shown(item, quote=True)}: expected key.path=value")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {shown(item, quote=True)}: empty key")
    where = f"--set {shown(key)}"
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML: the text itself
    except RecursionError:
        raise ConfigError(_too_deep(where)) from None
    check_shape(value, where)
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(
                f"--set {shown(key)}: {shown(part, quote=True)} is a value, not a section"
            )
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
    strategy = training.get("strategy") if isinstance(training, dict) else None
    if isinstance(strategy, dict) and isinstance(strategy.get("init_embeddings_from"), str):
        src = strategy["init_embeddings_from"]
        try:
            local = (base / src).exists()  # a local folder; otherwise a hub id or pkg:// URL
        except (OSError, ValueError):  # a name no file can have: the schema judges it
            local = False
        if local:
            strategy["init_embeddings_from"] = fix(src)
    stages = data.get("stages")
    for stage in stages if isinstance(stages, list) else []:  # a recipe's stages name files
        if isinstance(stage, dict):
            _resolve_relative_paths(stage, base)


def format_validation_error(exc: ValidationError, origin: str) -> str:
    lines = [f"{origin}: invalid config ({exc.error_count()} problem(s))"]
    for err in exc.errors():
        loc = shown(".".join(str(p) for p in err["loc"]) or "(top level)")
        msg = _one_line(str(err["msg"]))
        if not err["loc"] and err["type"] == "value_error":  # a rule across keys names its keys
            lines.append(f"  {msg.removeprefix('Value error, ')}")
            continue
        if err["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key{_suggest(err['loc'])}")
        elif err["type"] == "missing":
            lines.append(f"  {loc}: required key is missing")
        else:
            got = err.get("input")
            got_txt = "" if isinstance(got, dict) else f" (got {shown(repr(got))})"
            lines.append(f"  {loc}: {msg}{got_txt}")
    return "\n".join(lines)


def _one_line(text: str, limit: int = 600) -> str:
    """A problem's text as one line of the message (a rule's text quoting the user's)."""
    text = " ".join(text.splitlines())
    return text if len(text) <= limit else text[: limit - 3] + "..."


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

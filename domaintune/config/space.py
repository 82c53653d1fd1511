"""What a hyperparameter search (``tune.space``) may vary: training keys, each checked
against the config's own schema (its type and bounds) when the config loads. The search
itself is domaintune.tuning."""

from __future__ import annotations

import difflib
import functools
from typing import TYPE_CHECKING, Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, TypeAdapter, ValidationError

if TYPE_CHECKING:
    from domaintune.config.sections import TuneParamConfig

#: Training keys a search may not vary: they decide how the data are tokenized and split,
#: and every trial must be judged on the same validation split.
PREPARED_KEYS = {
    "training.max_length": "decides how the texts are tokenized",
    "training.seed": "seeds the train / validation / test split",
}


def check_space_keys(space: dict[str, TuneParamConfig], root: type[BaseModel]) -> None:
    """Each key of ``tune.space`` is a training key that takes every value it lists
    (checked per key, when the config loads); else ValueError naming ``tune.space.<key>``."""
    for path, spec in space.items():
        where = f"tune.space.{path}"
        annotation = leaf_annotation(path, root)
        kind = numeric(annotation)
        if spec.choices is None and kind is None:
            raise ValueError(f"{where}: a range needs a numeric key; give choices: [...]")
        if spec.choices is None and kind is int:
            if any(v is not None and v != int(v) for v in (spec.low, spec.high, spec.step)):
                raise ValueError(f"{where}: {path} is an integer: give whole low, high, step")
            if spec.log and spec.low is not None and spec.low < 1:
                raise ValueError(f"{where}: a log range of an integer needs low >= 1")
        for value in candidates(spec, kind):
            try:
                adapter(path, root).validate_python(value)
            except ValidationError as exc:
                msg = exc.errors()[0]["msg"]
                raise ValueError(f"{where}: {value!r} is refused: {msg}") from None


def leaf_annotation(path: str, root: type[BaseModel]) -> Any:
    """The annotation of ``path`` in ``root`` (RetrainConfig; ValueError naming it when it
    is not a key the search may vary)."""
    where = f"tune.space.{path}"
    parts = path.split(".")
    if parts[0] != "training" or len(parts) < 2:
        raise ValueError(
            f"{where}: tune searches training settings (training.<key>): the data are "
            "ingested, validated and prepared once for every trial"
        )
    if path in PREPARED_KEYS:
        raise ValueError(
            f"{where}: {path} {PREPARED_KEYS[path]}, and every trial must be judged on the "
            "same validation split; set it outside the space"
        )
    model: type[BaseModel] = root
    for i, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            close = difflib.get_close_matches(part, list(fields), n=1)
            hint = f"; did you mean {'.'.join([*parts[:i], close[0]])!r}?" if close else ""
            raise ValueError(f"{where}: not a config key{hint}")
        annotation = fields[part].annotation
        if i == len(parts) - 1:
            return annotation
        section = section_model(annotation)
        if section is None:
            raise ValueError(f"{where}: {'.'.join(parts[: i + 1])} is a value, not a section")
        model = section
    raise AssertionError("unreachable")


def section_model(annotation: Any) -> type[BaseModel] | None:
    options = get_args(annotation) if get_origin(annotation) in (Union, type(int | None)) else ()
    for a in (annotation, *options):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def numeric(annotation: Any) -> type | None:
    """int or float for a numeric key (``int | None``, ``int | Literal["auto"]`` too)."""
    options = get_args(annotation) if get_origin(annotation) in (Union, type(int | None)) else ()
    for a in (annotation, *options):
        if a is float:
            return float
        if a is int:
            return int
    return None


@functools.cache
def adapter(path: str, root: type[BaseModel]) -> TypeAdapter:
    """Validates one value of ``path`` by the key's own type and bounds."""
    model: Any = root
    parts = path.split(".")
    for part in parts[:-1]:
        model = section_model(model.model_fields[part].annotation)
    info = model.model_fields[parts[-1]]
    if not info.metadata:
        return TypeAdapter(info.annotation)
    return TypeAdapter(Annotated[info.annotation, *info.metadata])


def candidates(spec: TuneParamConfig, kind: type | None) -> list[Any]:
    if spec.choices is not None:
        return list(spec.choices)
    cast = int if kind is int else float
    return [cast(spec.low), cast(spec.high)]

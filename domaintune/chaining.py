"""Chaining: a fine-tune that starts from a registered model.

    model:
      name_or_path: registry://ner-finance@production     # or @latest, @v0003

The reference resolves in the run's own store (``store.root``: the registry lives there) by
the registry's one rule (``Registry.resolve``: production, latest or vNNNN, and its one-line
errors) to the version's ``model/`` folder; for a remote store the version is downloaded once
into this host's cache (``Registry.version_dir``). Like any base model, the folder's content
fingerprint goes into the cache keys, so promoting another version retrains while the same
version stays cached. The resolved name keeps the reference and adds the version it resolved
to, ``registry://ner-finance@production (v0003)``: the finetune manifest's ``base_model``,
which the registered model's lineage reads back (:func:`parent`).

A version registered as a LoRA adapter alone (``merge_on_export: false``) resolves to base +
adapter: the base named in its ``base_model.json`` (resolved again: a path, a hub id, or a
registry version), prepared as that training prepared it, with the adapter merged; built
once into the store's ``models`` stage, keyed by the adapter's and the base's content.

A parent's head that does not fit the new run (another task, another label set) is replaced
by a fresh one when the model is loaded: ``domaintune.training.strategies.head_change``.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from domaintune.errors import ModelError
from domaintune.fingerprint import hash_obj
from domaintune.loading import LoadSpec, load_model
from domaintune.models import TOKENIZER_FILES, ResolvedModel, resolve_pretrained
from domaintune.registry import REFERENCE, REFERENCE_RULE, SCHEME, resolve_reference
from domaintune.storage.store import Store

log = logging.getLogger(__name__)

STAGE = "models"
#: a reference as written, or as resolved: ``registry://NAME@production (v0003)``
_RESOLVED = re.compile(r"^(?P<reference>registry://\S+?)(?: \((?P<version>v\d+)\))?$")


def parent(name: str) -> dict[str, str] | None:
    """The registered model a base model name stands for (``reference``, ``use_case``,
    ``version``), or None when it is not a registry reference."""
    match = _RESOLVED.match(name or "")
    ref = REFERENCE.match(match["reference"]) if match else None
    if ref is None:
        return None
    version = match["version"] or ref["version"]
    return {"reference": match["reference"], "use_case": ref["name"], "version": version}


def pin(config: Any, store: Store | None = None) -> Any:
    """``config`` with a ``registry://NAME@production`` (or ``@latest``) base model pinned to
    the version it names now, ``registry://NAME@vNNNN``: every stage of one run then starts
    from the same version even when another is promoted meanwhile, and a bad reference fails
    here, before any stage."""
    named = parent(config.model.name_or_path or "")
    if named is None:  # no store is touched: a store that cannot be used fails in ingest
        return config
    store = store if store is not None else Store.of(config)
    try:
        _, version, _ = resolve_reference(store, f"{SCHEME}{named['use_case']}@{named['version']}")
    except ModelError as exc:
        raise ModelError(f"model.name_or_path {exc}") from None
    if named["version"] == version:
        return config
    pinned = f"{SCHEME}{named['use_case']}@{version}"
    log.info("model.name_or_path %s is %s for this run", named["reference"], pinned)
    model = config.model.model_copy(update={"name_or_path": pinned})
    return config.model_copy(update={"model": model})


def resolve_model(
    name_or_path: str, revision: str | None = None, store: Store | None = None
) -> ResolvedModel:
    """Any ``model.name_or_path`` as a local Hugging Face folder: a registry reference
    resolves in ``store`` (:func:`resolve_registered`), every other name is a pretrained
    model (``domaintune.models.resolve_pretrained``: hub id, folder, GGUF, packaged)."""
    if name_or_path.startswith(SCHEME):
        return resolve_registered(name_or_path, store)
    return resolve_pretrained(name_or_path, revision, store)


def resolve_config_model(config: Any) -> ResolvedModel:
    """The base model of a run (GGUF conversions go into the run's store)."""
    return resolve_model(config.model.name_or_path, config.model.revision, Store.of(config))


def resolve_registered(reference: str, store: Store | None) -> ResolvedModel:
    """``registry://NAME@production|latest|vNNNN`` in ``store``: the version's model folder,
    or for an adapter-only version its base with the adapter merged. A resolved name
    (``... (v0003)``, as in an adapter's ``base_model.json``) means exactly that version."""
    where = f"model.name_or_path {reference}"
    named = parent(reference)
    if named is None:
        raise ModelError(f"{where}: not a registry reference; rule: {REFERENCE_RULE}")
    if store is None:
        raise ModelError(
            f"{where}: a registry reference resolves in a run's store (store.root), and none "
            "was given here"
        )
    try:  # NAME@production, or a resolved name's own version
        _, version, folder = resolve_reference(
            store, f"{SCHEME}{named['use_case']}@{named['version']}"
        )
    except ModelError as exc:
        raise ModelError(f"model.name_or_path {exc}") from None
    reference = named["reference"]
    name = reference if reference.endswith(f"@{version}") else f"{reference} ({version})"
    model_dir = folder / "model"
    if (model_dir / "config.json").is_file():
        return ResolvedModel(name=name, path=str(model_dir))
    if (model_dir / "base_model.json").is_file():
        return ResolvedModel(name=name, path=str(merged_adapter(name, folder, store)))
    raise ModelError(
        f"model.name_or_path {name}: {model_dir} holds no model (no config.json and no "
        "base_model.json of an adapter)"
    )


def merged_adapter(name: str, folder: Path, store: Store) -> Path:
    """An adapter-only registry version (``folder``) as a full model folder: its base model
    prepared as its training prepared it (task head for its labels, strategy's structure),
    the adapter merged; once per adapter and base content, as a ``models`` store entry."""
    model_dir = folder / "model"
    base_info = json.loads((model_dir / "base_model.json").read_text())
    labels = (json.loads((folder / "lineage.json").read_text()).get("model") or {}).get("labels")
    if labels is None:
        raise ModelError(
            f"model.name_or_path {name}: a LoRA adapter registered before lineage.json "
            "recorded its labels (model.labels); rule: an adapter-only version is rebuilt with "
            "the head of its labels (register it again, or with merge_on_export: true)"
        )
    adapter_fp = ResolvedModel(name=name, path=str(model_dir)).fingerprint()
    key = "lora-" + hash_obj("lora-merge", adapter_fp, base_info.get("fingerprint"), labels)[:24]
    with store.lock(STAGE, key):
        if store.cached_manifest(STAGE, key) is None:
            base = _adapter_base(name, base_info, store)
            _merge(name, folder, base, labels, store, key)
    return store.entry_path(STAGE, key)


def _adapter_base(name: str, base_info: dict[str, Any], store: Store) -> ResolvedModel:
    """The base model an adapter was trained on, as its ``base_model.json`` names it, with
    the content it had then."""
    base_name = base_info.get("name")
    rule = "rule: an adapter-only version resolves to the base model it was trained on plus the adapter"
    try:
        base = resolve_model(str(base_name), None, store)
    except ModelError as exc:
        said = str(exc).removeprefix("model.name_or_path").lstrip(": ")
        raise ModelError(
            f"model.name_or_path {name}: a LoRA adapter whose base model {base_name!r} "
            f"(base_model.json) cannot be found ({said}); {rule}"
        ) from None
    recorded, now = base_info.get("fingerprint"), base.fingerprint()
    if recorded and now != recorded:
        raise ModelError(
            f"model.name_or_path {name}: a LoRA adapter whose base model {base_name!r} "
            f"(base_model.json) has changed since (content {now[:12]}, trained on "
            f"{recorded[:12]}); {rule}"
        )
    return base


def merge_registered_adapter(folder: Path, base_path: str, labels: list[str] | tuple = ()) -> Any:
    """The LoRA adapter of a registered version (``folder``: its ``config.yaml`` and
    ``model/``) merged into its base model at ``base_path``, loaded as the adapter's training
    prepared it (task type, seed, strategy, dropout): what chaining from the version and its
    ``merged`` export both use."""
    import yaml
    from transformers import AutoConfig

    from domaintune.config import TaskConfig, TrainingConfig
    from domaintune.training.strategies import dropout_overrides, merge_lora

    config = yaml.safe_load((folder / "config.yaml").read_text())
    training = TrainingConfig.model_validate(config["training"])
    trust = bool((config.get("model") or {}).get("trust_remote_code"))
    base_model = load_model(  # the base as the adapter's training prepared it
        LoadSpec(
            path=base_path,
            task_type=TaskConfig.model_validate(config["task"]).type,
            labels=tuple(labels),
            seed=training.seed,
            trust_remote_code=trust,
            structure=training.strategy,
            config_overrides=dropout_overrides(
                training.dropout, AutoConfig.from_pretrained(base_path, trust_remote_code=trust)
            ),
        )
    )
    return merge_lora(base_model, str(folder / "model"))


def _merge(
    name: str, folder: Path, base: ResolvedModel, labels: list[str], store: Store, key: str
) -> None:
    model_dir = folder / "model"
    log.info("%s: merging the LoRA adapter into its base model %s (once)", name, base.name)
    merged = merge_registered_adapter(folder, base.path, labels)
    with store.writer(STAGE, key) as w:
        merged.save_pretrained(w.path)
        for f in TOKENIZER_FILES:
            if (model_dir / f).is_file():
                shutil.copy2(model_dir / f, w.path / f)
        info = {
            "use_case": folder.parent.name,
            "version": folder.name,
            "base_model": base.name,
            "base_fingerprint": base.fingerprint(),
            "labels": labels,
        }
        (w.path / "merged_from.json").write_text(json.dumps(info, indent=2))
        w.manifest = info

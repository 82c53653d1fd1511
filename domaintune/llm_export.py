"""Verified exports of generative (causal LM) models: a merged safetensors folder and GGUF.

- :func:`merged_export`: a plain transformers folder (safetensors, config, tokenizer files,
  chat template). A LoRA adapter registered alone (``merge_on_export: false``: the adapter,
  its tokenizer and ``base_model.json``) is merged into its base model, prepared as its
  training prepared it, by the same code the registry's chaining uses
  (``domaintune.chaining``, ``domaintune.training.strategies.merge_lora``); any other folder
  already holds merged weights and is copied as it is.
- :func:`gguf_export`: llama.cpp's own converter (``convert_hf_to_gguf`` from the
  ``convert-hf-to-gguf`` package, run in a subprocess) on a merged folder, written under a
  temporary name and renamed at the end, so a file with the final name is always complete.
  What it cannot convert (an architecture, a tokenizer whose pre-tokenizer it does not know)
  is a one-line ``ExportError``.
- :func:`gguf_parity`: the GGUF file read back by transformers' GGUF reader (an independent
  reader that de-quantizes the tensors: not llama.cpp's runtime) against the model folder,
  on the same prompts: next-token logits, greedy answers, tokenizer ids.
- :func:`gguf_supported`: whether a model folder can be exported to GGUF at all, by its
  ``config.json`` ``architectures`` against the converter's registry of model classes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from domaintune.errors import DomainTuneError, ExportError

log = logging.getLogger(__name__)

#: the task types whose models GGUF export is for (their models are causal LMs)
GGUF_TASK_TYPES = frozenset({"causal_lm", "instruction_tuning"})
#: tensor types ``gguf_export`` writes (llama.cpp's converter's ``--outtype``)
GGUF_OUTTYPES = ("f32", "f16", "bf16", "q8_0")
#: the longest a conversion may run (seconds)
GGUF_TIMEOUT_S = 1800
#: files of a model folder a merged export carries besides the weights
_MODEL_FILES = ("config.json", "generation_config.json")
#: an exception's last line in a traceback: ``NotImplementedError: BPE pre-tokenizer ...``
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?([A-Z]\w*(?:Error|Exception)): (.+)$")
_LOGGED_ERROR = re.compile(r"^(?:ERROR|CRITICAL):[\w.-]*:(.+)$")

#: builds the base model of an adapter, prepared as its training prepared it, from the
#: content of its ``base_model.json`` plus ``adapter_dir`` (the adapter's folder); the
#: merged export's default resolves the name and applies the recorded strategy
BaseLoader = Callable[[dict[str, Any]], Any]


# ----------------------------------------------------------------------------- support


def gguf_supported(model_dir: Path, readable: bool = False) -> str | None:
    """None when ``model_dir`` (a merged model folder) can be exported to GGUF, else a
    one-line reason: no ``config.json``, an architecture that is not a causal LM (GGUF
    export here is for the generative task types, :data:`GGUF_TASK_TYPES`), or one that
    llama.cpp's converter has no model class for (``conversion.TEXT_MODEL_MAP``).
    ``readable``: also require that transformers' GGUF reader knows the GGUF architecture
    the converter writes (what :func:`gguf_parity` needs)."""
    model_dir = Path(model_dir)
    cfg_file = model_dir / "config.json"
    if not cfg_file.is_file():
        extra = (
            " (a LoRA adapter alone: merge it first, merged_export)"
            if (model_dir / "adapter_config.json").is_file()
            else ""
        )
        return f"{model_dir}: no config.json{extra}; rule: GGUF is made from a merged model folder"
    cfg = json.loads(cfg_file.read_text())
    archs = cfg.get("architectures") or []
    if not archs:
        return f"{cfg_file}: no architectures listed; rule: the converter picks its class by it"
    arch = archs[0]
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if arch not in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        return (
            f"{model_dir}: {arch} is not a causal language model; rule: GGUF export is for "
            f"generative models ({', '.join(sorted(GGUF_TASK_TYPES))})"
        )
    import conversion

    if arch not in conversion.TEXT_MODEL_MAP:
        return (
            f"{model_dir}: llama.cpp's converter (convert-hf-to-gguf) has no model class "
            f"for {arch}; rule: GGUF export needs an architecture the converter registers"
        )
    if readable:
        name = gguf_architecture(arch)
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        if name not in GGUF_SUPPORTED_ARCHITECTURES:
            return (
                f"{model_dir}: transformers' GGUF reader cannot read GGUF architecture "
                f"{name!r} ({arch}); rule: a GGUF export is checked by reading it back"
            )
    return None


def gguf_architecture(arch: str) -> str:
    """The GGUF architecture name (``general.architecture``, e.g. ``llama``) llama.cpp's
    converter writes for a transformers architecture (``LlamaForCausalLM``)."""
    import conversion
    import gguf

    cls = conversion.get_model_class(arch)
    return gguf.MODEL_ARCH_NAMES[cls.model_arch]


# ------------------------------------------------------------------------------ merged


def is_adapter_only(model_dir: Path) -> bool:
    """Whether ``model_dir`` holds a PEFT adapter without the model it adapts (no
    ``config.json`` beside ``adapter_config.json``)."""
    model_dir = Path(model_dir)
    return (model_dir / "adapter_config.json").is_file() and not (
        model_dir / "config.json"
    ).is_file()


def merged_export(
    model_dir: Path, out_dir: Path, base_loader: BaseLoader | None = None
) -> dict[str, Any]:
    """Write ``model_dir`` as a plain transformers folder to ``out_dir`` (which must not
    exist or be empty): safetensors weights, config, tokenizer files and chat template.

    A LoRA adapter alone (``adapter_config.json`` and ``base_model.json``, no
    ``config.json``: the registry's layout for ``merge_on_export: false``) is merged into
    its base model (``merge_and_unload``). The base is built by ``base_loader`` from the
    content of ``base_model.json`` (plus ``adapter_dir``), by default: the base named there (a folder, a hub id, a
    packaged model), checked to be the content the adapter was trained on, prepared as the
    recorded training strategy prepares it. Any other folder holds merged weights already
    (training merges at the end) and its files are copied as they are.

    The folder is written beside ``out_dir`` under a temporary name and renamed at the end.
    Returns ``{"files", "bytes", "dtype", "merged", "source"}``.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not model_dir.is_dir():
        raise ExportError(f"merged export: {model_dir} is not a folder")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(
            f"merged export: {out_dir} exists and is not empty; rule: an export is written "
            "to a new folder"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    merged = is_adapter_only(model_dir)
    try:
        if merged:
            _merge_adapter(model_dir, tmp, base_loader)
        else:
            _copy_model(model_dir, tmp)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file())
    info = {
        "files": files,
        "bytes": sum((out_dir / f).stat().st_size for f in files),
        "dtype": _weights_dtype(out_dir),
        "merged": merged,
        "source": str(model_dir),
    }
    log.info(
        "merged export: %s -> %s (%s, %.1f MB%s)",
        model_dir,
        out_dir,
        info["dtype"],
        info["bytes"] / 1e6,
        ", adapter merged" if merged else "",
    )
    return info


def _copy_model(model_dir: Path, out: Path) -> None:
    from domaintune.models import TOKENIZER_FILES

    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        raise ExportError(
            f"merged export: {model_dir} holds no safetensors weights (and no adapter); "
            "rule: a merged export copies a model folder's safetensors"
        )
    names = [p.name for p in weights]
    names += [p.name for p in model_dir.glob("*.safetensors.index.json")]
    names += [f for f in (*_MODEL_FILES, *TOKENIZER_FILES) if (model_dir / f).is_file()]
    if "config.json" not in names:
        raise ExportError(f"merged export: {model_dir} has no config.json")
    for name in dict.fromkeys(names):
        shutil.copy2(model_dir / name, out / name)


def _merge_adapter(model_dir: Path, out: Path, base_loader: BaseLoader | None) -> None:
    from domaintune.models import TOKENIZER_FILES
    from domaintune.training.strategies import merge_lora

    info_file = model_dir / "base_model.json"
    if base_loader is None and not info_file.is_file():
        raise ExportError(
            f"merged export: {model_dir} is a LoRA adapter without base_model.json; rule: an "
            "adapter alone is merged into the base model its base_model.json names"
        )
    base_info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    log.info("merged export: merging the LoRA adapter %s into its base model", model_dir)
    version = model_dir.parent
    if base_loader is None and model_dir.name == "model" and (version / "config.yaml").is_file():
        # a registered version: merged as chaining from it merges it (one home for that)
        from domaintune.chaining import merge_registered_adapter

        base = _checked_base(model_dir, base_info)
        lineage = version / "lineage.json"
        labels = ()
        if lineage.is_file():
            labels = tuple((json.loads(lineage.read_text()).get("model") or {}).get("labels") or ())
        base_model = None
        merged = merge_registered_adapter(version, base.path, labels)
    else:
        base_model = (base_loader or _prepared_base)(base_info | {"adapter_dir": str(model_dir)})
        merged = merge_lora(base_model, str(model_dir))
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer_from = model_dir
    if base_model is not None and not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        tokenizer_from = Path(getattr(base_model, "name_or_path", "") or model_dir)
    for f in TOKENIZER_FILES:
        if (tokenizer_from / f).is_file():
            shutil.copy2(tokenizer_from / f, out / f)


def _checked_base(adapter_dir: Path, base_info: dict[str, Any]) -> Any:
    """The base named in ``base_model.json``, resolved and its content checked against the
    recorded one (``domaintune.chaining``), or a one-line ExportError."""
    from domaintune.chaining import _adapter_base

    where = f"merged export: {adapter_dir}"
    if not base_info.get("name"):
        raise ExportError(f"{where}: base_model.json names no base model (key 'name')")
    try:
        return _adapter_base(str(adapter_dir), base_info, None)
    except DomainTuneError as exc:
        said = str(exc).removeprefix(f"model.name_or_path {adapter_dir}").lstrip(": ")
        raise ExportError(f"{where}: {said}") from None


def _prepared_base(base_info: dict[str, Any]) -> Any:
    """The base model of an adapter that is not a registered version (no ``config.yaml``
    beside it; a registered one is merged by ``chaining.merge_registered_adapter``): the
    base named in ``base_model.json``, the adapter's own PEFT task type (causal LM), the
    recorded strategy's architecture changes."""
    from domaintune.config import StrategyConfig
    from domaintune.loading import LoadSpec, load_model

    adapter_dir = Path(base_info["adapter_dir"])
    base = _checked_base(adapter_dir, base_info)
    peft_task = json.loads((adapter_dir / "adapter_config.json").read_text()).get("task_type")
    if peft_task != "CAUSAL_LM":
        raise ExportError(
            f"merged export: {adapter_dir}: cannot tell the adapter's task type (no "
            "config.yaml beside it, PEFT task_type is not CAUSAL_LM); rule: pass base_loader "
            "to build its base model"
        )
    structure = StrategyConfig.model_validate(base_info.get("strategy") or {"kind": "lora"})
    return load_model(LoadSpec(path=base.path, task_type="causal_lm", structure=structure))


def _weights_dtype(folder: Path) -> str:
    """The dtype most of the weights' bytes have (read from the safetensors headers)."""
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
    sizes: dict[str, int] = {}
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for name, t in header.items():
            if name != "__metadata__":
                start, end = t["data_offsets"]
                sizes[t["dtype"]] = sizes.get(t["dtype"], 0) + end - start
    if not sizes:
        return "unknown"
    top = max(sizes, key=lambda k: sizes[k])
    return names.get(top, top.lower())


# -------------------------------------------------------------------------------- gguf


def gguf_export(
    model_dir: Path,
    out_dir: Path,
    outtype: str = "f16",
    filename: str | None = None,
    timeout_s: float = GGUF_TIMEOUT_S,
) -> Path:
    """``model_dir`` (a merged model folder) as one GGUF file in ``out_dir``, made by
    llama.cpp's converter (``python -m convert_hf_to_gguf``, the ``convert-hf-to-gguf``
    package) with tensor type ``outtype`` (f32, f16, bf16, q8_0). The file is
    ``filename`` (default ``<folder name>.<outtype>.gguf``); it is written under a
    temporary name and renamed when complete. A model the converter refuses (an
    architecture, a tokenizer it does not know), a failure or a timeout is a one-line
    ``ExportError`` naming the folder and the converter's last error line, and leaves no
    file behind."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if outtype not in GGUF_OUTTYPES:
        raise ExportError(
            f"gguf export of {model_dir}: outtype {outtype!r}; allowed: {', '.join(GGUF_OUTTYPES)}"
        )
    reason = gguf_supported(model_dir)
    if reason:
        raise ExportError(f"gguf export: {reason}")
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / (filename or f"{model_dir.resolve().name}.{outtype}.gguf")
    tmp = out_dir / f".{final.name}.partial-{os.getpid()}"
    cmd = [
        sys.executable,
        "-m",
        "convert_hf_to_gguf",
        str(model_dir),
        "--outtype",
        outtype,
        "--outfile",
        str(tmp),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    log.info("gguf export: %s -> %s (%s)", model_dir, final, outtype)
    try:
        try:
            done = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout_s, env=env, check=False
            )
        except subprocess.TimeoutExpired:
            raise ExportError(
                f"gguf export of {model_dir}: llama.cpp's converter ran past {timeout_s:.0f} s"
            ) from None
        output = (done.stdout or "") + "\n" + (done.stderr or "")
        log.debug("converter output:\n%s", output[-20000:])
        if done.returncode != 0 or not tmp.is_file():
            raise ExportError(
                f"gguf export of {model_dir}: llama.cpp's converter failed (exit "
                f"{done.returncode}): {converter_error(output)}"
            )
        _check_gguf(tmp, model_dir)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    log.info(
        "gguf export: %s written (%.1f MB, %.1f s)",
        final,
        final.stat().st_size / 1e6,
        time.perf_counter() - t0,
    )
    return final


def converter_error(output: str) -> str:
    """The meaningful line of a failed conversion's output, on one line: the last
    exception's message (``NotImplementedError: BPE pre-tokenizer was not recognized ...``),
    else the last line the converter logged as an error, else its last line."""
    lines = [ln.rsplit("\r", 1)[-1].strip() for ln in output.splitlines()]
    lines = [ln for ln in lines if ln]
    for ln in reversed(lines):
        m = _EXCEPTION_LINE.match(ln)
        if m:
            return f"{m[1]}: {m[2]}"[:400]
    for ln in reversed(lines):
        m = _LOGGED_ERROR.match(ln)
        if m:
            return m[1].strip()[:400]
    return (lines[-1] if lines else "no output")[:400]


def _check_gguf(path: Path, model_dir: Path) -> None:
    """The converter's file is a GGUF with tensors in it."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        n = len(reader.tensors)
    except Exception as exc:
        raise ExportError(
            f"gguf export of {model_dir}: the converter wrote an unreadable file ({exc})"
        ) from None
    if n == 0:
        raise ExportError(f"gguf export of {model_dir}: the converter wrote no tensors")


# ------------------------------------------------------------------------------ parity


def _prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """A prompt as the project's generation sees it: the user turn in the model's chat
    template with the assistant's header after it, or the text alone without a template."""
    from domaintune.chat import render

    if getattr(tokenizer, "chat_template", None):
        return render(tokenizer, [{"role": "user", "content": prompt}], generation_prompt=True)
    return list(tokenizer(prompt)["input_ids"])


def gguf_parity(
    model_dir: Path,
    gguf_path: Path,
    prompts: list[str],
    max_new_tokens: int = 24,
    examples: int = 3,
) -> dict[str, Any]:
    """The GGUF file against the model folder it was made from, on ``prompts``.

    The GGUF is read back by **transformers' GGUF reader** (``from_pretrained(...,
    gguf_file=...)``: gguf-py de-quantizes every tensor to float32), a reader independent
    of the converter that wrote it; this is not llama.cpp's runtime (its kernels, its
    tokenizer implementation), which is not installed here. Both models run in float32.

    The weights are compared on the same ids (the folder's tokenizer, its chat template
    applied as generation applies it): ``max_abs_logit_diff`` (next-token logits at each
    prompt's last position), ``next_token_agreement`` (same argmax), ``greedy_identical``
    (share of prompts whose greedy answers of up to ``max_new_tokens`` tokens are identical,
    by ``domaintune.generation``; ``answer_tokens``: the model's answers' lengths, so an
    agreement on empty answers is seen as such) and the first ``examples`` answers as text
    (special tokens kept: what was generated).
    The tokenizers are compared separately: ``tokenizer_identical`` (each tokenizer renders
    every prompt with its own chat template to the same ids), ``chat_template_identical``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from domaintune.generation import generate_ids, stop_token_ids

    model_dir, gguf_path = Path(model_dir), Path(gguf_path)
    if not prompts:
        raise ExportError(f"gguf parity of {gguf_path}: no prompts given")
    reason = gguf_supported(model_dir, readable=True)
    if reason:
        raise ExportError(f"gguf parity: {reason}")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    try:
        gtok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        gmodel = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        ).eval()
    except Exception as exc:
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"gguf parity: transformers' GGUF reader cannot load {gguf_path} ({line})"
        ) from None

    ids = [_prompt_ids(tok, p) for p in prompts]
    gids = [_prompt_ids(gtok, p) for p in prompts]
    same_tokens = sum(a == b for a, b in zip(ids, gids, strict=True))

    diff, scale, agree = 0.0, 0.0, 0
    with torch.inference_mode():
        for p in ids:
            x = torch.tensor([p])
            a, b = model(input_ids=x).logits[0, -1], gmodel(input_ids=x).logits[0, -1]
            diff = max(diff, float((a - b).abs().max()))
            scale = max(scale, float(a.abs().max()))
            agree += int(a.argmax() == b.argmax())
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    settings = {
        "pad_id": pad,
        "stop_ids": stop_token_ids(tok),
        "max_new_tokens": max_new_tokens,
        "batch_size": 8,
    }
    ours = generate_ids(model, ids, **settings)
    theirs = generate_ids(gmodel, ids, **settings)
    identical = sum(a == b for a, b in zip(ours, theirs, strict=True))
    n = len(prompts)
    result = {
        "reader": "transformers GGUF reader (de-quantized to float32), not llama.cpp",
        "gguf_file": str(gguf_path),
        "gguf_bytes": gguf_path.stat().st_size,
        "prompts": n,
        "max_abs_logit_diff": diff,
        "max_abs_logit": scale,
        "next_token_agreement": agree / n,
        "greedy_identical": identical / n,
        "greedy_identical_count": identical,
        "max_new_tokens": max_new_tokens,
        "answer_tokens": [len(a) for a in ours],
        "tokenizer_identical": same_tokens == n,
        "tokenizer_identical_prompts": same_tokens,
        "chat_template_identical": getattr(tok, "chat_template", None)
        == getattr(gtok, "chat_template", None),
        "examples": [
            {
                "prompt": prompts[i],
                "model": tok.decode(ours[i]).strip(),
                "gguf": gtok.decode(theirs[i]).strip(),
            }
            for i in range(min(examples, n))
        ],
    }
    log.info(
        "gguf parity %s: logits within %.3g (max %.3g), next token %.0f%%, greedy answers "
        "identical %d/%d, tokenizer ids identical %d/%d",
        gguf_path.name,
        diff,
        scale,
        100 * agree / n,
        identical,
        n,
        same_tokens,
        n,
    )
    return result


__all__ = [
    "GGUF_OUTTYPES",
    "GGUF_TASK_TYPES",
    "converter_error",
    "gguf_architecture",
    "gguf_export",
    "gguf_parity",
    "gguf_supported",
    "is_adapter_only",
    "merged_export",
]

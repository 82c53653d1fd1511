"""Exports of a fine-tuned model for serving, each checked against the model before it is
kept: ONNX (fp32) and int8 ONNX for the encoders (classification, NER, QA), merged weights
and GGUF for generative models (``domaintune.llm_export``).

An ONNX export is made with PyTorch's ``torch.export``-based exporter (``dynamo=True``):
on this code's models (transformers 5) the older TorchScript exporter wrote graphs whose
logits differed from the model's by 0.02-0.05, which no one would notice without the check
below. int8 is ONNX Runtime's dynamic quantization (weights int8, activations quantized per
batch), which needs no calibration data: weights with one scale per tensor, or per output
channel where per tensor breaks the parity rule (per-tensor scales cost MPNet-base 6.5
points of accuracy on Financial PhraseBank, per channel 0.3; per channel is 20-30% slower
on one text for MiniLM, which loses nothing per tensor).

**Parity** (:func:`verify`): the export and the PyTorch model (fp32, as saved) score the
version's own test split with the task type's own scoring (``TaskType.score_split``), the
same code the evaluate stage runs. fp32 ONNX must give identical predictions (labels, tags,
answers) and logits within ``export.logit_tolerance``; int8 must keep the primary metric
within ``export.int8_tolerance`` (0.005 = half a point) of the PyTorch model's. Otherwise
the export is refused with one line (:class:`~domaintune.errors.ExportError`) and nothing is
kept. **Latency** (:func:`measure_latency`): p50 / p95 of one text and of batches of 32
texts of the test split, the PyTorch model as ``domaintune predict`` runs it beside each
export, in the same process.

The ONNX models run through :class:`OnnxNet`, which answers like a transformers model
(``net(**batch).logits``), so every task type's scoring and prediction code runs them
unchanged: ``domaintune predict --runtime onnx`` gives the same columns as ``torch``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd

from domaintune.errors import ExportError

log = logging.getLogger(__name__)

#: every format ``domaintune export`` and ``export.formats`` name
FORMATS = ("onnx", "onnx-int8", "merged", "gguf")
#: the formats that ``predict --runtime`` can run (an ONNX model folder)
ONNX_FORMATS = ("onnx", "onnx-int8")
#: the file of an ONNX export inside its folder
ONNX_FILE = "model.onnx"
#: the record of an export inside its folder
RECORD = "export.json"
#: the batch size of the throughput figure
BATCH = 32


# ------------------------------------------------------------------------ running ONNX


class OnnxNet:
    """An ONNX model in ONNX Runtime that answers like a transformers model: called with a
    collated batch of tensors, it returns an object with one torch tensor per graph output
    (``logits``; ``start_logits`` / ``end_logits``)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort
        import torch

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.path = Path(path)
        self.session = ort.InferenceSession(
            str(self.path), options, providers=["CPUExecutionProvider"]
        )
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self._where = torch.zeros(0)  # what ``next(net.parameters()).device`` asks

    def eval(self) -> OnnxNet:
        return self

    def parameters(self) -> Any:
        yield self._where

    def __call__(self, **batch: Any) -> SimpleNamespace:
        import torch

        first = next(iter(batch.values()))
        feed = {}
        for name in self.inputs:
            value = batch.get(name)
            if value is None:  # token_type_ids of a single-text batch: zeros, as the model
                value = torch.zeros_like(first)
            feed[name] = value.detach().cpu().numpy().astype(np.int64)
        outputs = self.session.run(None, feed)
        return SimpleNamespace(
            **{
                n: torch.from_numpy(np.asarray(o))
                for n, o in zip(self.outputs, outputs, strict=True)
            }
        )


def load_onnx(folder: str | Path) -> tuple[Any, OnnxNet, str]:
    """(tokenizer, :class:`OnnxNet`, "fp32") of an ONNX export folder: what ``predict``'s
    loader returns for ``--runtime onnx`` (the graph decides its own precision)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not (folder / ONNX_FILE).is_file():
        raise ExportError(f"{folder}: no {ONNX_FILE}; rule: an ONNX export folder holds one")
    return AutoTokenizer.from_pretrained(folder, use_fast=True), OnnxNet(folder / ONNX_FILE), "fp32"


# ---------------------------------------------------------------------------- making


def _fp32_model(model_dir: Path, task_type: str, labels: list[str], trust: bool) -> Any:
    """The model as saved, in fp32 with transformers' default attention: what is exported
    and what its exports are held to."""
    from domaintune.loading import LoadSpec, load_model

    net = load_model(
        LoadSpec(
            path=str(model_dir), task_type=task_type, labels=tuple(labels), trust_remote_code=trust
        )
    )
    return net.float().eval()


def _sample_batch(tokenizer: Any, task_type: str) -> dict[str, Any]:
    """Two rows of different lengths (the exporter sees a batch and a sequence axis that
    vary); question answering: question and passage pairs."""
    if task_type == "question_answering":
        enc = tokenizer(
            ["what rose?", "who reported the quarterly figures today?"],
            ["Operating profit rose to EUR 13.1 mn.", "The company reported the figures."],
            padding=True,
            return_tensors="pt",
        )
    else:
        enc = tokenizer(
            ["profit rose", "the company reported a loss for the third quarter in a row"],
            padding=True,
            return_tensors="pt",
        )
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def onnx_export(
    model_dir: str | Path,
    task_type: str,
    labels: list[str],
    out_dir: str | Path,
    trust_remote_code: bool = False,
) -> Path:
    """Write ``out_dir/model.onnx`` (dynamic batch and sequence axes) with the tokenizer and
    the model's config beside it; returns the ONNX file."""
    import torch
    from transformers import AutoTokenizer

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, use_fast=True)
    net = _fp32_model(model_dir, task_type, labels, trust_remote_code)
    sample = _sample_batch(tokenizer, task_type)
    with torch.inference_mode():
        outputs = [k for k, v in net(**sample).items() if torch.is_tensor(v)]
    batch = torch.export.Dim("batch")
    sequence = torch.export.Dim("sequence", max=max(int(net.config.max_position_embeddings), 8))
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        program = torch.onnx.export(
            net,
            (),
            kwargs=sample,
            input_names=list(sample),
            output_names=outputs,
            dynamic_shapes={k: {0: batch, 1: sequence} for k in sample},
            dynamo=True,
            optimize=True,
            verbose=False,
        )
        program.save(str(out_dir / ONNX_FILE))
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ExportError(f"{model_dir}: the ONNX exporter failed: {reason}") from None
    tokenizer.save_pretrained(out_dir)
    shutil.copy2(model_dir / "config.json", out_dir / "config.json")
    return out_dir / ONNX_FILE


def quantize_int8(onnx_file: str | Path, out_dir: str | Path, per_channel: bool = False) -> Path:
    """ONNX Runtime's dynamic int8 quantization of ``onnx_file`` into ``out_dir/model.onnx``
    (the tokenizer and config copied beside it); ``per_channel``: one weight scale per
    output channel instead of one per tensor (slower on one text, more accurate)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    onnx_file, out_dir = Path(onnx_file), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    logging.getLogger("root").setLevel(logging.ERROR)  # its "consider pre-processing" note
    # the exporter's recorded intermediate shapes can disagree with ONNX's own inference
    # (a (32) weight against a (3) one in a tiny classifier): quantize a copy without them
    import tempfile

    import onnx

    graph = onnx.load(str(onnx_file))
    del graph.graph.value_info[:]
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        plain = Path(tmp) / ONNX_FILE
        onnx.save(graph, str(plain))
        quantize_dynamic(
            str(plain),
            str(out_dir / ONNX_FILE),
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
        )
    for p in onnx_file.parent.iterdir():
        if p.is_file() and p.suffix != ".onnx" and p.name not in (RECORD, f"{ONNX_FILE}.data"):
            shutil.copy2(p, out_dir / p.name)
    return out_dir / ONNX_FILE


# --------------------------------------------------------------------------- checking


def _features(task: Any, split_path: str) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    present = set(pq.read_schema(split_path).names)
    cols = [
        c
        for c in ("input_ids", "attention_mask", "token_type_ids")
        if c in present and c in task.model_columns
    ]
    frame = pd.read_parquet(split_path, columns=cols)
    return [{c: frame[c].iloc[i].tolist() for c in cols} for i in range(len(frame))]


def _outputs(output: Any) -> dict[str, Any]:
    """Every logits tensor of a model's output (a transformers ModelOutput or OnnxNet's)."""
    import torch

    items = output.items() if hasattr(output, "items") else vars(output).items()
    return {k: v.float() for k, v in items if torch.is_tensor(v) and k.endswith("logits")}


def max_logit_difference(
    reference: Any, export: Any, collate: Any, feats: list[dict[str, Any]], batch_size: int = BATCH
) -> float:
    """The largest absolute difference between two models' logits on ``feats`` (padding
    positions left out), batch by batch."""
    import torch

    worst = 0.0
    with torch.inference_mode():
        for start in range(0, len(feats), batch_size):
            batch = collate(feats[start : start + batch_size])
            batch = {k: v for k, v in batch.items() if k != "labels"}
            mask = batch["attention_mask"].bool()
            ours, theirs = _outputs(reference(**batch)), _outputs(export(**batch))
            for name, value in ours.items():
                other = theirs[name]
                diff = (value - other).abs()
                if diff.dim() >= 2 and diff.shape[:2] == mask.shape:
                    diff = diff[mask]
                worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
    return worst


def _identical(ours: pd.DataFrame, theirs: pd.DataFrame) -> float:
    """The share of test rows whose predictions (the ``predicted`` column every task type's
    scoring writes) are the same."""
    a, b = ours["predicted"].astype(str).to_numpy(), theirs["predicted"].astype(str).to_numpy()
    return float((a == b).mean()) if len(a) else 1.0


def verify(
    fmt: str,
    reference: Any,
    export: Any,
    tokenizer: Any,
    task: Any,
    split_path: str,
    labels: list[str],
    primary: str,
    settings: Any = None,
    logit_tolerance: float = 1e-3,
    int8_tolerance: float = 0.005,
    batch_size: int = BATCH,
) -> dict[str, Any]:
    """The export against the model on the test split; raises :class:`ExportError` (one
    line) where it breaks the format's rule, else returns the figures."""
    ref_metrics, ref_table = task.score_split(
        reference, tokenizer, split_path, labels, batch_size, settings=settings
    )
    exp_metrics, exp_table = task.score_split(
        export, tokenizer, split_path, labels, batch_size, settings=settings
    )
    feats = _features(task, split_path)
    logits = max_logit_difference(reference, export, task.collator(tokenizer), feats, batch_size)
    lower = primary in task.lower_is_better
    ours, theirs = float(ref_metrics[primary]), float(exp_metrics[primary])
    worse_by = (theirs - ours) if lower else (ours - theirs)
    out = {
        "metric": primary,
        "model": round(ours, 6),
        "export": round(theirs, 6),
        "difference": round(theirs - ours, 6),
        "identical_predictions": round(_identical(ref_table, exp_table), 6),
        "max_logit_difference": float(f"{logits:.3g}"),
        "rows": len(exp_table),
        "reference": "the PyTorch model in fp32, on the version's test split",
    }
    if fmt == "onnx":
        out["rule"] = f"identical predictions, logits within {logit_tolerance:g}"
        if out["identical_predictions"] < 1.0 or logits > logit_tolerance:
            raise ExportError(
                f"onnx export: {1 - out['identical_predictions']:.1%} of {out['rows']} test "
                f"rows predicted differently, logits up to {logits:.3g} apart; rule: identical "
                f"predictions and logits within {logit_tolerance:g} (export.logit_tolerance)"
            )
    else:
        out["rule"] = f"{primary} no more than {int8_tolerance:g} below the model's"
        if worse_by > int8_tolerance:
            raise ExportError(
                f"{fmt} export: test {primary} {theirs:.4f} against the model's {ours:.4f} "
                f"({worse_by:.4f} worse); rule: within {int8_tolerance:g} "
                "(export.int8_tolerance)"
            )
    return out


def _percentiles(seconds: list[float]) -> tuple[float, float]:
    ms = np.asarray(seconds) * 1000.0
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 95))


def measure_latency(
    net: Any,
    collate: Any,
    feats: list[dict[str, Any]],
    autocast: Any = None,
    singles: int = 40,
    batches: int = 4,
) -> dict[str, float]:
    """p50 / p95 milliseconds of one text (the first ``singles`` test rows, one at a time)
    and of batches of 32 (``batches`` of them), after a warm-up of each; texts per second
    of the batches. ``autocast()``: a context the PyTorch model runs in (its precision)."""
    import contextlib

    import torch

    context = autocast or contextlib.nullcontext
    single = [collate([f]) for f in feats[:singles]]
    many = [collate(feats[i : i + BATCH]) for i in range(0, len(feats), BATCH)][:batches]
    many = [b for b in many if len(b["input_ids"]) == BATCH] or many[:1]
    clean = [{k: v for k, v in b.items() if k != "labels"} for b in single + many]
    single, many = clean[: len(single)], clean[len(single) :]

    def timed(batch: dict[str, Any]) -> float:
        t0 = time.perf_counter()
        net(**batch)
        return time.perf_counter() - t0

    with torch.inference_mode(), context():
        for b in (single[:2] + many[:1]) if single else many[:1]:  # warm-up
            net(**b)
        one = [timed(b) for b in single]
        group = [timed(b) for b in many]
    p50, p95 = _percentiles(one)
    b50, b95 = _percentiles(group)
    texts = sum(len(b["input_ids"]) for b in many)
    return {
        "single_p50_ms": round(p50, 2),
        "single_p95_ms": round(p95, 2),
        "batch32_p50_ms": round(b50, 1),
        "batch32_p95_ms": round(b95, 1),
        "batch32_texts_per_s": round(texts / max(sum(group), 1e-9), 1),
        "singles": len(one),
        "batches": len(group),
    }


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def write_record(folder: Path, record: dict[str, Any]) -> None:
    (folder / RECORD).write_text(json.dumps(record, indent=2))


def read_record(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


__all__ = [
    "FORMATS",
    "ONNX_FORMATS",
    "OnnxNet",
    "load_onnx",
    "max_logit_difference",
    "measure_latency",
    "onnx_export",
    "quantize_int8",
    "verify",
]


def machine_line() -> str:
    """This machine as the latency figures need it named: cores, processor, bf16 support."""
    import os
    import platform

    from domaintune.training.launch import cpu_bf16_features

    try:
        lines = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    name = next(
        (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
        platform.processor() or platform.machine(),
    )
    bf16 = cpu_bf16_features()
    return f"{os.cpu_count()} x {name}, bf16: {', '.join(bf16) if bf16 else 'none'}"

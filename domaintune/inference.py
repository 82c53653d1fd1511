"""Batched inference, used to evaluate fine-tuned and base models alike and by ``predict``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from domaintune import cpu_share
from domaintune.config import Precision


@contextlib.contextmanager
def autocast_for(model: Any, precision: Precision) -> Iterator[None]:
    """Score ``model`` in ``precision`` (bf16/fp16 autocast on its device; fp32: as is)."""
    import torch

    if precision == "fp32":
        yield
        return
    device = next(model.parameters()).device.type
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    with torch.autocast(device_type=device, dtype=dtype):
        yield


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities over the last axis (stable: the maximum is subtracted first)."""
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def batched_logits(
    model: Any,
    collate: Any,
    feats: list[dict[str, Any]],
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
    logits_of: Callable[[Any], Any] | None = None,
) -> list[np.ndarray]:
    """Logits for every feature row (``input_ids`` and its companions), in their order.

    Rows are batched by length (less padding) and put back in order afterwards. Per-token
    logits are cut back to each row's own length. ``on_batch(rows)`` after each batch;
    ``logits_of(output)`` picks the logits from the model's output (default ``.logits``)."""
    import torch

    order = np.argsort([len(f["input_ids"]) for f in feats], kind="stable")
    model.eval()
    device = next(model.parameters()).device
    out: list[np.ndarray] = [None] * len(feats)  # type: ignore[list-item]
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            cpu_share.refresh()
            idx = order[start : start + batch_size]
            batch = collate([feats[i] for i in idx])
            batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            output = model(**batch)
            logits = (output.logits if logits_of is None else logits_of(output)).float()
            logits = logits.cpu().numpy()
            for j, i in enumerate(idx):
                row = logits[j]
                out[i] = row[: len(feats[i]["input_ids"])] if row.ndim == 2 else row
            if on_batch is not None:
                on_batch(len(idx))
    return out


def predict_logits(
    model: Any, tokenizer: Any, task: Any, split_path: str, batch_size: int
) -> list[np.ndarray]:
    """Logits for every row of a tokenized split, in the split's order."""
    from datasets import Dataset

    ds = Dataset.from_parquet(split_path)
    cols = [c for c in task.model_columns if c in ds.column_names and c != "labels"]
    feats = ds.select_columns(cols).to_list()
    return batched_logits(model, task.collator(tokenizer), feats, batch_size)

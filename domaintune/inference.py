"""Batched inference on a tokenized split, used to evaluate fine-tuned and base models alike."""

from __future__ import annotations

from typing import Any

import numpy as np


def predict_logits(
    model: Any, tokenizer: Any, task: Any, split_path: str, batch_size: int
) -> list[np.ndarray]:
    """Logits for every row of a tokenized split, in the split's order.

    Rows are batched by length (less padding) and put back in order afterwards. Per-token
    logits are cut back to each row's own length.
    """
    import torch
    from datasets import Dataset

    ds = Dataset.from_parquet(split_path)
    cols = [c for c in task.model_columns if c in ds.column_names and c != "labels"]
    feats = ds.select_columns(cols).to_list()
    order = np.argsort([len(f["input_ids"]) for f in feats], kind="stable")
    collate = task.collator(tokenizer)
    model.eval()
    device = next(model.parameters()).device
    out: list[np.ndarray] = [None] * len(feats)  # type: ignore[list-item]
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = collate([feats[i] for i in idx])
            batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            logits = model(**batch).logits.float().cpu().numpy()
            for j, i in enumerate(idx):
                row = logits[j]
                out[i] = row[: len(feats[i]["input_ids"])] if row.ndim == 2 else row
    return out

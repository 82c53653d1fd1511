"""Causal language modelling: domain adaptation on raw domain text (filings, clinical notes,
product catalogues).

Documents are tokenized, each followed by the end-of-sequence token, concatenated and cut
into blocks of ``training.max_length`` tokens, so no position is spent on padding except in
a split's last block (its padding is masked out of attention and loss). Blocks may span a
document boundary, as in the Hugging Face ``run_clm`` recipe; the EOS token marks it. The
packing efficiency (share of real tokens) is reported per split. The metric is held-out
perplexity, exp(mean token negative log-likelihood), before and after fine-tuning.
"""

from __future__ import annotations

import html
import math
import re
from typing import Any

import numpy as np
import pandas as pd

from domaintune.errors import ModelError
from domaintune.evidence import ExampleStats
from domaintune.tasktypes import register_task_type
from domaintune.tasktypes.base import SMOLLM2, TaskType, TokenizeSettings, require_columns

_SPACES = re.compile(r"[ \t\f\v]+")
_BLANKS = re.compile(r"\n{3,}")


@register_task_type
class CausalLM(TaskType):
    name = "causal_lm"
    metrics = ("perplexity",)
    lower_is_better = frozenset({"perplexity"})
    default_model = SMOLLM2
    contract = "causal_lm"
    auto_model = "AutoModelForCausalLM"
    exports = ("merged", "gguf")  # a language model for llama.cpp-style servers
    cuts_long_texts = False  # packed into blocks
    raw_columns = ("text",)
    model_columns = ("input_ids", "attention_mask", "labels")
    target_column = "text"

    # -- ingest ---------------------------------------------------------------
    def map_columns(self, df: pd.DataFrame, config: Any, where: str) -> pd.DataFrame:
        col = config.data.text_column
        require_columns(df, {"text": col}, where)
        text = df[col].map(
            lambda v: None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)
        )
        return pd.DataFrame(
            {"text": text.astype(object), "_row": df["_row"], "_source": df["_source"]}
        )

    def label_counts(self, df: pd.DataFrame) -> dict[str, int]:
        text = df["text"].dropna()
        return {"documents": int(len(text)), "characters": int(text.str.len().sum())}

    # -- validate -------------------------------------------------------------
    def contract_tables(
        self, df: pd.DataFrame, labels: list[str], config: Any = None
    ) -> dict[str, pd.DataFrame]:
        rows = df.copy()
        key = rows["text"].map(lambda t: " ".join(t.split()) if isinstance(t, str) else None)
        rows["_is_duplicate"] = (key.duplicated(keep="first") & key.notna()).astype(float)
        return {"rows": rows}

    # -- preprocess -----------------------------------------------------------
    def usable_rows(self, df: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
        return df[df["text"].notna()]

    def clean(self, df: pd.DataFrame, config: Any) -> pd.DataFrame:
        """Keep the paragraph structure a language model should learn; tidy the rest."""

        def fix(t: str) -> str:
            if config.preprocess.unescape_html:
                t = html.unescape(t)
            t = t.replace("\r\n", "\n").replace("\r", "\n")
            if config.preprocess.normalize_whitespace:
                t = "\n".join(_SPACES.sub(" ", line).strip() for line in t.split("\n"))
                t = _BLANKS.sub("\n\n", t)
            return t.strip()

        out = df.copy()
        out["text"] = out["text"].map(fix)
        return out[out["text"].str.len() > 0]

    def check_tokenizer(self, tokenizer: Any, settings: Any) -> None:
        if tokenizer.eos_token_id is None:
            raise ModelError(
                "model.name_or_path: the tokenizer has no end-of-sequence token; rule: causal_lm needs one"
            )

    def tokenize(
        self, batch: dict[str, list], tokenizer: Any, settings: TokenizeSettings, labels: list[str]
    ) -> dict[str, list]:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        ids = [x + [tokenizer.eos_token_id] for x in ids]
        return {"input_ids": ids, "length": [len(x) for x in ids], "_example": batch["_example"]}

    def pack(
        self, ds: Any, tokenizer: Any, settings: TokenizeSettings
    ) -> tuple[Any, dict[str, Any]]:
        from datasets import Dataset

        block = settings.max_length
        flat = np.fromiter((t for ids in ds["input_ids"] for t in ids), dtype=np.int64)
        n_blocks = max(1, math.ceil(len(flat) / block))
        pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        padded = np.full(n_blocks * block, pad_id, dtype=np.int64)
        padded[: len(flat)] = flat
        mask = np.zeros(n_blocks * block, dtype=np.int64)
        mask[: len(flat)] = 1
        input_ids = padded.reshape(n_blocks, block)
        attention = mask.reshape(n_blocks, block)
        labels = np.where(attention == 1, input_ids, -100)
        packed = Dataset.from_dict(
            {
                "input_ids": input_ids.tolist(),
                "attention_mask": attention.tolist(),
                "labels": labels.tolist(),
                "length": [block] * n_blocks,
                "_example": list(range(n_blocks)),
            }
        )
        stats = {
            "documents": len(ds),
            "tokens": int(len(flat)),
            "blocks": n_blocks,
            "block_size": block,
            "packing_efficiency": round(len(flat) / (n_blocks * block), 4),
        }
        return packed, stats

    # -- train / evaluate ------------------------------------------------------
    def collator(self, tokenizer: Any, settings: Any = None) -> Any:
        from transformers import default_data_collator

        return default_data_collator  # blocks all have the same length

    def metric_for_best_model(self, primary: str) -> tuple[str, bool]:
        return "loss", False  # validation perplexity is exp(loss): pick the lowest loss

    def compute_metrics(
        self, predictions: Any, references: Any, labels: list[str]
    ) -> dict[str, Any]:
        """``predictions``: summed negative log-likelihood; ``references``: token count."""
        nll, tokens = float(predictions), int(references)
        loss = nll / max(tokens, 1)
        return {"perplexity": float(math.exp(min(loss, 700))), "loss": loss, "tokens": tokens}

    def trainer_metrics(self, eval_pred: Any, labels: list[str]) -> dict[str, float]:
        raise NotImplementedError("causal_lm is judged by the validation loss alone")

    def score_split(
        self,
        model: Any,
        tokenizer: Any,
        split_path: str,
        labels: list[str],
        batch_size: int,
        settings: Any = None,
    ) -> tuple[dict[str, Any], pd.DataFrame]:
        import torch
        import torch.nn.functional as F
        from datasets import Dataset

        ds = Dataset.from_parquet(split_path).with_format("torch", columns=list(self.model_columns))
        model.eval()
        device = next(model.parameters()).device
        rows, total_nll, total_tokens = [], 0.0, 0
        with torch.inference_mode():
            for start in range(0, len(ds), batch_size):
                batch = {k: v.to(device) for k, v in ds[start : start + batch_size].items()}
                logits = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
                target = batch["labels"][:, 1:]
                nll = F.cross_entropy(
                    logits[:, :-1].float().reshape(-1, logits.size(-1)),
                    target.reshape(-1),
                    ignore_index=-100,
                    reduction="none",
                ).view(target.shape)
                counted = (target != -100).sum(-1)
                for i in range(len(target)):
                    n = int(counted[i])
                    block_nll = float(nll[i].sum())
                    rows.append(
                        {
                            "block": start + i,
                            "tokens": n,
                            "loss": block_nll / max(n, 1),
                            "nll": block_nll,
                        }
                    )
                    total_nll += block_nll
                    total_tokens += n
        return self.compute_metrics(total_nll, total_tokens, labels), pd.DataFrame(rows)

    def example_statistics(
        self, predictions: pd.DataFrame, metric: str, labels: list[str]
    ) -> ExampleStats | None:
        """perplexity: [summed negative log-likelihood, tokens] per block (the examples of a
        packed split are its blocks: documents are cut into them), combined as exp(total nll /
        total tokens)."""
        if metric != "perplexity":
            return None
        return perplexity_statistics(predictions, "tokens")

    # -- predict ---------------------------------------------------------------
    def predict(self, model: Any, table: pd.DataFrame, text_column: str, load: Any) -> pd.DataFrame:
        """Per document: ``perplexity_tokens`` scored and ``perplexity`` = exp(mean negative log-likelihood).
        A document (its tokens and end-of-sequence token, as training packs it) is cut into
        blocks of ``training.max_length``; each block's first token has no context and is not
        scored, as in the evaluation's packed blocks."""
        import torch
        import torch.nn.functional as F

        from domaintune.inference import autocast_for
        from domaintune.progress import Progress
        from domaintune.tasktypes.predicting import log

        tokenizer, net, precision = load()
        texts = table[text_column].fillna("").astype(str).tolist()
        eos = tokenizer.eos_token_id
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        blocks: list[tuple[int, list[int]]] = []  # (document, token ids)
        for doc, doc_ids in enumerate(ids):
            doc_ids = [*doc_ids, eos] if eos is not None else list(doc_ids)
            for start in range(0, len(doc_ids), model.max_length):
                block = doc_ids[start : start + model.max_length]
                if len(block) > 1:
                    blocks.append((doc, block))
        nll = np.zeros(len(texts))
        scored = np.zeros(len(texts), dtype=np.int64)
        order = np.argsort([len(b) for _, b in blocks], kind="stable")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
        progress = Progress(len(blocks), "predict", unit="blocks", logger=log)
        with torch.inference_mode(), autocast_for(net, precision):
            for start in range(0, len(order), model.batch_size):
                chosen = [blocks[i] for i in order[start : start + model.batch_size]]
                width = max(len(b) for _, b in chosen)
                input_ids = torch.full((len(chosen), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chosen), width), dtype=torch.long)
                for j, (_, b) in enumerate(chosen):
                    input_ids[j, : len(b)] = torch.tensor(b)
                    mask[j, : len(b)] = 1
                logits = net(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
                target = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
                losses = F.cross_entropy(
                    logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="none"
                ).view(target.shape)
                for j, (doc, _) in enumerate(chosen):
                    nll[doc] += float(losses[j].sum())
                    scored[doc] += int((target[j] != -100).sum())
                progress.advance(len(chosen))
        progress.close()
        out = table.copy()
        out["perplexity_tokens"] = scored
        with np.errstate(divide="ignore", invalid="ignore"):
            out["perplexity"] = np.where(scored > 0, np.exp(nll / np.maximum(scored, 1)), np.nan)
        return out

    def prediction_counts(self, result: pd.DataFrame) -> dict[str, int]:
        """The corpus as a whole."""
        return {"documents": len(result), "tokens": int(result["perplexity_tokens"].sum())}


def _perplexity(sums: np.ndarray) -> np.ndarray:
    """exp(nll / tokens) of summed [nll, tokens], as ``compute_metrics`` computes it."""
    loss = sums[..., 0] / np.maximum(sums[..., 1], 1)
    return np.exp(np.minimum(loss, 700))


def perplexity_statistics(predictions: pd.DataFrame, tokens_column: str) -> ExampleStats:
    """[nll, tokens] per block of a ``score_split`` frame: its ``nll`` column (the block's
    summed negative log-likelihood), or ``loss`` x tokens in a frame scored before it
    existed."""
    tokens = predictions[tokens_column].to_numpy(dtype=np.float64)
    if "nll" in predictions.columns:
        nll = predictions["nll"].to_numpy(dtype=np.float64)
    else:
        nll = predictions["loss"].to_numpy(dtype=np.float64) * tokens
    return ExampleStats(np.column_stack([nll, tokens]), _perplexity)

"""Masked language modelling: domain-adaptive pre-training of an encoder on raw domain text
("Don't Stop Pretraining", Gururangan et al. 2020), before it is fine-tuned for a task.

Documents are read and cleaned as for ``causal_lm``. Each is tokenized with the tokenizer's
special tokens (``[CLS] ... [SEP]``), the documents are concatenated and cut into blocks of
``training.max_length`` tokens, as Hugging Face's ``run_mlm`` recipe does (``group_texts``)
and as RoBERTa (and so "Don't Stop Pretraining") packed full sentences: no position is spent on
padding except in a split's last block, and a document longer than a block is learned whole
instead of truncated. The last block is padded rather than dropped, so that a small split
loses nothing.

Masking is dynamic: the collator masks ``task.mlm_probability`` of each block anew in every
batch. With ``task.whole_word_masking`` (the default), all pieces of a word are masked together
and each masked piece becomes the mask token (transformers' whole-word masking has no random
or kept tokens); without it, single tokens are masked, 80% as the mask token, 10% a random
token and 10% kept (BERT's and RoBERTa's token masking). Word boundaries come from the
vocabulary: a WordPiece continuation (``##``) continues a word, a byte-level BPE (``Ġ``) or
SentencePiece (``▁``) marker starts one, and a token after a special token starts one.

Evaluation masks the test split once, with a fixed seed, in fixed chunks of blocks: the base
model, the fine-tuned model and the champion are scored on exactly the same masked tokens,
whatever the batch size and the training seed. The metrics are ``perplexity``, exp(mean
negative log-likelihood of the masked tokens), and ``masked_accuracy``, the share of masked
tokens predicted exactly. The registered model is an ``...ForMaskedLM`` folder that a next
run (``model.name_or_path``) loads with a fresh task head.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from domaintune.errors import ModelError
from domaintune.evidence import ExampleStats, ratio_of_sums
from domaintune.tasktypes import register_task_type
from domaintune.tasktypes.base import MINILM, TaskType, TokenizeSettings
from domaintune.tasktypes.causal_lm import CausalLM, perplexity_statistics

log = logging.getLogger(__name__)

#: The seed the test split is masked with: one set of masks for every model and run.
EVAL_MASK_SEED = 0
#: Blocks masked together when the test split is masked (independent of the batch size).
_MASK_CHUNK = 64
#: Pretrained architectures whose saved weights include a masked-LM head.
_MLM_HEADS = ("ForMaskedLM", "ForPreTraining")


def word_start_table(tokenizer: Any) -> np.ndarray:
    """Per token id: whether the token begins a word, read from the tokenizer's own scheme
    (WordPiece's continuation prefix, byte-level BPE's ``Ġ``, SentencePiece's ``▁``).
    ModelError when the tokenizer shows no such scheme."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    prefix = (backend.get("model") or {}).get("continuing_subword_prefix")
    marker = (
        None if prefix else _word_marker([backend.get("pre_tokenizer"), backend.get("decoder")])
    )
    if not prefix and marker is None:
        raise ModelError(
            "task.whole_word_masking: the tokenizer of model.name_or_path marks no word "
            "boundaries (no WordPiece '##', byte-level 'Ġ' or SentencePiece '▁' pieces); "
            "rule: whole-word masking needs them (set task.whole_word_masking: false)"
        )
    vocab = tokenizer.get_vocab()
    table = np.zeros(max(len(tokenizer), max(vocab.values()) + 1), dtype=bool)
    for token, i in vocab.items():
        table[i] = not token.startswith(prefix) if prefix else token.startswith(marker)
    return table


def _word_marker(node: Any) -> str | None:
    """The character a word's first piece starts with, found in a (nested) pre-tokenizer or
    decoder: ``Ġ`` for byte-level, the replacement of a Metaspace."""
    if isinstance(node, dict):
        if node.get("type") == "ByteLevel":
            return "Ġ"
        if node.get("type") == "Metaspace":
            return node.get("replacement") or "▁"
        node = list(node.values())
    if isinstance(node, list):
        for child in node:
            found = _word_marker(child)
            if found:
                return found
    return None


# the class is built on first use: it subclasses a transformers class, and importing transformers
# where this module loads would slow `domaintune --help` and config loading (start-up)
@functools.cache
def _collator_class() -> type:
    import torch
    from transformers import DataCollatorForLanguageModeling

    class MaskingCollator(DataCollatorForLanguageModeling):
        """transformers' MLM collator, its special tokens and (for whole-word masking) its
        word boundaries read from the token ids: the Trainer hands a collator only the
        columns the model's forward takes, so no offsets or word ids reach it."""

        def __post_init__(self) -> None:
            super().__post_init__()
            special = np.zeros(len(self.tokenizer), dtype=bool)
            special[[i for i in self.tokenizer.all_special_ids if i < len(special)]] = True
            self._special = torch.from_numpy(special)
            starts = word_start_table(self.tokenizer) if self.whole_word_mask else special
            self._starts = torch.from_numpy(starts)

        def torch_mask_tokens(
            self, inputs: Any, special_tokens_mask: Any = None, offset_mapping: Any = None
        ) -> tuple[Any, Any]:
            special = self._special[inputs]
            if self.whole_word_mask:
                # character offsets as whole-word masking reads them: one character per
                # piece, a gap before the piece that starts a word
                gap = self._starts[inputs].long()
                end = torch.cumsum(gap + 1, dim=1)
                offset_mapping = torch.stack([end - 1, end], dim=-1)
            return super().torch_mask_tokens(inputs, special.long(), offset_mapping)

    return MaskingCollator


def masking_collator(tokenizer: Any, settings: Any = None, seed: int | None = None) -> Any:
    """The MLM collator of ``settings`` (``task.mlm_probability``, ``task.whole_word_masking``;
    None: their defaults); ``seed`` gives it its own generator (evaluation's fixed masks)."""
    from domaintune.config import TaskConfig

    settings = settings if settings is not None else TaskConfig(type="masked_lm")
    whole = settings.whole_word_masking
    collate = _collator_class()(
        tokenizer=tokenizer,
        mlm=True,
        mlm_probability=settings.mlm_probability,
        whole_word_mask=whole,
        # whole-word masking replaces every masked piece by the mask token (transformers
        # supports nothing else there; said here rather than warned at every start)
        mask_replace_prob=1.0 if whole else 0.8,
        random_replace_prob=0.0 if whole else 0.1,
        seed=seed,
    )
    if seed is not None:
        collate.create_rng()  # transformers would create it on the first batch, not here
    return collate


@register_task_type
class MaskedLM(CausalLM):
    """Raw text as for causal_lm (columns, contract tables, cleaning, packing); what differs:
    special tokens per document, no stored labels (the collator masks), the MLM metrics."""

    name = "masked_lm"
    metrics = ("perplexity", "masked_accuracy")
    lower_is_better = frozenset({"perplexity"})
    default_model = MINILM
    contract = "masked_lm"
    auto_model = "AutoModelForMaskedLM"
    exports = ()  # an encoder to fine-tune further, not served (predict says so too)
    cuts_long_texts = False  # packed into blocks
    model_columns = ("input_ids", "attention_mask")
    # an encoder to fine-tune further, not a model to serve: predict says so in one line
    # (causal_lm's perplexities would be wrong for it)
    predict = TaskType.predict
    prediction_counts = TaskType.prediction_counts

    def learning_settings(self, settings: Any) -> dict[str, Any]:
        """How the collator masks is part of what is learned, and of what is scored."""
        return {k: getattr(settings, k) for k in ("mlm_probability", "whole_word_masking")}

    scoring_settings = learning_settings

    # -- preprocess -----------------------------------------------------------
    def check_tokenizer(self, tokenizer: Any, settings: Any) -> None:
        if tokenizer.mask_token_id is None:
            raise ModelError(
                "model.name_or_path: the tokenizer has no mask token; rule: masked_lm needs one"
            )
        if settings.whole_word_masking:
            word_start_table(tokenizer)  # a tokenizer without word boundaries fails here

    def tokenize(
        self, batch: dict[str, list], tokenizer: Any, settings: TokenizeSettings, labels: list[str]
    ) -> dict[str, list]:
        ids = tokenizer(batch["text"])["input_ids"]  # [CLS] document [SEP]
        return {"input_ids": ids, "length": [len(x) for x in ids], "_example": batch["_example"]}

    def pack(
        self, ds: Any, tokenizer: Any, settings: TokenizeSettings
    ) -> tuple[Any, dict[str, Any]]:
        packed, stats = super().pack(ds, tokenizer, settings)
        return packed.remove_columns("labels"), stats  # the collator draws the labels

    # -- train / evaluate ------------------------------------------------------
    def load_model(
        self,
        path: str,
        labels: list[str],
        seed: int,
        trust_remote_code: bool = False,
        **config_overrides: Any,
    ) -> Any:
        cfg = Path(path) / "config.json"
        archs = (json.loads(cfg.read_text()).get("architectures") or []) if cfg.is_file() else []
        if not any(a.endswith(_MLM_HEADS) for a in archs):
            log.info(
                "masked_lm: %s (%s) has no masked-LM head: a fresh one is initialised from "
                "training.seed",
                Path(path).name,
                ", ".join(archs) or "no architecture",
            )
        return super().load_model(path, labels, seed, trust_remote_code, **config_overrides)

    def collator(self, tokenizer: Any, settings: Any = None) -> Any:
        return masking_collator(tokenizer, settings)

    def compute_metrics(
        self, predictions: Any, references: Any, labels: list[str]
    ) -> dict[str, Any]:
        """``predictions``: (summed negative log-likelihood, correct predictions) of the
        masked tokens; ``references``: their count."""
        nll, correct = predictions
        tokens = int(references)
        loss = float(nll) / max(tokens, 1)
        return {
            "perplexity": float(math.exp(min(loss, 700))),
            "masked_accuracy": int(correct) / max(tokens, 1),
            "loss": loss,
            "masked_tokens": tokens,
        }

    def trainer_metrics(self, eval_pred: Any, labels: list[str]) -> dict[str, float]:
        raise NotImplementedError("masked_lm is judged by the validation loss alone")

    def example_statistics(
        self, predictions: pd.DataFrame, metric: str, labels: list[str]
    ) -> ExampleStats | None:
        """Per block (its masks drawn once, the same every time): perplexity [nll, masked
        tokens]; masked_accuracy [correct, masked tokens]."""
        if metric == "perplexity":
            return perplexity_statistics(predictions, "masked_tokens")
        if metric == "masked_accuracy":
            values = predictions[["correct", "masked_tokens"]].to_numpy(dtype=np.float64)
            return ExampleStats(values, ratio_of_sums)
        return None

    def mask_split(self, tokenizer: Any, split_path: str, settings: Any = None) -> Any:
        """(masked input ids, attention mask, labels) of a split, masked once with
        ``EVAL_MASK_SEED`` in chunks of ``_MASK_CHUNK`` blocks: the same masks every time."""
        import torch
        from datasets import Dataset

        ds = Dataset.from_parquet(split_path).with_format("torch", columns=list(self.model_columns))
        collate = masking_collator(tokenizer, settings, seed=EVAL_MASK_SEED)
        inputs, masks, targets = [], [], []
        for start in range(0, len(ds), _MASK_CHUNK):
            chunk = ds[start : start + _MASK_CHUNK]
            ids, gold = collate.torch_mask_tokens(chunk["input_ids"].clone())
            inputs.append(ids)
            masks.append(chunk["attention_mask"])
            targets.append(gold)
        return torch.cat(inputs), torch.cat(masks), torch.cat(targets)

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

        input_ids, attention, targets = self.mask_split(tokenizer, split_path, settings)
        model.eval()
        device = next(model.parameters()).device
        rows, total_nll, total_correct, total = [], 0.0, 0, 0
        with torch.inference_mode():
            for start in range(0, len(input_ids), batch_size):
                window = slice(start, start + batch_size)
                gold = targets[window].to(device)
                logits = model(
                    input_ids=input_ids[window].to(device),
                    attention_mask=attention[window].to(device),
                ).logits.float()
                nll = F.cross_entropy(
                    logits.reshape(-1, logits.size(-1)),
                    gold.reshape(-1),
                    ignore_index=-100,
                    reduction="none",
                ).view(gold.shape)
                counted = gold != -100
                hits = (logits.argmax(-1) == gold) & counted
                for i in range(len(gold)):
                    n, block_nll, right = (
                        int(counted[i].sum()),
                        float(nll[i].sum()),
                        int(hits[i].sum()),
                    )
                    rows.append(
                        {
                            "block": start + i,
                            "masked_tokens": n,
                            "loss": block_nll / max(n, 1),
                            "correct": right,
                            "nll": block_nll,
                        }
                    )
                    total_nll += block_nll
                    total_correct += right
                    total += n
        return self.compute_metrics((total_nll, total_correct), total, labels), pd.DataFrame(rows)

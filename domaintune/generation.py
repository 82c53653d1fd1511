"""Greedy generation: the one way domaintune generates answers (evaluation of the base, the
fine-tuned and the champion model, ``domaintune predict``, the model server).

Prompts are token ids (rendered with the model's chat template and cut to fit by the task
type). They are generated in batches of similar length, left-padded, with a key/value cache:
one forward pass over the prompts, then one token per step. A sequence leaves the batch as
soon as it ends (an end-of-turn or end-of-sequence token, or ``max_new_tokens``), and its
rows leave the cache with it, so a batch costs what its live sequences cost, not what its
longest answer costs (``model.generate`` keeps computing finished rows until the last one
ends). The answers are identical to ``model.generate``'s greedy ones (tested).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: a marker no chat template contains: where an answer ends in a rendered conversation
_ANSWER_MARK = "\u2063domaintune-answer\u2063"


@dataclass(frozen=True)
class GenerationSettings:
    """How answers are generated (``evaluation.max_new_tokens``, ``evaluation.batch_size``):
    built once per run, part of the evaluation keys, written into the model's
    ``generation_config.json`` so that predict and serving generate alike."""

    #: the most tokens an answer may have (``evaluation.max_new_tokens``)
    max_new_tokens: int = 128
    #: prompts generated together (``evaluation.batch_size``)
    batch_size: int = 16
    #: the most tokens a prompt keeps (domaintune.chat.prompt_budget of max_length)
    max_prompt_tokens: int = 2048

    @classmethod
    def of(cls, config: Any, answer_tokens: dict[str, Any] | None = None) -> GenerationSettings:
        """The run's settings; ``answer_tokens``: the training answers' token lengths
        (preprocess stats), from which ``max_new_tokens: auto`` is derived."""
        from domaintune.chat import prompt_budget

        max_length = config.training.max_length
        wanted = config.evaluation.max_new_tokens
        max_new = auto_max_new_tokens(answer_tokens, max_length) if wanted == "auto" else wanted
        return cls(
            max_new_tokens=int(max_new),
            batch_size=config.evaluation.batch_size,
            max_prompt_tokens=prompt_budget(max_length, int(max_new)),
        )

    @classmethod
    def of_run(cls, config: Any, splits: Any) -> GenerationSettings:
        """The settings of a run whose tokenized splits are ``splits`` (a SplitManifest: its
        training answers' lengths decide ``max_new_tokens: auto``)."""
        answers = (splits.stats.get("train_tokens") or {}).get("answer_tokens")
        return cls.of(config, answers)

    def key(self) -> dict[str, int]:
        return asdict(self)


def auto_max_new_tokens(answer_tokens: dict[str, Any] | None, max_length: int) -> int:
    """``evaluation.max_new_tokens: auto``: room for the training answers (their 99th
    percentile in tokens, end-of-turn included) plus a quarter, rounded up to 8, at most
    ``max_length``; 128 when the lengths are unknown."""
    if not answer_tokens or not answer_tokens.get("p99"):
        return min(128, max_length)
    wanted = math.ceil(1.25 * float(answer_tokens["p99"]) / 8) * 8
    return int(max(8, min(wanted, max_length)))


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The tokens that end an answer: the end-of-sequence token(s) and the token the chat
    template closes an assistant turn with (``<|im_end|>`` for ChatML, ``<end_of_turn>`` for
    Gemma), which is often not the end-of-sequence token."""
    eos = tokenizer.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _ANSWER_MARK}],
                tokenize=False,
            )
        except Exception:  # a template that cannot render this pair: eos alone
            text = ""
        if _ANSWER_MARK in text:
            after = text[text.index(_ANSWER_MARK) + len(_ANSWER_MARK) :]
            special = set(tokenizer.all_special_ids) | set(
                getattr(tokenizer, "added_tokens_decoder", {}) or {}
            )
            for t in tokenizer(after, add_special_tokens=False)["input_ids"]:
                if t in special:
                    ids.add(int(t))
                    break
    return sorted(ids)


def _accepts(model: Any, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def generate_ids(
    model: Any,
    prompts: list[list[int]],
    *,
    pad_id: int,
    stop_ids: list[int],
    max_new_tokens: int,
    batch_size: int,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (token ids), in their order, without the stop
    token. ``on_batch(rows, new_tokens)`` after each batch."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    order = np.argsort([len(p) for p in prompts], kind="stable")
    out: list[list[int]] = [[] for _ in prompts]
    stops = torch.tensor(sorted(set(stop_ids)), device=device)
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = [int(i) for i in order[s : s + batch_size]]
            answers = _generate_batch(
                model, [prompts[i] for i in idx], pad_id, stops, max_new_tokens, device
            )
            for i, ids in zip(idx, answers, strict=True):
                out[i] = ids
            if on_batch is not None:
                on_batch(len(idx), sum(len(a) + 1 for a in answers))
    return out


def _generate_batch(
    model: Any, chunk: list[list[int]], pad_id: int, stops: Any, max_new_tokens: int, device: Any
) -> list[list[int]]:
    """One batch: prefill, then one token per step; finished rows leave the batch and the
    cache."""
    import torch
    from transformers import DynamicCache

    width = max(len(p) for p in chunk)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
    with_positions = _accepts(model, "position_ids")
    extra: dict[str, Any] = {}
    if with_positions:
        extra["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    if _accepts(model, "logits_to_keep"):
        extra["logits_to_keep"] = 1  # the prompt's last position only
    cache = DynamicCache(config=model.config)
    logits = model(
        input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True, **extra
    ).logits
    answers: list[list[int]] = [[] for _ in chunk]
    live = torch.arange(len(chunk), device=device)  # the rows still generating
    token = logits[:, -1].argmax(-1)
    for step in range(max_new_tokens):
        ended = torch.isin(token, stops)
        for row, t, end in zip(live.tolist(), token.tolist(), ended.tolist(), strict=True):
            if not end:
                answers[row].append(int(t))
        if step + 1 == max_new_tokens or bool(ended.all()):
            break
        if bool(ended.any()):
            keep = (~ended).nonzero().squeeze(-1)
            cache.reorder_cache(keep)
            live, mask, token = live[keep], mask[keep], token[keep]
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
        extra = {"position_ids": mask.sum(-1, keepdim=True) - 1} if with_positions else {}
        logits = model(
            input_ids=token[:, None],
            attention_mask=mask,
            past_key_values=cache,
            use_cache=True,
            **extra,
        ).logits
        token = logits[:, -1].argmax(-1)
    return answers


def generate_texts(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    settings: GenerationSettings,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Greedy answers to ``prompts`` as text (special tokens left out, stripped)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = generate_ids(
        model,
        prompts,
        pad_id=pad,
        stop_ids=stop_token_ids(tokenizer),
        max_new_tokens=settings.max_new_tokens,
        batch_size=settings.batch_size,
        on_batch=on_batch,
    )
    return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]

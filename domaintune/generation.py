"""Greedy generation: the one way domaintune generates answers (evaluation of the base, the
fine-tuned and the champion model, ``domaintune predict``, the model server).

Prompts are token ids (rendered with the model's chat template and cut to fit by the task
type). They are generated shortest first, left-padded, with a key/value cache: one forward
pass over the prompts, then one token per step. A sequence leaves the batch as soon as it
ends (an end-of-turn or end-of-sequence token, or ``max_new_tokens``), and its rows leave the
cache with it; when a quarter of the batch's places are free, waiting prompts are run
through the model and join the batch that is decoding (continuous batching: their caches
and the running ones right-aligned in new buffers). So the batch stays full and costs what
its live sequences cost, not what its longest answer costs (``model.generate`` keeps
computing finished rows until the last one ends, and the next batch waits for it). Models
with sliding-window layers (Gemma 3) generate batch after batch. The answers are identical
to ``model.generate``'s greedy ones (tested, fp32).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from domaintune import cpu_share
from domaintune.config import Precision

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


def cast_for_generation(model: Any, precision: Precision) -> Any:
    """Under bf16 autocast on a CPU: the linear layers' weights cast to bf16 once, not on every
    decoding step. Autocast rounds them to bf16 for each product anyway (the same rounding), so
    the answers are identical (tested) and SmolLM2-135M generates 1.2x faster (416 vs 348
    tokens/s, 64 answers in batches of 64). A tied output layer gets a bf16 copy of its own, so
    the input embeddings stay fp32 as autocast keeps them. In place; returns ``model``."""
    import torch

    if precision != "bf16" or next(model.parameters()).device.type != "cpu":
        return model
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            module.to(torch.bfloat16)
    if head is not None and isinstance(head, torch.nn.Linear):
        head.weight = torch.nn.Parameter(
            head.weight.detach().to(torch.bfloat16), requires_grad=False
        )
        if head.bias is not None:
            head.bias = torch.nn.Parameter(
                head.bias.detach().to(torch.bfloat16), requires_grad=False
            )
    return model


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
    token. At most ``batch_size`` sequences decode together; when a quarter of the places
    are free, waiting prompts join the running batch (continuous batching), for models whose
    layers all attend to the whole sequence; models with sliding-window layers (Gemma 3)
    generate batch after batch. ``on_batch(rows, new_tokens)`` as answers finish."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    order = [int(i) for i in np.argsort([len(p) for p in prompts], kind="stable")]
    out: list[list[int]] = [[] for _ in prompts]
    stops = torch.tensor(sorted(set(stop_ids)), device=device)
    with torch.inference_mode():
        if _joinable(model):
            _generate_continuous(
                model, prompts, order, out, pad_id, stops, max_new_tokens, batch_size, on_batch
            )
            return out
        for s in range(0, len(order), batch_size):
            cpu_share.refresh()
            idx = order[s : s + batch_size]
            answers = _generate_batch(
                model, [prompts[i] for i in idx], pad_id, stops, max_new_tokens, device
            )
            for i, ids in zip(idx, answers, strict=True):
                out[i] = ids
            if on_batch is not None:
                on_batch(len(idx), sum(len(a) + 1 for a in answers))
    return out


def _joinable(model: Any) -> bool:
    """Whether prompts may join a running batch: every layer's cache is a full one (the
    preallocated layer), none a sliding window."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        layers = DynamicCache(config=model.config).layers
    except Exception:  # a model transformers' cache does not describe: batch after batch
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


class _Running:
    """The sequences decoding together: their prompt indices, attention mask over the cache,
    the token each produced last (not yet in the cache) and the cache."""

    def __init__(self, rows: list[int], mask: Any, token: Any, cache: Any) -> None:
        self.rows, self.mask, self.token, self.cache = rows, mask, token, cache

    def keep(self, keep: list[int]) -> None:
        import torch

        index = torch.tensor(keep, device=self.mask.device)
        self.cache.reorder_cache(index)
        self.rows = [self.rows[k] for k in keep]
        self.mask, self.token = self.mask[index], self.token[index]

    def join(self, other: _Running, room: int) -> None:
        """``other``'s sequences join these: both caches right-aligned in new buffers of
        ``room`` more positions than the longer needs; the columns no live row attends to
        are dropped."""
        import torch

        start = int(self.mask.any(0).to(torch.int8).argmax())
        mine, theirs = self.mask.shape[1] - start, other.mask.shape[1]
        width = max(mine, theirs)
        n = len(self.rows)
        mask = self.mask.new_zeros(n + len(other.rows), width)
        mask[:n, width - mine :] = self.mask[:, start:]
        mask[n:, width - theirs :] = other.mask
        for layer, new in zip(self.cache.layers, other.cache.layers, strict=True):
            merged = []
            for old, add in zip(layer._buffers, new._buffers, strict=True):
                buf = old.new_zeros(n + len(other.rows), old.shape[1], width + room, old.shape[3])
                buf[:n, :, width - mine : width] = old[:, :, start : start + mine]
                buf[n:, :, width - theirs : width] = add[:, :, :theirs]
                merged.append(buf)
            layer._buffers, layer._length = tuple(merged), width
            layer.keys, layer.values = (b[:, :, :width] for b in layer._buffers)
        self.rows = self.rows + other.rows
        self.mask, self.token = mask, torch.cat([self.token, other.token])


def _prefill(
    model: Any, chunk: list[list[int]], pad_id: int, room: int, with_positions: bool
) -> tuple[Any, Any, Any]:
    """The prompts left-padded through the model once: (mask, first tokens, cache with
    ``room`` positions to grow)."""
    import torch

    device = next(model.parameters()).device
    width = max(len(p) for p in chunk)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
    extra: dict[str, Any] = {}
    if with_positions:
        extra["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    if _accepts(model, "logits_to_keep"):
        extra["logits_to_keep"] = 1  # the prompt's last position only
    cache = preallocated_cache(model, width + room)
    logits = model(
        input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True, **extra
    ).logits
    return mask, logits[:, -1].argmax(-1), cache


def _generate_continuous(
    model: Any,
    prompts: list[list[int]],
    order: list[int],
    out: list[list[int]],
    pad_id: int,
    stops: Any,
    max_new_tokens: int,
    batch_size: int,
    on_batch: Callable[[int, int], None] | None,
) -> None:
    """Continuous batching: sequences leave as they end, waiting prompts (shortest first)
    join when a quarter of ``batch_size`` is free; answers written into ``out``."""
    import torch

    with_positions = _accepts(model, "position_ids")
    stop_set = set(stops.tolist())
    waiting = list(reversed(order))  # popped from the end: shortest first
    running: _Running | None = None
    least = max(1, batch_size // 4)
    while waiting or running is not None:
        cpu_share.refresh()  # another run's process may have started or ended beside this one
        free = batch_size - (len(running.rows) if running else 0)
        if waiting and (running is None or free >= min(least, len(waiting))):
            rows = [waiting.pop() for _ in range(min(free, len(waiting)))]
            joining = _Running(
                rows, *_prefill(model, [prompts[i] for i in rows], pad_id, max_new_tokens, with_positions)
            )  # fmt: skip
            if running is None:
                running = joining
            else:
                running.join(joining, max_new_tokens)
        keep, ended = [], []
        for k, (row, t) in enumerate(zip(running.rows, running.token.tolist(), strict=True)):
            if t not in stop_set:
                out[row].append(int(t))
                if len(out[row]) < max_new_tokens:
                    keep.append(k)
                    continue
            ended.append(row)
        if ended and on_batch is not None:
            on_batch(len(ended), sum(len(out[r]) + 1 for r in ended))
        if not keep:
            running = None
            continue
        if ended:
            running.keep(keep)
        running.mask = torch.cat([running.mask, running.mask.new_ones(len(keep), 1)], dim=1)
        extra = {"position_ids": running.mask.sum(-1, keepdim=True) - 1} if with_positions else {}
        logits = model(
            input_ids=running.token[:, None],
            attention_mask=running.mask,
            past_key_values=running.cache,
            use_cache=True,
            **extra,
        ).logits
        running.token = logits[:, -1].argmax(-1)


def preallocated_cache(model: Any, capacity: int) -> Any:
    """transformers' dynamic key/value cache whose full-attention layers keep their keys and
    values in buffers of ``capacity`` positions, written in place. The dynamic layer appends
    with ``torch.cat``, copying the whole cache of every layer at every step: half the time
    of a decoding step (64 rows, SmolLM2-135M). Sliding-window layers stay as they are."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=model.config)
    layer_class = _preallocated_layer_class()
    for layer in cache.layers:
        if type(layer) is DynamicLayer:
            layer.__class__ = layer_class
            layer.capacity = capacity
    return cache


# the class is built on first use: it subclasses a transformers class, and importing transformers
# where this module loads would slow `domaintune --help` and config loading (start-up)
@functools.cache
def _preallocated_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """A DynamicLayer over preallocated buffers (see :func:`preallocated_cache`); keys
        and values keep the dtypes they come in."""

        capacity = 0

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> Any:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self._length = 0
                self._buffers = tuple(
                    x.new_empty(*x.shape[:2], max(self.capacity, x.shape[2]), x.shape[3])
                    for x in (key_states, value_states)
                )
            end = self._length + key_states.shape[-2]
            if end > self._buffers[0].shape[2]:  # more than planned: grow by doubling
                self._buffers = tuple(self._grown(b, 2 * end) for b in self._buffers)
            self._buffers[0][:, :, self._length : end] = key_states
            self._buffers[1][:, :, self._length : end] = value_states
            self._length = end
            self.keys, self.values = (b[:, :, :end] for b in self._buffers)
            return self.keys, self.values

        def _grown(self, buffer: Any, size: int) -> Any:
            grown = buffer.new_empty(*buffer.shape[:2], size, buffer.shape[3])
            grown[:, :, : self._length] = buffer[:, :, : self._length]
            return grown

        def reorder_cache(self, beam_idx: Any) -> None:
            self.batch_select_indices(beam_idx)

        def batch_select_indices(self, indices: Any) -> None:
            if not self.is_initialized:
                return
            self._buffers = tuple(b.index_select(0, indices.to(b.device)) for b in self._buffers)
            self.keys, self.values = (b[:, :, : self._length] for b in self._buffers)

    return PreallocatedLayer


def _generate_batch(
    model: Any, chunk: list[list[int]], pad_id: int, stops: Any, max_new_tokens: int, device: Any
) -> list[list[int]]:
    """One batch: prefill, then one token per step; finished rows leave the batch and the
    cache."""
    import torch

    with_positions = _accepts(model, "position_ids")
    mask, token, cache = _prefill(model, chunk, pad_id, max_new_tokens, with_positions)
    answers: list[list[int]] = [[] for _ in chunk]
    live = torch.arange(len(chunk), device=device)  # the rows still generating
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

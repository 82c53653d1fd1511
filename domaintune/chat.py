"""Chat conversations as token ids, and the one rule for fitting them into
``training.max_length`` that training, evaluation and predict share.

A conversation is rendered with the model's own chat template. Training learns every
assistant turn (the prompt's other tokens have label -100). When a conversation is longer
than ``max_length``:

- the answer (the last assistant turn) keeps ``min(answer, max(max_length - prompt,
  max_length // 2))`` tokens: it is never cut to nothing, and it is cut only where the
  prompt alone would take more than half of the room;
- the prompt gets the rest. It is cut where it loses least: earlier exchanges go first
  (the system message and the last user turn stay), then the end of the last user message
  (its beginning, where an instruction stands, stays), and only as a last resort the
  prompt's first tokens (the generation header at its end always stays).

Evaluation and predict cut a prompt by the same function to
``prompt_budget(max_length, max_new_tokens)``: the room training would leave it beside an
answer of ``max_new_tokens`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def render(tokenizer: Any, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    """Token ids of ``messages`` in the model's chat template (with the assistant's
    generation header after them when ``generation_prompt``)."""
    return list(
        tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=generation_prompt,
            tokenize=True,
            return_dict=False,
        )
    )


def prompt_budget(max_length: int, max_new_tokens: int) -> int:
    """The most tokens a prompt keeps at evaluation and in predict: what training leaves a
    prompt beside an answer of ``max_new_tokens`` tokens."""
    return max_length - min(max_new_tokens, max_length // 2)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _cut_content(tokenizer: Any, text: str, tokens: int) -> str:
    """``text`` without its last ``tokens`` tokens (cut at a token boundary)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    keep = max(0, len(enc["input_ids"]) - tokens)
    return text[: enc["offset_mapping"][keep - 1][1]] if keep else ""


def fit_prompt(tokenizer: Any, messages: list[dict], budget: int) -> tuple[list[int], bool, list]:
    """(token ids, whether cut, the messages kept) of the prompt for the turn after
    ``messages``, in at most ``budget`` tokens (the module's rule)."""
    ids = render(tokenizer, messages, generation_prompt=True)
    if len(ids) <= budget:
        return ids, False, messages
    msgs = [dict(m) for m in messages]
    system = [m for m in msgs[:1] if m.get("role") == "system"]
    rest = msgs[len(system) :]
    last_user = max((i for i, m in enumerate(rest) if m.get("role") == "user"), default=0)
    # earlier exchanges first: the oldest turns before the last user message
    while last_user > 0 and len(ids) > budget:
        rest, last_user = rest[1:], last_user - 1
        ids = render(tokenizer, system + rest, generation_prompt=True)
    # then the end of the last user message, a few times (a cut can change the tokens
    # around it by one or two)
    for _ in range(4):
        if len(ids) <= budget or not rest:
            break
        content = str(rest[last_user].get("content", ""))
        cut = _cut_content(tokenizer, content, len(ids) - budget + 1)
        rest[last_user] = {**rest[last_user], "content": cut}
        ids = render(tokenizer, system + rest, generation_prompt=True)
    if len(ids) > budget:  # a system message or template longer than the room itself
        ids = ids[len(ids) - budget :]
    return ids, True, system + rest


def assistant_spans(tokenizer: Any, messages: list[dict]) -> list[tuple[int, int]]:
    """[start, end) token spans of the assistant turns of ``render(messages)`` (each with its
    end-of-turn tokens), found by rendering the conversation up to each turn."""
    spans = []
    full = render(tokenizer, messages)
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        start = _common_prefix(render(tokenizer, messages[:i], generation_prompt=True), full)
        end = _common_prefix(render(tokenizer, messages[: i + 1]), full)
        if end > start:
            spans.append((start, end))
    return spans


@dataclass(frozen=True)
class Encoded:
    """One training example: ids and labels (-100 outside assistant turns), fitted into
    ``max_length``; whether its prompt or its answer was cut; the answer's length before."""

    input_ids: list[int]
    labels: list[int]
    prompt_cut: bool
    answer_cut: bool
    answer_tokens: int


def encode_conversation(tokenizer: Any, messages: list[dict], max_length: int) -> Encoded:
    """A conversation ending with the assistant's answer, as a training example (the
    module's rule)."""
    prompt_msgs = messages[:-1]
    full = render(tokenizer, messages)
    prompt = render(tokenizer, prompt_msgs, generation_prompt=True)
    start = _common_prefix(prompt, full)  # the template's prompt is a prefix of the whole
    answer = full[start:]
    keep = min(len(answer), max(max_length - len(prompt), max_length // 2))
    prompt_ids, prompt_cut, kept = fit_prompt(tokenizer, prompt_msgs, max_length - keep)
    ids = prompt_ids + answer[:keep]
    labels = [-100] * len(prompt_ids) + answer[:keep]
    if any(m.get("role") == "assistant" for m in kept) and not (
        prompt_cut and len(prompt_ids) < len(render(tokenizer, kept, generation_prompt=True))
    ):
        # a multi-turn conversation: the earlier answers are learned too
        for a, b in assistant_spans(tokenizer, kept + [messages[-1]]):
            for t in range(a, min(b, len(prompt_ids))):
                labels[t] = ids[t]
    return Encoded(ids, labels, prompt_cut, keep < len(answer), len(answer))

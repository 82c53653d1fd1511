"""domaintune.chat: one rule fits a conversation into max_length for training, evaluation and
predict; the answer is never cut to nothing and the prompt keeps its instruction."""

from __future__ import annotations

import pytest

from domaintune.chat import encode_conversation, fit_prompt, prompt_budget, render

INSTRUCTION = "Write a short headline for this story."
STORY = " ".join(f"the bank reported profits rose in quarter {i} ." for i in range(60))


@pytest.fixture(scope="module")
def tok(tiny_causal_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_causal_model)


def conversation(user: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def learned(tok, enc) -> str:
    return tok.decode([t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != -100])


def test_a_short_conversation_is_kept_whole_and_only_its_answer_is_learned(tok):
    msgs = conversation(f"{INSTRUCTION} profits rose .", "Profits rise")
    enc = encode_conversation(tok, msgs, 128)
    assert enc.input_ids == render(tok, msgs)
    assert not enc.prompt_cut and not enc.answer_cut
    assert learned(tok, enc) == "Profits rise<|endoftext|>"
    prompt = render(tok, msgs[:-1], generation_prompt=True)
    assert enc.labels[: len(prompt)] == [-100] * len(prompt)
    assert enc.answer_tokens == len(enc.input_ids) - len(prompt)


def test_a_long_prompt_loses_the_end_of_its_story_not_its_instruction(tok):
    msgs = conversation(f"{INSTRUCTION} {STORY}", "Bank profits rise")
    enc = encode_conversation(tok, msgs, 64)
    assert len(enc.input_ids) <= 64 and enc.prompt_cut and not enc.answer_cut
    text = tok.decode(enc.input_ids)
    assert text.startswith(f"<|user|>{INSTRUCTION} the bank")
    assert text.endswith("<|assistant|>Bank profits rise<|endoftext|>"), "the template stays whole"
    assert learned(tok, enc) == "Bank profits rise<|endoftext|>"


def test_the_answer_is_never_cut_to_nothing(tok):
    long_answer = " ".join(["profits rose again"] * 40)
    enc = encode_conversation(tok, conversation(f"{INSTRUCTION} {STORY}", long_answer), 128)
    assert len(enc.input_ids) <= 128 and enc.prompt_cut and enc.answer_cut
    answer = [t for t in enc.labels if t != -100]
    assert len(answer) == 64, "prompt and answer share the room when both are long"
    assert tok.decode(enc.input_ids).startswith(f"<|user|>{INSTRUCTION}")
    # a short prompt leaves the answer all the room it does not need
    enc = encode_conversation(tok, conversation("Summarise .", long_answer), 64)
    prompt = render(tok, [{"role": "user", "content": "Summarise ."}], generation_prompt=True)
    assert not enc.prompt_cut and enc.answer_cut
    assert len(enc.input_ids) == 64 and len([t for t in enc.labels if t != -100]) == 64 - len(
        prompt
    )


def test_earlier_exchanges_go_first_and_earlier_answers_are_learned(tok):
    msgs = [
        {"role": "system", "content": "You answer bank customers ."},
        {"role": "user", "content": STORY[:300]},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "And the profits ?"},
        {"role": "assistant", "content": "second answer"},
    ]
    whole = encode_conversation(tok, msgs, 512)
    assert not whole.prompt_cut
    assert learned(tok, whole) == "first answer<|endoftext|>second answer<|endoftext|>"
    cut = encode_conversation(tok, msgs, 64)
    text = tok.decode(cut.input_ids)
    assert cut.prompt_cut and "first answer" not in text and STORY[:40] not in text
    assert text.startswith("<|system|>You answer bank customers .<|endoftext|><|user|>And the")
    assert learned(tok, cut) == "second answer<|endoftext|>"


def test_evaluation_cuts_a_prompt_as_training_did(tok):
    """Predict and evaluation cut to prompt_budget(max_length, max_new_tokens): the prompt
    training kept beside an answer of up to max_new_tokens tokens."""
    msgs = conversation(f"{INSTRUCTION} {STORY}", "Bank profits rise")
    enc = encode_conversation(tok, msgs, 64)
    answer = len([t for t in enc.labels if t != -100])
    ids, cut, _ = fit_prompt(tok, msgs[:-1], prompt_budget(64, answer))
    assert cut and enc.input_ids[: len(ids)] == ids
    assert prompt_budget(64, 8) == 56 and prompt_budget(64, 500) == 32

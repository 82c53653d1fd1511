"""domaintune.generation: greedy answers identical to model.generate's, finished rows leave
the batch, answers stop at the chat template's end of turn, max_new_tokens from the data."""

from __future__ import annotations

import pytest

from domaintune.chat import render
from domaintune.generation import (
    GenerationSettings,
    auto_max_new_tokens,
    generate_ids,
    generate_texts,
    stop_token_ids,
)


@pytest.fixture(scope="module")
def tiny(tiny_causal_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from domaintune.training.attention import CPU_ATTENTION, register

    register()
    tok = AutoTokenizer.from_pretrained(tiny_causal_model)
    model = AutoModelForCausalLM.from_pretrained(
        tiny_causal_model, attn_implementation=CPU_ATTENTION
    )
    return tok, model.eval()


def prompts(tok, sizes=(1, 7, 3, 12, 5)):
    return [
        render(tok, [{"role": "user", "content": "the bank reported " * k}], generation_prompt=True)
        for k in sizes
    ]


def reference(model, tok, prompt, max_new_tokens):
    """One prompt alone through model.generate (no padding): the greedy answer."""
    import torch

    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )[0, len(prompt) :].tolist()
    return out[: out.index(tok.eos_token_id)] if tok.eos_token_id in out else out


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_greedy_answers_are_model_generates_in_any_batch(tiny, batch_size):
    tok, model = tiny
    ps = prompts(tok)
    got = generate_ids(
        model, ps, pad_id=tok.pad_token_id, stop_ids=stop_token_ids(tok),
        max_new_tokens=24, batch_size=batch_size,
    )  # fmt: skip
    assert got == [reference(model, tok, p, 24) for p in ps]
    assert all(len(a) <= 24 for a in got)


def test_rows_that_end_leave_the_batch_and_are_reported(tiny):
    tok, model = tiny
    ps = prompts(tok)
    # stop at the token the first prompt's answer starts with: that row ends at once, the
    # others go on without it
    first = reference(model, tok, ps[0], 1)[0]
    seen = []
    got = generate_ids(
        model, ps, pad_id=tok.pad_token_id, stop_ids=[first], max_new_tokens=10,
        batch_size=len(ps), on_batch=lambda rows, tokens: seen.append((rows, tokens)),
    )  # fmt: skip
    assert got[0] == []
    # reported as they end, not when the batch ends: the first report at the first step
    assert len(seen) > 1 and seen[0][0] >= 1
    assert sum(r for r, _ in seen) == len(ps)
    assert sum(t for _, t in seen) == sum(len(a) + 1 for a in got)
    texts = generate_texts(model, tok, ps, GenerationSettings(max_new_tokens=10, batch_size=2))
    assert texts == [tok.decode(reference(model, tok, p, 10)).strip() for p in ps]


def test_waiting_prompts_join_the_running_batch(tiny, monkeypatch):
    """Continuous batching: with two places and five prompts of different lengths, prompts
    join a batch that is already decoding (their caches right-aligned beside the running
    rows', shorter or longer) and every answer is still model.generate's."""
    from domaintune import generation

    tok, model = tiny
    ps = prompts(tok, sizes=(1, 9, 2, 14, 4, 6, 3))
    joins = []
    real = generation._Running.join
    monkeypatch.setattr(
        generation._Running, "join",
        lambda self, other, room: (joins.append((self.mask.shape[1], other.mask.shape[1])),
                                   real(self, other, room)),
    )  # fmt: skip
    got = generate_ids(
        model, ps, pad_id=tok.pad_token_id, stop_ids=stop_token_ids(tok),
        max_new_tokens=20, batch_size=2,
    )  # fmt: skip
    assert got == [reference(model, tok, p, 20) for p in ps]
    assert joins, "no prompt joined a running batch"
    assert any(theirs > mine for mine, theirs in joins)  # the running rows shift right
    assert any(theirs < mine for mine, theirs in joins)  # the joining rows do


def test_sliding_window_models_generate_batch_after_batch(tiny):
    """A model with sliding-window layers (Gemma 3) cannot take new rows into its windowed
    caches: it generates batch after batch, with the same answers as model.generate."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    from domaintune import generation

    tok, llama = tiny
    assert generation._joinable(llama)
    config = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        pad_token_id=tok.pad_token_id or 0, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert not generation._joinable(model)
    ps = prompts(tok)
    got = generate_ids(
        model, ps, pad_id=tok.pad_token_id, stop_ids=stop_token_ids(tok),
        max_new_tokens=12, batch_size=2,
    )  # fmt: skip
    assert got == [reference(model, tok, p, 12) for p in ps]


def test_answers_stop_at_the_templates_end_of_turn(tmp_path, tiny):
    """A ChatML-style template closes an assistant turn with its own token, not with the
    end-of-sequence token: generation stops there too."""
    tok, _ = tiny
    tok = type(tok).from_pretrained(tok.name_or_path)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(tok) == sorted({tok.eos_token_id, end})


def test_max_new_tokens_auto_leaves_room_for_the_training_answers():
    assert auto_max_new_tokens({"p99": 20}, 256) == 32  # 1.25 x 20, rounded up to 8
    assert auto_max_new_tokens({"p99": 400}, 384) == 384  # never more than max_length
    assert auto_max_new_tokens(None, 512) == 128  # lengths unknown


def test_bf16_weights_cast_once_give_autocasts_answers(tiny_causal_model):
    """Generation under bf16 autocast with the linear weights cast to bf16 beforehand (not on
    every step): the same answers; the input embeddings stay fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from domaintune.generation import cast_for_generation

    tok = AutoTokenizer.from_pretrained(tiny_causal_model)
    ps = prompts(tok)
    answers = []
    for cast in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_causal_model).eval()
        if cast:
            cast_for_generation(model, "bf16")
            assert model.get_input_embeddings().weight.dtype == torch.float32
            assert model.get_output_embeddings().weight.dtype == torch.bfloat16
        with torch.autocast("cpu", dtype=torch.bfloat16):
            answers.append(
                generate_ids(
                    model,
                    ps,
                    pad_id=tok.pad_token_id,
                    stop_ids=stop_token_ids(tok),
                    max_new_tokens=16,
                    batch_size=3,
                )  # fmt: skip
            )
    assert answers[0] == answers[1]

"""Padding-free SFT batches: examples end to end in one row give each example exactly the
logits it has alone (no attention crosses examples), and the answer-only output layer gives
the model's own loss and gradients."""

from __future__ import annotations

import pytest
import torch

from domaintune.chat import encode_conversation
from domaintune.tasktypes import get_task_type
from domaintune.training.trainer import answer_only_loss


@pytest.fixture(scope="module")
def tiny(tiny_causal_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from domaintune.training.attention import CPU_ATTENTION, register

    register()
    tok = AutoTokenizer.from_pretrained(tiny_causal_model)
    model = AutoModelForCausalLM.from_pretrained(
        tiny_causal_model, attn_implementation=CPU_ATTENTION
    )
    sdpa = AutoModelForCausalLM.from_pretrained(tiny_causal_model, attn_implementation="sdpa")
    return tok, model.eval(), sdpa.eval()


def examples(tok):
    return [
        encode_conversation(
            tok,
            [
                {"role": "user", "content": "the bank reported " * k},
                {"role": "assistant", "content": "profits rose " * (k % 3 + 1)},
            ],
            96,
        )
        for k in (2, 9, 4, 1)
    ]


def packed_batch(tok, encoded):
    collate = get_task_type("instruction_tuning").padding_free_collator(tok)
    return collate([{"input_ids": e.input_ids, "labels": e.labels} for e in encoded])


def alone(model, encoded):
    return torch.cat([model(input_ids=torch.tensor([e.input_ids])).logits[0] for e in encoded])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_packed_row_gives_each_example_its_own_logits(tiny, precision):
    tok, model, _ = tiny
    encoded = examples(tok)
    batch = packed_batch(tok, encoded)
    assert batch["input_ids"].shape == (1, sum(len(e.input_ids) for e in encoded))
    assert "attention_mask" not in batch, "no padding, no mask"
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
        packed = model(**inputs).logits[0].float()
        separate = alone(model, encoded).float()
    assert torch.allclose(packed, separate, atol=1e-5 if precision == "fp32" else 2e-2)


def test_without_a_cache_transformers_kernels_see_the_examples_too(tiny):
    """On a GPU (SDPA without FlashAttention-2) the boundaries come from the restarting
    positions; training runs without a key/value cache, which that detection needs."""
    tok, _, sdpa = tiny
    encoded = examples(tok)
    batch = packed_batch(tok, encoded)
    with torch.no_grad():
        packed = sdpa(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits[0]
        assert torch.allclose(packed, alone(sdpa, encoded), atol=1e-5)


def test_the_answer_only_output_layer_gives_the_models_loss_and_gradients(tiny):
    tok, model, _ = tiny
    batch = packed_batch(tok, examples(tok))
    first_labels = batch["labels"][0, batch["cu_seq_lens_q"][:-1].long()]
    assert (first_labels == -100).all(), "no example learns the next one's first token"
    model.zero_grad()
    full = model(**batch).loss
    full.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss, outputs, scaled = answer_only_loss(model, batch)
    loss.backward()
    assert not scaled and torch.allclose(loss, full, atol=1e-6)
    learned = int((batch["labels"][:, 1:] != -100).sum())
    assert outputs.logits.shape[1] == learned < batch["input_ids"].shape[1] / 2
    for p, g in zip(model.parameters(), expected, strict=True):
        assert torch.allclose(p.grad, g, atol=1e-6)
    # over an accumulated batch: divided by its learned tokens, as transformers does
    loss, _, scaled = answer_only_loss(model, batch, num_items_in_batch=2 * learned)
    assert scaled and torch.allclose(loss, full / 2, atol=1e-6)


def test_a_sliding_window_layer_sees_as_far_back_packed_as_alone(tiny):
    """Gemma 3's local layers attend to the last ``sliding_window`` tokens only: packed, an
    example longer than the window gets the banded mask transformers gives it alone."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    from domaintune.training.attention import CPU_ATTENTION

    tok = tiny[0]
    config = Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        pad_token_id=tok.pad_token_id or 0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=CPU_ATTENTION).eval()
    encoded = examples(tok)
    assert max(len(e.input_ids) for e in encoded) > 4 * config.sliding_window
    batch = packed_batch(tok, encoded)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       cu_seq_lens_q=batch["cu_seq_lens_q"], cu_seq_lens_k=batch["cu_seq_lens_k"],
                       max_length_q=batch["max_length_q"], max_length_k=batch["max_length_k"],
                       use_cache=False).logits[0]  # fmt: skip
        assert torch.allclose(packed, alone(model, encoded), atol=1e-5)

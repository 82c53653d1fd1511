"""The CPU training kernels: dropout with cheaper masks, attention with that dropout, the
fp32 attention kernel under bf16, and gradient clipping that skips the no-op multiply
(domaintune.training.dropout / .attention / .clipping)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from domaintune.training.attention import CPU_ATTENTION, _cpu_attention
from domaintune.training.clipping import clip_grad_norm
from domaintune.training.dropout import CpuDropout, dropout, keep_mask, use_cpu_dropout


def drop_mask(shape, p):
    """(True where keep_mask drops, the scale)"""
    keep, scale = keep_mask(shape, p)
    assert keep.dtype == torch.uint8 and int(keep.max()) <= 1
    return keep == 0, scale


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_masks_drop_at_the_rate_asked_and_keep_the_expectation(p):
    torch.manual_seed(0)
    drop, scale = drop_mask((1000, 1000), p)
    assert drop.dtype == torch.bool and drop.shape == (1000, 1000)
    dropped = round(p * 32768) / 32768
    assert abs(dropped - p) <= 1 / 65536
    assert scale == pytest.approx(1 / (1 - dropped), rel=1e-12)
    # 1e6 draws: the share dropped is within 5 standard deviations of p
    assert abs(drop.float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / 1e6)
    # the two 15-bit halves of each draw are both used, both uniform
    halves = drop.view(-1, 2).float().mean(0)
    assert torch.allclose(halves, torch.full((2,), p), atol=5 * math.sqrt(p * (1 - p) / 5e5))


def test_masks_follow_the_torch_seed_and_change_between_calls():
    torch.manual_seed(7)
    a, _ = drop_mask((64, 48), 0.1)
    b, _ = drop_mask((64, 48), 0.1)
    torch.manual_seed(7)
    again, _ = drop_mask((64, 48), 0.1)
    assert torch.equal(a, again) and not torch.equal(a, b)
    odd, _ = drop_mask((3, 5, 7), 0.1)  # an odd number of elements
    assert odd.shape == (3, 5, 7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_scales_what_it_keeps_and_its_gradient_is_the_same_mask(dtype):
    x = torch.randn(32, 48, 64, dtype=dtype, requires_grad=True)
    torch.manual_seed(3)
    y = dropout(x, 0.25)
    torch.manual_seed(3)
    drop, scale = drop_mask(x.shape, 0.25)
    assert y.dtype == dtype and 0.2 < drop.float().mean() < 0.3
    assert torch.equal(y == 0, drop | (x == 0))
    # what is kept is x * scale rounded once, not x times a rounded scale (in bf16, 1/0.75
    # rounded would bias every kept value); no bias beyond the rounding of each element
    kept = y.detach()[~drop].double() / x.detach()[~drop].double()
    eps = torch.finfo(dtype).eps
    assert (kept - scale).abs().max() <= eps * scale
    assert abs(kept.mean().item() - scale) < 1e-4
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad == 0, drop)
    assert torch.equal(x.grad[~drop], torch.full_like(x.grad[~drop], scale))
    assert dropout(x, 0.25, training=False) is x and dropout(x, 0.0) is x


def test_a_model_gets_the_cpu_masks_and_stays_the_same_model(tiny_model):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    plain = AutoModelForSequenceClassification.from_pretrained(str(tiny_model), num_labels=3)
    torch.manual_seed(0)
    ours = AutoModelForSequenceClassification.from_pretrained(str(tiny_model), num_labels=3)
    count = use_cpu_dropout(ours)
    assert count == sum(isinstance(m, torch.nn.Dropout) for m in plain.modules()) > 0
    assert all(type(m) is CpuDropout for m in ours.modules() if isinstance(m, torch.nn.Dropout))
    assert plain.state_dict().keys() == ours.state_dict().keys()
    ids = torch.randint(5, 90, (4, 16))
    with torch.no_grad():  # evaluation: no dropout, the same outputs
        assert torch.equal(plain.eval()(input_ids=ids).logits, ours.eval()(input_ids=ids).logits)
    ours.train()
    torch.manual_seed(1)
    first = ours(input_ids=ids, labels=torch.tensor([0, 1, 2, 0])).loss
    torch.manual_seed(1)
    again = ours(input_ids=ids, labels=torch.tensor([0, 1, 2, 0])).loss
    assert torch.equal(first, again) and torch.isfinite(first)
    first.backward()
    assert all(p.grad is not None for p in ours.parameters() if p.requires_grad)


def _reference(q, k, v, mask, p, causal=False, groups=1):
    """softmax(q k^T / sqrt(d) + mask) with the masks drop_mask draws, times v."""
    if groups > 1:
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
    elif mask is not None:
        scores = scores + mask
    elif causal:
        allowed = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
        scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
    probs = scores.softmax(-1)
    drop, scale = drop_mask(probs.shape, p)
    return ((probs * scale).masked_fill(drop, 0) @ v.float()).transpose(1, 2)


@pytest.mark.parametrize("case", ["bool mask", "float mask", "causal, grouped kv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_with_dropout_is_the_math_with_the_cpu_masks(case, dtype):
    """transformers' SDPA mask conventions: boolean True attends, a float mask is added, no
    mask on a causal module is causal; key/value heads shared by groups of query heads."""
    torch.manual_seed(0)
    b, h, t, d = 3, 4, 10, 8
    groups = 2 if case.startswith("causal") else 1
    q = torch.randn(b, h, t, d, dtype=dtype)
    k, v = (torch.randn(b, h // groups, t, d, dtype=dtype) for _ in range(2))
    module = SimpleNamespace(is_causal=case.startswith("causal"), num_key_value_groups=groups)
    mask = None
    if case == "bool mask":
        mask = torch.ones(b, 1, t, t, dtype=torch.bool)
        mask[0, :, :, 6:] = False  # padding
    elif case == "float mask":
        mask = torch.zeros(b, 1, t, t)
        mask[1, :, :, 7:] = torch.finfo(torch.float32).min
    torch.manual_seed(5)
    out, weights = _cpu_attention(module, q, k, v, mask, dropout=0.3)
    torch.manual_seed(5)
    expected = _reference(q, k, v, mask, 0.3, causal=module.is_causal, groups=groups)
    assert weights is None and out.dtype == dtype and out.shape == (b, t, h, d)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(out.float(), expected, atol=tolerance)


def test_attention_without_dropout_is_sdpa(tiny_model):
    """Evaluation (no dropout) in fp32 is transformers' SDPA itself; a model loaded with the
    CPU function gives the SDPA model's outputs, and its saved config does not name it."""
    from transformers import AutoModelForSequenceClassification

    from domaintune.training.attention import attention_implementation, register

    register()
    assert attention_implementation("auto", "fp32", str(tiny_model)) == CPU_ATTENTION

    def model(impl):
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(
            str(tiny_model), num_labels=3, attn_implementation=impl
        ).eval()

    ids = torch.randint(5, 90, (4, 24))
    mask = torch.ones_like(ids)
    mask[:2, 12:] = 0
    with torch.no_grad():
        ours = model(CPU_ATTENTION)(input_ids=ids, attention_mask=mask).logits
        sdpa = model("sdpa")(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(ours, sdpa)  # the same masks and kernel
    assert CPU_ATTENTION not in model(CPU_ATTENTION).config.to_json_string()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_padding_is_masked_with_the_cpu_attention(precision):
    """A padded sentence gets the logits it gets alone. transformers builds no mask at all
    for an attention function its mask interface does not know: padding would be attended."""
    from transformers import BertConfig, BertForSequenceClassification

    from domaintune.training.attention import register

    register()
    torch.manual_seed(0)
    # large initial weights: peaked attention, so that attended padding would show
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, num_labels=3,
                        initializer_range=0.5)  # fmt: skip
    config._attn_implementation = CPU_ATTENTION
    model = BertForSequenceClassification(config).eval()
    ids = torch.randint(5, 90, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
        padded = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state[0, :6]
        alone = model.bert(input_ids=ids[:1, :6]).last_hidden_state[0]
        attended = model.bert(input_ids=ids[:1]).last_hidden_state[0, :6]
    error = (padded.float() - alone.float()).abs().max()
    # the control: attending to the six padding tokens changes the states by far more
    assert (attended.float() - alone.float()).abs().max() > 0.1
    assert error < (1e-5 if precision == "fp32" else 0.02)


@pytest.mark.parametrize("max_norm", [1e-3, 1.0, 1e6, "nan"])
def test_clipping_gives_torchs_gradients_bit_for_bit(max_norm):
    """Clipping (1e-3), at the edge (1.0 on a norm near 1), nothing to clip (1e6), and a
    non-finite gradient: the same gradients and norm as torch.nn.utils.clip_grad_norm_."""
    torch.manual_seed(3)
    shapes = [(64, 32), (32,), (7, 5, 3), (1,)]
    grads = [torch.randn(s) for s in shapes]
    scale = 1 / torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
    grads = [g * scale for g in grads]  # total norm ~1
    if max_norm == "nan":
        grads[1][3] = float("nan")
        max_norm = 1.0
    ours = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    theirs = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for a, b, g in zip(ours, theirs, grads, strict=True):
        a.grad, b.grad = g.clone(), g.clone()
    frozen = torch.nn.Parameter(torch.zeros(3))  # no gradient: skipped by both
    norm = clip_grad_norm([*ours, frozen], max_norm)
    expected = torch.nn.utils.clip_grad_norm_([*theirs, frozen], max_norm)
    assert torch.equal(norm, expected) or (norm.isnan() and expected.isnan())
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a.grad.nan_to_num(), b.grad.nan_to_num())
        assert torch.equal(a.grad.isnan(), b.grad.isnan())


def test_a_dropped_nan_stays_nan_as_with_torchs_dropout():
    """A diverged activation is not hidden by the mask (PyTorch's CPU dropout multiplies)."""
    x = torch.full((64, 64), float("nan"))
    y = dropout(x, 0.5)
    assert torch.isnan(y).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_token_against_a_cache_is_sdpa_without_repeating_the_cache(dtype):
    """Generation's decode step: query heads grouped by their shared key/value head (GQA),
    left padding masked, the result of SDPA on the repeated cache."""
    torch.manual_seed(0)
    batch, heads, kv_heads, cached, dim = 5, 6, 2, 17, 8
    q = torch.randn(batch, heads, 1, dim).to(dtype)
    k, v = (torch.randn(batch, kv_heads, cached, dim).to(dtype) for _ in range(2))
    mask = torch.ones(batch, 1, 1, cached, dtype=torch.bool)
    mask[1, ..., :4] = mask[3, ..., :9] = False  # left padding
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True, training=False)
    out, _ = _cpu_attention(module, q, k, v, mask, scaling=dim**-0.5)
    repeat = heads // kv_heads
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.float(),
        k.float().repeat_interleave(repeat, dim=1),
        v.float().repeat_interleave(repeat, dim=1),
        attn_mask=mask,
        scale=dim**-0.5,
    ).transpose(1, 2)
    assert out.shape == (batch, 1, heads, dim) and out.dtype == dtype
    assert torch.allclose(out.float(), expected, atol=1e-6 if dtype == torch.float32 else 1e-2)
